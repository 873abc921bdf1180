"""Tests for the multiple-choice knapsack ILP in lampq_fx.allocation.ilp.

An exact dynamic program over integer costs is the oracle for optimality.
"""

import importlib.util
import logging
import math
import sys
import warnings

import numpy as np
import pytest
import scipy.optimize

from lampq_fx.allocation import ilp
from lampq_fx.allocation.ilp import (
    BudgetConstraint,
    InfeasibleBudgetError,
    MCKPProblem,
    SolverError,
    min_feasible_limits,
    solve_mckp,
)

HAS_GUROBI = importlib.util.find_spec("gurobipy") is not None
requires_gurobi = pytest.mark.skipif(not HAS_GUROBI, reason="gurobipy is not importable")

# The real scipy function, kept before any test monkeypatches it.
REAL_MILP = scipy.optimize.milp

BITS = np.array([2, 3, 4, 8])


def dp_optimum(objective, costs, budget):
    """Return the minimum objective of a single-constraint MCKP by dynamic programming.

    ``costs`` are non-negative integers. ``best[b]`` is the minimum objective over the
    layers seen so far with total cost at most ``b``.
    """
    budget = int(budget)
    best = np.zeros(budget + 1)
    for layer_objective, layer_costs in zip(objective, costs):
        updated = np.full(budget + 1, np.inf)
        for value, cost in zip(layer_objective, layer_costs):
            cost = int(cost)
            if cost > budget:
                continue
            candidate = best[: budget + 1 - cost] + value
            updated[cost:] = np.minimum(updated[cost:], candidate)
        best = updated
    return float(best[budget])


def make_problem(objective, costs, limit, name="cost", unit="", display_scale=1.0):
    layer_count = len(objective)
    return MCKPProblem(
        objective=[np.asarray(row, dtype=float) for row in objective],
        constraints=[
            BudgetConstraint(
                name=name,
                coefficients=[np.asarray(row, dtype=float) for row in costs],
                limit=float(limit),
                display_scale=display_scale,
                unit=unit,
            )
        ],
        layer_names=[f"blocks.{i}.attn" for i in range(layer_count)],
        candidate_labels=[[f"c{c}" for c in range(len(row))] for row in objective],
    )


def random_instance(seed):
    rng = np.random.default_rng(seed)
    layer_count = int(rng.integers(5, 26))
    objective = []
    costs = []
    for _ in range(layer_count):
        candidate_count = int(rng.integers(2, 7))
        objective.append(rng.normal(size=candidate_count) * 10.0 ** rng.uniform(-3, 3))
        costs.append(rng.integers(0, 16, size=candidate_count))
    cheapest = sum(int(row.min()) for row in costs)
    dearest = sum(int(row.max()) for row in costs)
    budget = int(rng.integers(cheapest, dearest + 1))
    return objective, costs, budget


def spanning_instance(seed, low_exponent=-10.0, high_exponent=2.0, layer_count=20):
    """Build layers whose objective scales span 10**low_exponent .. 10**high_exponent.

    Each layer's objective falls with more bits, and the budget allows 4 bits on average.
    """
    rng = np.random.default_rng(seed)
    scales = 10.0 ** rng.permutation(np.linspace(low_exponent, high_exponent, layer_count))
    params = rng.integers(1, 11, size=layer_count)
    objective = [scale * 4.0 ** (-BITS.astype(float)) * rng.uniform(0.5, 2.0, size=BITS.size) for scale in scales]
    costs = [BITS * count for count in params]
    budget = int(4 * params.sum())
    return objective, costs, budget


def assert_matches_dp(solution, objective, costs, budget):
    expected = dp_optimum(objective, costs, budget)
    assert math.isclose(solution.objective, expected, rel_tol=1e-9, abs_tol=1e-300), (
        f"{solution.solver} objective {solution.objective!r} != DP optimum {expected!r}"
    )
    assert solution.status == "optimal"
    assert solution.constraint_values["cost"] <= budget


# ---------------------------------------------------------------------------
# Optimality against the dynamic program


def test_ilp_matches_dp_random():
    for seed in range(30):
        objective, costs, budget = random_instance(seed)
        solution = solve_mckp(make_problem(objective, costs, budget), solver="highs")
        assert solution.solver == "highs"
        assert_matches_dp(solution, objective, costs, budget)


