#!/usr/bin/env bash
# Trace and allocate three timm ViTs at their default resolutions with random weights
# (no data: Gaussian-noise calibration). Prints the wall time of each run.
#   bash benchmarks/timm_models.sh [OUT_DIR]
set -euo pipefail
out=${1:-benchmarks/results/timm}
for model in vit_small_patch14_dinov2 deit_small_patch16_224 swin_tiny_patch4_window7_224; do
    start=$(date +%s)
    lampq quantize --model "$model" --calib-images 4 --batch-size 4 --budget wbits=4 \
        --rounds 1 --out "$out/$model" --no-progress 2> "$out-$model.log" || { tail -5 "$out-$model.log"; exit 1; }
    echo "$model: $(( $(date +%s) - start )) s"
done
