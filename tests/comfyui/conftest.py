"""The pack inside a real ComfyUI 0.8.0 (CPU) and its real frontend (comfyui-frontend-package 1.35.9).

Runs in run_tests.sh's comfyui stage (LORA_TRAINER_COMFYUI=1), or when tests/comfyui is named on the
command line; a plain `pytest` over tests/ leaves it out. `bash .ci/setup.sh comfyui` provides
ComfyUI's source (.ci/envs/comfyui-src) and the overlay it needs (.ci/envs/comfyui); without the
source every test here is skipped.

One server per session: `python .ci/envs/comfyui-src/main.py --cpu` with this interpreter (.venv's
torch) and the overlay on PYTHONPATH, a temporary --base-directory whose custom_nodes/lora-scripts links
to this repository (or to COMFYUI_TEST_PACK, another checkout), and its log in <base>/comfyui.log
(printed when a test of the session failed).

The checkpoint is random weights in the real SD1.5 architecture: ComfyUI detects a model by its
UNet's shape (SD15 wants model_channels 320 and context_dim 768) and builds the CLIP and VAE at
their real sizes, so the tests' tiny model cannot load there ("Could not detect model type").
It is built once with the same code as the tiny ones (build_random_components, variant "base";
tests/ldm_layout.py writes the single file) and kept in .ci/envs/comfyui-cache (COMFYUI_TEST_CACHE).
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
COMFYUI_SRC = ROOT / ".ci" / "envs" / "comfyui-src"
COMFYUI_OVERLAY = ROOT / ".ci" / "envs" / "comfyui"
SKIP_REASON = "no ComfyUI 0.8.0 here: .ci/envs/comfyui-src/main.py is absent (bash .ci/setup.sh comfyui)"
PACK_FOLDER = "lora-scripts"  # the folder name under custom_nodes/, as a git clone names it
PACK = Path(os.environ.get("COMFYUI_TEST_PACK") or ROOT)  # another checkout of the pack to run, if given
CHECKPOINT = "random-sd15.safetensors"


def _selected(config) -> bool:
    if os.environ.get("LORA_TRAINER_COMFYUI"):
        return True
    for arg in config.args:
        path = (Path(config.invocation_params.dir) / arg.split("::")[0]).resolve()
        if path == HERE or HERE in path.parents:
            return True
    return False


def pytest_ignore_collect(collection_path, config):
    if collection_path.name.startswith("test_") and collection_path.suffix == ".py" and not _selected(config):
        return True
    return None


def pytest_collection_modifyitems(config, items):
    if (COMFYUI_SRC / "main.py").is_file():
        return
    skip = pytest.mark.skip(reason=SKIP_REASON)
    for item in items:
        if HERE in Path(str(item.path)).resolve().parents:
            item.add_marker(skip)


class ComfyServer:
    """A running ComfyUI: its URL, its base directory and log, and the few API calls the tests make."""

    def __init__(self, base: Path, port: int, proc: subprocess.Popen, log: Path):
        self.base, self.port, self.proc, self.log_path = base, port, proc, log
        self.url = f"http://127.0.0.1:{port}"

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def log_tail(self, lines: int = 120) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    def get(self, path: str, timeout: float = 30):
        with urllib.request.urlopen(self.url + path, timeout=timeout) as r:
            return json.loads(r.read())

    def post(self, path: str, body: dict, timeout: float = 30):
        req = urllib.request.Request(self.url + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:  # /prompt answers 400 with the validation errors
            raise AssertionError(f"POST {path}: {e.code} {e.read().decode(errors='replace')}") from None

    def queue(self, prompt: dict) -> str:
        return self.post("/prompt", {"prompt": prompt, "client_id": "lora-scripts-tests"})["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = 900) -> dict:
        """The history entry of a finished prompt; fails with the server log on an error or a timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"ComfyUI exited ({self.proc.returncode}):\n{self.log_tail()}"
            entry = self.get(f"/history/{prompt_id}").get(prompt_id)
            status = (entry or {}).get("status") or {}
            if status.get("status_str") == "error":
                errors = [m for m in status.get("messages", []) if m[0] == "execution_error"]
                pytest.fail(f"prompt {prompt_id} failed: {json.dumps(errors, indent=1)[:4000]}\n"
                            f"--- ComfyUI log (tail) ---\n{self.log_tail()}")
            if status.get("completed"):
                return entry
            time.sleep(0.5)
        pytest.fail(f"prompt {prompt_id} did not finish in {timeout:.0f}s\n--- ComfyUI log (tail) ---\n"
                    f"{self.log_tail()}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def comfy_base(tmp_path_factory):
    """ComfyUI's --base-directory: models/ (checkpoints, loras), custom_nodes/lora-scripts → this repo, user/."""
    base = tmp_path_factory.mktemp("comfyui")
    for sub in ("models/checkpoints", "models/loras", "custom_nodes", "input", "output", "user/default"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    (base / "custom_nodes" / PACK_FOLDER).symlink_to(PACK, target_is_directory=True)
    # A returning user's settings: no first-run tutorial/templates over the canvas, no minimap in the screenshot.
    (base / "user" / "default" / "comfy.settings.json").write_text(
        json.dumps({"Comfy.TutorialCompleted": True, "Comfy.Minimap.Visible": False}), encoding="utf-8")
    return base


@pytest.fixture(scope="session")
def comfy_server(comfy_base, request):
    if not (COMFYUI_SRC / "main.py").is_file():
        pytest.skip(SKIP_REASON)
    port = _free_port()
    log = comfy_base / "comfyui.log"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(COMFYUI_OVERLAY), *filter(None, [env.get("PYTHONPATH")])])
    cmd = [sys.executable, str(COMFYUI_SRC / "main.py"), "--cpu", "--listen", "127.0.0.1", "--port", str(port),
           "--base-directory", str(comfy_base), "--disable-auto-launch", "--disable-api-nodes",
           # the default database is <source>/user/comfyui.db: keep the source tree clean
           "--database-url", f"sqlite:///{comfy_base / 'comfyui.db'}"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=comfy_base, env=env)
    server = ComfyServer(comfy_base, port, proc, log)
    try:
        deadline = time.monotonic() + 240
        while True:
            if proc.poll() is not None:
                pytest.fail(f"ComfyUI exited at start ({proc.returncode}):\n{server.log_tail(200)}")
            try:
                server.get("/object_info/CheckpointLoaderSimple", timeout=5)
                break
            except (OSError, ValueError):
                if time.monotonic() > deadline:
                    pytest.fail(f"ComfyUI did not answer in 240s:\n{server.log_tail(200)}")
                time.sleep(1)
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(30)
        if request.session.testsfailed:  # past pytest's capture: this teardown belongs to a test that may pass
            capture = request.config.pluginmanager.getplugin("capturemanager")
            with capture.global_and_fixture_disabled():
                print(f"\n--- ComfyUI log ({log}) ---\n{server.log()}--- end of the ComfyUI log ---", flush=True)


