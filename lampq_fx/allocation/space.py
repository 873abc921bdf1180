"""The bit-width search space, budgets, and the allocation record."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from lampq_fx.analysis.layer_types import LayerInfo, LayerKind, LayerType
from lampq_fx.quantize.quantizers import check_bits


@dataclass(frozen=True, order=True)
class BitChoice:
    """Weight and activation bit-widths of one layer; ``None`` weight bits for matmuls."""

    weight_bits: int | None
    act_bits: int | None

    @property
    def label(self) -> str:
        weight = f"w{self.weight_bits}" if self.weight_bits is not None else ""
        act = f"a{self.act_bits}" if self.act_bits is not None else "a32"
        return weight + act

    def as_tuple(self) -> tuple[int | None, int | None]:
        return self.weight_bits, self.act_bits


@dataclass(frozen=True)
class SearchSpace:
    """Candidate bit-widths for every layer.

    ``min_bits`` bounds the bit-widths of whole layer types from below, e.g.
    ``{"head": 8, "patch_embed": 8}``; the bound applies to weight and activation bits.
    """

    weight_bits: tuple[int, ...] = (2, 3, 4, 5, 6, 8)
    act_bits: tuple[int, ...] = (8,)
    min_bits: Mapping[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.weight_bits or not self.act_bits:
            raise ValueError("the search space needs at least one weight and one activation bit-width")
        for bits in (*self.weight_bits, *self.act_bits):
            check_bits(bits)
        valid_types = {t.value for t in LayerType}
        for type_name, bits in self.min_bits.items():
            if type_name not in valid_types:
                raise ValueError(f"min_bits names unknown layer type {type_name!r}; "
                                 f"valid types: {sorted(valid_types)}")
            check_bits(bits)
        object.__setattr__(self, "weight_bits", tuple(sorted(set(self.weight_bits))))
        object.__setattr__(self, "act_bits", tuple(sorted(set(self.act_bits))))

    @property
    def allocates_activations(self) -> bool:
        return len(self.act_bits) > 1

    def candidates(self, layer: LayerInfo) -> list[BitChoice]:
        floor = self.min_bits.get(layer.layer_type.value, 0)
        act_options = [b for b in self.act_bits if b >= floor] or [max(self.act_bits)]
        if not layer.has_weight:
            return [BitChoice(None, a) for a in act_options]
        weight_options = [b for b in self.weight_bits if b >= floor] or [max(self.weight_bits)]
        return [BitChoice(w, a) for w in weight_options for a in act_options]

    def to_dict(self) -> dict:
        return {"weight_bits": list(self.weight_bits), "act_bits": list(self.act_bits),
                "min_bits": dict(self.min_bits)}


BUDGET_KINDS = ("avg_weight_bits", "size_mb", "bops")


@dataclass(frozen=True)
class Budget:
    """A resource budget: average weight bits, model size in MB (10^6 bytes), or BOPs.

    BOPs count bit operations per image: Σ MACs·b_w·b_a over weighted layers plus
    Σ MACs·b_a·b_a over activation matmuls.
    """

    kind: str
    value: float
    label: str = ""

    def __post_init__(self) -> None:
        if self.kind not in BUDGET_KINDS:
            raise ValueError(f"budget kind must be one of {BUDGET_KINDS}, got {self.kind!r}")
        if not (isinstance(self.value, (int, float)) and math.isfinite(self.value) and self.value > 0):
            raise ValueError(f"budget value must be a positive finite number, got {self.value!r}")
        if not self.label:
            object.__setattr__(self, "label", self.default_label())

    def default_label(self) -> str:
        if self.kind == "avg_weight_bits":
            return f"W{self.value:g} avg"
        if self.kind == "size_mb":
            return f"{self.value:g} MB"
        return f"{self.value / 1e9:.4g} GBOPs"

    @property
    def slug(self) -> str:
        return "".join(c if c.isalnum() or c in ".-" else "-" for c in self.label).strip("-").lower()

    def to_dict(self) -> dict:
        return {"kind": self.kind, "value": self.value, "label": self.label}

    @classmethod
    def from_dict(cls, data: Mapping) -> "Budget":
        return cls(kind=data["kind"], value=float(data["value"]), label=data.get("label", ""))


def layer_bops(layer: LayerInfo, choice: BitChoice) -> float:
    act = choice.act_bits or 32
    if layer.kind is LayerKind.MATMUL:
        return float(layer.macs) * act * act
    return float(layer.macs) * (choice.weight_bits or 32) * act


def uniform_bops(layers: Sequence[LayerInfo], weight_bits: int, act_bits: int) -> float:
    """BOPs of the model with every layer at ``weight_bits``/``act_bits``."""
    return sum(layer_bops(layer, BitChoice(weight_bits if layer.has_weight else None, act_bits))
               for layer in layers)


@dataclass
class Allocation:
    """Bit-widths chosen per layer, with how and under which budget they were chosen."""

    choices: dict[str, BitChoice]
    strategy: str
    budget: Budget | None = None
    solver: dict | None = None
    objective: float | None = None
    rounds: list[dict] = field(default_factory=list)

    def bits(self) -> dict[str, tuple[int | None, int | None]]:
        return {name: choice.as_tuple() for name, choice in self.choices.items()}

    def key(self) -> tuple:
        return tuple(sorted((name, choice.as_tuple()) for name, choice in self.choices.items()))


def average_weight_bits(layers: Sequence[LayerInfo], choices: Mapping[str, BitChoice]) -> float:
    weighted = [layer for layer in layers if layer.has_weight]
    total = sum(layer.weight_params for layer in weighted)
    return sum(layer.weight_params * (choices[layer.name].weight_bits or 32)
               for layer in weighted) / max(total, 1)


def average_act_bits(layers: Sequence[LayerInfo], choices: Mapping[str, BitChoice]) -> float:
    """MAC-weighted average activation bits."""
    total = sum(layer.macs for layer in layers)
    return sum(layer.macs * (choices[layer.name].act_bits or 32) for layer in layers) / max(total, 1)


def model_size_mb(layers: Sequence[LayerInfo], choices: Mapping[str, BitChoice],
                  float_bytes: int) -> float:
    """Quantized weights at their bit-widths plus one FP32 scale per output channel,
    plus ``float_bytes`` for everything kept in float (biases, norms, embeddings)."""
    quantized = sum(layer.weight_params * (choices[layer.name].weight_bits or 32) / 8
                    + 4 * layer.out_channels for layer in layers if layer.has_weight)
    return (quantized + float_bytes) / 1e6
