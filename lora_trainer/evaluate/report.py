"""One HTML page per run (`report.html`) and one page that compares runs (`compare.html`).

Both pages open from disk with no server and fetch nothing from a network: the loss curve is inline SVG,
the sample grids and the compare grid are referenced by relative path (the page lives beside them), the
style is in the page. Every text a user wrote (names, config values, file names, notes) is escaped.
A run's files are all optional: a missing one leaves its section saying so in one line.
"""

from __future__ import annotations

import html
import io
import json
import math
import os
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence
from urllib.parse import quote

from ..files import atomic_write_text

DEFAULT_STRENGTH = 0.7  # the usage hint's weight until the LoRA is scored
_NONE = "—"
_BADGE = " <span class=\"badge\">best</span>"
_STYLE = """body { font: 15px/1.45 system-ui, sans-serif; color: #1d1d1f; background: #fafafa; margin: 0; }
main { max-width: 1100px; margin: 0 auto; padding: 1.5em; } h2 { font-size: 1.15em; } .missing { color: #777; }
section { background: #fff; border: 1px solid #e3e3e3; border-radius: 6px; padding: 0.4em 1.2em 1em; margin: 1em 0; }
table { border-collapse: collapse; } td, th { border-bottom: 1px solid #eee; padding: 0.25em 0.8em; text-align: left; }
tr.best { background: #fff4d6; } .badge { background: #e0701b; color: #fff; border-radius: 3px; padding: 0 0.4em; }
code { background: #f2f2f2; padding: 0.1em 0.3em; border-radius: 3px; } figcaption { color: #555; font-size: 0.9em; }
img, #loss-plot svg { max-width: 100%; height: auto; }"""


def _e(value: Any) -> str:
    return html.escape(str(value))


def html_page(title: str, body: Iterable[str]) -> str:
    """The skeleton both pages share. The empty data: icon stops the browser asking for /favicon.ico."""
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<link rel=\"icon\" href=\"data:,\"><title>{_e(title)}</title><style>{_STYLE}</style></head>\n"
            "<body><main>\n" + "\n".join(body) + "\n</main></body></html>\n")


def _section(id_: str, heading: str, *parts: str) -> str:
    return f"<section id=\"{id_}\"><h2>{_e(heading)}</h2>\n" + "\n".join(parts) + "\n</section>"


def _missing(text: str) -> str:
    return f"<p class=\"missing\">{_e(text)}</p>"


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]], best: Optional[int] = None) -> str:
    """`rows` hold HTML already escaped by the caller; the row at index `best` is marked."""
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = "".join(("<tr class=\"best\">" if i == best else "<tr>") + "".join(f"<td>{c}</td>" for c in row) + "</tr>"
                   for i, row in enumerate(rows))
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _number(value: Any) -> str:
    return _NONE if value is None else f"{value:.4g}" if isinstance(value, float) else _e(value)


def _duration(seconds: Any) -> str:
    if seconds is None:
        return _NONE
    m, s = divmod(int(round(seconds)), 60)
    return f"{m // 60} h {m % 60:02d} min" if m >= 60 else f"{m} min {s:02d} s" if m else f"{s} s"


def _gigabytes(n: Any) -> str:
    return _NONE if n is None else f"{n / 2**30:.2f} GB"


def _href(target: Path, page_dir: Path) -> str:
    """`target` relative to the page's folder, as a URL path (a page moved with its folder still finds it)."""
    try:
        rel = Path(os.path.relpath(os.path.abspath(target), os.path.abspath(page_dir))).as_posix()
    except ValueError:  # another drive on Windows: no relative path exists
        return _e(Path(target).resolve().as_uri())
    return _e(quote(rel))


def _read_mapping(path: Path) -> Optional[dict]:
    """The JSON (or, for .yaml, YAML) mapping in `path`; None when missing or unreadable: its section says so."""
    import yaml

    try:
        text = path.read_text(encoding="utf-8")
        value = yaml.safe_load(text) if path.suffix == ".yaml" else json.loads(text)
    except (OSError, ValueError, yaml.YAMLError):
        return None
    return value if isinstance(value, dict) else None


def _read_log(path: Path) -> Dict[str, Dict[int, dict]]:
    """event → {step: line}. A resumed run appends to the same log, so the later line of a step wins."""
    events: Dict[str, Dict[int, dict]] = {"loss": {}, "validation": {}, "sample": {}}
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            event = json.loads(line)
        except ValueError:  # a line cut short by a crash
            continue
        if isinstance(event, dict) and event.get("event") in events and isinstance(event.get("step"), int):
            events[event["event"]][event["step"]] = event
    return events


