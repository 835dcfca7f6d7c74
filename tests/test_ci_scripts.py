"""The test command's own scripts: pip's noise is explained, not shown; ComfyUI's source comes before the stacks."""

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PIP_STDERR = """\
WARNING: Location 'file:///wheels/' is ignored: it is neither a file nor a directory.
ERROR: pip's dependency resolver does not currently take into account all the packages that are installed. \
This behaviour is the source of the following dependency conflicts.
gradio 4.40.0 requires fastapi<1.0, but you have fastapi 1.2.0 which is incompatible.
open-clip-torch 2.32.0 requires timm, which is not installed.
WARNING: a warning a user should still see
"""


def test_pip_filter_counts_resolver_conflicts_in_one_line_and_keeps_the_rest():
    done = subprocess.run(["bash", "-c", "source .ci/setup.sh && pip_filter"], cwd=ROOT, input=PIP_STDERR,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    lines = done.stderr.splitlines()
    assert "WARNING: a warning a user should still see" in lines
    assert not any("ERROR" in line or "is ignored" in line or "requires" in line for line in lines), lines
    assert sum(line.startswith("[setup] note: pip listed 2 version conflict(s)") for line in lines) == 1, lines


def test_comfyui_source_is_set_up_before_the_stacks_run():
    script = (ROOT / "run_tests.sh").read_text(encoding="utf-8").splitlines()
    setup = next(i for i, line in enumerate(script) if "bash .ci/setup.sh comfyui" in line)
    stacks = next(i for i, line in enumerate(script) if line.startswith("for stack in $STACKS"))
    assert setup < stacks  # the stacks' DoRA-in-ComfyUI check reads ComfyUI's code
