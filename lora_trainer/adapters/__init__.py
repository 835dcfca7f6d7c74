"""The adapter stage: what is trained on top of the base model, and the file it becomes.

- `lora`: attaching LoRA (peft) to the UNet and text encoders, and reading its weights back;
- `dora`: DoRA's magnitude per input column (the layout A1111, ComfyUI and Forge apply);
- `keymap`: diffusers/peft module names ↔ kohya's `lora_unet_…` / `lora_te…` names;
- `export`: the kohya-layout .safetensors with its ss_* metadata, and reading any LoRA file;
- `merge`, `resize`: LoRAs baked into a checkpoint, combined, or shrunk by SVD.

A new adapter type (LoHa, LoKr) goes here: its layers, its key layout in `keymap`/`export`.
"""
