"""One process against several: throughput and memory per process of `train --gpus N`.

Each row is a real CLI run (`python -m lora_trainer train --config F [--gpus N]`) on the same global
batch, so every row trains the same LoRA: one process at batch_size × N, then N processes at
batch_size. Throughput is taken from the run's own train.jsonl (steps between the first and the last
logged step, so loading and caching are left out); memory is each process's peak resident set
(VmHWM, read from /proc while it runs). The LoRAs of the rows are compared at the end.

    python bench/ddp.py                        # CPU, gloo, the real SD1.5 architecture at 64 px
    python bench/ddp.py --variant tiny         # seconds; communication dominates, not representative
    python bench/ddp.py --device cuda --processes 1 --resolution 512   # a lent one-GPU machine: one row

On the CPU the processes share the cores (OMP_NUM_THREADS = cores / processes, as torchrun sets it),
so two processes cannot be faster than one: the CPU rows show the cost of the second process and of the
all-reduce, and prove the path; the speed-up belongs to machines with one GPU per process.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--variant", default="base", help="shipped SD1 architecture: base (real size) or tiny")
    p.add_argument("--processes", default="1,2", help="comma-separated process counts, one row each")
    p.add_argument("--batch-size", type=int, default=1, help="per process in the largest row")
    p.add_argument("--resolution", type=int, default=None, help="default: 64 on CPU, 512 on CUDA")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--keep", default=None, help="work folder to keep (default: a temp folder)")
    return p.parse_args(argv)


def _base_model(folder: Path, variant: str) -> Path:
    path = folder / f"sd1-{variant}.safetensors"
    if not path.exists():
        code = (f"import sys; sys.path[:0] = [{str(ROOT)!r}, {str(ROOT / 'tests')!r}]; "
                "from ldm_layout import save_ldm_file; from lora_trainer.model.tiny import build_random_components; "
                f"save_ldm_file(build_random_components('sd1', {variant!r}, 0), __import__('pathlib').Path({str(path)!r}))")
        subprocess.run([sys.executable, "-c", code], check=True)
    return path


def _config(folder: Path, data: Path, base: Path, out: Path, args, batch_size: int, resolution: int) -> Path:
    path = folder / f"{out.name}.yaml"
    path.write_text(
        f"train_data_dir: {data}\nmetadata_path: {data / 'metadata.csv'}\nbase_model: {base}\noutput_dir: {out}\n"
        f"device: {args.device}\nresolution: {resolution}\nmin_bucket_reso: {resolution}\n"
        f"max_bucket_reso: {resolution}\nbatch_size: {batch_size}\nmax_train_steps: {args.steps}\nlora_rank: 8\n"
        "lora_alpha: 8\nsave_precision: fp32\nsave_steps: 0\nseed: 1\n", encoding="utf-8")
    return path


def _peaks(pid: int) -> dict:
    """Peak RSS (MB) of `pid` and of each of its children, by pid."""
    from lora_trainer.training.launch import child_pids

    out = {}
    for p in [pid, *child_pids(pid)]:
        try:
            with open(f"/proc/{p}/status", encoding="ascii") as fh:
                for line in fh:
                    if line.startswith("VmHWM:"):
                        out[p] = int(line.split()[1]) / 1024
        except OSError:
            pass
    return out


def run_row(config: Path, processes: int) -> dict:
    cmd = [sys.executable, "-m", "lora_trainer", "train", "--config", str(config)]
    if processes > 1:
        cmd += ["--gpus", str(processes)]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // processes)))
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peaks: dict = {}
    while proc.poll() is None:
        for pid, mb in _peaks(proc.pid).items():
            peaks[pid] = max(peaks.get(pid, 0.0), mb)
        time.sleep(0.2)
    output = proc.stdout.read()
    if proc.returncode != 0:
        raise SystemExit(f"row with {processes} process(es) failed:\n{output[-3000:]}")
    wall = time.perf_counter() - started
    workers = [mb for pid, mb in peaks.items() if pid != proc.pid] if processes > 1 else [peaks[proc.pid]]
    return {"wall": wall, "peaks": workers, "launcher": peaks.get(proc.pid) if processes > 1 else None}


def _throughput(out: Path, images_per_step: int) -> tuple:
    events = [json.loads(line) for line in (out / "logs" / "train.jsonl").read_text().splitlines()]
    times = [e["time"] for e in events if e.get("event") == "loss"]
    steps = len(times) - 1
    seconds = times[-1] - times[0]
    return seconds / steps, images_per_step * steps / seconds


def main(argv=None) -> None:
    args = _args(argv)
    import torch
    from safetensors.torch import load_file

    from lora_trainer.cli.demo_data import make_demo_images

    counts = [int(n) for n in args.processes.split(",")]
    resolution = args.resolution or (512 if args.device == "cuda" else 64)
    folder = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench-ddp-"))
    folder.mkdir(parents=True, exist_ok=True)
    base = _base_model(folder, args.variant)
    data = make_demo_images(folder / "data") if not (folder / "data").is_dir() else folder / "data"
    global_batch = args.batch_size * max(counts)
    rows, loras = [], []
    for n in counts:
        out = folder / f"out-{n}"
        config = _config(folder, data, base, out, args, global_batch // n, resolution)
        measured = run_row(config, n)
        seconds, images = _throughput(out, global_batch)
        loras.append(load_file(str(out / f"out-{n}.safetensors")))
        rows.append((n, global_batch // n, seconds, images, measured))
    print(f"\nSD1 {args.variant}, {args.device}, {resolution} px, global batch {global_batch}, {args.steps} steps, "
          f"{os.cpu_count()} cores, torch {torch.__version__}")
    print(f"{'processes':>9} {'batch/proc':>10} {'s/step':>8} {'images/s':>9} {'peak RSS per process (MB)':>28} "
          f"{'sum (MB)':>9} {'wall s':>7}")
    for n, batch, seconds, images, m in rows:
        per = ", ".join(f"{mb:,.0f}" for mb in sorted(m["peaks"]))
        print(f"{n:>9} {batch:>10} {seconds:>8.3f} {images:>9.2f} {per:>28} {sum(m['peaks']):>9,.0f} {m['wall']:>7.1f}")
    for n, lora in zip(counts[1:], loras[1:]):
        diff = max((lora[k] - loras[0][k]).abs().max().item() for k in lora)
        print(f"LoRA of {n} processes vs {counts[0]}: max |difference| {diff:.2e}")
    if rows and rows[-1][4]["launcher"]:
        print(f"(the launcher process itself: {rows[-1][4]['launcher']:,.0f} MB)")


if __name__ == "__main__":
    main()
