"""Type-aware Fisher sensitivity Ω of every layer at every candidate bit-width.

    Ω_i(b_w, b_a) = α_t(i) · ½ · [ tr(F^W_i) · mse_W,i(b_w) + Σ_k tr(F^X_i,k) · mse_X,i,k(b_a) ]

tr(F) are the empirical Fisher traces of ``fisher.py``. mse is the mean squared
quantization error per element of the weight (``mse_W``) and of each activation
input k (``mse_X``, measured on calibration samples). The bracket is the
second-order estimate of the loss increase, ½ Σ_j F_jj Δ_j², when the quantization
error Δ is spread evenly over the elements, since then Σ_j F_jj Δ_j² ≈ tr(F)·mse.

α_t puts the layer types on one scale. That even-spread assumption fails
differently per type (outlier channels in the LayerNorm outputs that feed qkv/fc1,
heavy-tailed post-GELU inputs of fc2, one-sided post-softmax inputs), so the raw
scores of two types are not comparable. α_t is fitted by measurement: quantize
every layer of type t at a low bit-width b with all else in float, measure the
calibration-loss increase ΔL_t(b), and solve the least-squares fit through the
origin over the fit bit-widths:

    α_t = Σ_b ΔL_t(b)·S_t(b) / Σ_b S_t(b)²,   S_t(b) = Σ_{i∈t} Ω_i(b) with α = 1.

Worked example: S_qkv(3) = 0.02 and ΔL_qkv(3) = 0.05 give α_qkv = 2.5. A type whose
measured increase is not positive (robust to that bit-width) gets α_t = 1% of the
median fitted α, so it is still scored but cheaply.
"""

from __future__ import annotations

import logging
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from lampq_fx.allocation.space import BitChoice, SearchSpace
from lampq_fx.analysis.layer_types import LayerInfo, LayerType
from lampq_fx.metrics.fisher import FisherTrace

logger = logging.getLogger(__name__)

ALPHA_FLOOR_FRACTION = 0.01


@dataclass
class ErrorTable:
    """Mean squared quantization errors per layer: weight by bits, each input by bits."""

    weight: dict[str, dict[int, float]]
    inputs: dict[str, list[dict[int, float]]]


@dataclass
class TypeScaleFit:
    """The α of one layer type and the measurements it was fitted to."""

    alpha: float
    points: list[dict] = field(default_factory=list)
    note: str = ""


@dataclass
class SensitivityTable:
    """Ω for every layer and candidate, with the ingredients kept for reports."""

    layers: list[LayerInfo]
    candidates: dict[str, list[BitChoice]]
    fisher: dict[str, FisherTrace]
    errors: ErrorTable
    alpha: dict[LayerType, TypeScaleFit]
    type_aware: bool = True

    def raw_omega(self, name: str, choice: BitChoice, fisher: Mapping[str, FisherTrace] | None = None
                  ) -> float:
        trace = (fisher or self.fisher)[name]
        total = 0.0
        if choice.weight_bits is not None and trace.weight:
            total += trace.weight * self.errors.weight[name][choice.weight_bits]
        if choice.act_bits is not None:
            for input_trace, errors in zip(trace.inputs, self.errors.inputs[name]):
                total += input_trace * errors[choice.act_bits]
        return 0.5 * total

    def scale(self, layer: LayerInfo) -> float:
        if not self.type_aware:
            return 1.0
        fit = self.alpha.get(layer.layer_type)
        return fit.alpha if fit is not None else 1.0

    def omega(self, layer: LayerInfo, choice: BitChoice,
              fisher: Mapping[str, FisherTrace] | None = None) -> float:
        return self.scale(layer) * self.raw_omega(layer.name, choice, fisher)

    def with_fisher(self, fisher: dict[str, FisherTrace]) -> "SensitivityTable":
        return SensitivityTable(self.layers, self.candidates, fisher, self.errors, self.alpha,
                                self.type_aware)

    def without_type_scale(self) -> "SensitivityTable":
        return SensitivityTable(self.layers, self.candidates, self.fisher, self.errors,
                                self.alpha, type_aware=False)

    def per_type_summary(self, reference: BitChoice) -> list[dict]:
        """Raw and type-scaled Ω summed per type at one reference bit choice."""
        rows: dict[LayerType, dict] = {}
        for layer in self.layers:
            choice = BitChoice(reference.weight_bits if layer.has_weight else None,
                               reference.act_bits)
            if not _has_errors(self, layer, choice):
                continue
            row = rows.setdefault(layer.layer_type, {"type": layer.layer_type.value, "layers": 0,
                                                     "raw": 0.0, "scaled": 0.0})
            raw = self.raw_omega(layer.name, choice)
            row["layers"] += 1
            row["raw"] += raw
            fit = self.alpha.get(layer.layer_type)
            row["scaled"] += raw * (fit.alpha if fit else 1.0)
            row["alpha"] = fit.alpha if fit else 1.0
            row["note"] = fit.note if fit else "not fitted"
        return list(rows.values())


