"""What a run leaves for people comparing runs: the config it really used, its time and peak, its report page.

`config.yaml` is written once the memory plan has changed what it changes (the settings the run trains with);
`run.json` when the run ends or stops: steps, seconds (summed over resumed sessions), peak memory, the device,
the finished LoRA, the dataset scan's summary, the best val_loss. `report.html` is drawn from these files and
the logs (`evaluate/report.py`). `experiments/compare.py` reads the same files.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

from ..files import atomic_write_text

CONFIG_FILE = "config.yaml"
RECORD_FILE = "run.json"


def write_used_config(output_dir: Path, cfg: Any) -> Path:
    import yaml

    text = "# the settings this run trained with (after the memory plan's changes)\n"
    return atomic_write_text(Path(output_dir) / CONFIG_FILE, text + yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def read_record(output_dir: Path) -> Dict[str, Any]:
    """The run's run.json, or {} when it has none (yet) or it cannot be read."""
    try:
        return json.loads((Path(output_dir) / RECORD_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def write_record(output_dir: Path, earlier: Dict[str, Any], **fields: Any) -> Path:
    """run.json with this session's `fields`; seconds add up over sessions and the peak is the highest seen."""
    record = {**earlier, **fields}
    record["seconds"] = round(float(earlier.get("seconds") or 0) + float(fields.get("seconds") or 0), 3)
    record["peak_bytes"] = max(int(earlier.get("peak_bytes") or 0), int(fields.get("peak_bytes") or 0))
    return atomic_write_text(Path(output_dir) / RECORD_FILE, json.dumps(record, indent=1))


def reset_peak() -> None:
    """Start measuring this run's peak: CUDA's allocator statistics, and on Linux the process's VmHWM (a host
    process that trained before keeps its old high-water mark otherwise)."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.reset_peak_memory_stats()
    if sys.platform.startswith("linux"):
        try:
            Path("/proc/self/clear_refs").write_text("5")  # 5: reset the peak resident set size
        except OSError:
            pass  # not allowed in some containers: the peak then counts from the process's start


def measured_peak(device: Any) -> Tuple[int, str]:
    """(bytes, what they are): torch.cuda.max_memory_allocated on CUDA, the process's peak resident set elsewhere."""
    import torch

    if getattr(device, "type", str(device)) == "cuda" and torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated(device)), "peak VRAM (allocated)"
    return _peak_rss(), "peak RAM (process)"


def _peak_rss() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource  # macOS: ru_maxrss in bytes; Linux without /proc: kilobytes

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def finish_record(run: Any, inputs: Any, best: Dict[str, Any], lora: Optional[Path], stopped: bool,
                  seconds: float, callbacks: Any) -> None:
    """run.json for the session that just ended, then report.html (a page that fails is said, never fatal)."""
    output_dir = Path(run.output_dir)
    peak, what = measured_peak(run.device)
    write_record(output_dir, read_record(output_dir), name=run.cfg.name, family=run.components.family,
                 steps=run.position.step, total_steps=run.total_steps, seconds=seconds, peak_bytes=peak,
                 peak_what=what, device=str(run.device), stopped=stopped, lora=str(lora) if lora else None,
                 scan=inputs.scan, skipped=[list(s) for s in inputs.skipped], best=dict(best or {}))
    from ..evaluate.report import write_run_report

    try:
        page = write_run_report(output_dir)
    except Exception as err:  # the LoRA and its state are saved already: a page that fails must not fail the run
        callbacks.on_status(f"report.html not written ({type(err).__name__}: {err})")
        return
    callbacks.on_status(f"report: {page}")
