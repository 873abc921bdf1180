"""Empirical Fisher traces per layer, from plain backward passes.

For layer i with weight W_i and quantized input x̂_i, over N calibration samples:

    tr(F^W_i) = (1/N) Σ_n ||∂ℓ_n/∂W_i||²        (per-sample gradients, not the batch gradient)
    tr(F^X_i) = (1/N) Σ_n ||∂ℓ_n/∂x̂_i,n||²

where ℓ_n is the task loss of sample n. The per-sample weight gradient of a linear
layer is G_nᵀX_n, with G_n the output gradients [T, out] and X_n the inputs [T, in].
Its squared norm is computed either directly or as Σ_ts (X_n X_nᵀ)_ts (G_n G_nᵀ)_ts,
whichever needs fewer operations. A module called several times per forward (a
detection head shared across pyramid levels) has the per-sample gradient
Σ_c G_n,cᵀ X_n,c: its terms are summed before the norm is taken. Conv2d layers are unfolded into the same form. The input
trace uses the batch gradient of Σ_n ℓ_n, which equals the per-sample gradient
because a ViT in eval mode has no interaction between samples.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn.functional as F
from tqdm.auto import tqdm

from lampq_fx.quantize.modules import QuantConv2d, QuantLayerModule, QuantLinear
from lampq_fx.quantize.prepare import quant_modules

logger = logging.getLogger(__name__)

LossFunction = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class NonFiniteError(FloatingPointError):
    """A loss or gradient became NaN or infinite during scoring."""


@dataclass
class FisherTrace:
    """Fisher traces of one layer: weight trace and one trace per activation input."""

    weight: float
    inputs: list[float]

    def to_dict(self) -> dict:
        return {"weight": self.weight, "inputs": list(self.inputs)}

    @classmethod
    def from_dict(cls, data: dict) -> "FisherTrace":
        return cls(weight=float(data["weight"]), inputs=[float(v) for v in data["inputs"]])


def per_sample_squared_norms(inputs: torch.Tensor, output_grads: torch.Tensor) -> torch.Tensor:
    """Return ||G_nᵀ X_n||² per sample for X [B, T, in] and G [B, T, out]."""
    tokens, in_features = inputs.shape[1], inputs.shape[2]
    out_features = output_grads.shape[2]
    if tokens * tokens * (in_features + out_features) <= tokens * in_features * out_features:
        input_gram = inputs @ inputs.transpose(1, 2)
        grad_gram = output_grads @ output_grads.transpose(1, 2)
        return (input_gram * grad_gram).sum(dim=(1, 2))
    per_sample = torch.einsum("bto,bti->boi", output_grads, inputs)
    return per_sample.pow(2).sum(dim=(1, 2))


def _weight_gradient_form(layer: QuantLayerModule, x: torch.Tensor, grad: torch.Tensor
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Reshape a layer's input and output gradient to [B, T, in] and [B, T, out]."""
    batch = x.shape[0]
    if isinstance(layer, QuantConv2d):
        unfolded = F.unfold(x, layer.kernel_size, dilation=layer.dilation,
                            padding=layer.padding, stride=layer.stride)
        return unfolded.transpose(1, 2), grad.reshape(batch, grad.shape[1], -1).transpose(1, 2)
    return x.reshape(batch, -1, x.shape[-1]), grad.reshape(batch, -1, grad.shape[-1])


@dataclass
class _Accumulator:
    weight: float = 0.0
    inputs: list[float] = field(default_factory=list)


