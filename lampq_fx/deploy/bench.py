"""``lampq bench``: CPU latency, throughput, memory and weight bytes of deployment variants.

Variants, all of the same model and measured in one run:

* ``fp32``: the eager float model;
* ``bf16``: the eager model cast to BF16, BF16 inputs;
* ``int8``: every weighted layer static int8 (torch.ao FX, x86);
* ``int4``: every linear layer int4 weight-only (layers without an int4 kernel go to int8);
* ``lampq``: the allocation given with ``--allocation``, lowered with the same kernels.

The lowered variants are built, saved with ``save_lowered`` and loaded again before
they are timed, as a deployment would load them. For each variant and batch size the
run does ``warmup`` calls, then times ``runs`` calls and reports the median latency,
the 10th-90th percentile spread and throughput (images / median latency). Peak
resident memory is the process's high-water mark (VmHWM) while that variant runs;
the mark is reset before each variant through ``/proc/self/clear_refs``.
"""

from __future__ import annotations

import gc
import logging
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from lampq_fx.deploy.lowered import LoweredModel, load_lowered, lower_session, save_lowered
from lampq_fx.deploy.lowering import format_op_table
from lampq_fx.io import write_json_atomic, write_text_atomic

logger = logging.getLogger(__name__)

VARIANTS = ("fp32", "bf16", "int8", "int4", "lampq", "lampq-bf16")
# lampq-bf16: the LampQ allocation with the ops that stay float run in BF16 instead of FP32


