"""Stand-ins for the AUTOMATIC1111 / Forge modules the extension touches, as read from A1111 v1.10.1 and Forge
(commit dfdcbab6; ../shared/research/hosts.md §4 has the details):

- `shared.state` (shared_state.State): begin(job) resets the flags and sets job_count = -1; end(); interrupt();
  assign_current_image(img) bumps id_live_preview;
- `call_queue.queue_lock`: the lock txt2img/img2img hold (a FIFOLock there, a plain Lock here);
- `progress`: add_task_to_queue / start_task / finish_task / create_task_id, and `progress_of(id)` computing
  what POST /internal/progress answers (active, queued, completed, progress = job_no/job_count + ...);
- `sd_models`: model_data.sd_model (peek), select_checkpoint(), checkpoint_tiles(), checkpoint_aliases,
  send_model_to_cpu/device (A1111) or unload_model_weights (Forge, where the former are no-ops); model_path
  (<models>/Stable-diffusion), checkpoints_list and list_models(), which clears the list and registers the --ckpt
  file, then every .safetensors/.ckpt under --ckpt-dir and model_path (title: the path relative to its folder, as
  CheckpointInfo names a file whose sha256 is not cached yet); `shared_items.refresh_checkpoints()` calls it, as
  the checkpoint dropdown's refresh button does (the same in Forge);
- `processing`: StableDiffusionProcessingTxt2Img(**kw) + process_images(p) → Processed(images, infotexts);
  process_images sets state.job_count only while it is -1 and calls state.nextjob() per picture; its
  infotext's prompt line lacks the <lora:...> tags (seen in a real A1111 1.10.1 run), "Lora hashes" has them;
- `infotext_utils`: ParamBinding + register_paste_params_button (bound later by ui.py);
- Forge only: `modules_forge.main_thread.run_and_wait_result(fn)` (runs fn on its one worker thread) and
  `backend.patcher.lora` (model_lora_keys_unet/clip give {file key: model key}; load_lora → (taken, rest)).

`install(monkeypatch, ...)` puts them into sys.modules and returns a namespace with the recorded calls.
"""

from __future__ import annotations

import random
import re
import string
import sys
import threading
import types
from pathlib import Path
from typing import Any, Dict, List, Optional


class State:
    def __init__(self) -> None:
        self.interrupted = self.skipped = self.stopping_generation = False
        self.job, self.job_no, self.job_count = "", 0, 0
        self.sampling_step = self.sampling_steps = 0
        self.textinfo: Optional[str] = None
        self.current_image = None
        self.id_live_preview = 0
        self.log: List[tuple] = []

    def begin(self, job: str = "(unknown)") -> None:
        self.interrupted = self.skipped = self.stopping_generation = False
        self.job, self.job_no, self.job_count, self.textinfo = job, 0, -1, None
        self.log.append(("begin", job))

    def end(self) -> None:
        self.log.append(("end", self.job))
        self.job, self.job_count = "", 0

    def interrupt(self) -> None:
        self.interrupted = True

    def nextjob(self) -> None:
        self.job_no += 1
        self.sampling_step = 0

    def assign_current_image(self, image: Any) -> None:
        self.current_image = image
        self.id_live_preview += 1


def _progress_module(state: State) -> types.ModuleType:
    m = types.ModuleType("modules.progress")
    m.current_task, m.pending_tasks, m.finished_tasks, m.log = None, {}, [], []

    def add_task_to_queue(id_task):
        m.pending_tasks[id_task] = 1
        m.log.append(("queued", id_task))

    def start_task(id_task):
        m.current_task = id_task
        m.pending_tasks.pop(id_task, None)
        m.log.append(("start", id_task))

    def finish_task(id_task):
        if m.current_task == id_task:
            m.current_task = None
        m.finished_tasks.append(id_task)
        m.log.append(("finish", id_task))

    def create_task_id(task_type):
        return f"task({task_type}-{''.join(random.choices(string.ascii_uppercase + string.digits, k=7))})"

    def progress_of(id_task) -> Dict[str, Any]:
        active = id_task == m.current_task
        out = {"active": active, "queued": id_task in m.pending_tasks, "completed": id_task in m.finished_tasks,
               "progress": None, "textinfo": state.textinfo if active else "Waiting..."}
        if active and state.job_count > 0:
            out["progress"] = min(state.job_no / state.job_count, 1)
        return out

    m.add_task_to_queue, m.start_task, m.finish_task = add_task_to_queue, start_task, finish_task
    m.create_task_id, m.progress_of = create_task_id, progress_of
    return m


