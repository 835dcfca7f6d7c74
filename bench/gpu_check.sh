#!/usr/bin/env bash
# Every GPU check of a lent device machine in one call (about 8 minutes on one H200), results in $OUT:
#   1. the GPU tests (@pytest.mark.gpu: mixed precision, fused AdamW, VRAM handed back, fp8 and offload on CUDA)
#   2. plan vs measured peak VRAM (torch.cuda.max_memory_allocated): SD1.5 512 px bf16, and SDXL 1024 px with the
#      Low VRAM preset (checkpointing + fp8 + batch 1), random weights in the real architectures
#   3. images/s of SD1.5 512 px bf16 batch 4 against the FLOP floor (1,718 GFLOP per image for a LoRA
#      forward + backward) at the GPU's dense bf16 rate
#   4. Flux (FLUX=0 skips it): plan vs measured peak VRAM of the full-width, reduced-depth Flux.1 (one double and
#      one single block) at 1024 px, bf16 and fp8 with gradient checkpointing, and its s/step against the bare
#      diffusers + peft loop
#
# Here, once (the device image has torch, peft and transformers but not diffusers, open_clip or ftfy):
#   bash bench/gpu_check.sh --prepare          # downloads those wheels into .whl/ (git-ignored)
# Then the device tool:  run(command="bash bench/gpu_check.sh", carry=[".whl"], timeout_s=560)
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if [[ "${1:-}" == --prepare ]]; then
    exec python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 -d .whl \
        diffusers open_clip_torch ftfy wcwidth
fi

OUT="${OUT:-$(mktemp -d -t gpu_check.XXXXXX)}"  # the device tool sets OUT; elsewhere a fresh temporary folder
mkdir -p "$OUT"
echo "results in $OUT"
DEPS="$(mktemp -d -t lt-deps.XXXXXX)"
trap 'rm -rf "$DEPS"' EXIT
export PYTHONPATH="$DEPS:$PWD" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
python3 -m pip install --quiet --no-deps --no-index --target "$DEPS" .whl/*.whl 2>&1 | tail -2
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
status=0

echo "== 1. GPU tests"
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tee "$OUT/tests.log" | tail -5 || status=1

echo "== 2. plan vs measured peak VRAM"
timeout 170 python3 bench/memory.py --device cuda --families sd1 --resolutions 512 --precisions bf16 \
    2>&1 | tee "$OUT/plan_sd15.md" | tail -4 || status=1
timeout 200 python3 bench/memory.py --device cuda --families sdxl --resolutions 1024 --precisions bf16 --low-vram \
    2>&1 | tee "$OUT/plan_sdxl.md" | tail -4 || status=1

echo "== 3. SD1.5 512 px bf16 batch 4: images/s against the FLOP floor"
timeout 120 python3 bench/train_step.py --device cuda --batch-size 4 --steps 20 --warmup 5 2>&1 |
    tee "$OUT/speed.md" | tail -6 || status=1
python3 - "$OUT/speed.md" <<'PY' | tee -a "$OUT/speed.md"
import re, sys
text = open(sys.argv[1]).read()
row = re.search(r"\| lora_trainer train\(cfg\) \| ([\d.]+) \|", text)
if row:
    per_image = float(row[1]) / 4
    floor = 1718e9 / 790e12  # bf16 dense matrix rate measured on this kind (KINDS.md): ~790 TFLOP/s
    print(f"\n{1 / per_image:.1f} images/s; FLOP floor {1 / floor:.0f} images/s; {floor / per_image:.1%} of the floor")
PY
if [[ "${FLUX:-1}" != 0 ]]; then
    echo "== 4. Flux.1 (full width, 1 double + 1 single block): plan vs measured, s/step"
    timeout 150 python3 bench/memory.py --device cuda --families flux --resolutions 1024 --precisions bf16,fp8 \
        --checkpointing 2>&1 | tee "$OUT/plan_flux.md" | tail -4 || status=1
    timeout 120 python3 bench/train_step.py --device cuda --family flux --resolution 1024 --steps 10 --warmup 3 \
        2>&1 | tee "$OUT/speed_flux.md" | tail -6 || status=1
fi
exit $status
