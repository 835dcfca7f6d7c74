"""GPU-only checks (skipped without CUDA): mixed precision keeps LoRA in fp32 and VRAM is given back."""

import pytest
import torch

from lora_trainer.model import build_tiny_components
from lora_trainer.training.loop import train

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains_with_fp32_lora_and_frees_vram(precision, make_cfg):
    from lora_trainer.adapters.lora import lora_parameters

    before = torch.cuda.memory_allocated()
    components = build_tiny_components("sd1", seed=0)
    cfg = make_cfg(max_train_steps=6, device="cuda", mixed_precision=precision, gradient_checkpointing=True)
    result = train(cfg, components=components)
    assert result.lora_path.is_file() and all(torch.isfinite(torch.tensor(x)) for x in result.losses)
    assert all(p.dtype == torch.float32 for p in lora_parameters(components.unet))
    half = torch.bfloat16 if precision == "bf16" else torch.float16
    assert components.unet.conv_in.weight.dtype == half
    assert next(components.unet.parameters()).device.type == "cpu"  # handed back
    assert torch.cuda.memory_allocated() <= before + 1024 * 1024


def test_cuda_uses_fused_adamw(make_cfg):
    from lora_trainer.callbacks import Callbacks
    from lora_trainer.training.setup import prepare_run

    run = prepare_run(make_cfg(device="cuda"), Callbacks(), components=build_tiny_components("sd1"))
    assert run.optimizer.defaults.get("fused") is True


def test_fp8_offload_keeps_layer_weights_in_cpu_ram_while_training(make_cfg):
    from lora_trainer.callbacks import Callbacks
    from lora_trainer.adapters.lora import lora_parameters

    components = build_tiny_components("sd1", seed=0)
    seen = []

    class Where(Callbacks):
        def on_loss(self, step, loss, lr):
            unet = components.unet
            seen.append((unet.conv_in.weight.device.type, unet.conv_in.weight.dtype, unet.conv_norm_out.weight.device.type,
                         {p.device.type for p in lora_parameters(unet)}))

    cfg = make_cfg(max_train_steps=2, device="cuda", mixed_precision="bf16", base_precision="fp8", offload="blocks",
                   sample_prompts=["a house"])
    result = train(cfg, Where(), components=components)
    assert result.lora_path.is_file() and all(torch.isfinite(torch.tensor(x)) for x in result.losses)
    assert seen[0] == ("cpu", torch.float8_e4m3fn, "cuda", {"cuda"})  # layer weights in RAM, the rest on the GPU


def test_out_of_memory_on_cuda_steps_down(make_cfg, monkeypatch):
    import lora_trainer.training.loop as train_mod

    real, raised = train_mod._micro_step, []

    def micro_step(run, *args):
        if run.position.step == 1 and not raised:
            raised.append(1)
            torch.empty(1 << 50, device="cuda")  # a real CUDA out-of-memory error
        return real(run, *args)

    monkeypatch.setattr(train_mod, "_micro_step", micro_step)
    result = train(make_cfg(max_train_steps=3, device="cuda"), components=build_tiny_components("sd1", seed=0))
    assert raised and result.steps == 3
