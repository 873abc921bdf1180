"""Turn a sensitivity table and a budget into an ILP, solve it, and return an Allocation."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import numpy as np

from lampq_fx.allocation.ilp import (
    BudgetConstraint,
    InfeasibleBudgetError,
    MCKPProblem,
    solve_mckp,
)
from lampq_fx.allocation.space import Allocation, BitChoice, Budget, layer_bops
from lampq_fx.analysis.layer_types import LayerInfo
from lampq_fx.metrics.fisher import FisherTrace
from lampq_fx.metrics.sensitivity import SensitivityTable

logger = logging.getLogger(__name__)


def _constraint(layers: Sequence[LayerInfo], candidates: Mapping[str, list[BitChoice]],
                budget: Budget, float_bytes: int) -> tuple[BudgetConstraint, float]:
    """Return the budget row and the constant (in display units) that the row leaves out."""
    if budget.kind == "avg_weight_bits":
        total = float(sum(layer.weight_params for layer in layers if layer.has_weight))
        coefficients = [np.array([layer.weight_params * (c.weight_bits or 0) for c in candidates[layer.name]],
                                 dtype=float) for layer in layers]
        return BudgetConstraint("avg_weight_bits", coefficients, budget.value * total,
                                display_scale=total, unit="average weight bits"), 0.0
    if budget.kind == "size_mb":
        # Per-channel FP32 scales and float tensors are fixed costs outside the row.
        fixed_mb = (float_bytes + sum(4 * layer.out_channels for layer in layers if layer.has_weight)) / 1e6
        coefficients = [np.array([layer.weight_params * (c.weight_bits or 0) / 8 / 1e6
                                  for c in candidates[layer.name]], dtype=float) for layer in layers]
        return BudgetConstraint("size_mb", coefficients, budget.value - fixed_mb,
                                unit="MB"), fixed_mb
    coefficients = [np.array([layer_bops(layer, c) for c in candidates[layer.name]], dtype=float)
                    for layer in layers]
    return BudgetConstraint("bops", coefficients, budget.value, display_scale=1e9,
                            unit="GBOPs"), 0.0


def _budget_units(budget: Budget, constraint: BudgetConstraint, raw: float, fixed: float) -> float:
    """Convert a constraint row's value to the budget's own unit (bits, MB or BOPs)."""
    if budget.kind == "bops":
        return raw
    return raw / constraint.display_scale + fixed


def check_budget_feasible(layers: Sequence[LayerInfo], candidates: Mapping[str, list[BitChoice]],
                          budget: Budget, float_bytes: int) -> None:
    """Raise ``InfeasibleBudgetError`` stating the smallest feasible budget."""
    constraint, fixed = _constraint(layers, candidates, budget, float_bytes)
    smallest_raw = float(sum(row.min() for row in constraint.coefficients))
    if smallest_raw > constraint.limit * (1 + 1e-12):
        smallest = smallest_raw / constraint.display_scale + fixed
        lowest = min(c.weight_bits or c.act_bits for choices in candidates.values() for c in choices)
        advice = "raise the budget" if lowest <= 2 else \
            "raise the budget or add lower bit-widths to the candidates"
        raise InfeasibleBudgetError(
            f"budget of {budget.value / (1e9 if budget.kind == 'bops' else 1):.4g} "
            f"{constraint.unit} is infeasible: the smallest feasible budget with these "
            f"candidates is {smallest:.4g} {constraint.unit}; {advice}"
        )


def block_groups(layers: Sequence[LayerInfo]) -> dict[str, str]:
    """Map each layer to its block: the module path up to its last numbered component.

    ``blocks.3.attn.qkv`` → ``blocks.3``, ``layers.1.blocks.0.mlp.fc1`` →
    ``layers.1.blocks.0``, ``encoder.layers.encoder_layer_2.mlp.0`` →
    ``encoder.layers.encoder_layer_2``. Layers outside numbered containers (patch
    embedding, head) form groups of their own.
    """
    groups = {}
    for layer in layers:
        parts = layer.name.split(".")
        numbered = [i for i, part in enumerate(parts[:-1]) if any(ch.isdigit() for ch in part)]
        groups[layer.name] = ".".join(parts[:numbered[-1] + 1]) if numbered else layer.name
    return groups


def _group_rows(layers: Sequence[LayerInfo], candidates: Mapping[str, list[BitChoice]],
                rows: Sequence[list[np.ndarray]], groups: Mapping[str, str]
                ) -> tuple[list[str], list[list[tuple]], list[list[np.ndarray]]]:
    """Merge per-layer rows into per-group rows over the (w, a) pairs every member offers."""
    members: dict[str, list[int]] = {}
    for index, layer in enumerate(layers):
        members.setdefault(groups[layer.name], []).append(index)
    names, pairs, merged = [], [], [[] for _ in rows]
    for group, indices in members.items():
        offered = [{(c.weight_bits, c.act_bits): k for k, c in enumerate(candidates[layers[i].name])}
                   for i in indices]
        # A pair names the weight bits of the group's weighted layers; matmuls take only its a.
        shared = set()
        for i, options in zip(indices, offered):
            if layers[i].has_weight:
                shared.update(options)
        if not shared:
            shared = set(offered[0])
        usable = []
        for w, a in sorted(shared, key=lambda pair: (pair[0] or 0, pair[1])):
            picks = [options.get((w if layers[i].has_weight else None, a)) for i, options in zip(indices, offered)]
            if all(pick is not None for pick in picks):
                usable.append(((w, a), picks))
        if not usable:
            raise ValueError(f"the layers of block {group!r} share no candidate bit-widths")
        names.append(group)
        pairs.append([(indices, picks) for _, picks in usable])
        for row_list, merged_rows in zip(rows, merged):
            merged_rows.append(np.array([sum(row_list[i][k] for i, k in zip(indices, picks))
                                         for _, picks in usable], dtype=float))
    return names, pairs, merged


def allocate_ilp(
    table: SensitivityTable,
    budget: Budget,
    *,
    float_bytes: int,
    strategy: str,
    fisher: Mapping[str, FisherTrace] | None = None,
    solver: str = "auto",
    time_limit_s: float = 60.0,
    groups: Mapping[str, str] | None = None,
) -> Allocation:
    """Minimise Σ Ω_i(b)·x_(i,b) under ``budget``, one bit choice per layer.

    With ``groups`` (layer name → group name, e.g. from ``block_groups``), all layers
    of a group take the same (weight, activation) pair, and a group's Ω and cost are
    the sums over its layers.
    """
    layers = table.layers
    candidates = table.candidates
    check_budget_feasible(layers, candidates, budget, float_bytes)
    constraint, fixed = _constraint(layers, candidates, budget, float_bytes)
    objective = [np.array([table.omega(layer, c, fisher) for c in candidates[layer.name]], dtype=float)
                 for layer in layers]
    if groups is None:
        problem = MCKPProblem(
            objective=objective,
            constraints=[constraint],
            layer_names=[layer.name for layer in layers],
            candidate_labels=[[c.label for c in candidates[layer.name]] for layer in layers],
        )
        solution = solve_mckp(problem, solver=solver, time_limit_s=time_limit_s)
        choices = {layer.name: candidates[layer.name][index]
                   for layer, index in zip(layers, solution.choice)}
    else:
        names, selections, (group_objective, group_costs) = _group_rows(
            layers, candidates, [objective, constraint.coefficients], groups)
        grouped = BudgetConstraint(constraint.name, group_costs, constraint.limit,
                                   display_scale=constraint.display_scale, unit=constraint.unit)
        problem = MCKPProblem(objective=group_objective, constraints=[grouped], layer_names=names,
                              candidate_labels=[[str(k) for k in range(len(row))] for row in group_objective])
        solution = solve_mckp(problem, solver=solver, time_limit_s=time_limit_s)
        choices = {}
        for options, index in zip(selections, solution.choice):
            indices, picks = options[index]
            for i, k in zip(indices, picks):
                choices[layers[i].name] = candidates[layers[i].name][k]
    for layer, row in zip(layers, objective):
        layer.omega = {c.label: float(value) for c, value in zip(candidates[layer.name], row)}
    return Allocation(
        choices=choices,
        strategy=strategy,
        budget=budget,
        objective=solution.objective,
        solver={
            "name": solution.solver,
            "version": solution.solver_version,
            "status": solution.status,
            "objective": solution.objective,
            "mip_gap": solution.mip_gap,
            "wall_time_s": solution.wall_time_s,
            "fallback_reason": solution.fallback_reason,
            "budget_used": _budget_units(budget, constraint, solution.constraint_values[constraint.name],
                                         fixed),
        },
    )