_BUILD_CHECKPOINT = """
import sys, torch
sys.path.insert(0, sys.argv[2])
from lora_trainer.model.tiny import build_random_components
from ldm_layout import save_ldm_file
save_ldm_file(build_random_components("sd1", "base", seed=0), sys.argv[1], dtype=torch.float16)
"""


def _checkpoint_key() -> str:
    digest = hashlib.sha256()
    files = sorted((ROOT / "lora_trainer" / "model" / "configs" / "sd1" / "base").glob("*.json"))
    files += [ROOT / "tests" / "ldm_layout.py", ROOT / "lora_trainer" / "model" / "tiny.py",
              ROOT / "lora_trainer" / "model" / "factory.py"]
    for path in files:
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:12]


@pytest.fixture(scope="session")
def sd15_checkpoint(comfy_base):
    """A random-weight SD1.5 single file (fp16, 2.1 GB) in <base>/models/checkpoints; its name for ckpt_name.

    Built in a child process (it peaks at about 7 GB) once per content of the code that writes it.
    """
    cache = Path(os.environ.get("COMFYUI_TEST_CACHE") or ROOT / ".ci" / "envs" / "comfyui-cache")
    cache.mkdir(parents=True, exist_ok=True)
    cached = cache / f"random-sd15-{_checkpoint_key()}.safetensors"
    if not cached.is_file():
        for old in cache.glob("random-sd15-*.safetensors"):
            old.unlink()
        tmp = cached.with_suffix(".tmp")
        subprocess.run([sys.executable, "-c", _BUILD_CHECKPOINT, str(tmp), str(ROOT / "tests")], cwd=ROOT,
                       check=True)
        tmp.rename(cached)
    (comfy_base / "models" / "checkpoints" / CHECKPOINT).symlink_to(cached)
    return CHECKPOINT


@pytest.fixture(scope="session")
def captioned_dataset(comfy_base):
    """Four demo images with their captions (metadata.csv): Caption Folder keeps them, no captioner needed."""
    from lora_trainer.cli.demo_data import make_demo_images

    return make_demo_images(comfy_base / "dataset", n=4)


@pytest.fixture(scope="session")
def example_workflow():
    """Reads the pack's example_workflows/<the first of the given names that exists>."""

    def load(*candidates: str) -> dict:
        for name in candidates:
            path = PACK / "example_workflows" / name
            if path.is_file():
                return json.loads(path.read_text(encoding="utf-8"))
        raise AssertionError(f"none of {', '.join('example_workflows/' + c for c in candidates)} exists")

    return load