class FisherRecorder:
    """Collects per-layer squared gradient sums through the modules' ``recorder`` slot."""

    def __init__(self) -> None:
        self.sums: dict[str, _Accumulator] = {}
        self.batch_index = 0
        self._shared_gradients: dict[str, torch.Tensor] = {}

    def flush(self) -> None:
        """Add the squared norms of shared modules' summed per-sample gradients (after each backward)."""
        for name, per_sample in self._shared_gradients.items():
            total = float(per_sample.pow(2).sum())
            self.sums[name].weight += self._check(name, total, "weight")
        self._shared_gradients.clear()

    def _check(self, name: str, value: float, what: str) -> float:
        if value != value or value in (float("inf"), float("-inf")):
            raise NonFiniteError(
                f"{what} gradient of layer '{name}' is {value} on calibration batch "
                f"{self.batch_index}: check the model weights and inputs of that batch"
            )
        return value

    def track(self, layer: QuantLayerModule, inputs: list[torch.Tensor],
              output: torch.Tensor) -> None:
        name = layer.layer_name
        accumulator = self.sums.setdefault(name, _Accumulator(inputs=[0.0] * len(inputs)))

        if isinstance(layer, (QuantLinear, QuantConv2d)):
            saved_input = inputs[0].detach()

            def on_output_grad(grad: torch.Tensor) -> None:
                x, g = _weight_gradient_form(layer, saved_input.float(), grad.detach().float())
                if layer.shared_calls > 1:
                    per_sample = torch.einsum("bto,bti->boi", g, x)
                    known = self._shared_gradients.get(name)
                    self._shared_gradients[name] = per_sample if known is None else known + per_sample
                    return
                total = float(per_sample_squared_norms(x, g).sum())
                accumulator.weight += self._check(name, total, "weight")

            output.register_hook(on_output_grad)

        for position, tensor in enumerate(inputs):
            if not tensor.requires_grad:
                continue

            def on_input_grad(grad: torch.Tensor, position: int = position) -> None:
                total = float(grad.detach().float().pow(2).sum())
                accumulator.inputs[position] += self._check(name, total, f"input {position}")

            tensor.register_hook(on_input_grad)


def compute_fisher_traces(
    graph_module: fx.GraphModule,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    loss_fn: LossFunction,
    *,
    progress: bool = True,
    description: str = "Fisher",
) -> dict[str, FisherTrace]:
    """Compute tr(F^W) and tr(F^X) for every quantizable layer of a prepared graph.

    ``loss_fn(outputs, targets)`` returns one loss per sample. The graph runs with its
    current bit-widths, so the traces describe the partly quantized model when bits
    are set. Parameters get no gradients; only activations do.
    """
    modules = quant_modules(graph_module)
    recorder = FisherRecorder()
    saved_requires_grad = {p: p.requires_grad for p in graph_module.parameters()}
    for parameter in graph_module.parameters():
        parameter.requires_grad_(False)
    for module in modules.values():
        module.recorder = recorder
    graph_module.eval()

    samples = 0
    started = time.perf_counter()
    try:
        for batch_index, (images, targets) in enumerate(
                tqdm(batches, desc=description, unit="batch", disable=not progress)):
            recorder.batch_index = batch_index
            images = images.detach().clone().requires_grad_(True)
            losses = loss_fn(graph_module(images), targets)
            loss = losses.sum()
            if not torch.isfinite(loss):
                raise NonFiniteError(
                    f"task loss is {loss.detach().item()} on calibration batch {batch_index}: "
                    "check the model weights and inputs of that batch"
                )
            loss.backward()
            recorder.flush()
            samples += len(images)
    finally:
        for module in modules.values():
            module.recorder = None
        for parameter, flag in saved_requires_grad.items():
            parameter.requires_grad_(flag)

    if samples == 0:
        raise ValueError("the Fisher pass received no calibration samples")
    traces = {}
    for name, module in modules.items():
        accumulated = recorder.sums.get(name)
        if accumulated is None:
            raise RuntimeError(f"layer '{name}' was never executed during the Fisher pass")
        traces[name] = FisherTrace(
            weight=accumulated.weight / samples if module.has_weight else 0.0,
            inputs=[value / samples for value in accumulated.inputs],
        )
    logger.info("%s: traces of %d layers from %d samples in %.1f s", description,
                len(traces), samples, time.perf_counter() - started)
    return traces


def classification_loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-sample cross-entropy of logits [B, C] against integer labels [B]."""
    return F.cross_entropy(outputs, targets, reduction="none")