@dataclass
class BenchConfig:
    batch_sizes: tuple[int, ...] = (1, 32)
    runs: int = 20
    warmup: int = 3
    threads: int = 2
    mode: str = "static"
    calibration_images: int = 64
    variants: tuple[str, ...] = VARIANTS
    out: Path | None = None
    extra: dict = field(default_factory=dict)


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _rss_mb(field_name: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def time_calls(function: Callable[[], object], runs: int, warmup: int) -> list[float]:
    """Seconds per call of ``function`` over ``runs`` timed calls after ``warmup`` untimed ones."""
    if runs < 1:
        raise ValueError(f"runs must be ≥ 1, got {runs}")
    with torch.inference_mode():
        for _ in range(warmup):
            function()
        times = []
        for _ in range(runs):
            started = time.perf_counter()
            function()
            times.append(time.perf_counter() - started)
    return times


def _percentile(values: Sequence[float], fraction: float) -> float:
    ordered = sorted(values)
    position = fraction * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def float_weight_bytes(model: nn.Module, bytes_per_value: int = 4) -> int:
    return sum(p.numel() for p in model.parameters()) * bytes_per_value


def measure(name: str, module: Callable[[torch.Tensor], torch.Tensor], input_shape: tuple[int, ...],
            dtype: torch.dtype, config: BenchConfig, weight_bytes: int) -> dict:
    gc.collect()
    reset = _reset_peak_rss()
    before = _rss_mb("VmRSS")
    row = {"variant": name, "weight_bytes": weight_bytes, "rss_before_mb": before, "batches": {}}
    for batch in config.batch_sizes:
        images = torch.randn(batch, *input_shape).to(dtype)
        times = time_calls(lambda: module(images), config.runs, config.warmup)
        median = statistics.median(times)
        row["batches"][str(batch)] = {"median_ms": 1e3 * median, "p10_ms": 1e3 * _percentile(times, 0.1),
                                      "p90_ms": 1e3 * _percentile(times, 0.9), "images_per_s": batch / median}
        logger.info("%s batch %d: median %.1f ms (p10 %.1f, p90 %.1f), %.1f images/s", name, batch, 1e3 * median,
                    row["batches"][str(batch)]["p10_ms"], row["batches"][str(batch)]["p90_ms"], batch / median)
    row["peak_rss_mb"] = _rss_mb("VmHWM") if reset else None
    return row


def run_bench(model_factory: Callable[[], nn.Module], session_factory: Callable[[], object],
              allocation_path: Path | None, config: BenchConfig, description: str) -> dict:
    """Measure every variant in ``config.variants``; ``allocation_path`` is needed for ``lampq``.

    ``session_factory`` builds the ``LampQSession`` whose traced model and calibration
    images the lowering uses; it is dropped before any timing starts.
    """
    from lampq_fx.report import read_allocation
    torch.set_num_threads(config.threads)
    variants = [v for v in config.variants if not v.startswith("lampq") or allocation_path is not None]
    if any(v.startswith("lampq") for v in config.variants) and allocation_path is None:
        logger.warning("no --allocation: the lampq variant is skipped")
    record = {"task": description, "threads": config.threads, "mode": config.mode, "runs": config.runs,
              "warmup": config.warmup, "batch_sizes": list(config.batch_sizes), "torch": torch.__version__,
              "machine": platform.processor() or platform.machine(), "date": time.strftime("%Y-%m-%d"),
              "rows": [], "lowering": {}, **config.extra}
    with tempfile.TemporaryDirectory(prefix="lampq-bench-") as scratch:
        session = session_factory()
        layers = session.layers
        lowered_bits = {
            "int8": {layer.name: (8, 8) if layer.has_weight else (None, None) for layer in layers},
            "int4": {layer.name: (4, None) if layer.has_weight else (None, None) for layer in layers},
        }
        if allocation_path is not None:
            allocation = read_allocation(allocation_path, layers)
            lowered_bits["lampq"] = lowered_bits["lampq-bf16"] = allocation.bits()
            record["allocation"] = {"path": str(allocation_path), "strategy": allocation.strategy,
                                    "budget": allocation.budget.label if allocation.budget else None}
        input_shape = tuple(session.calibration.images.shape[1:])
        record["task"] = f"{description}, input {input_shape[-2]}×{input_shape[-1]} px"
        example = session.calibration.images[:1].clone()
        float_bytes = float_weight_bytes(session.traced)
        saved = {}
        for name in variants:
            if name in lowered_bits:
                lowered = lower_session(session, lowered_bits[name], mode=config.mode,
                                        calibration_images=config.calibration_images,
                                        float_dtype=torch.bfloat16 if name.endswith("-bf16") else torch.float32,
                                        label=f"bench variant {name}")
                saved[name] = save_lowered(Path(scratch) / name, lowered)
                record["lowering"][name] = {"op_table": lowered.op_table(), "plan_table": lowered.plan_table(),
                                            "weight_bytes": lowered.weight_bytes()}
                del lowered
        del session
        gc.collect()
        for name in variants:
            if name == "fp32":
                model = model_factory().eval()
                row = measure(name, model, input_shape, torch.float32, config, float_bytes)
            elif name == "bf16":
                model = model_factory().eval().to(torch.bfloat16)
                row = measure(name, model, input_shape, torch.bfloat16, config, float_bytes // 2)
            else:
                loaded: LoweredModel = load_lowered(model_factory(), saved[name], example)
                model = loaded.module
                row = measure(name, model, input_shape, torch.float32, config, loaded.weight_bytes())
                del loaded
            record["rows"].append(row)
            del model
            gc.collect()
    _add_ratios(record)
    if config.out is not None:
        write_json_atomic(config.out / "bench.json", record)
        write_text_atomic(config.out / "bench.md", render_bench(record))
        plot_bench(record, config.out / "bench.png")
    return record


def _add_ratios(record: dict) -> None:
    rows = {row["variant"]: row for row in record["rows"]}
    for row in record["rows"]:
        for batch, entry in row["batches"].items():
            for base in ("fp32", "bf16"):
                if base in rows:
                    entry[f"speedup_vs_{base}"] = rows[base]["batches"][batch]["median_ms"] / entry["median_ms"]
        if "fp32" in rows:
            row["weight_ratio_vs_fp32"] = row["weight_bytes"] / rows["fp32"]["weight_bytes"]


def render_bench(record: dict) -> str:
    threads = f"{record['threads']} thread" + ("s" if record["threads"] != 1 else "")
    lines = [f"Task: {record['task']}. torch {record['torch']}, {threads}, int8 mode "
             f"{record['mode']}, {record['warmup']} warm-up and {record['runs']} timed calls per point, "
             f"{record['date']}.", "",
             "| variant | batch | median (ms) | p10-p90 (ms) | images/s | × FP32 | × BF16 | weight MB | "
             "weights / FP32 | peak RSS (MB) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in record["rows"]:
        for batch, entry in row["batches"].items():
            peak = f"{row['peak_rss_mb']:.0f}" if row.get("peak_rss_mb") else "n/a"
            lines.append(
                f"| {row['variant']} | {batch} | {entry['median_ms']:.1f} | {entry['p10_ms']:.1f}-{entry['p90_ms']:.1f} | "
                f"{entry['images_per_s']:.1f} | {entry.get('speedup_vs_fp32', float('nan')):.2f} | "
                f"{entry.get('speedup_vs_bf16', float('nan')):.2f} | {row['weight_bytes'] / 1e6:.2f} | "
                f"{row.get('weight_ratio_vs_fp32', float('nan')):.3f} | {peak} |")
    lines += ["", "× FP32 and × BF16 are speed-ups (median latency of the base / this variant's). Peak RSS "
              "includes the Python process and the torch libraries.", ""]
    for name, info in record["lowering"].items():
        lines += [f"### {name}: ops and the kernels they run on", "", format_op_table(info["op_table"]), "",
                  f"Layers whose bits changed for {name}:", "", info["plan_table"], ""]
    return "\n".join(lines)


def plot_bench(record: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    batches = [str(b) for b in record["batch_sizes"]]
    figure, axes = plt.subplots(1, len(batches), figsize=(4.5 * len(batches), 3.4), squeeze=False)
    for axis, batch in zip(axes[0], batches):
        names = [row["variant"] for row in record["rows"]]
        values = [row["batches"][batch]["images_per_s"] for row in record["rows"]]
        axis.bar(names, values, color=["#888888", "#4c72b0", "#55a868", "#c44e52", "#8172b2", "#937860"][:len(names)])
        axis.tick_params(axis="x", labelsize=7)
        axis.set_title(f"batch {batch}", fontsize=9)
        axis.set_ylabel("images / s")
        axis.grid(axis="y", alpha=0.3)
    figure.suptitle(f"{record['task']}, {record['threads']} threads", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
