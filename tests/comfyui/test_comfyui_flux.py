"""A Flux.1 LoRA we trained loads in a real ComfyUI 0.8.0 (CPU) with no key left out, and changes what it samples.

The base is a full-width, reduced-depth Flux.1-dev in the original single-file layout (one double and one single
block at Flux's widths, random weights, fp16): ComfyUI reads Flux's depth from the keys but its head count and
rope axes are fixed, so only a full-width file is detected as Flux. It is trained for two steps by the core
(`train`, from the files as the Train Flux LoRA node names them), and the LoRA is then read by ComfyUI's own
code in a process of its own: `UNETLoader`'s `load_diffusion_model`, `LoraLoaderModelOnly`'s
`load_lora_for_models`, and `KSampler`'s `common_ksampler` with a conditioning made of random T5/CLIP outputs
(ComfyUI builds T5-XXL at its real size, 4.7B parameters, so no text encoder is loaded: the conditioning is what
CLIPTextEncode would hand KSampler). Every module of the file must be patched ("lora key not loaded" never
logged), and the sampled latent must move.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
COMFYUI_SRC = ROOT / ".ci" / "envs" / "comfyui-src"  # as conftest.py: without it every test here is skipped

COMFY_SIDE = r"""
import json, logging, sys
import torch
unet_path, lora_path = sys.argv[1:3]
sys.argv = [sys.argv[0], "--cpu"]
import comfy.options
comfy.options.enable_args_parsing()
import comfy.cli_args  # noqa: E402  (ComfyUI reads its flags at import, as main.py runs it)
import comfy.sd, comfy.utils, comfy.sample, comfy.samplers  # noqa: E402

caught = []
handler = logging.Handler()
handler.emit = lambda record: caught.append(record.getMessage())
logging.getLogger().addHandler(handler)
model = comfy.sd.load_diffusion_model(unet_path)
lora = comfy.utils.load_torch_file(lora_path, safe_load=True)
patched, _ = comfy.sd.load_lora_for_models(model, None, lora, 1.0, 0.0)
modules = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in lora}
gen = torch.Generator().manual_seed(0)
positive = [[torch.randn(1, 16, 4096, generator=gen), {"pooled_output": torch.randn(1, 768, generator=gen),
                                                        "guidance": 3.5}]]
latent = torch.zeros(1, 16, 8, 8)
noise = torch.randn(latent.shape, generator=gen)


def sample(m):
    return comfy.sample.sample(m, noise, 2, 1.0, "euler", "simple", positive, positive, latent, seed=0)


base, with_lora = sample(model), sample(patched)
print(json.dumps({"not_loaded": [m for m in caught if "lora key not loaded" in m], "modules": len(modules),
                  "patches": len(patched.patches), "model_type": type(model.model).__name__,
                  "moved": float((with_lora - base).abs().max()), "finite": bool(torch.isfinite(with_lora).all())}))
"""


def test_a_flux_lora_we_trained_loads_with_no_key_left_out_and_moves_the_sample(tmp_path, demo_folder):
    import torch

    sys.path.insert(0, str(ROOT / "tests"))
    from flux_files import FULL_WIDTH, write_tiny_flux
    from lora_trainer.config import TrainConfig
    from lora_trainer.training.loop import train

    files = write_tiny_flux(tmp_path / "flux", "dev", width=FULL_WIDTH, dtype=torch.float16)
    cfg = TrainConfig(train_data_dir=str(demo_folder), output_dir=str(tmp_path / "out"), output_name="flux_ci",
                      base_model=files["base_model"], clip_l=files["clip_l"], t5xxl=files["t5xxl"], vae=files["vae"],
                      t5_tokenizer=files["t5_tokenizer"], resolution=64, min_bucket_reso=64, max_bucket_reso=64,
                      lora_rank=4, lora_alpha=4, target_modules=["attn", "ff"], max_train_steps=2,
                      learning_rate=1e-2, device="cpu", seed=0)
    lora = train(cfg).lora_path
    side = tmp_path / "comfy_side.py"
    side.write_text(COMFY_SIDE, encoding="utf-8")
    done = subprocess.run([sys.executable, str(side), files["base_model"], str(lora)], capture_output=True,
                          text=True, cwd=str(COMFYUI_SRC), timeout=900,
                          env={**os.environ, "PYTHONPATH": f"{COMFYUI_SRC}:{os.environ.get('PYTHONPATH', '')}"})
    assert done.returncode == 0, done.stderr[-4000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["model_type"] == "Flux", got
    assert got["not_loaded"] == [], got["not_loaded"][:5]
    assert got["patches"] == got["modules"] > 0, got  # one patch per module of the file: every one reached a weight
    assert got["finite"] and got["moved"] > 1e-4, got
