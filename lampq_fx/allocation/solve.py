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


def allocate_ilp(
    table: SensitivityTable,
    budget: Budget,
    *,
    float_bytes: int,
    strategy: str,
    fisher: Mapping[str, FisherTrace] | None = None,
    solver: str = "auto",
    time_limit_s: float = 60.0,
) -> Allocation:
    """Minimise Σ Ω_i(b)·x_(i,b) under ``budget``, one bit choice per layer."""
    layers = table.layers
    candidates = table.candidates
    check_budget_feasible(layers, candidates, budget, float_bytes)
    constraint, fixed = _constraint(layers, candidates, budget, float_bytes)
    objective = [np.array([table.omega(layer, c, fisher) for c in candidates[layer.name]], dtype=float)
                 for layer in layers]
    problem = MCKPProblem(
        objective=objective,
        constraints=[constraint],
        layer_names=[layer.name for layer in layers],
        candidate_labels=[[c.label for c in candidates[layer.name]] for layer in layers],
    )
    solution = solve_mckp(problem, solver=solver, time_limit_s=time_limit_s)
    choices = {layer.name: candidates[layer.name][index]
               for layer, index in zip(layers, solution.choice)}
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