def _loss_svg(loss: Dict[int, dict], val: Dict[int, dict]) -> str:
    """The tab's loss figure as inline SVG; steps missing from the log are NaN, which the figure leaves out."""
    from .loss_plot import loss_figure

    steps = sorted(loss)
    first = steps[0] if steps else 1
    losses = [float(loss[s].get("loss", math.nan)) if s in loss else math.nan
              for s in range(first, steps[-1] + 1)] if steps else []
    points = [(s, float(val[s]["val_loss"])) for s in sorted(val) if val[s].get("val_loss") is not None]
    buf = io.StringIO()
    loss_figure(losses, 760, 320, val=points, first_step=first).savefig(buf, format="svg", metadata={"Date": None})
    svg = buf.getvalue()
    return svg[svg.index("<svg"):]  # the XML prolog and DOCTYPE have no place inside HTML


def _samples_html(output_dir: Path, logged: Dict[int, dict]) -> str:
    files = sorted((output_dir / "samples").glob("*.png"))
    if not files:
        return _missing("no sample grids (samples/*.png)")
    # The step is the one the log's sample event gives (by file name: the folder may have moved), not one read
    # out of the name; a grid the log does not name goes last, captioned by its name.
    step_of = {Path(str(e.get("path", ""))).name: s for s, e in logged.items()}
    files.sort(key=lambda f: (f.name not in step_of, step_of.get(f.name, 0), f.name))
    figures = []
    for f in files:
        caption = (f"step {step_of[f.name]} · " if f.name in step_of else "") + f.name
        src = _e(quote("samples/" + f.name))
        figures.append(f"<figure class=\"sample-grid\"><img class=\"sample-grid-image\" src=\"{src}\" "
                       f"alt=\"{_e(caption)}\"><figcaption>{_e(caption)}</figcaption></figure>")
    return "\n".join(figures)


def _scores_html(scores: Optional[dict], lora: Optional[Path], cfg: dict) -> str:
    if not scores or not scores.get("scores"):
        strengths = ",".join(f"{w:g}" for w in cfg.get("sample_strengths") or () if w) or "0.5,0.6,0.7,0.8"
        return _missing(f"not scored yet: python -m lora_trainer score --lora {lora or '…'} --reference-dir "
                        f"{cfg.get('train_data_dir') or '…'} --base-model {cfg.get('base_model') or '…'} "
                        f"--prompt \"{cfg.get('trigger_word') or '…'} …\" --strengths {strengths}")
    rows, best = [], None
    for i, s in enumerate(scores["scores"]):
        is_best = s.get("strength") == scores.get("best")
        best = i if is_best else best
        rows.append([_number(s.get("strength")) + (_BADGE if is_best else "")]
                    + [_number(s.get(k)) for k in ("style", "fidelity", "combined")])
    note = f"<p>{_e(scores['note'])}</p>" if scores.get("note") else ""
    return _table(["strength", "style", "fidelity", "combined"], rows, best) + note


def _how_to_use(name: str, suffix: str, weight: float, trigger: str) -> str:
    file, tag = _e(name + suffix), _e(f"<lora:{name}:{weight:g}>" + (f" {trigger}" if trigger else ""))
    return (f"<ul><li>A1111 / Forge: copy <code>{file}</code> into the host's <code>models/Lora</code> folder and "
            f"put <code>{tag}</code> in the prompt.</li>"
            f"<li>ComfyUI: copy it into <code>ComfyUI/models/loras</code>; add a <b>Load LoRA</b> node "
            f"(<code>LoraLoader</code>) with lora_name <code>{file}</code> and strength_model / strength_clip "
            f"<code>{weight:g}</code>.</li></ul>")


def _summary_html(run: Optional[dict], cfg: dict) -> str:
    if run is None:
        return _missing("no run.json: the run has not finished")
    steps = f"{run.get('steps', _NONE)}/{run.get('total_steps', _NONE)} steps"
    out = (f"<p class=\"summary\">{_e(steps)} in {_duration(run.get('seconds'))}, "
           f"{_e(run.get('peak_what') or 'peak memory')} {_gigabytes(run.get('peak_bytes'))}, "
           f"on {_e(run.get('device', _NONE))}, {'stopped early' if run.get('stopped') else 'finished'}.</p>")
    facts = [f"family {_e(run['family'])}"] if run.get("family") else []
    facts += [f"{k} {_e(_config_value(cfg[k]))}" for k in ("base_model", "lora_rank", "trigger_word") if cfg.get(k)]
    return out + (f"<p>{' · '.join(facts)}</p>" if facts else "")


def _loss_html(log: Optional[Dict[str, Dict[int, dict]]], best: dict) -> str:
    if log and (log["loss"] or log["validation"]):
        out = f"<div id=\"loss-plot\" class=\"plot\">{_loss_svg(log['loss'], log['validation'])}</div>"
    else:
        out = _missing("no loss logged yet (logs/train.jsonl)")
    if best.get("val_loss") is not None:
        out += (f"<p>best val_loss {_number(float(best['val_loss']))} at step {_e(best.get('step', _NONE))}"
                + (f": <code>{_e(best['path'])}</code>" if best.get("path") else "") + "</p>")
    return out