@requires_gurobi
def test_gurobi_matches_dp_random():
    for seed in range(30):
        objective, costs, budget = random_instance(seed)
        solution = solve_mckp(make_problem(objective, costs, budget), solver="gurobi")
        assert solution.solver == "gurobi"
        assert_matches_dp(solution, objective, costs, budget)


@requires_gurobi
def test_gurobi_highs_agree_random():
    for seed in range(30):
        objective, costs, budget = random_instance(seed)
        problem = make_problem(objective, costs, budget)
        gurobi = solve_mckp(problem, solver="gurobi")
        highs = solve_mckp(problem, solver="highs")
        assert math.isclose(gurobi.objective, highs.objective, rel_tol=1e-9), f"seed {seed}"


def test_solution_fields_recomputed():
    objective, costs, budget = random_instance(7)
    solution = solve_mckp(make_problem(objective, costs, budget), solver="highs")

    expected_objective = math.fsum(row[c] for row, c in zip(objective, solution.choice))
    expected_cost = sum(int(row[c]) for row, c in zip(costs, solution.choice))
    assert len(solution.choice) == len(objective)
    assert solution.objective == expected_objective
    assert solution.constraint_values == {"cost": float(expected_cost)}
    assert solution.mip_gap == 0.0
    assert solution.fallback_reason is None
    assert solution.wall_time_s > 0
    assert solution.solver_version


@pytest.mark.parametrize("solver", ["highs", pytest.param("gurobi", marks=requires_gurobi)])
def test_spanning_objectives_exact(solver):
    for seed in range(10):
        objective, costs, budget = spanning_instance(seed)
        solution = solve_mckp(make_problem(objective, costs, budget), solver=solver)

        assert len(set(solution.choice)) > 1, f"seed {seed}: allocation is not mixed: {solution.choice}"
        assert solution.constraint_values["cost"] <= budget, f"seed {seed}"
        assert_matches_dp(solution, objective, costs, budget)


@pytest.mark.parametrize("solver", ["highs", pytest.param("gurobi", marks=requires_gurobi)])
def test_tiny_objectives_exact(solver):
    # Every objective is below 1e-10. Unscaled, all differences would fall under the
    # solvers' optimality tolerances, so this fails unless the objective is rescaled.
    for seed in range(5):
        objective, costs, budget = spanning_instance(seed, low_exponent=-14.0, high_exponent=-10.0)
        solution = solve_mckp(make_problem(objective, costs, budget), solver=solver)

        assert len(set(solution.choice)) > 1, f"seed {seed}: allocation is not mixed: {solution.choice}"
        assert_matches_dp(solution, objective, costs, budget)


# ---------------------------------------------------------------------------
# Infeasible budgets


def average_bits_problem(limit):
    bits = [np.array([2.0, 4.0, 8.0])] * 3
    return MCKPProblem(
        objective=[np.array([3.0, 2.0, 1.0])] * 3,
        constraints=[
            BudgetConstraint(
                name="avg_weight_bits",
                coefficients=[row / 3 for row in bits],
                limit=limit,
                unit="average weight bits",
            )
        ],
        layer_names=["qkv", "proj", "fc1"],
        candidate_labels=[["w2a8", "w4a8", "w8a8"]] * 3,
    )


def test_infeasible_budget_message():
    with pytest.raises(InfeasibleBudgetError) as excinfo:
        solve_mckp(average_bits_problem(1.5), solver="highs")
    assert str(excinfo.value) == (
        "budget of 1.50 average weight bits is infeasible: "
        "the smallest feasible budget with these candidates is 2.00 average weight bits"
    )


def test_infeasible_budget_close_values_differ():
    with pytest.raises(InfeasibleBudgetError) as excinfo:
        solve_mckp(average_bits_problem(1.999), solver="highs")
    assert "budget of 1.999 average weight bits" in str(excinfo.value)
    assert "is 2.000 average weight bits" in str(excinfo.value)


