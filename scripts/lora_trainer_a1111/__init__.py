"""A1111 / Forge glue for the Train LoRA tab (A1111 runs only the top-level .py files of scripts/ as scripts)."""
