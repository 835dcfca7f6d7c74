"""ComfyUI's side of the core's interfaces: progress, cancel, memory, the LoRA folder, the graph's weights.

Every ComfyUI module (`folder_paths`, `comfy.*`, `nodes`) is imported inside the function that
needs it, so importing this file outside ComfyUI (the tests, the CLI) works.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional

from ..lora_trainer.callbacks import Callbacks, HostInterface
from ..lora_trainer.errors import LoraTrainerError
from ..lora_trainer.model.loader import HandedOver


class ComfyCallbacks(Callbacks):
    """Progress into ComfyUI's bar; Cancel (the queue's interrupt flag) becomes should_stop.

    ComfyUI's global progress hook raises on Cancel from inside `ProgressBar.update`; that must not
    escape into the training loop (it would skip the resumable save), so it is caught and remembered.
    """

    def __init__(self, node_id: Optional[str] = None) -> None:
        self.node_id = node_id
        self.bar: Any = None
        self.stopped = False
        self.plan = ""

    def on_progress(self, step: int, total: int) -> None:
        import comfy.model_management as mm
        import comfy.utils

        if self.should_stop():
            return
        if self.bar is None or self.bar.total != total:
            self.bar = comfy.utils.ProgressBar(total, node_id=self.node_id)
        try:
            self.bar.update_absolute(step, total)
        except mm.InterruptProcessingException:
            self.stopped = True

    def on_status(self, message: str) -> None:
        if message.startswith("memory plan"):
            self.plan = message  # shown on the node with the result
        print(f"[LoRA Trainer] {message}", flush=True)  # flushed: the log is how a user follows a run

    def on_saved(self, path: Path, final: bool) -> None:
        if final:
            self.on_status(f"saved {path}")

    def should_stop(self) -> bool:
        import comfy.model_management as mm

        self.stopped = self.stopped or mm.processing_interrupted()
        return self.stopped

    def raise_if_stopped(self, what_now: str) -> None:
        """Tell ComfyUI the node was cancelled (its history then reads `execution_interrupted`)."""
        import comfy.model_management as mm

        if self.stopped:
            self.on_status(f"cancelled: {what_now}")
            mm.throw_exception_if_processing_interrupted()  # resets the flag when it is still set
            raise mm.InterruptProcessingException()


class ComfyHost(HostInterface):
    """Finished LoRAs go to ComfyUI's first `loras` folder; its models leave the GPU while we train."""

    def lora_dir(self) -> Optional[Path]:
        import folder_paths

        return Path(folder_paths.get_folder_paths("loras")[0])

    def free_gpu(self) -> None:
        import comfy.model_management as mm

        mm.unload_all_models()
        mm.soft_empty_cache()

    def restore_gpu(self) -> None:
        import comfy.model_management as mm

        mm.soft_empty_cache()  # ComfyUI loads its models back by itself when a node next needs them

    def refresh_loras(self) -> None:
        import folder_paths

        # The cache is also invalidated by the folder's mtime; dropping it makes that certain.
        getattr(folder_paths, "filename_list_cache", {}).pop("loras", None)


def graph_weights(model: Any, clip: Any = None, vae: Any = None) -> HandedOver:
    """The graph's weights as one original-layout state dict, the way CheckpointSave builds it.

    Call under `torch.inference_mode(False)`: the copies are then ordinary tensors that autograd
    accepts (ComfyUI loaded its weights inside inference mode). Copies go to the CPU so that
    unloading ComfyUI's models really frees the GPU.
    """
    import comfy.model_management as mm

    clip_sd, vae_sd, load = None, None, [model]
    if clip is not None:
        load.append(clip.load_model())
        clip_sd = clip.get_sd()
    if vae is not None:
        vae_sd = vae.get_sd()
    mm.load_models_gpu(load, force_patch_weights=True)  # bakes in any LoRA applied upstream, as CheckpointSave
    sd = model.model.state_dict_for_saving(clip_sd, vae_sd, None)
    # Handed over: the loader turns these copies into the training copy tensor by tensor, never a second one.
    return HandedOver((k, v.detach().to("cpu", copy=True)) for k, v in sd.items())


def lora_module_names(keys: Iterable[str]) -> List[str]:
    return sorted({k.split(".", 1)[0] for k in keys if k.startswith("lora_")})


def check_lora_keys(lora: Dict[str, Any], model: Any, clip: Any = None) -> None:
    """Every module of our file must be in ComfyUI's own key map for this model (else: `lora key not loaded`);
    without a CLIP, the text encoder's modules are not checked (they are not applied)."""
    import comfy.lora

    key_map: Dict[str, Any] = {}
    comfy.lora.model_lora_keys_unet(model.model, key_map)
    if clip is not None:
        comfy.lora.model_lora_keys_clip(clip.cond_stage_model, key_map)
    names = [n for n in lora_module_names(lora) if clip is not None or n.startswith("lora_unet_")]
    missing = [name for name in names if name not in key_map]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise LoraTrainerError(f"{len(missing)} LoRA modules would not load in ComfyUI for this model: {shown}. "
                               "The file was saved; please report this with the model's name.")


def load_lora_file(path: Path) -> Dict[str, Any]:
    import comfy.utils

    return comfy.utils.load_torch_file(str(path), safe_load=True)
