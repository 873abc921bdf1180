"""Hutchinson Hessian traces against the exact Hessian, and the HAWQ-v2 strategy."""

from __future__ import annotations

import math

import pytest
import torch

import lampq_fx as lq
from lampq_fx.allocation.space import Budget, average_weight_bits
from lampq_fx.metrics.fisher import classification_loss
from lampq_fx.metrics.hessian import hutchinson_traces
from lampq_fx.quantize.prepare import quant_modules


def _exact_hessian_rows(graph_module, layer, images, labels) -> tuple[torch.Tensor, slice]:
    """Rows of the full weight Hessian that belong to ``layer``, and its column range."""
    modules = {name: m for name, m in quant_modules(graph_module).items() if m.has_weight}
    weights = [m.weight for m in modules.values()]
    loss = classification_loss(graph_module(images), labels).mean()
    gradients = torch.autograd.grad(loss, weights, create_graph=True)
    position = list(modules).index(layer)
    start = sum(w.numel() for w in weights[:position])
    target = weights[position]
    rows = []
    for index in range(target.numel()):
        basis = torch.zeros(target.numel())
        basis[index] = 1.0
        row = torch.autograd.grad(gradients[position], weights, grad_outputs=basis.view_as(target),
                                  retain_graph=True)
        rows.append(torch.cat([r.flatten() for r in row]))
    return torch.stack(rows), slice(start, start + target.numel())


@pytest.fixture
def session(tiny_vit):
    torch.manual_seed(0)
    calibration = lq.CalibrationSet(torch.randn(16, 1, 8, 8), torch.randint(0, 5, (16,)))
    session = lq.LampQSession(tiny_vit, calibration, batch_size=16, progress=False)
    session.calibrate()
    return session


@pytest.mark.parametrize("layer", ["omega", "blocks.1.out"])
def test_hutchinson_matches_exact_trace(session, layer):
    images, labels = session.calibration.images, session.calibration.labels
    rows, columns = _exact_hessian_rows(session.graph_module, layer, images, labels)
    block = rows[:, columns]
    exact = float(block.diagonal().sum())
    probes = 2000
    estimate = hutchinson_traces(session.graph_module, [(images, labels)], classification_loss,
                                 probes=probes, seed=1).traces[layer]
    # Variance of the joint-probe estimate: 2·(off-diagonal of the block)² + (cross-layer rows)².
    in_block = float(block.pow(2).sum()) - float(block.diagonal().pow(2).sum())
    cross = float(rows.pow(2).sum()) - float(block.pow(2).sum())
    tolerance = 4 * math.sqrt((2 * in_block + cross) / probes)
    assert abs(estimate - exact) <= tolerance


def test_hutchinson_counts_backward_passes(session):
    batches = session.calibration.batches(8)
    result = hutchinson_traces(session.graph_module, batches, classification_loss, probes=3)
    assert result.backward_passes == len(batches) * (1 + 3)
    assert set(result.traces) == {layer.name for layer in session.layers if layer.has_weight}


def test_hawq_strategy_meets_budget(session):
    allocation = lq.allocate(session, Budget("avg_weight_bits", 3.5), strategy="hawq-v2", probes=4)
    assert average_weight_bits(session.layers, allocation.choices) <= 3.5 + 1e-9
    assert allocation.solver["backward_passes"] == 1 * (1 + 4)  # one batch of 16 images
    assert len({c.weight_bits for c in allocation.choices.values() if c.weight_bits}) > 1


def test_hutchinson_rejects_zero_probes(session):
    with pytest.raises(ValueError, match="probes must be ≥ 1"):
        hutchinson_traces(session.graph_module, session.calibration.batches(16), classification_loss, probes=0)


def test_session_reuses_hessian_traces_across_budgets(session):
    session.reset_measurements()
    first = session.counts["backward_passes"]
    lq.allocate(session, Budget("avg_weight_bits", 3.5), strategy="hawq-v2", probes=2)
    after_first = session.counts["backward_passes"]
    assert after_first - first >= 1 * (1 + 2)  # Hutchinson, plus the float Fisher when not cached
    lq.allocate(session, Budget("avg_weight_bits", 4.5), strategy="hawq-v2", probes=2)
    assert session.counts["backward_passes"] == after_first
    session.reset_measurements()
    lq.allocate(session, Budget("avg_weight_bits", 4.5), strategy="hawq-v2", probes=2)
    assert session.counts["backward_passes"] - after_first == after_first - first
