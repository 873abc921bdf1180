"""Converters that bring pretrained weights from other formats into timm models."""

from lampq_fx.pretrained.dinov2_onnx import convert_dinov2_onnx, load_dinov2_from_onnx

__all__ = ["convert_dinov2_onnx", "load_dinov2_from_onnx"]