def _processing_module(state: State, calls: list) -> types.ModuleType:
    from PIL import Image

    m = types.ModuleType("modules.processing")

    class StableDiffusionProcessingTxt2Img:
        def __init__(self, **kw: Any) -> None:
            self.__dict__.update(kw)
            self.closed = False

        def close(self) -> None:
            self.closed = True

    def process_images(p):
        calls.append(("txt2img", dict(vars(p)), threading.current_thread().name))
        if state.job_count == -1:
            state.job_count = 1
        state.nextjob()
        shade = (hash(p.prompt) % 200) + 20
        image = Image.new("RGB", (p.width, p.height), (shade, shade, shade))
        prompt = re.sub(r"<lora:[^>]+>", "", p.prompt)  # as A1111 1.10.1 writes it here: tags gone, hashes kept
        info = f"{prompt}\nSteps: {p.steps}, Sampler: {p.sampler_name}, CFG scale: {p.cfg_scale}, Seed: {p.seed}, " \
               f"Size: {p.width}x{p.height}" + (', Lora hashes: "x: 0123456789ab"' if "<lora:" in p.prompt else "")
        return types.SimpleNamespace(images=[image], infotexts=[info], info=info)

    m.StableDiffusionProcessingTxt2Img, m.process_images = StableDiffusionProcessingTxt2Img, process_images
    return m


def _infotext_module() -> types.ModuleType:
    m = types.ModuleType("modules.infotext_utils")

    class ParamBinding:
        def __init__(self, paste_button, tabname, source_text_component=None, source_image_component=None,
                     source_tabname=None, override_settings_component=None, paste_field_names=None):
            self.paste_button, self.tabname = paste_button, tabname
            self.source_text_component, self.source_image_component = source_text_component, source_image_component

    m.ParamBinding, m.registered_param_bindings = ParamBinding, []
    m.register_paste_params_button = m.registered_param_bindings.append
    return m


def install(monkeypatch: Any, tmp_path: Path, checkpoint: Path, sd_model: Any, forge: bool = False) -> Any:
    """The WebUI's modules with `sd_model` loaded from `checkpoint`; Forge's behaviour when `forge`."""
    calls: list = []
    state = State()
    info = types.SimpleNamespace(filename=str(checkpoint), title=f"{checkpoint.name} [0123456789]")
    shared = types.SimpleNamespace(cmd_opts=types.SimpleNamespace(lora_dir=str(tmp_path / "Lora"), api_auth=None,
                                                                  ckpt_dir=None),
                                   state=state, opts=types.SimpleNamespace())
    sd_models = types.SimpleNamespace(model_data=types.SimpleNamespace(sd_model=sd_model),
                                      select_checkpoint=lambda: info,
                                      checkpoints_list={info.title: info},
                                      checkpoint_aliases={info.title: info, checkpoint.name: info},
                                      model_path=str(tmp_path / "models" / "Stable-diffusion"),
                                      send_model_to_cpu=lambda m: None if forge else calls.append(("cpu", m)),
                                      send_model_to_device=lambda m: None if forge else calls.append(("gpu", m)),
                                      unload_model_weights=lambda *a: calls.append(("unload",)))
    sd_models.checkpoint_tiles = lambda: list(sd_models.checkpoints_list)
    sd_models.list_models = lambda: _list_models(sd_models, shared.cmd_opts, info, calls)
    modules = dict(
        shared=shared, sd_models=sd_models, devices=types.SimpleNamespace(torch_gc=lambda: None),
        shared_items=types.SimpleNamespace(refresh_checkpoints=lambda: sd_models.list_models()),
        paths=types.SimpleNamespace(models_path=str(tmp_path / "models"), data_path=str(tmp_path),
                                    script_path=str(tmp_path)),
        call_queue=types.SimpleNamespace(queue_lock=threading.Lock()), progress=_progress_module(state),
        processing=_processing_module(state, calls), infotext_utils=_infotext_module(),
    )
    pkg = types.ModuleType("modules")
    for name, mod in modules.items():
        setattr(pkg, name, mod)
        monkeypatch.setitem(sys.modules, f"modules.{name}", mod)
    monkeypatch.setitem(sys.modules, "modules", pkg)
    monkeypatch.setitem(sys.modules, "networks",
                        types.SimpleNamespace(list_available_networks=lambda: calls.append(("refresh",))))
    if forge:
        _install_forge(monkeypatch, calls)
    else:
        monkeypatch.delitem(sys.modules, "modules_forge", raising=False)
    return types.SimpleNamespace(calls=calls, state=state, checkpoint=info, lora_dir=tmp_path / "Lora",
                                 sd_model=sd_model, **modules)


