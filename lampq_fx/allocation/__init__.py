"""Per-layer bit-width allocation: search space, budgets, the ILP and its solvers."""

from lampq_fx.allocation.ilp import (
    BudgetConstraint,
    ILPSolution,
    InfeasibleBudgetError,
    MCKPProblem,
    SolverError,
    min_feasible_limits,
    solve_mckp,
)
from lampq_fx.allocation.space import (
    Allocation,
    BitChoice,
    Budget,
    SearchSpace,
    average_act_bits,
    average_weight_bits,
    model_size_mb,
    uniform_bops,
)

__all__ = [
    "Allocation",
    "BitChoice",
    "Budget",
    "BudgetConstraint",
    "ILPSolution",
    "InfeasibleBudgetError",
    "MCKPProblem",
    "SearchSpace",
    "SolverError",
    "average_act_bits",
    "average_weight_bits",
    "min_feasible_limits",
    "model_size_mb",
    "solve_mckp",
    "uniform_bops",
]
