"""Data-parallel training through torchrun: two gloo processes on the CPU against one process at twice the batch.

The runs go through the real CLI (`python -m lora_trainer train --gpus 2` with device: cpu), so torchrun's
launcher, the c10d rendezvous, the gloo process group and DDP are the real ones.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from lora_trainer.cli.commands import main
from lora_trainer.training.distributed import Processes
from lora_trainer.errors import ResumeError

ROOT = Path(__file__).resolve().parents[1]
# The launcher, Ctrl-C, failure and rendezvous paths are torch's and ours alone: once, on the newest stack. The
# equivalence test runs on every stack (their diffusers and peft compute the gradients).
once = pytest.mark.once
# 8 images at batch_size 3 × 2 processes: global batches of 6 and 2, so in every epoch's short batch rank 1 has
# no image at all (it runs one at weight 0). Two micro-batches per step; flips, caption dropout, noise offset.
SETTINGS = dict(resolution=64, min_bucket_reso=64, max_bucket_reso=128, lora_rank=4, lora_alpha=4, batch_size=3,
                gradient_accumulation_steps=2, max_train_steps=8, learning_rate=1e-3, seed=5, device="cpu",
                save_precision="fp32", flip_aug=True, caption_dropout_rate=0.3, noise_offset=0.05,
                lr_scheduler="cosine", lr_warmup_steps=2, save_steps=4, output_name="lora")


def write_config(path: Path, data: Path, base: Path, out: Path, **changes) -> Path:
    values = dict(SETTINGS, train_data_dir=str(data), metadata_path=str(data / "metadata.csv"), base_model=str(base),
                  output_dir=str(out), validation_dir=str(data.parent / "validation"))
    values.update(changes)
    path.write_text("".join(f"{k}: {v}\n" for k, v in values.items()), encoding="utf-8")
    return path


def cli(*args: str, hook: Path | None = None, **popen) -> subprocess.Popen:
    """`python -m lora_trainer train ARGS` in its own process; `hook` is a folder put first on its path."""
    path = [str(hook)] if hook else []
    stack = [os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []  # a host stack's overlay
    environ = dict(os.environ, PYTHONPATH=os.pathsep.join([*path, str(ROOT), *stack]), OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "lora_trainer", "train", *args], cwd=ROOT, env=environ,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def finish(proc: subprocess.Popen, timeout: float = 300) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def assert_same_lora(a: Path, b: Path) -> None:
    ta, tb = load_file(str(a)), load_file(str(b))
    assert ta.keys() == tb.keys()
    assert max(ta[k].abs().max().item() for k in ta if "lora_up" in k) > 1e-4  # trained: lora_up starts at zero
    for key in ta:
        torch.testing.assert_close(ta[key], tb[key], rtol=1e-4, atol=2e-5, msg=key)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from ldm_layout import save_ldm_file

    from lora_trainer.cli.demo_data import make_demo_images
    from lora_trainer.model import build_tiny_components

    root = tmp_path_factory.mktemp("ddp")
    base = save_ldm_file(build_tiny_components("sd1", seed=0), root / "tiny-sd1.safetensors")
    validation = make_demo_images(root / "validation")
    for extra in sorted(validation.glob("*.png"))[2:]:
        extra.unlink()  # two validation images
    (validation / "metadata.csv").unlink()
    return make_demo_images(root / "data"), base, root


@pytest.fixture(scope="module")
def two_processes(data):
    """The reference: 2 gloo processes at batch_size 3, through `train --gpus 2`."""
    images, base, root = data
    out = root / "two"
    code, stdout, stderr = finish(cli("--config", str(write_config(root / "two.yaml", images, base, out)),
                                      "--gpus", "2"))
    assert code == 0, stderr
    return out, stdout, stderr


def test_two_processes_train_the_lora_one_process_trains_at_twice_the_batch(data, two_processes, tmp_path):
    images, base, _ = data
    out, stdout, stderr = two_processes
    single = tmp_path / "one"
    assert main(["train", "--config", str(write_config(tmp_path / "one.yaml", images, base, single, batch_size=6))]) == 0
    assert_same_lora(out / "lora.safetensors", single / "lora.safetensors")
    assert_same_lora(out / "lora-step00000004.safetensors", single / "lora-step00000004.safetensors")

    # Only rank 0 wrote: the same files as the single process, one log line per step, one event file.
    def files(folder):
        return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and "cache" not in p.parts
                      and "tfevents" not in p.name)
    assert files(out) == files(single)
    assert len(list((out / "logs").glob("events.out.tfevents.*"))) == 1
    log = (out / "logs" / "train.jsonl").read_text().splitlines()
    assert sum('"event": "loss"' in line for line in log) == 8
    assert stdout.count("LoRA: ") == 1 and "[rank 1]" not in stdout + stderr
    with safe_open(str(out / "lora.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["lora_trainer.processes"] == "2"
    assert meta["ss_batch_size_per_device"] == "3" and meta["ss_total_batch_size"] == "12"  # 3 × 2 × 2
    assert meta["lora_trainer.val_loss"]  # rank 0 validated while rank 1 waited


def test_text_encoder_training_with_gradient_checkpointing_under_ddp(data, tmp_path):
    """The text encoders' LoRA is synced too, also through reentrant checkpointing (transformers < 4.35)."""
    images, base, _ = data
    short = dict(max_train_steps=2, save_steps=0, train_text_encoder="true", gradient_checkpointing="true",
                 validation_dir='""')
    two, one = tmp_path / "two", tmp_path / "one"
    code, _, stderr = finish(cli("--config", str(write_config(tmp_path / "t.yaml", images, base, two, **short)),
                                 "--gpus", "2"))
    assert code == 0, stderr
    assert main(["train", "--config", str(write_config(tmp_path / "o.yaml", images, base, one, batch_size=6,
                                                       **short))]) == 0
    assert any(k.startswith("lora_te_") for k in load_file(str(two / "lora.safetensors")))
    assert_same_lora(two / "lora.safetensors", one / "lora.safetensors")


