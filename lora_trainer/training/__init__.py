"""The training stage: config + data + model + adapter → a trained LoRA.

- `loop`: `train()`, the steps, Ctrl-C, out-of-memory step-down, the callbacks;
- `setup`: the checks before loading, and the run's parts (model, adapter, data, caches, optimizer);
- `objective`: noise, timesteps, the noisy input, the model call, the target and the per-image loss,
  shared by the loop and validation (a new family's objective goes here);
- `optimizers`: the optimizer a config names (a new optimizer goes here);
- `checkpoints`, `state`: what a run saves, and resuming from it;
- `validation`: the held-out loss and the best checkpoint;
- `plan`, `activations`, `memory`: the peak predicted before loading, and releasing memory;
- `distributed`, `launch`: several processes (torchrun + DDP, `--gpus`).
"""
