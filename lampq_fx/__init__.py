"""lampq_fx: layer-wise mixed-precision quantization of Vision Transformers on torch.fx.

The steps, usable one by one or through ``quantize_model``::

    import lampq_fx as lq

    session = lq.LampQSession(model, lq.CalibrationSet(images, labels))   # trace + type
    session.calibrate()                                                  # activation ranges
    scores = lq.score(session)                                           # type-aware Fisher Ω
    allocation = lq.allocate(session, lq.Budget("avg_weight_bits", 4))   # ILP + iterative update
    qmodel = lq.quantize(session, allocation)                            # simulated quantized model

Every quantizable node of ``session.graph_module`` carries a ``LayerInfo`` in
``node.meta['lampq']`` (layer type, Fisher traces, Ω, allocated bits).
"""

from __future__ import annotations

import torch
import torch.fx as fx
from torch import nn

from lampq_fx.allocation import Allocation, BitChoice, Budget, InfeasibleBudgetError, SearchSpace, SolverError
from lampq_fx.analysis import META_KEY, LayerInfo, LayerType, TracingError, annotate_layers, layers_of, trace_model
from lampq_fx.metrics.fisher import NonFiniteError
from lampq_fx.metrics.sensitivity import SensitivityTable
from lampq_fx.session import CalibrationSet, LampQSession

__version__ = "0.1.0"


def trace(model: nn.Module, example_inputs: torch.Tensor | tuple[torch.Tensor, ...], *,
          leaf_modules=(), concrete_args=None) -> fx.GraphModule:
    """Trace ``model`` and annotate its quantizable nodes with their layer types."""
    graph_module = trace_model(model, example_inputs, leaf_modules=leaf_modules,
                               concrete_args=concrete_args)
    annotate_layers(graph_module, example_inputs)
    return graph_module


def score(session: LampQSession, space: SearchSpace | None = None, *,
          type_aware: bool = True) -> SensitivityTable:
    """Compute Ω for every layer and candidate bit choice of ``space``."""
    return session.sensitivity(space or SearchSpace(), type_aware=type_aware)


def allocate(session: LampQSession, budget: Budget, space: SearchSpace | None = None, *,
             strategy: str = "lampq", **options) -> Allocation:
    """Allocate bits under ``budget`` with the named strategy (see ``lampq_fx.strategies``)."""
    from lampq_fx.strategies import get_strategy
    return get_strategy(strategy, **options).allocate(session, budget, space or SearchSpace())


def quantize(session: LampQSession, allocation: Allocation) -> fx.GraphModule:
    """Return a simulated-quantized copy of the session's model under ``allocation``."""
    return session.quantized_model(allocation)


def quantize_model(model: nn.Module, calibration: CalibrationSet, budget: Budget, *,
                   space: SearchSpace | None = None, strategy: str = "lampq",
                   **session_options) -> tuple[fx.GraphModule, Allocation]:
    """Trace, calibrate, score, allocate and quantize in one call."""
    session = LampQSession(model, calibration, **session_options)
    session.calibrate()
    allocation = allocate(session, budget, space, strategy=strategy)
    return quantize(session, allocation), allocation


__all__ = [
    "META_KEY",
    "Allocation",
    "BitChoice",
    "Budget",
    "CalibrationSet",
    "InfeasibleBudgetError",
    "LampQSession",
    "LayerInfo",
    "LayerType",
    "NonFiniteError",
    "SearchSpace",
    "SensitivityTable",
    "SolverError",
    "TracingError",
    "allocate",
    "layers_of",
    "quantize",
    "quantize_model",
    "score",
    "trace",
]