@once
def test_two_processes_train_a_flux_lora_as_one_process_at_twice_the_batch(data, tmp_path):
    """Flux under DDP: each image's noise level t is drawn from its place in the run, so the split batch draws
    what the whole one does; the fused file of the two processes is the single process's."""
    from flux_files import write_tiny_flux

    images, _, _ = data
    flux = write_tiny_flux(tmp_path / "flux", "dev")
    short = dict(max_train_steps=3, save_steps=0, validation_dir='""', target_modules="[attn, ff]",
                 **{k: flux[k] for k in ("clip_l", "t5xxl", "vae", "t5_tokenizer")})
    base = Path(flux["base_model"])
    two, one = tmp_path / "two", tmp_path / "one"
    code, _, stderr = finish(cli("--config", str(write_config(tmp_path / "t.yaml", images, base, two, **short)),
                                 "--gpus", "2"))
    assert code == 0, stderr
    assert main(["train", "--config", str(write_config(tmp_path / "o.yaml", images, base, one, batch_size=6,
                                                       **short))]) == 0
    assert any(k.startswith("lora_unet_double_blocks_0_img_attn_qkv") for k in load_file(str(two / "lora.safetensors")))
    assert_same_lora(two / "lora.safetensors", one / "lora.safetensors")


@once
def test_ctrl_c_stops_every_process_and_a_resume_on_one_process_ends_with_the_same_lora(data, two_processes, tmp_path):
    images, base, _ = data
    out = tmp_path / "stopped"
    config = write_config(tmp_path / "stop.yaml", images, base, out)
    proc = cli("--config", str(config), "--gpus", "2", start_new_session=True)
    log = out / "logs" / "train.jsonl"
    deadline = time.monotonic() + 240
    while not (log.is_file() and '"event": "loss"' in log.read_text()):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: every process of the group gets it
    code, stdout, stderr = finish(proc)
    assert code == 1, stderr
    assert "stopped at step" in stdout and f"--resume {out}" in stdout
    assert not (out / "lora.safetensors").exists()
    stopped_at = int(stdout.split("stopped at step ")[1].split(";")[0])
    # Both processes stopped at that one step: rank 0 logged exactly its losses and saved its state there.
    assert sum('"event": "loss"' in line for line in log.read_text().splitlines()) == stopped_at
    assert (out / "state" / f"step-{stopped_at:08d}").is_dir() and stopped_at < 8

    # The global batch is what counts: 1 process × 6 resumes what 2 × 3 started, exactly.
    assert main(["train", "--config", str(config), "--set", "batch_size=6", "--resume", str(out)]) == 0
    assert_same_lora(out / "lora.safetensors", two_processes[0] / "lora.safetensors")


def test_resume_with_another_global_batch_is_refused_with_what_to_set(data, two_processes, capsys):
    images, base, root = data
    config = write_config(root / "wrong.yaml", images, base, root / "resumed")
    assert main(["train", "--config", str(config), "--resume", str(two_processes[0])]) == 2
    said = capsys.readouterr().err
    assert "global batch of 6 (2 processes × batch_size 3)" in said and "set batch_size: 6 for 1 process" in said


@once
def test_a_failing_process_ends_the_others_with_its_message(data, tmp_path):
    images, base, _ = data
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(  # rank 1 fails at its third micro-batch; rank 0 would wait for it
        "import os\n"
        "if os.environ.get('RANK') == '1':\n"
        "    import lora_trainer.training.loop as t\n"
        "    from lora_trainer.errors import TrainingError\n"
        "    calls, step = [], t._micro_step\n"
        "    def failing(*a, **k):\n"
        "        calls.append(1)\n"
        "        if len(calls) == 3:\n"
        "            raise TrainingError('the disk vanished')\n"
        "        return step(*a, **k)\n"
        "    t._micro_step = failing\n")
    out = tmp_path / "failed"
    started = time.monotonic()
    code, stdout, stderr = finish(cli("--config", str(write_config(tmp_path / "f.yaml", images, base, out)),
                                      "--gpus", "2", hook=hook), timeout=240)
    assert code == 2
    assert "[rank 1] error: the disk vanished" in stderr
    assert "process 1 ended with the error above; the other processes were stopped" in stderr
    assert "Traceback" not in stderr
    assert not (out / "lora.safetensors").exists()
    assert time.monotonic() - started < 200  # rank 0 did not wait out the 60-minute collective timeout


