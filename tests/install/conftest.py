"""install.py against a real host environment: only in run_tests.sh's install stage, which builds the venv
(.ci/setup.sh a1111-host) and names it in LORA_TRAINER_HOST_VENV."""

import os

if not os.environ.get("LORA_TRAINER_HOST_VENV"):
    collect_ignore_glob = ["test_*.py"]
