"""Graph analysis: trace a ViT with torch.fx and type its quantizable layers."""

from lampq_fx.analysis.layer_types import (
    META_KEY,
    LayerInfo,
    LayerKind,
    LayerType,
    annotate_layers,
    layers_of,
)
from lampq_fx.analysis.tracing import TracingError, trace_model

__all__ = [
    "META_KEY",
    "LayerInfo",
    "LayerKind",
    "LayerType",
    "TracingError",
    "annotate_layers",
    "layers_of",
    "trace_model",
]
