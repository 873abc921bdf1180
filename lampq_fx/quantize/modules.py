"""Quantizable replacements for the layers found by the graph analysis.

Each module keeps the float parameters of the layer it replaces, a weight bit-width
(``None`` = float) and one ``ActivationQuantizer`` per activation input. A module with
every bit-width unset computes exactly what the original layer computes.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from lampq_fx.quantize.quantizers import (
    ActivationQuantizer,
    check_bits,
    quantize_weight_per_channel,
)


class GradientRecorder(Protocol):
    """Receives a layer's quantized inputs and output during a scoring pass."""

    def track(self, layer: "QuantLayerModule", inputs: list[torch.Tensor],
              output: torch.Tensor) -> None: ...


class QuantLayerModule(nn.Module):
    """Shared state of the quantized layers: bit-widths, quantizers and a gradient recorder."""

    layer_name: str = ""
    shared_calls: int = 1  # graph calls per forward; >1 when one module serves several inputs

    def __init__(self, input_quantizers: list[ActivationQuantizer]) -> None:
        super().__init__()
        self.input_quantizers = nn.ModuleList(input_quantizers)
        self.weight_bits: int | None = None
        self.recorder: GradientRecorder | None = None
        self._weight_cache: dict[int, torch.Tensor] = {}

    @property
    def act_bits(self) -> int | None:
        return self.input_quantizers[0].bits

    def set_bits(self, weight_bits: int | None, act_bits: int | None) -> None:
        if weight_bits is not None:
            check_bits(weight_bits)
        if act_bits is not None:
            check_bits(act_bits)
        self.weight_bits = weight_bits if self.has_weight else None
        for quantizer in self.input_quantizers:
            quantizer.bits = act_bits

    @property
    def has_weight(self) -> bool:
        return getattr(self, "weight", None) is not None

    def quantized_weight(self, bits: int) -> torch.Tensor:
        """Return the fake-quantized weight at ``bits``, computed once per bit-width."""
        cached = self._weight_cache.get(bits)
        if cached is None or cached.device != self.weight.device:
            cached, _ = quantize_weight_per_channel(self.weight, bits)
            self._weight_cache[bits] = cached
        return cached

    def weight_mean_squared_error(self, bits: int) -> float:
        """Mean squared weight quantization error per element at ``bits``."""
        with torch.no_grad():
            return float((self.quantized_weight(bits) - self.weight).pow(2).mean())

    def clear_weight_cache(self) -> None:
        """Drop the cached quantized weights; call it after changing ``weight`` in place."""
        self._weight_cache.clear()

    def _effective_weight(self) -> torch.Tensor:
        if self.weight_bits is None:
            return self.weight
        # Straight-through: the forward value is quantized, the gradient reaches the float weight.
        return self.weight + (self.quantized_weight(self.weight_bits) - self.weight).detach()

    def _record(self, inputs: list[torch.Tensor], output: torch.Tensor) -> None:
        if self.recorder is not None and torch.is_grad_enabled():
            self.recorder.track(self, inputs, output)


class QuantLinear(QuantLayerModule):
    def __init__(self, source: nn.Linear, per_channel_input: bool = False) -> None:
        super().__init__([ActivationQuantizer("uniform", per_channel=per_channel_input)])
        self.in_features, self.out_features = source.in_features, source.out_features
        self.weight = source.weight
        self.bias = source.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.input_quantizers[0](x)
        output = F.linear(x, self._effective_weight(), self.bias)
        self._record([x], output)
        return output

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, weight_bits={self.weight_bits}"


class QuantConv2d(QuantLayerModule):
    def __init__(self, source: nn.Conv2d) -> None:
        super().__init__([ActivationQuantizer("uniform")])
        if source.groups != 1:
            raise ValueError(f"QuantConv2d supports groups=1 only, got groups={source.groups}")
        self.weight = source.weight
        self.bias = source.bias
        self.stride, self.padding = source.stride, source.padding
        self.dilation, self.padding_mode = source.dilation, source.padding_mode
        if source.padding_mode != "zeros":
            raise ValueError(f"QuantConv2d supports padding_mode='zeros' only, got {source.padding_mode!r}")
        self.kernel_size = source.kernel_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.input_quantizers[0](x)
        output = F.conv2d(x, self._effective_weight(), self.bias, self.stride, self.padding,
                          self.dilation)
        self._record([x], output)
        return output

    def extra_repr(self) -> str:
        return f"kernel_size={tuple(self.kernel_size)}, stride={tuple(self.stride)}, " \
               f"weight_bits={self.weight_bits}"


class QuantMatMul(QuantLayerModule):
    """An activation × activation matmul with both operands quantized.

    ``softmax_operand`` makes the first operand use the log2 quantizer (attn·v).
    """

    def __init__(self, softmax_operand: bool = False) -> None:
        first = ActivationQuantizer("log2" if softmax_operand else "uniform")
        super().__init__([first, ActivationQuantizer("uniform")])
        self.weight = None

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        a = self.input_quantizers[0](a)
        b = self.input_quantizers[1](b)
        output = torch.matmul(a, b)
        self._record([a, b], output)
        return output
