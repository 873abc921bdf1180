#!/usr/bin/env bash
# CPU deployment benchmark: DeiT-S at 224 px with random weights, and the
# embedded reference model. Each model gets a kernel-only LampQ allocation at an
# average of 4.5 weight bits (patch embedding and head kept at 8 bits, since they
# have no int4 kernel), then `lampq bench` times FP32, BF16, int8, int4 and LampQ.
#
#     bash benchmarks/deploy_bench.sh [OUT]     (default OUT: benchmarks/results)
#
# An allocation already in OUT is reused (delete OUT/deit_kernel to allocate again).
set -euo pipefail
out=${1:-benchmarks/results}

if [ ! -f "$out/deit_kernel/w4.5-avg/allocation.json" ]; then
    lampq quantize --model deit_small_patch16_224 --kernel-bits 4,8 --min-bits patch_embed=8,head=8 \
        --budget wbits=4.5 --baseline none --calib-images 32 --rounds 1 --no-progress --out "$out/deit_kernel"
fi
lampq bench --model deit_small_patch16_224 --allocation "$out/deit_kernel/w4.5-avg/allocation.json" \
    --threads 2 --batch-sizes 1,32 --runs 20 --warmup 3 --out "$out/bench_deit"

if [ ! -f "$out/reference_kernel/w4.5-avg/allocation.json" ]; then
    lampq quantize --kernel-bits 4,8 --min-bits patch_embed=8,head=8 --budget wbits=4.5 --baseline none \
        --rounds 1 --no-progress --out "$out/reference_kernel"
fi
lampq bench --allocation "$out/reference_kernel/w4.5-avg/allocation.json" \
    --threads 2 --batch-sizes 1,32 --runs 20 --warmup 3 --out "$out/bench_reference"