def _has_errors(table: SensitivityTable, layer: LayerInfo, choice: BitChoice) -> bool:
    if choice.weight_bits is not None and choice.weight_bits not in table.errors.weight[layer.name]:
        return False
    return all(choice.act_bits in errors for errors in table.errors.inputs[layer.name])


def fit_type_scales(
    layers: Sequence[LayerInfo],
    table: SensitivityTable,
    space: SearchSpace,
    measure_loss_increase: Callable[[dict[str, tuple[int | None, int | None]]], float],
    weight_fit_bits: Sequence[int] = (3, 4),
    act_fit_bits: Sequence[int] = (4,),
) -> dict[LayerType, TypeScaleFit]:
    """Fit α_t for every layer type that has more than one candidate.

    ``measure_loss_increase(bits)`` quantizes the named layers at the given
    (weight, activation) bits, all others float, and returns the calibration-loss
    increase over the float model.
    """
    # Errors exist only for candidate widths, so probe at the requested widths that are
    # candidates, or else at the lowest candidates (4 and 8 with --kernel-bits 4,8).
    weight_fit_bits = [b for b in weight_fit_bits if b in space.weight_bits] or sorted(space.weight_bits)[:2]
    act_fit_bits = [b for b in act_fit_bits if b in space.act_bits] or sorted(space.act_bits)[:1]
    by_type: dict[LayerType, list[LayerInfo]] = {}
    for layer in layers:
        by_type.setdefault(layer.layer_type, []).append(layer)

    fits: dict[LayerType, TypeScaleFit] = {}
    for layer_type, members in by_type.items():
        if all(len(table.candidates[m.name]) < 2 for m in members):
            fits[layer_type] = TypeScaleFit(1.0, note="not fitted: one candidate per layer, so α has no effect")
            continue
        perturbations: list[tuple[int | None, int | None]] = []
        if any(m.has_weight for m in members):
            perturbations += [(bits, None) for bits in weight_fit_bits]
        if space.allocates_activations or not any(m.has_weight for m in members):
            perturbations += [(None, bits) for bits in act_fit_bits]

        points = []
        for weight_bits, act_bits in perturbations:
            bits = {m.name: (weight_bits if m.has_weight else None, act_bits) for m in members}
            predicted = sum(table.raw_omega(m.name, BitChoice(*bits[m.name])) for m in members)
            measured = measure_loss_increase(bits)
            points.append({"weight_bits": weight_bits, "act_bits": act_bits,
                           "predicted": predicted, "measured": measured})
        numerator = sum(p["measured"] * p["predicted"] for p in points)
        denominator = sum(p["predicted"] ** 2 for p in points)
        alpha = numerator / denominator if denominator > 0 else float("nan")
        fits[layer_type] = TypeScaleFit(alpha, points)

    fitted = [f.alpha for f in fits.values() if not f.note and f.alpha == f.alpha and f.alpha > 0]
    if not fitted:
        logger.warning("no layer type showed a calibration-loss increase at the fit bit-widths; "
                       "using α = 1 for every type")
        for fit in fits.values():
            fit.alpha, fit.note = 1.0, fit.note or "no measurable loss increase"
        return fits
    floor = ALPHA_FLOOR_FRACTION * statistics.median(fitted)
    for layer_type, fit in fits.items():
        if fit.note:
            continue
        if not fit.alpha == fit.alpha or fit.alpha < floor:
            fit.note = f"floored to {floor:.3g}: quantizing this type barely raised the calibration loss"
            fit.alpha = floor
            logger.warning("α[%s] %s (measured ΔL: %s); its layers may be given few bits, so check "
                           "that the calibration set is representative", layer_type.value, fit.note,
                           ", ".join(f"{p['measured']:.3g}" for p in fit.points))
            continue
        logger.info("α[%s] = %.3g from %s", layer_type.value, fit.alpha,
                    ", ".join(f"ΔL={p['measured']:.4g}/S={p['predicted']:.4g}" for p in fit.points))
    return fits
