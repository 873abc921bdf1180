"""Simulated quantization: quantizers, quantizable modules, calibration."""

from lampq_fx.quantize.modules import QuantConv2d, QuantLayerModule, QuantLinear, QuantMatMul
from lampq_fx.quantize.prepare import apply_bits, calibrate, prepare_quantization, quant_modules
from lampq_fx.quantize.quantizers import (
    ActivationQuantizer,
    fake_quantize_log2,
    fake_quantize_uniform,
    quantize_weight_per_channel,
)

__all__ = [
    "ActivationQuantizer",
    "QuantConv2d",
    "QuantLayerModule",
    "QuantLinear",
    "QuantMatMul",
    "apply_bits",
    "calibrate",
    "fake_quantize_log2",
    "fake_quantize_uniform",
    "prepare_quantization",
    "quant_modules",
    "quantize_weight_per_channel",
]