def _list_models(sd_models: Any, cmd_opts: Any, ckpt: Any, calls: list) -> None:
    calls.append(("list_models",))
    sd_models.checkpoints_list.clear()
    sd_models.checkpoint_aliases.clear()
    found = [(ckpt, Path(ckpt.filename).name)]  # the --ckpt file, as A1111 registers it first
    for folder in filter(None, [cmd_opts.ckpt_dir, sd_models.model_path]):
        for path in sorted(Path(folder).rglob("*")):
            if path.suffix in (".safetensors", ".ckpt") and not path.name.endswith((".vae.safetensors", ".vae.ckpt")):
                rel = path.relative_to(folder).as_posix()
                found.append((types.SimpleNamespace(filename=str(path), title=rel), path.stem))
    for entry, stem in found:
        sd_models.checkpoints_list[entry.title] = entry
        for alias in filter(None, [entry.title, stem]):
            sd_models.checkpoint_aliases[alias] = entry


def _install_forge(monkeypatch: Any, calls: list) -> None:
    def run_and_wait_result(fn, *args, **kwargs):  # Forge's single worker thread
        out = {}
        worker = threading.Thread(target=lambda: out.setdefault("r", fn(*args, **kwargs)), name="forge-main-thread")
        worker.start()
        worker.join()
        return out["r"]

    main_thread = types.SimpleNamespace(run_and_wait_result=run_and_wait_result)
    forge_pkg = types.ModuleType("modules_forge")
    forge_pkg.main_thread = main_thread
    monkeypatch.setitem(sys.modules, "modules_forge", forge_pkg)
    monkeypatch.setitem(sys.modules, "modules_forge.main_thread", main_thread)


def install_forge_lora(monkeypatch: Any, unet_keys: Dict[str, str], clip_keys: Dict[str, str]) -> None:
    """backend.patcher.lora: key maps {file module name: model key}; load_lora takes each mapped module's keys."""
    def load_lora(lora, to_load):
        taken = {k: v for k, v in lora.items() if k.split(".", 1)[0] in to_load}
        return taken, {k: v for k, v in lora.items() if k not in taken}

    lora_mod = types.SimpleNamespace(model_lora_keys_unet=lambda model, key_map: dict(unet_keys),
                                     model_lora_keys_clip=lambda model, key_map: dict(clip_keys), load_lora=load_lora)
    for name, mod in {"backend": types.ModuleType("backend"), "backend.patcher": types.ModuleType("backend.patcher"),
                      "backend.patcher.lora": lora_mod}.items():
        monkeypatch.setitem(sys.modules, name, mod)
