"""Output files: allocation.json, report.md and the bits-per-layer plot."""

from __future__ import annotations

import io
import json
from collections.abc import Mapping, Sequence
from pathlib import Path

from lampq_fx.allocation.space import (
    Allocation,
    BitChoice,
    Budget,
    average_act_bits,
    average_weight_bits,
    layer_bops,
    model_size_mb,
)
from lampq_fx.analysis.layer_types import LayerInfo, LayerType
from lampq_fx.io import write_bytes_atomic, write_json_atomic

ALLOCATION_FORMAT = 1

TYPE_COLOURS = {
    LayerType.PATCH_EMBED: "#6a3d9a", LayerType.QKV: "#1f78b4", LayerType.ATTN_QK: "#a6cee3",
    LayerType.ATTN_V: "#b2df8a", LayerType.PROJ: "#33a02c", LayerType.FC1: "#ff7f00",
    LayerType.FC2: "#e31a1c", LayerType.HEAD: "#555555", LayerType.OTHER: "#cab2d6",
}


class AllocationFileError(ValueError):
    """An allocation.json file is malformed, of a newer format, or for another model."""


def allocation_metrics(layers: Sequence[LayerInfo], choices: Mapping[str, BitChoice],
                       float_bytes: int) -> dict:
    return {
        "avg_weight_bits": average_weight_bits(layers, choices),
        "avg_act_bits": average_act_bits(layers, choices),
        "size_mb": model_size_mb(layers, choices, float_bytes),
        "gbops": sum(layer_bops(layer, choices[layer.name]) for layer in layers) / 1e9,
    }


def allocation_to_dict(allocation: Allocation, layers: Sequence[LayerInfo], float_bytes: int,
                       extra: Mapping | None = None) -> dict:
    rows = []
    for layer in layers:
        choice = allocation.choices[layer.name]
        rows.append({
            "name": layer.name,
            "type": layer.layer_type.value,
            "kind": layer.kind.value,
            "weight_bits": choice.weight_bits,
            "act_bits": choice.act_bits,
            "omega": layer.omega.get(choice.label) if allocation.strategy != "uniform" else None,
            "params": layer.weight_params,
            "macs": layer.macs,
        })
    return {
        "format_version": ALLOCATION_FORMAT,
        "strategy": allocation.strategy,
        "budget": allocation.budget.to_dict() if allocation.budget else None,
        "solver": allocation.solver,
        "objective": allocation.objective,
        "metrics": allocation_metrics(layers, allocation.choices, float_bytes),
        "rounds": allocation.rounds,
        "layers": rows,
        **(dict(extra) if extra else {}),
    }


def write_allocation(path: Path, allocation: Allocation, layers: Sequence[LayerInfo],
                     float_bytes: int, extra: Mapping | None = None) -> None:
    write_json_atomic(path, allocation_to_dict(allocation, layers, float_bytes, extra))


