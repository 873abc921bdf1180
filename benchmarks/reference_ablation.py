"""Ablation on the embedded Fashion-MNIST ViT: which parts of LampQ earn their place.

Runs, on one session (same calibration images, same quantizers, same budgets):
uniform, HAWQ-v2 (Hutchinson Hessian traces + ILP), plain Fisher + ILP (no α_t),
LampQ with one bit pair per block, LampQ without the iterative update, and full
LampQ, at average weight bits {3, 3.5, 4, 5} with 8-bit activations and at the
W4A4- and W6A6-equivalent BOPs budgets. Writes a markdown table, a JSON file and a
plot of top-1 against average weight bits.

    python benchmarks/reference_ablation.py --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import time
from pathlib import Path

import torch

from lampq_fx.allocation.space import SearchSpace
from lampq_fx.data import TensorBatches
from lampq_fx.pipeline import parse_budget
from lampq_fx.reference import load_reference_model, load_reference_sample
from lampq_fx.report import allocation_metrics
from lampq_fx.session import CalibrationSet, LampQSession
from lampq_fx.strategies import get_strategy

STRATEGIES = ("uniform", "hawq-v2", "fisher-ilp", "lampq-block", "lampq-noiter", "lampq")
BUDGETS = ("wbits=3", "wbits=3.5", "wbits=4", "wbits=5", "w4a4", "w6a6")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--calib-images", type=int, default=512)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")

    torch.manual_seed(args.seed)
    sample = load_reference_sample()
    calibration = CalibrationSet(sample["calib_images"][:args.calib_images], sample["calib_labels"][:args.calib_images])
    test = TensorBatches(sample["test_images"], sample["test_labels"], 500)
    session = LampQSession(load_reference_model(), calibration, seed=args.seed, progress=False)
    session.calibrate()
    fp32 = session.evaluate(test)

    rows = []
    for text in BUDGETS:
        spec = parse_budget(text)
        budget = spec.resolve(session.layers)
        space = spec.space(SearchSpace())
        for name in STRATEGIES:
            started = time.perf_counter()
            allocation = get_strategy(name).allocate(session, budget, space)
            seconds = time.perf_counter() - started
            top1 = session.evaluate(test, allocation)
            rows.append({"budget": budget.label, "strategy": name, "top1": top1, "allocation_s": seconds,
                         "calibration_loss": session.calibration_loss(allocation),
                         "metrics": allocation_metrics(session.layers, allocation.choices, session.float_bytes),
                         "bits": {k: v.label for k, v in allocation.choices.items()}})
            logging.info("%s %s: top-1 %.2f%% (%.1f s)", budget.label, name, 100 * top1, seconds)

    args.out.mkdir(parents=True, exist_ok=True)
    record = {"fp32_top1": fp32, "rows": rows, "seed": args.seed, "calibration_images": args.calib_images,
              "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
              "machine": platform.processor() or platform.machine(),
              "date": time.strftime("%Y-%m-%d")}
    (args.out / "reference_ablation.json").write_text(json.dumps(record, indent=1))
    write_table(record, args.out / "reference_ablation.md")
    plot(record, args.out / "reference_ablation.png")


def write_table(record: dict, path: Path) -> None:
    budgets = list(dict.fromkeys(row["budget"] for row in record["rows"]))
    lines = [f"FP32 top-1: {100 * record['fp32_top1']:.2f}%", "",
             "| budget | " + " | ".join(STRATEGIES) + " |", "|---|" + "---:|" * len(STRATEGIES)]
    for budget in budgets:
        cells = []
        for name in STRATEGIES:
            row = next(r for r in record["rows"] if r["budget"] == budget and r["strategy"] == name)
            cells.append(f"{100 * row['top1']:.2f}")
        lines.append(f"| {budget} | " + " | ".join(cells) + " |")
    lines += ["", "Allocation wall time in seconds (float-model Fisher and α_t are computed once and "
              "reused by later rows, so the first LampQ-family row of the first budget carries them):", "",
              "| budget | " + " | ".join(STRATEGIES) + " |", "|---|" + "---:|" * len(STRATEGIES)]
    for budget in budgets:
        cells = [f"{next(r for r in record['rows'] if r['budget'] == budget and r['strategy'] == n)['allocation_s']:.1f}"
                 for n in STRATEGIES]
        lines.append(f"| {budget} | " + " | ".join(cells) + " |")
    lines += ["", "Calibration loss of each allocation (what LampQ's iterative update minimises):", "",
              "| budget | " + " | ".join(STRATEGIES) + " |", "|---|" + "---:|" * len(STRATEGIES)]
    for budget in budgets:
        cells = [f"{next(r for r in record['rows'] if r['budget'] == budget and r['strategy'] == n)['calibration_loss']:.4f}"
                 for n in STRATEGIES]
        lines.append(f"| {budget} | " + " | ".join(cells) + " |")
    path.write_text("\n".join(lines) + "\n")


def plot(record: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    figure, axis = plt.subplots(figsize=(6, 4))
    for name in STRATEGIES:
        points = sorted((r["metrics"]["avg_weight_bits"], 100 * r["top1"]) for r in record["rows"]
                        if r["strategy"] == name and r["budget"].endswith("avg"))
        axis.plot(*zip(*points), marker="o", label=name)
    axis.axhline(100 * record["fp32_top1"], color="gray", linestyle="--", label="FP32")
    axis.set_xlabel("average weight bits (activations 8-bit)")
    axis.set_ylabel("top-1 (%)")
    axis.set_title("Fashion-MNIST reference ViT, 10,000 test images")
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