def test_budget_at_minimum_feasible():
    solution = solve_mckp(average_bits_problem(2.0), solver="highs")
    assert solution.choice == [0, 0, 0]
    assert math.isclose(solution.constraint_values["avg_weight_bits"], 2.0)


def conflicting_problem():
    # Budget "a" forces candidate 0 in every layer and budget "b" forces candidate 1.
    return MCKPProblem(
        objective=[np.array([1.0, 2.0])] * 2,
        constraints=[
            BudgetConstraint("a", [np.array([0.0, 1.0])] * 2, limit=0.5, unit="MB"),
            BudgetConstraint("b", [np.array([1.0, 0.0])] * 2, limit=0.5, display_scale=1e9, unit="GBOPs"),
        ],
        layer_names=["fc1", "fc2"],
        candidate_labels=[["w4a8", "w8a8"]] * 2,
    )


@pytest.mark.parametrize("solver", ["highs", pytest.param("gurobi", marks=requires_gurobi)])
def test_infeasible_combination(solver):
    with pytest.raises(InfeasibleBudgetError) as excinfo:
        solve_mckp(conflicting_problem(), solver=solver)
    message = str(excinfo.value)
    assert "combination" in message
    assert "a 0.00 MB" in message
    assert "b 0.00 GBOPs" in message


def test_min_feasible_limits():
    limits = min_feasible_limits(conflicting_problem())
    assert limits == {"a": 0.0, "b": 0.0}
    assert min_feasible_limits(average_bits_problem(3.0)) == {"avg_weight_bits": pytest.approx(2.0)}


def test_budget_display_format():
    constraint = BudgetConstraint("bops", [np.array([1.0])], limit=2.5e9, display_scale=1e9, unit="GBOPs")
    assert constraint.display(2.5e9) == "2.50 GBOPs"
    assert constraint.display(3.456e6) == "0.00346 GBOPs"
    assert BudgetConstraint("x", [np.array([1.0])], limit=1.0).display(3.5) == "3.50"


# ---------------------------------------------------------------------------
# Fallbacks under solver="auto"


def test_auto_fallback_without_gurobipy(monkeypatch):
    monkeypatch.setitem(sys.modules, "gurobipy", None)
    objective, costs, budget = random_instance(1)
    problem = make_problem(objective, costs, budget)

    with pytest.warns(RuntimeWarning, match="gurobipy is not importable"):
        solution = solve_mckp(problem, solver="auto")
    assert solution.solver == "highs"
    assert "gurobipy is not importable" in solution.fallback_reason
    assert_matches_dp(solution, objective, costs, budget)


def test_gurobi_missing_raises(monkeypatch):
    monkeypatch.setitem(sys.modules, "gurobipy", None)
    objective, costs, budget = random_instance(1)
    with pytest.raises(SolverError, match="gurobi is unavailable: gurobipy is not importable"):
        solve_mckp(make_problem(objective, costs, budget), solver="gurobi")


@requires_gurobi
def test_auto_fallback_license_error(monkeypatch):
    import gurobipy

    def failing_env(*args, **kwargs):
        raise gurobipy.GurobiError(10009, "No Gurobi license found")

    monkeypatch.setattr(gurobipy, "Env", failing_env)
    objective, costs, budget = random_instance(2)

    with pytest.warns(RuntimeWarning, match="No Gurobi license found"):
        solution = solve_mckp(make_problem(objective, costs, budget), solver="auto")
    assert solution.solver == "highs"
    assert "environment could not start" in solution.fallback_reason
    assert_matches_dp(solution, objective, costs, budget)