def read_allocation(path: Path, layers: Sequence[LayerInfo] | None = None) -> Allocation:
    """Read an allocation.json; with ``layers``, check that it describes that model."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise AllocationFileError(f"cannot read allocation file {path}: {error}; expected the allocation.json "
                                  "that lampq quantize writes") from error
    version = data.get("format_version") if isinstance(data, dict) else None
    if not isinstance(version, int):
        raise AllocationFileError(f"{path} is not an allocation file: 'format_version' is missing")
    if version > ALLOCATION_FORMAT:
        raise AllocationFileError(
            f"{path} has allocation format {version}, newer than this lampq_fx reads "
            f"({ALLOCATION_FORMAT}); upgrade lampq_fx")
    try:
        choices = {row["name"]: BitChoice(row["weight_bits"], row["act_bits"]) for row in data["layers"]}
        budget = Budget.from_dict(data["budget"]) if data.get("budget") else None
    except (KeyError, TypeError) as error:
        raise AllocationFileError(f"{path} is malformed: {error!r}") from error
    if layers is not None:
        expected = {layer.name for layer in layers}
        if set(choices) != expected:
            missing = sorted(expected - set(choices))[:3]
            extra = sorted(set(choices) - expected)[:3]
            raise AllocationFileError(
                f"{path} was written for a different model: layers missing from the file "
                f"{missing}, layers the model does not have {extra}")
    return Allocation(choices=choices, strategy=data.get("strategy", ""), budget=budget,
                      solver=data.get("solver"), objective=data.get("objective"),
                      rounds=data.get("rounds") or [])


def plot_bits_per_layer(path: Path, layers: Sequence[LayerInfo],
                        allocations: Mapping[str, Allocation], title: str) -> None:
    """Bar chart of weight bits (activation bits for matmuls) per layer, coloured by type."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    figure, axes = plt.subplots(len(allocations), 1, figsize=(max(8, 0.22 * len(layers)), 2.6 * len(allocations)),
                                sharex=True, squeeze=False)
    positions = range(len(layers))
    colours = [TYPE_COLOURS[layer.layer_type] for layer in layers]
    for axis, (label, allocation) in zip(axes[:, 0], allocations.items()):
        heights = []
        for layer in layers:
            choice = allocation.choices[layer.name]
            heights.append(choice.weight_bits if layer.has_weight else choice.act_bits)
        axis.bar(positions, heights, color=colours, edgecolor="black", linewidth=0.3)
        acts = [allocation.choices[layer.name].act_bits for layer in layers]
        axis.plot(positions, acts, "k_", markersize=7, label="activation bits")
        axis.set_ylabel("bits")
        axis.set_ylim(0, 9)
        axis.set_yticks([0, 2, 4, 6, 8])
        axis.set_title(label, fontsize=9)
        axis.grid(axis="y", alpha=0.3)
    axes[-1, 0].set_xticks(list(positions))
    axes[-1, 0].set_xticklabels([layer.name for layer in layers], rotation=90, fontsize=6)
    present = sorted({layer.layer_type for layer in layers}, key=lambda t: list(LayerType).index(t))
    handles = [Patch(color=TYPE_COLOURS[t], label=t.value) for t in present]
    handles.append(plt.Line2D([], [], color="k", marker="_", linestyle="", label="activation bits"))
    figure.suptitle(title + " (bars: weight bits, or activation bits for matmuls)", fontsize=10, y=0.995)
    figure.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 0.965), fontsize=7,
                  ncol=len(handles), frameon=False)
    figure.tight_layout(rect=(0, 0, 1, 0.93))
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    plt.close(figure)
    write_bytes_atomic(Path(path), buffer.getvalue())


def format_table(rows: Sequence[Mapping], fp32_top1: float | None, metric: str = "top-1") -> str:
    """Markdown table of results; ``top1`` contains the task metric (top-1 or box AP) as a fraction or None."""
    header = (f"| budget | strategy | {metric} (%) | Δ vs FP32 | avg W bits | avg A bits | size (MB) | GBOPs |\n"
              "|---|---|---:|---:|---:|---:|---:|---:|")
    lines = [header]
    if fp32_top1 is not None:
        lines.append(f"| — | FP32 | {100 * fp32_top1:.2f} | — | 32 | 32 | — | — |")
    for row in rows:
        top1 = row.get("top1")
        top1_text = f"{100 * top1:.2f}" if top1 is not None else "n/a"
        delta = f"{100 * (top1 - fp32_top1):+.2f}" if top1 is not None and fp32_top1 is not None else "n/a"
        metrics = row["metrics"]
        lines.append(f"| {row['budget']} | {row['strategy']} | {top1_text} | {delta} | "
                     f"{metrics['avg_weight_bits']:.2f} | {metrics['avg_act_bits']:.2f} | "
                     f"{metrics['size_mb']:.3f} | {metrics['gbops']:.3f} |")
    return "\n".join(lines)
