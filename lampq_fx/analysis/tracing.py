"""Symbolic tracing of ViT models with torch.fx."""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from lampq_fx.analysis.attention import make_attention_traceable

logger = logging.getLogger(__name__)


class TracingError(RuntimeError):
    """A model could not be traced, or its traced graph does not match eager mode."""


def _timm_notrace_lists() -> tuple[tuple[type, ...], tuple[Any, ...]]:
    """Return the module classes and functions that timm marks as not traceable."""
    try:
        from timm.layers import _fx as timm_fx
    except ImportError:
        return (), ()
    return tuple(timm_fx.get_notrace_modules()), tuple(timm_fx.get_notrace_functions())


class LampQTracer(fx.Tracer):
    """An FX tracer that honours timm's leaf lists and remembers where it failed.

    ``scope_stack`` contains the qualified names of the modules being traced, so a
    failure deep inside a model can name the module that raised it.
    """

    def __init__(self, leaf_modules: Sequence[type] = ()) -> None:
        timm_modules, timm_functions = _timm_notrace_lists()
        super().__init__(autowrap_functions=timm_functions)
        self.leaf_types = tuple(timm_modules) + tuple(leaf_modules)
        self.scope_stack: list[tuple[str, type]] = []

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        if self.leaf_types and isinstance(module, self.leaf_types):
            return True
        return super().is_leaf_module(module, qualified_name)

    def call_module(self, module, forward, args, kwargs):
        qualified_name = self.path_of_module(module)
        self.scope_stack.append((qualified_name, type(module)))
        result = super().call_module(module, forward, args, kwargs)
        self.scope_stack.pop()
        return result


def _tracing_error(tracer: LampQTracer, model: nn.Module, error: Exception) -> TracingError:
    if tracer.scope_stack:
        name, cls = tracer.scope_stack[-1]
        where = f"in module '{name}' ({cls.__module__}.{cls.__qualname__})"
        leaf_hint = f"trace(model, ..., leaf_modules=[{cls.__qualname__}])"
    else:
        where = f"in the forward of {type(model).__qualname__}"
        leaf_hint = "trace(model, ..., leaf_modules=[<the offending module class>])"
    return TracingError(
        f"torch.fx could not trace {type(model).__qualname__} {where}: "
        f"{type(error).__name__}: {error}. "
        f"Work around it by keeping that module out of the graph with {leaf_hint} "
        "(its layers are then not quantized), or, when the failing construct branches "
        "on an argument, fix that argument with trace(model, ..., concrete_args={...})."
    )


def _max_abs_difference(left: Any, right: Any) -> float:
    if isinstance(left, torch.Tensor):
        return float((left.float() - right.float()).abs().max()) if left.numel() else 0.0
    if isinstance(left, (tuple, list)):
        return max((_max_abs_difference(a, b) for a, b in zip(left, right)), default=0.0)
    if isinstance(left, dict):
        return max((_max_abs_difference(left[k], right[k]) for k in left), default=0.0)
    return 0.0


def _zeros_like_output(output: Any) -> Any:
    if isinstance(output, torch.Tensor):
        return torch.zeros_like(output)
    if isinstance(output, (tuple, list)):
        return type(output)(_zeros_like_output(item) for item in output)
    if isinstance(output, dict):
        return {key: _zeros_like_output(value) for key, value in output.items()}
    return output


def trace_model(
    model: nn.Module,
    example_inputs: tuple[torch.Tensor, ...] | torch.Tensor,
    *,
    leaf_modules: Sequence[type] = (),
    concrete_args: dict[str, Any] | None = None,
    check_tolerance: float = 1e-4,
) -> fx.GraphModule:
    """Trace a copy of ``model`` into an FX GraphModule with explicit attention matmuls.

    The copy is put in eval mode, fused attention is turned off and torch.nn attention
    modules are swapped for traceable equivalents (``make_attention_traceable``). The
    caller's model is not modified. The traced module is checked against the eager copy
    on ``example_inputs`` (max abs difference ≤ ``check_tolerance`` times the output's
    scale) and ``TracingError`` is raised on failure or mismatch.
    """
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    working = copy.deepcopy(model).eval()
    swapped = make_attention_traceable(working)

    tracer = LampQTracer(leaf_modules)
    try:
        graph = tracer.trace(working, concrete_args=concrete_args)
    except Exception as error:  # torch.fx raises many types; all mean "untraceable here".
        raise _tracing_error(tracer, model, error) from error
    graph_module = fx.GraphModule(working, graph, class_name=type(model).__name__ + "Traced")

    with torch.no_grad():
        try:
            eager_out = working(*example_inputs)
        except Exception as error:  # any failure here means the inputs do not fit the model
            shapes = [tuple(t.shape) for t in example_inputs if isinstance(t, torch.Tensor)]
            raise TracingError(
                f"{type(model).__qualname__} failed on example inputs of shape {shapes}: "
                f"{type(error).__name__}: {error}; pass inputs of the size the model expects"
            ) from error
        traced_out = graph_module(*example_inputs)
    difference = _max_abs_difference(eager_out, traced_out)
    scale = max(1.0, _max_abs_difference(eager_out, _zeros_like_output(eager_out)))
    if not difference <= check_tolerance * scale:
        raise TracingError(
            f"the traced {type(model).__qualname__} differs from eager mode by {difference:.3g} "
            f"(tolerance {check_tolerance * scale:.3g}); a data-dependent branch was probably "
            "frozen during tracing: mark the module that contains it as a leaf module"
        )
    logger.info("traced %s: %d graph nodes, %d attention modules made traceable, "
                "traced-vs-eager max abs difference %.2g",
                type(model).__name__, len(graph.nodes), swapped, difference)
    return graph_module
