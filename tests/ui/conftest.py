"""The UI tests run only in their own stages (run_tests.sh: LORA_TRAINER_UI=gradio3 / gradio4 / gradio6, each
with that gradio overlay on PYTHONPATH), once per gradio version rather than once per host stack.
Fixtures (tiny_sd1, demo_folder, ...) come from tests/conftest.py."""

import os

if not os.environ.get("LORA_TRAINER_UI"):
    collect_ignore_glob = ["test_*.py"]
elif os.environ["LORA_TRAINER_UI"] == "gradio3":
    # the browser tests: Forge's gradio 4 and the newest (standalone UI)
    collect_ignore_glob = ["test_ui_browser.py", "test_report_browser.py"]