@once
def test_two_machines_meet_at_a_rendezvous_endpoint(data, two_processes, tmp_path):
    """--nnodes 2 on one machine: the c10d rendezvous of a several-machine run, each 'machine' one process. The
    first hosts it through `train --nnodes 2 --rdzv-endpoint`, the second joins with plain torchrun (docs/multi-gpu.md)."""
    images, base, _ = data
    out = tmp_path / "nodes"
    config = str(write_config(tmp_path / "n.yaml", images, base, out))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    endpoint = f"127.0.0.1:{port}"
    first = cli("--config", config, "--nnodes", "2", "--rdzv-endpoint", endpoint, "--rdzv-timeout", "120")
    time.sleep(2)
    second = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend",
         "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", f"lora-scripts-{endpoint}", "-m", "lora_trainer", "train",
         "--config", config], cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    results = [finish(first), finish(second)]
    assert [code for code, _, _ in results] == [0, 0], results
    assert_same_lora(out / "lora.safetensors", two_processes[0] / "lora.safetensors")


def test_bad_launch_settings_are_one_line_each(data, tmp_path, capsys, monkeypatch):
    images, base, _ = data
    cpu = str(write_config(tmp_path / "cpu.yaml", images, base, tmp_path / "o"))
    auto = str(write_config(tmp_path / "auto.yaml", images, base, tmp_path / "o", device="auto"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with socket.socket() as busy:
        busy.bind(("", 0))
        busy.listen()
        port = busy.getsockname()[1]
        cases = {
            ("--config", auto, "--gpus", "2"): "no CUDA GPU is visible. Set device: cpu to train with 2 CPU processes",
            ("--config", cpu, "--gpus", "0"): "--gpus 0: give the number of processes",
            ("--config", cpu, "--nnodes", "2"): "--nnodes 2 needs --rdzv-endpoint HOST:PORT",
            ("--config", cpu, "--nnodes", "2", "--rdzv-endpoint", f"localhost:{port}"):
                f"port {port} is in use on this machine (localhost): pick a free port",
            ("--config", cpu, "--nnodes", "2", "--rdzv-endpoint", "no-such-machine.invalid:29500"):
                "no machine is known by the name no-such-machine.invalid",
            ("--config", cpu, "--nnodes", "2", "--rdzv-endpoint", "192.0.2.1:29500", "--rdzv-timeout", "1"):
                "could not reach 192.0.2.1:29500 within 1 s. Start the command on 192.0.2.1",
        }
        for args, said in cases.items():
            assert main(["train", *args]) == 2, args
            err = capsys.readouterr().err.strip()
            assert said in err and len(err.splitlines()) == 1, (args, err)


def test_gpus_beyond_the_visible_ones_is_refused(monkeypatch):
    from lora_trainer.errors import ConfigError
    from lora_trainer.training.launch import check_gpus

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    check_gpus(2, "auto")
    with pytest.raises(ConfigError, match="--gpus 4, but this machine shows 2 GPUs .*use --gpus 2 or fewer"):
        check_gpus(4, "cuda")


def test_each_process_takes_its_slice_and_the_weights_make_the_global_mean():
    assert Processes(0, 2).share(6, 3) == ([0, 1, 2], 2 / 6)
    assert Processes(1, 2).share(6, 3) == ([3, 4, 5], 2 / 6)
    assert Processes(0, 2).share(4, 3) == ([0, 1, 2], 2 / 4)
    assert Processes(1, 2).share(4, 3) == ([3], 2 / 4)
    assert Processes(1, 2).share(2, 3) == ([0], 0.0)  # nothing left: one image at weight 0 for the all-reduce
    assert Processes().share(5, 5) == ([0, 1, 2, 3, 4], 1 / 5)  # alone: the plain mean
    # Over the processes (DDP averages: ÷ world), every image of a short batch counts 1 / its size.
    for size in (1, 2, 4, 5, 6):
        weights = [0.0] * size
        for rank in range(2):
            places, weight = Processes(rank, 2).share(size, 3)
            for i in places:
                weights[i] += weight / 2
        assert weights == pytest.approx([1 / size] * size)


def test_the_global_batch_check_of_a_state(tmp_path):
    from lora_trainer.training.state import _check_global_batch

    _check_global_batch(tmp_path, {"processes": 2, "global_batch": 6}, 6, 1)
    _check_global_batch(tmp_path, {"processes": 2, "global_batch": 6}, 2, 3)
    _check_global_batch(tmp_path, {"config": {"batch_size": 4}}, 2, 2)  # a state from before processes were saved
    with pytest.raises(ResumeError, match=r"global batch of 6 \(2 processes × batch_size 3\); this run's is 8 "
                                          r"\(4 × 2\). To resume exactly, use 2 processes with batch_size: 3"):
        _check_global_batch(tmp_path, {"processes": 2, "global_batch": 6}, 2, 4)
