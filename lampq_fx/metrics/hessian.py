"""Hutchinson estimates of per-layer Hessian traces (the HAWQ-v2 sensitivity).

For the weight W_i of layer i and the mean calibration loss L:

    tr(H_ii) ≈ (1/m) Σ_j v_j,iᵀ (H v_j)_i,   v_j with independent ±1 entries,

where H is the Hessian over all weights and H_ii its block for layer i (Hutchinson,
1990; used for bit allocation by HAWQ-v2, Dong et al., NeurIPS 2020). One probe
covers all layers at once: one Hessian-vector product (a backward pass through the
gradient) gives every layer's estimate. The estimate is unbiased. The cross-layer
blocks add to its variance, which is
[2 Σ_{k≠l∈i} H_kl² + Σ_{k∈i, l∉i} H_kl²] / m.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.fx as fx

from lampq_fx.metrics.fisher import LossFunction, NonFiniteError
from lampq_fx.quantize.prepare import quant_modules

logger = logging.getLogger(__name__)


@dataclass
class HessianTraces:
    """Estimated tr(H) per layer name, and the number of backward passes spent."""

    traces: dict[str, float]
    backward_passes: int


def hutchinson_traces(
    graph_module: fx.GraphModule,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    loss_fn: LossFunction,
    *,
    probes: int = 16,
    seed: int = 0,
) -> HessianTraces:
    """Estimate tr(∂²L/∂W_i²) for every weighted layer with ``probes`` Rademacher vectors per batch.

    ``loss_fn`` returns per-sample losses; L is their mean over each batch, and the
    estimates are averaged over batches (weighted by batch size).
    """
    if probes < 1:
        raise ValueError(f"probes must be ≥ 1, got {probes}")
    modules = {name: m for name, m in quant_modules(graph_module).items() if m.has_weight}
    names = list(modules)
    weights = [modules[name].weight for name in names]
    saved = [w.requires_grad for w in weights]
    generator = torch.Generator().manual_seed(seed)
    sums = dict.fromkeys(names, 0.0)
    samples = passes = 0
    started = time.perf_counter()
    graph_module.eval()
    try:
        for weight in weights:
            weight.requires_grad_(True)
        for batch_index, (images, targets) in enumerate(batches):
            loss = loss_fn(graph_module(images), targets).mean()
            if not torch.isfinite(loss):
                raise NonFiniteError(f"task loss is {loss.detach().item()} on calibration batch {batch_index}")
            gradients = torch.autograd.grad(loss, weights, create_graph=True)
            passes += 1
            for _ in range(probes):
                vectors = [torch.randint(0, 2, w.shape, generator=generator).to(w.dtype) * 2 - 1 for w in weights]
                products = torch.autograd.grad(gradients, weights, grad_outputs=vectors, retain_graph=True)
                passes += 1
                for name, vector, product in zip(names, vectors, products):
                    sums[name] += float((vector * product).sum()) * len(images) / probes
            samples += len(images)
    finally:
        for weight, flag in zip(weights, saved):
            weight.requires_grad_(flag)
    if samples == 0:
        raise ValueError("the Hessian estimate received no calibration samples")
    traces = {name: value / samples for name, value in sums.items()}
    logger.info("Hutchinson traces of %d layers: %d probes per batch, %d backward passes, %.1f s",
                len(traces), probes, passes, time.perf_counter() - started)
    return HessianTraces(traces, passes)
