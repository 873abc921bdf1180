"""Lowered model against its simulation: logit differences and top-1 agreement.

Takes one allocation from a benchmarks/allocators.py result file, lowers it to the CPU
kernels (promoting widths without a kernel), and compares the lowered model with the
simulation of the promoted allocation on the same test images. A round trip through
``save_lowered`` / ``load_lowered`` is checked on the same images.

    python benchmarks/lowering_check.py --model reference \\
        --allocations benchmarks/results/reference_ablation.json --budget "W3.5 avg"
    python benchmarks/lowering_check.py --model vits-cifar10 --data ../shared/data/cifar10 \\
        --eval-images 500 --allocations benchmarks/results/vits_cifar10_allocators.json --budget "W4 avg"
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import tempfile
import time
from pathlib import Path

import torch

from lampq_fx.deploy import compare_with_simulation, load_lowered, lower_session, save_lowered
from lampq_fx.pipeline import REFERENCE_MODEL, VITS_CIFAR_MODEL, RunConfig, create_model, load_task
from lampq_fx.session import LampQSession

logger = logging.getLogger("lowering-check")


def parse_label(label: str) -> tuple[int | None, int | None]:
    """``w4a8`` → (4, 8), ``a8`` → (None, 8), ``a32`` → (None, None)."""
    match = re.fullmatch(r"(?:w(\d+))?a(\d+)", label)
    if match is None:
        raise ValueError(f"invalid bit label {label!r}")
    weight = int(match.group(1)) if match.group(1) else None
    act = int(match.group(2))
    return weight, None if act == 32 else act


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=REFERENCE_MODEL, choices=(REFERENCE_MODEL, VITS_CIFAR_MODEL))
    parser.add_argument("--data", type=Path)
    parser.add_argument("--eval-images", type=int)
    parser.add_argument("--allocations", type=Path, required=True, help="JSON file from benchmarks/allocators.py")
    parser.add_argument("--budget", default="W4 avg")
    parser.add_argument("--strategy", default="lampq")
    parser.add_argument("--int4-dtype", choices=("bfloat16", "float32"), default="bfloat16",
                        help="dtype of the int4 layers' matmul (float32: exactly the simulated product)")
    parser.add_argument("--float-dtype", choices=("float32", "bfloat16"), default="float32",
                        help="dtype of the ops without an integer kernel (bfloat16: the lampq-bf16 bench variant)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")

    record = json.loads(args.allocations.read_text())
    row = next((r for r in record["rows"] if r["budget"] == args.budget and r["strategy"] == args.strategy), None)
    if row is None:
        parser.error(f"{args.allocations} has no {args.strategy} row at budget {args.budget!r}")
    bits = {name: parse_label(label) for name, label in row["bits"].items()}

    config = RunConfig(model=args.model, data=args.data, eval_images=args.eval_images, calib_images=256,
                       progress=False)
    task = load_task(config)
    session = LampQSession(task.model, task.calibration, progress=False)
    session.calibrate()
    started = time.perf_counter()
    lowered = lower_session(session, bits, int4_dtype=getattr(torch, args.int4_dtype),
                            float_dtype=getattr(torch, args.float_dtype))
    lowering_s = time.perf_counter() - started
    test = list(task.evaluation)
    result = compare_with_simulation(session, lowered, test)
    with tempfile.TemporaryDirectory() as scratch:
        save_lowered(scratch, lowered)
        reloaded = load_lowered(create_model(config), scratch, session.calibration.images[:1])
        with torch.no_grad():
            identical = all(torch.equal(reloaded(images), lowered(images)) for images, _ in test[:2])
    result.update({"model": args.model, "budget": args.budget, "strategy": args.strategy, "lowering_s": lowering_s,
                   "int4_dtype": args.int4_dtype, "float_dtype": args.float_dtype,
                   "reload_identical": identical, "promoted_layers": sum(p.promoted for p in lowered.plans),
                   "plan_table": lowered.plan_table()})
    logger.info("%s %s %s: agreement %.2f%%, max |Δlogit| %.4f, mean %.5f, simulated top-1 %.2f%%, lowered "
                "%.2f%%, reload identical %s", args.model, args.strategy, args.budget, 100 * result["top1_agreement"],
                result["max_abs_diff"], result["mean_abs_diff"], 100 * result["simulated_top1"],
                100 * result["lowered_top1"], identical)
    args.out.mkdir(parents=True, exist_ok=True)
    suffix = ("" if args.int4_dtype == "bfloat16" else "_int4_fp32") + \
        ("" if args.float_dtype == "float32" else "_float_bf16")
    name = f"lowering_{args.model.replace('-', '_')}{suffix}.json"
    (args.out / name).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