@requires_gurobi
def test_auto_fallback_size_limit():
    # 450 layers with 5 candidates give 2250 binary variables, over the 2000-variable
    # limit of Gurobi's size-limited license.
    rng = np.random.default_rng(11)
    layer_count = 450
    objective = [np.sort(rng.uniform(0, 1, size=5))[::-1] for _ in range(layer_count)]
    costs = [np.array([2, 3, 4, 6, 8]) for _ in range(layer_count)]
    budget = 4 * layer_count + 37
    problem = make_problem(objective, costs, budget)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        solution = solve_mckp(problem, solver="auto")
    if solution.solver == "gurobi":
        pytest.skip("the installed gurobi license is not size-limited")

    assert solution.solver == "highs"
    assert "license" in solution.fallback_reason
    fallback_warnings = [w for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(fallback_warnings) == 1
    assert "license" in str(fallback_warnings[0].message)
    assert_matches_dp(solution, objective, costs, budget)


def test_auto_fallback_gurobi_time_limit(monkeypatch):
    def gurobi_timed_out(model, time_limit_s):
        return ilp._SolverResult("gurobi", "test", "time_limit", None)

    monkeypatch.setattr(ilp, "_run_gurobi", gurobi_timed_out)
    objective, costs, budget = random_instance(3)

    with pytest.warns(RuntimeWarning, match="time limit of 5 s with no feasible allocation"):
        solution = solve_mckp(make_problem(objective, costs, budget), solver="auto", time_limit_s=5)
    assert solution.solver == "highs"
    assert "time limit" in solution.fallback_reason
    assert_matches_dp(solution, objective, costs, budget)


def choice_to_x(problem, choice):
    parts = []
    for values, c in zip(problem.objective, choice):
        part = np.zeros(values.size)
        part[c] = 1.0
        parts.append(part)
    return np.concatenate(parts)


def test_auto_keeps_gurobi_incumbent(monkeypatch):
    objective, costs, budget = random_instance(4)
    problem = make_problem(objective, costs, budget)
    cheapest = [int(np.argmin(row)) for row in costs]
    incumbent_x = choice_to_x(problem, cheapest)

    def gurobi_incumbent(model, time_limit_s):
        return ilp._SolverResult("gurobi", "test", "time_limit", incumbent_x, dual_bound=0.0)

    def highs_timed_out(*args, **kwargs):
        return scipy.optimize.OptimizeResult(status=1, x=None, message="Time limit reached", mip_dual_bound=None)

    monkeypatch.setattr(ilp, "_run_gurobi", gurobi_incumbent)
    monkeypatch.setattr(scipy.optimize, "milp", highs_timed_out)

    with pytest.warns(RuntimeWarning, match="with a feasible incumbent"):
        solution = solve_mckp(problem, solver="auto")
    assert solution.solver == "gurobi"
    assert solution.status == "time_limit"
    assert solution.choice == cheapest
    assert solution.mip_gap > 0


# ---------------------------------------------------------------------------
# Time limits on the HiGHS path


def test_highs_time_limit_no_solution(monkeypatch):
    def highs_timed_out(*args, **kwargs):
        return scipy.optimize.OptimizeResult(status=1, x=None, message="Time limit reached", mip_dual_bound=None)

    monkeypatch.setattr(scipy.optimize, "milp", highs_timed_out)
    objective, costs, budget = random_instance(5)

    with pytest.raises(SolverError, match=r"time limit of 2 s reached with no feasible allocation; raise time_limit_s"):
        solve_mckp(make_problem(objective, costs, budget), solver="highs", time_limit_s=2)


def test_highs_time_limit_incumbent(monkeypatch, caplog):
    def highs_with_incumbent(*args, **kwargs):
        result = REAL_MILP(*args, **kwargs)
        result.status = 1
        result.mip_dual_bound = -1.0
        return result

    monkeypatch.setattr(scipy.optimize, "milp", highs_with_incumbent)
    objective, costs, budget = random_instance(6)

    with caplog.at_level(logging.WARNING, logger=ilp.__name__):
        solution = solve_mckp(make_problem(objective, costs, budget), solver="highs")
    assert solution.status == "time_limit"
    assert solution.mip_gap > 0
    assert any("not proven optimal" in record.getMessage() for record in caplog.records)


# ---------------------------------------------------------------------------
# Verification of solver results


def highs_returning(x):
    def fake_milp(*args, **kwargs):
        return scipy.optimize.OptimizeResult(status=0, x=x, message="Optimal", mip_dual_bound=0.0)

    return fake_milp


def test_verify_rejects_budget_violation(monkeypatch):
    objective, costs, budget = random_instance(8)
    problem = make_problem(objective, costs, budget - 1 if budget > 0 else budget)
    dearest = [int(np.argmax(row)) for row in costs]
    monkeypatch.setattr(scipy.optimize, "milp", highs_returning(choice_to_x(problem, dearest)))

    with pytest.raises(SolverError, match="failed the budget check: constraint 'cost'"):
        solve_mckp(problem, solver="highs")


def test_verify_rejects_two_candidates(monkeypatch):
    objective, costs, budget = random_instance(9)
    problem = make_problem(objective, costs, budget)
    x = choice_to_x(problem, [0] * len(objective))
    x[1] = 1.0
    monkeypatch.setattr(scipy.optimize, "milp", highs_returning(x))

    with pytest.raises(SolverError, match=r"one-candidate-per-layer check: layer 0 \('blocks.0.attn'\) has 2"):
        solve_mckp(problem, solver="highs")


def test_verify_rejects_fractional(monkeypatch):
    objective, costs, budget = random_instance(10)
    problem = make_problem(objective, costs, budget)
    x = choice_to_x(problem, [0] * len(objective))
    x[0] = 0.5
    monkeypatch.setattr(scipy.optimize, "milp", highs_returning(x))

    with pytest.raises(SolverError, match="integrality check: variable 0 is 0.5"):
        solve_mckp(problem, solver="highs")


def test_verify_rejects_gurobi_answer(monkeypatch):
    objective, costs, budget = random_instance(12)
    problem = make_problem(objective, costs, budget)
    x = choice_to_x(problem, [0] * len(objective))
    x[0] = 0.0

    def gurobi_without_layer_zero(model, time_limit_s):
        return ilp._SolverResult("gurobi", "test", "optimal", x, dual_bound=0.0)

    monkeypatch.setattr(ilp, "_run_gurobi", gurobi_without_layer_zero)
    with pytest.raises(SolverError, match="gurobi solution failed the one-candidate-per-layer check: layer 0"):
        solve_mckp(problem, solver="auto")


# ---------------------------------------------------------------------------
# Input validation and logging


def test_problem_rejects_shape_mismatch():
    with pytest.raises(ValueError, match=r"layer 1 \('blocks.1.attn'\): budget constraint 'cost' has coefficient shape"):
        make_problem([[1.0, 2.0], [1.0, 2.0]], [[1, 2], [1, 2, 3]], limit=5)


def test_problem_rejects_nan_objective():
    with pytest.raises(ValueError, match=r"layer 0 \('blocks.0.attn'\): objective contains non-finite"):
        make_problem([[np.nan, 2.0], [1.0, 2.0]], [[1, 2], [1, 2]], limit=5)


def test_problem_rejects_label_mismatch():
    with pytest.raises(ValueError, match=r"layer 0 \('qkv'\): 2 objective values but 3 candidate labels"):
        MCKPProblem(
            objective=[np.array([1.0, 2.0])],
            constraints=[],
            layer_names=["qkv"],
            candidate_labels=[["w2a8", "w4a8", "w8a8"]],
        )


def test_problem_rejects_layer_count_mismatch():
    with pytest.raises(ValueError, match="2 objective rows but 1 layer names"):
        MCKPProblem(
            objective=[np.array([1.0]), np.array([1.0])],
            constraints=[],
            layer_names=["qkv"],
            candidate_labels=[["w8a8"], ["w8a8"]],
        )


def test_problem_rejects_empty_layer():
    with pytest.raises(ValueError, match=r"layer 0 \('qkv'\): no candidates"):
        MCKPProblem(objective=[np.array([])], constraints=[], layer_names=["qkv"], candidate_labels=[[]])


def test_solve_rejects_bad_arguments():
    problem = average_bits_problem(3.0)
    with pytest.raises(ValueError, match="solver must be one of"):
        solve_mckp(problem, solver="cplex")
    with pytest.raises(ValueError, match="time_limit_s must be a positive"):
        solve_mckp(problem, solver="highs", time_limit_s=0)


def test_solve_logs_one_info_line(caplog):
    with caplog.at_level(logging.INFO, logger=ilp.__name__):
        solve_mckp(average_bits_problem(3.0), solver="highs")
    info_lines = [record.getMessage() for record in caplog.records if record.levelno == logging.INFO]
    assert len(info_lines) == 1
    assert "highs" in info_lines[0]
    assert "9 variables, 4 constraints" in info_lines[0]