def _dataset_html(run: Optional[dict]) -> str:
    if run is None:
        return _missing("no dataset scan (run.json missing)")
    skipped = "".join(f"<li><code>{_e(f)}</code>: {_e(why)}</li>" for f, why in run.get("skipped") or [])
    return f"<p>{_e(run.get('scan') or 'no scan summary')}</p>" + (
        f"<p>Skipped:</p><ul class=\"skipped\">{skipped}</ul>" if skipped else "<p>Training skipped no image.</p>")


def _config_value(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def write_run_report(output_dir: Path) -> Path:
    """Write `output_dir/report.html` from config.yaml, run.json, logs/train.jsonl, samples/*.png and
    the final LoRA's `.scores.json`; returns its path."""
    output_dir = Path(output_dir)
    cfg_read, run = _read_mapping(output_dir / "config.yaml"), _read_mapping(output_dir / "run.json")
    cfg = cfg_read or {}
    lora = Path(run["lora"]) if run and run.get("lora") else None
    lora = output_dir / lora if lora is not None and not lora.is_absolute() else lora  # relative: to the run
    scores = _read_mapping(lora.with_suffix(".scores.json")) if lora else None
    name = lora.stem if lora else cfg.get("output_name") or (run or {}).get("name") or output_dir.name
    weight = scores["best"] if scores and isinstance(scores.get("best"), (int, float)) else DEFAULT_STRENGTH
    title = (run or {}).get("name") or cfg.get("output_name") or output_dir.name
    log_path = output_dir / "logs" / "train.jsonl"
    log = _read_log(log_path) if log_path.is_file() else None
    config = (_table(["key", "value"], [[_e(k), _e(_config_value(v))] for k, v in cfg.items()]) if cfg_read is not None
              else _missing("no config.yaml"))
    usage = _how_to_use(name, lora.suffix if lora else ".safetensors", weight, str(cfg.get("trigger_word") or ""))
    body = [f"<h1>{_e(title)}</h1>", _summary_html(run, cfg),
            _section("how-to-use", "How to use", usage),
            _section("loss", "Loss and validation", _loss_html(log, (run or {}).get("best") or {})),
            _section("samples", "Sample grids", _samples_html(output_dir, log["sample"] if log else {})),
            _section("scores", "Strength scores", _scores_html(scores, lora, cfg)),
            _section("dataset", "Dataset", _dataset_html(run)),
            _section("config", "Config", config)]
    return atomic_write_text(output_dir / "report.html", html_page(f"{title}: LoRA training report", body))


# The run's place, not a setting compared: every run has its own.
_NOT_COMPARED = {"output_dir", "output_name"}


def _differing(configs: List[dict]) -> List[str]:
    keys = sorted({k for c in configs for k in c} - _NOT_COMPARED)
    return [k for k in keys if len({json.dumps(c.get(k), sort_keys=True, default=str) for c in configs}) > 1]


def write_compare_report(path: Path, comparison: dict, grid_png: Optional[Path]) -> Path:
    """Write the page comparing runs (`comparison`: best, notes, runs) at `path`; links and the grid are
    relative to its folder. Returns `path`."""
    path = Path(path)
    runs = comparison.get("runs") or []
    configs = [r.get("config") or {} for r in runs]
    differ = _differing(configs)
    rows, best = [], None
    for i, (r, c) in enumerate(zip(runs, configs)):
        is_best = r.get("name") is not None and r.get("name") == comparison.get("best")
        best = i if is_best else best
        link = f"<a href=\"{_href(Path(r['path']) / 'report.html', path.parent)}\">{_e(r.get('name'))}</a>" \
            if r.get("path") else _e(r.get("name"))
        rows.append([link + (_BADGE if is_best else ""),
                     *(_number(r.get(k)) for k in ("val_loss_final", "val_loss_best", "best_strength", "clip_score",
                                                   "steps")),
                     _duration(r.get("seconds")), _gigabytes(r.get("peak_bytes")),
                     "<br>".join(f"{_e(k)} = {_e(_config_value(c.get(k, _NONE)))}" for k in differ) or _NONE])
    table = _table(["run", "val_loss final", "val_loss best", "best strength", "CLIP score", "steps", "time",
                    "peak memory", "what differs"], rows, best) if runs else _missing("no runs to compare")
    notes = comparison.get("notes") or []
    body = [f"<h1>Compare {len(runs)} runs</h1>",
            _section("runs", "Runs", table),
            _section("notes", "Notes", "<ul>" + "".join(f"<li>{_e(n)}</li>" for n in notes) + "</ul>" if notes
                     else _missing("no notes")),
            _section("grid", "Grid", f"<img id=\"compare-grid\" src=\"{_href(grid_png, path.parent)}\" alt=\"grid\">"
                     if grid_png else _missing("no grid rendered"))]
    return atomic_write_text(path, html_page("Compare LoRA runs", body))
