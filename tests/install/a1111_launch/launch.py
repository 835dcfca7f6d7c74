"""Stand-in for A1111's `launch` module as an extension's install.py sees it (A1111 v1.10.1 runs install.py
with PYTHONPATH = its root; `launch.run_pip` is modules/launch_utils.run_pip): the same shell command line,
`"<python>" -m pip <command> --prefer-binary`, run with shell=True, an error raised on failure."""

import subprocess
import sys

python = sys.executable


def run_pip(command, desc=None, live=False):
    line = f'"{python}" -m pip {command} --prefer-binary'
    result = subprocess.run(line, shell=True, capture_output=not live, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"Couldn't install {desc}.\nCommand: {line}\nError code: {result.returncode}\n"
                           f"stderr: {result.stderr}")
    return result.stdout or ""
