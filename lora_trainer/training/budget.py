"""Fitting a run into the memory it has: the plan's changes before loading (`memory_budget_gb`), and the
step-down after CUDA runs out of memory mid-step, redoing that step exactly with the next change."""

from __future__ import annotations

from typing import Any

from .memory import forget_frames, release


MAX_BACK_OFFS = 3


def fit_budget(cfg: Any, callbacks: Any, base_weights: Any = None, components: Any = None) -> Any:
    """`cfg` with the memory plan's changes applied when `memory_budget_gb` is set; says which."""
    from .plan import apply_plan, budget_is_set, plan_memory

    if not budget_is_set(cfg.memory_budget_gb):
        return cfg
    from ..model.detect import detect_family
    from ..model.flux import is_flux

    family = components.family if components is not None else None
    if family is None and base_weights is not None:
        family = "flux" if is_flux(base_weights) else detect_family(list(base_weights))
    plan = plan_memory(cfg, None, cfg.memory_budget_gb, family=family, weights=base_weights)
    said = ", ".join(f"{k}: {v}" for change in plan.changes for k, v in change["set"].items())
    callbacks.on_status(f"memory plan on {plan.device}: predicted peak {plan.peak_bytes / 2**30:.1f} GB, budget "
                        f"{plan.budget_bytes / 2**30:.1f} GB" + (f"; changed {said} → {plan.final_peak / 2**30:.1f} GB"
                                                                 if said else "; no change needed"))
    return apply_plan(cfg, plan)


def start_of_step(run: Any) -> tuple:
    """What redoing the coming optimizer step needs: the position and every RNG state."""
    from .state import Position, rng_state

    pos = run.position
    return Position(pos.step, pos.epoch, pos.batch), rng_state()


def back_off(run: Any, callbacks: Any, step_start: tuple, err: BaseException) -> None:
    """After CUDA ran out of memory mid-step: free the step, apply the plan's next change to the run in place and
    rewind to the step's start, so the run goes on exactly as if the step had begun with the new setting.
    The changes are recorded in `run.info["memory_changes"]` (and so in the LoRA's metadata)."""
    from ..errors import TrainingError
    from .plan import next_change
    from .state import restore_rng

    forget_frames(err)  # the failed step's activations live in its frames
    run.optimizer.zero_grad(set_to_none=True)
    release()
    done = run.info.setdefault("memory_changes", [])
    position, rng = step_start
    # Several processes must keep one setting: a step-down on one alone would part them, so they stop instead.
    alone = not run.processes.many
    change = next_change(run.cfg, run.device.type, batch=False) if alone and len(done) < MAX_BACK_OFFS else None
    if change is None:
        raise TrainingError(
            f"Out of GPU memory at step {position.step + 1}" + (f" even after {_said(done)}" if done else "") +
            f". Continue with --resume {run.cfg.output_dir} (from the last checkpoint) and a smaller batch_size (with "
            "more gradient_accumulation_steps) or resolution, or run `python -m lora_trainer plan` with "
            "--budget-gb to see what fits.") from None
    apply_in_place(run, change)
    run.position.step, run.position.epoch, run.position.batch = position.step, position.epoch, position.batch
    restore_rng(rng)
    done.append(change)
    callbacks.on_status(f"out of GPU memory at step {position.step + 1}: continuing with {_said([change])} "
                        f"(step-down {len(done)} of at most {MAX_BACK_OFFS})")


def apply_in_place(run: Any, change: dict) -> None:
    """Apply a memory setting to a running run's models (no reload)."""
    from ..model.precision import place_base_weights, storage_dtype, store_base_weights
    from .setup import pick_precision

    comps = run.components
    if change.get("gradient_checkpointing"):
        comps.unet.enable_gradient_checkpointing()
        for te in comps.text_encoders if run.te_params else []:
            te.gradient_checkpointing_enable()
    cfg = run.cfg.replace(**change)
    if "base_precision" in change or "offload" in change:
        _, compute = pick_precision(cfg, run.device)
        storage = storage_dtype(cfg.base_precision, compute)
        offload = cfg.offload == "blocks" and run.device.type == "cuda"
        models = [comps.unet, *comps.text_encoders]
        store_base_weights(models, storage, compute, offload=offload)
        place_base_weights(comps.unet, run.device, offload)
        run.info["base_precision"] = str(storage).removeprefix("torch.")
    run.cfg = cfg


def _said(changes: list) -> str:
    return "; ".join(", ".join(f"{k}: {v}" for k, v in c.items()) for c in changes)
