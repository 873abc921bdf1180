"""Multiple-choice knapsack ILP for per-layer bit-width allocation.

Each layer ``i`` has candidates ``c`` (bit-width choices) and one binary variable
``x[i, c]`` per candidate. The model chooses exactly one candidate per layer and
minimises ``sum objective[i][c] * x[i, c]`` subject to budget rows
``sum coefficients_k[i][c] * x[i, c] <= limit_k``.

``solve_mckp`` tries Gurobi first under ``solver="auto"`` and falls back to HiGHS
(through ``scipy.optimize.milp``) when Gurobi is missing, unlicensed, over the
size-limited license or stopped by the time limit. When the optimum is much smaller
than the largest objective value, extra solves rescale the objective around it (see
``_refine_optimum``). Every solver result is checked against the original, unscaled
problem before it is used.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
import warnings
from dataclasses import dataclass, field

import numpy as np
import scipy
import scipy.optimize
import scipy.sparse

__all__ = [
    "BudgetConstraint",
    "ILPSolution",
    "InfeasibleBudgetError",
    "MCKPProblem",
    "SolverError",
    "min_feasible_limits",
    "solve_mckp",
]

logger = logging.getLogger(__name__)

SOLVER_CHOICES = ("auto", "gurobi", "highs")

# A recomputed constraint value passes when value <= limit + RELATIVE * |limit| + ABSOLUTE.
CONSTRAINT_RELATIVE_TOLERANCE = 1e-9
CONSTRAINT_ABSOLUTE_TOLERANCE = 1e-12

# Maximum distance of a solver's variable value from 0 or 1.
INTEGRALITY_TOLERANCE = 1e-6

# Feasibility, integrality and optimality tolerances passed to both solvers. 1e-9 is the
# smallest value Gurobi 13 accepts for FeasibilityTol, IntFeasTol and OptimalityTol. The
# Gurobi defaults (1e-6, 1e-5 and 1e-6) could let a solution exceed the budget by more than
# the check above allows. With the default OptimalityTol, Gurobi stopped up to 5e-7
# (scaled units) above the optimum on 5 of the 30 random instances in tests/test_ilp.py.
SOLVER_TOLERANCE = 1e-9

# Upper limit on extra solves that rescale the objective around the optimum (see _refine_optimum).
MAX_REFINEMENT_ROUNDS = 3


class InfeasibleBudgetError(ValueError):
    """Raised when no choice of candidates meets the budget constraints."""


class SolverError(RuntimeError):
    """Raised when a solver is unavailable, fails, times out without an allocation,
    or returns a solution that fails verification."""


@dataclass(frozen=True)
class BudgetConstraint:
    """Budget row ``sum_i coefficients[i][choice[i]] <= limit``.

    ``coefficients`` and ``limit`` are in raw units, for example bits or bit
    operations. ``display_scale`` converts raw values to the human unit ``unit``:
    the human value is ``raw / display_scale``.
    """

    name: str
    coefficients: list[np.ndarray]
    limit: float
    display_scale: float = 1.0
    unit: str = ""

    def __post_init__(self) -> None:
        coefficients = [np.asarray(row, dtype=np.float64) for row in self.coefficients]
        object.__setattr__(self, "coefficients", coefficients)
        object.__setattr__(self, "limit", float(self.limit))
        object.__setattr__(self, "display_scale", float(self.display_scale))

        if not self.name:
            raise ValueError("budget constraint name must not be empty")
        if not math.isfinite(self.limit):
            raise ValueError(f"budget constraint '{self.name}': limit {self.limit} is not finite")
        if not (math.isfinite(self.display_scale) and self.display_scale > 0):
            raise ValueError(
                f"budget constraint '{self.name}': display_scale must be a positive finite "
                f"number, got {self.display_scale}"
            )

    def display(self, raw: float, digits: int = 2) -> str:
        """Format a raw value in the human unit, for example "3.50 average weight bits"."""
        value = raw / self.display_scale
        if value != 0 and abs(value) < 10.0 ** (-digits):
            text = f"{value:.{digits + 1}g}"
        else:
            text = f"{value:.{digits}f}"
        return f"{text} {self.unit}" if self.unit else text


@dataclass(frozen=True)
class MCKPProblem:
    """Multiple-choice knapsack instance: one candidate per layer, minimum total objective.

    ``objective[i]`` contains one float per candidate of layer ``i``. Every
    constraint's ``coefficients[i]`` has the same length, and ``candidate_labels[i]``
    names the candidates (for example "w4a8") in messages.
    """

    objective: list[np.ndarray]
    constraints: list[BudgetConstraint]
    layer_names: list[str]
    candidate_labels: list[list[str]]

    def __post_init__(self) -> None:
        objective = [np.asarray(row, dtype=np.float64) for row in self.objective]
        object.__setattr__(self, "objective", objective)
        object.__setattr__(self, "constraints", list(self.constraints))
        object.__setattr__(self, "layer_names", list(self.layer_names))
        object.__setattr__(self, "candidate_labels", [list(labels) for labels in self.candidate_labels])
        self._validate()

    def _validate(self) -> None:
        layer_count = len(self.objective)
        if layer_count == 0:
            raise ValueError("MCKP problem has no layers")
        if len(self.layer_names) != layer_count:
            raise ValueError(
                f"MCKP problem has {layer_count} objective rows but {len(self.layer_names)} layer names"
            )
        if len(self.candidate_labels) != layer_count:
            raise ValueError(
                f"MCKP problem has {layer_count} objective rows but "
                f"{len(self.candidate_labels)} candidate label lists"
            )

        names = [constraint.name for constraint in self.constraints]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"budget constraint names must be unique, got duplicates {duplicates}")
        for constraint in self.constraints:
            if not isinstance(constraint, BudgetConstraint):
                raise TypeError(f"constraints must be BudgetConstraint objects, got {type(constraint).__name__}")
            if len(constraint.coefficients) != layer_count:
                raise ValueError(
                    f"budget constraint '{constraint.name}' has {len(constraint.coefficients)} "
                    f"coefficient rows but the problem has {layer_count} layers"
                )

        for i, values in enumerate(self.objective):
            self._validate_layer(i, values)

    def _validate_layer(self, i: int, values: np.ndarray) -> None:
        layer = f"layer {i} ('{self.layer_names[i]}')"
        if values.ndim != 1:
            raise ValueError(f"{layer}: objective must be one-dimensional, got shape {values.shape}")
        if values.size == 0:
            raise ValueError(f"{layer}: no candidates")
        if not np.all(np.isfinite(values)):
            raise ValueError(f"{layer}: objective contains non-finite values {values.tolist()}")
        if len(self.candidate_labels[i]) != values.size:
            raise ValueError(
                f"{layer}: {values.size} objective values but "
                f"{len(self.candidate_labels[i])} candidate labels"
            )
        for constraint in self.constraints:
            coefficients = constraint.coefficients[i]
            if coefficients.shape != values.shape:
                raise ValueError(
                    f"{layer}: budget constraint '{constraint.name}' has coefficient shape "
                    f"{coefficients.shape} but the objective has shape {values.shape}"
                )
            if not np.all(np.isfinite(coefficients)):
                raise ValueError(
                    f"{layer}: budget constraint '{constraint.name}' contains non-finite "
                    f"coefficients {coefficients.tolist()}"
                )

    @property
    def variable_count(self) -> int:
        """Number of binary variables, one per (layer, candidate) pair."""
        return sum(values.size for values in self.objective)


@dataclass
class ILPSolution:
    """Verified allocation returned by ``solve_mckp``.

    ``objective`` and ``constraint_values`` are recomputed from the original problem.
    ``mip_gap`` is ``(objective - lower bound) / |objective|`` in original units,
    0 when the solver proved optimality. ``wall_time_s`` covers the whole
    ``solve_mckp`` call, including a Gurobi attempt before a fallback.
    ``fallback_reason`` is set when ``solver="auto"`` fell back to HiGHS.
    """

    choice: list[int]
    objective: float
    constraint_values: dict[str, float]
    solver: str
    solver_version: str
    status: str
    mip_gap: float
    wall_time_s: float
    fallback_reason: str | None = None


def min_feasible_limits(problem: MCKPProblem) -> dict[str, float]:
    """Return, per constraint, the smallest limit that some allocation meets (raw units).

    Each constraint on its own is met by choosing every layer's cheapest candidate, so
    its minimum is ``sum_i min_c coefficients[i][c]``.
    """
    return {
        constraint.name: math.fsum(float(row.min()) for row in constraint.coefficients)
        for constraint in problem.constraints
    }


def solve_mckp(problem: MCKPProblem, solver: str = "auto", time_limit_s: float = 60.0) -> ILPSolution:
    """Solve the multiple-choice knapsack ILP and return a verified allocation.

    ``solver`` is "auto" (Gurobi, then HiGHS as fallback), "gurobi" or "highs".
    ``time_limit_s`` bounds each solver run, so "auto" can take up to twice as long
    when Gurobi stops at the limit and HiGHS runs after it. Refinement solves get
    whatever is left of ``time_limit_s`` after the first solve.

    Raises InfeasibleBudgetError when no allocation meets the budgets, and SolverError
    when the requested solver is unavailable, a time limit is reached with no
    feasible allocation, or a solver result fails verification.
    """
    if solver not in SOLVER_CHOICES:
        raise ValueError(f"solver must be one of {SOLVER_CHOICES}, got {solver!r}")
    time_limit_s = float(time_limit_s)
    if not (math.isfinite(time_limit_s) and time_limit_s > 0):
        raise ValueError(f"time_limit_s must be a positive finite number of seconds, got {time_limit_s}")

    start = time.perf_counter()
    _raise_if_below_minimum(problem)
    model = _ScaledModel.build(problem)

    fallback_reason = None
    gurobi_incumbent = None
    if solver in ("auto", "gurobi"):
        try:
            result = _run_gurobi(model, time_limit_s)
        except _GurobiUnavailable as exc:
            if solver == "gurobi":
                raise SolverError(f"gurobi is unavailable: {exc}") from exc
            fallback_reason = str(exc)
        else:
            if solver == "gurobi" or result.status in ("optimal", "infeasible"):
                return _finish(problem, model, result, None, start, time_limit_s)
            fallback_reason = _describe_gurobi_stop(result, time_limit_s)
            if result.x is not None:
                gurobi_incumbent = result
        _warn_fallback(fallback_reason)

    result = _run_highs(model, time_limit_s)
    if gurobi_incumbent is not None and result.status != "optimal":
        result = _pick_better_incumbent(problem, model, gurobi_incumbent, result)
    return _finish(problem, model, result, fallback_reason, start, time_limit_s)


# ---------------------------------------------------------------------------
# Budget pre-check and infeasibility messages


def _exceeds(value: float, limit: float) -> bool:
    tolerance = CONSTRAINT_RELATIVE_TOLERANCE * abs(limit) + CONSTRAINT_ABSOLUTE_TOLERANCE
    return value > limit + tolerance


def _display_pair(constraint: BudgetConstraint, first: float, second: float) -> tuple[str, str]:
    """Format two raw values, adding digits until they read differently (up to 6 decimals)."""
    for digits in range(2, 7):
        first_text = constraint.display(first, digits)
        second_text = constraint.display(second, digits)
        if first_text != second_text:
            break
    return first_text, second_text


def _raise_if_below_minimum(problem: MCKPProblem) -> None:
    minimums = min_feasible_limits(problem)
    failures = []
    for constraint in problem.constraints:
        minimum = minimums[constraint.name]
        if not _exceeds(minimum, constraint.limit):
            continue
        limit_text, minimum_text = _display_pair(constraint, constraint.limit, minimum)
        text = (
            f"budget of {limit_text} is infeasible: the smallest feasible budget "
            f"with these candidates is {minimum_text}"
        )
        if len(problem.constraints) > 1:
            text = f"{constraint.name}: {text}"
        failures.append(text)
    if failures:
        raise InfeasibleBudgetError("; ".join(failures))


def _raise_infeasible_combination(problem: MCKPProblem, solver_name: str) -> None:
    if len(problem.constraints) < 2:
        # The pre-check proved that the cheapest candidates meet a single budget,
        # so a solver that reports infeasibility here has numerical trouble.
        raise SolverError(
            f"{solver_name} reported the problem infeasible although choosing each layer's "
            "cheapest candidate meets the budget. This indicates a numerical problem in the solver"
        )
    minimums = min_feasible_limits(problem)
    budgets = ", ".join(f"{c.name} <= {c.display(c.limit)}" for c in problem.constraints)
    own_minimums = ", ".join(f"{c.name} {c.display(minimums[c.name])}" for c in problem.constraints)
    raise InfeasibleBudgetError(
        f"the combination of budgets ({budgets}) is infeasible: each budget is feasible on its "
        f"own, but no allocation meets all of them together (solver {solver_name}). "
        f"Smallest feasible budget of each constraint on its own: {own_minimums}. "
        "Loosen at least one budget."
    )


# ---------------------------------------------------------------------------
# Scaled model shared by both solvers


@dataclass(frozen=True)
class _ScaledModel:
    """Solver input with the objective and budget rows rescaled for conditioning.

    Subtracting each layer's minimum objective shifts the total by a constant, because
    exactly one candidate per layer is chosen, so the argmin is unchanged. Dividing the
    shifted objective by ``objective_scale`` (at first the largest shifted value) brings
    objectives that span many orders of magnitude into [0, 1]. Each budget row and its
    limit are divided by the row's maximum absolute coefficient. ``upper_bounds`` is 0
    for candidates excluded from the search and 1 otherwise.
    """

    objective: np.ndarray
    objective_offset: float
    objective_scale: float
    shifted_objective: np.ndarray
    upper_bounds: np.ndarray
    assignment: scipy.sparse.csr_array
    budget_rows: scipy.sparse.csr_array
    budget_limits: np.ndarray
    layer_slices: list[slice]

    @classmethod
    def build(cls, problem: MCKPProblem) -> _ScaledModel:
        sizes = [values.size for values in problem.objective]
        bounds = np.concatenate([[0], np.cumsum(sizes)])
        layer_slices = [slice(int(lo), int(hi)) for lo, hi in zip(bounds[:-1], bounds[1:])]
        variable_count = int(bounds[-1])

        shifted_objective = np.concatenate([values - values.min() for values in problem.objective])
        largest = float(shifted_objective.max())
        objective_scale = largest if largest > 0 else 1.0
        objective_offset = math.fsum(float(values.min()) for values in problem.objective)

        layer_of_variable = np.repeat(np.arange(len(sizes)), sizes)
        assignment = scipy.sparse.csr_array(
            (np.ones(variable_count), (layer_of_variable, np.arange(variable_count))),
            shape=(len(sizes), variable_count),
        )

        rows = []
        limits = []
        for constraint in problem.constraints:
            row = np.concatenate(constraint.coefficients)
            row_scale = float(np.abs(row).max())
            if row_scale == 0:
                row_scale = 1.0
            rows.append(row / row_scale)
            limits.append(constraint.limit / row_scale)
        budget_rows = scipy.sparse.csr_array(np.array(rows).reshape(len(rows), variable_count))

        return cls(
            objective=shifted_objective / objective_scale,
            objective_offset=objective_offset,
            objective_scale=objective_scale,
            shifted_objective=shifted_objective,
            upper_bounds=np.ones(variable_count),
            assignment=assignment,
            budget_rows=budget_rows,
            budget_limits=np.array(limits, dtype=np.float64),
            layer_slices=layer_slices,
        )

    def rescaled_below(self, incumbent_shifted_total: float) -> _ScaledModel:
        """Return a copy scaled by an incumbent's shifted objective, for a refinement solve.

        Shifted objective values are non-negative, so a candidate whose shifted value
        exceeds the incumbent's shifted total cannot be in a better allocation. Those
        candidates get upper bound 0, and every remaining objective value lies in [0, 1].
        """
        excluded = self.shifted_objective > incumbent_shifted_total
        objective = np.where(excluded, 1.0, self.shifted_objective / incumbent_shifted_total)
        upper_bounds = np.where(excluded, 0.0, self.upper_bounds)
        return dataclasses.replace(
            self, objective=objective, objective_scale=incumbent_shifted_total, upper_bounds=upper_bounds
        )

    def shifted_total(self, choice: list[int]) -> float:
        """Sum the shifted objective of an allocation, in original units."""
        return math.fsum(float(self.shifted_objective[s.start + c]) for s, c in zip(self.layer_slices, choice))

    @property
    def variable_count(self) -> int:
        return self.objective.size

    @property
    def constraint_count(self) -> int:
        return self.assignment.shape[0] + self.budget_rows.shape[0]

    def original_objective(self, scaled: float) -> float:
        """Convert a value of the scaled objective (for example a dual bound) to original units."""
        return scaled * self.objective_scale + self.objective_offset


@dataclass
class _SolverResult:
    """Raw solver output before verification.

    ``status`` is "optimal", "time_limit", "infeasible" or "failed". ``x`` is None
    when the solver has no feasible point. ``dual_bound`` is a lower bound on the
    scaled objective, or None when the solver reported none.
    """

    solver: str
    solver_version: str
    status: str
    x: np.ndarray | None
    dual_bound: float | None = None
    message: str = ""


class _GurobiUnavailable(Exception):
    """Gurobi cannot solve this model: not installed, no license, or model over the license size."""


# ---------------------------------------------------------------------------
# Gurobi


def _run_gurobi(model: _ScaledModel, time_limit_s: float) -> _SolverResult:
    """Solve the scaled model with Gurobi, raising _GurobiUnavailable with the reason
    when gurobipy is missing or raises GurobiError."""
    try:
        import gurobipy
    except ImportError as exc:
        raise _GurobiUnavailable(f"gurobipy is not importable ({exc})") from exc

    version = ".".join(str(part) for part in gurobipy.gurobi.version())
    env = None
    gurobi_model = None
    try:
        # An empty Env takes OutputFlag before start(), so Gurobi prints no license banner.
        env = gurobipy.Env(empty=True)
        env.setParam("OutputFlag", 0)
        env.start()
    except gurobipy.GurobiError as exc:
        if env is not None:
            env.dispose()
        raise _GurobiUnavailable(f"gurobi environment could not start (error {exc.errno}: {exc})") from exc

    try:
        gurobi_model = gurobipy.Model("mckp", env=env)
        gurobi_model.Params.MIPGap = 0.0
        gurobi_model.Params.MIPGapAbs = 0.0
        gurobi_model.Params.FeasibilityTol = SOLVER_TOLERANCE
        gurobi_model.Params.IntFeasTol = SOLVER_TOLERANCE
        gurobi_model.Params.OptimalityTol = SOLVER_TOLERANCE
        gurobi_model.Params.TimeLimit = time_limit_s

        x = gurobi_model.addMVar(model.variable_count, ub=model.upper_bounds, vtype=gurobipy.GRB.BINARY, name="x")
        gurobi_model.addConstr(model.assignment @ x == 1.0, name="one_candidate")
        if model.budget_rows.shape[0] > 0:
            gurobi_model.addConstr(model.budget_rows @ x <= model.budget_limits, name="budget")
        gurobi_model.setObjective(model.objective @ x, gurobipy.GRB.MINIMIZE)
        gurobi_model.optimize()
        return _read_gurobi_result(gurobipy, gurobi_model, x, version)
    except gurobipy.GurobiError as exc:
        # The size-limited license raises here (error 10010) when the model is too large.
        raise _GurobiUnavailable(f"gurobi failed to optimize the model (error {exc.errno}: {exc})") from exc
    finally:
        if gurobi_model is not None:
            gurobi_model.dispose()
        env.dispose()


def _read_gurobi_result(gurobipy, gurobi_model, x, version: str) -> _SolverResult:
    grb = gurobipy.GRB
    status = gurobi_model.Status
    has_solution = gurobi_model.SolCount > 0
    values = np.array(x.X, dtype=np.float64) if has_solution else None
    dual_bound = float(gurobi_model.ObjBound) if has_solution else None

    if status == grb.OPTIMAL:
        return _SolverResult("gurobi", version, "optimal", values, dual_bound)
    if status == grb.TIME_LIMIT:
        return _SolverResult("gurobi", version, "time_limit", values, dual_bound, "time limit reached")
    # Every variable is binary, so the model cannot be unbounded and INF_OR_UNBD means infeasible.
    if status in (grb.INFEASIBLE, grb.INF_OR_UNBD):
        return _SolverResult("gurobi", version, "infeasible", None)
    return _SolverResult("gurobi", version, "failed", values, dual_bound, f"gurobi ended with status code {status}")


def _describe_gurobi_stop(result: _SolverResult, time_limit_s: float) -> str:
    if result.status == "time_limit":
        found = "with a feasible incumbent" if result.x is not None else "with no feasible allocation"
        return f"gurobi reached the time limit of {time_limit_s:g} s {found}"
    return f"gurobi did not solve the model: {result.message}"


def _warn_fallback(reason: str) -> None:
    message = f"solving the bit-width ILP with HiGHS instead of gurobi: {reason}"
    # stacklevel 3 points the warning at the caller of solve_mckp.
    warnings.warn(message, RuntimeWarning, stacklevel=3)
    logger.warning(message)


# ---------------------------------------------------------------------------
# HiGHS through scipy.optimize.milp


def _highs_version() -> str:
    try:
        from scipy.optimize._highspy import _core

        highs = f"{_core.HIGHS_VERSION_MAJOR}.{_core.HIGHS_VERSION_MINOR}.{_core.HIGHS_VERSION_PATCH}"
    except (ImportError, AttributeError):
        # NOTE: reads a private scipy module, which may move in later scipy releases.
        highs = "unknown"
    return f"{highs} (scipy {scipy.__version__})"


def _run_highs(model: _ScaledModel, time_limit_s: float) -> _SolverResult:
    """Solve the scaled model with HiGHS through ``scipy.optimize.milp``."""
    constraints = [scipy.optimize.LinearConstraint(model.assignment, 1.0, 1.0)]
    if model.budget_rows.shape[0] > 0:
        constraints.append(scipy.optimize.LinearConstraint(model.budget_rows, -np.inf, model.budget_limits))

    # NOTE: HiGHS 1.12 prints "HighsMipSolverData::transformNewIntegerFeasibleSolution
    # tmpSolver.run();" to stdout on some instances even with disp=False. The line is a
    # leftover debug print in HiGHS, and the result is still checked below.

    # milp accepts only mip_rel_gap among the gap options, but passes options it does not
    # know to HiGHS verbatim (scipy 1.17) with a RuntimeWarning that is silenced here.
    # HiGHS's own warning for an option name it rejects stays visible.
    options = {
        "time_limit": time_limit_s,
        "mip_rel_gap": 0.0,
        "mip_abs_gap": 0.0,
        "mip_feasibility_tolerance": SOLVER_TOLERANCE,
        "primal_feasibility_tolerance": SOLVER_TOLERANCE,
        "dual_feasibility_tolerance": SOLVER_TOLERANCE,
        "disp": False,
    }
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore",
            message=r"Unrecognized options detected: .*These will be passed to HiGHS verbatim",
            category=RuntimeWarning,
        )
        result = scipy.optimize.milp(
            c=model.objective,
            integrality=np.ones(model.variable_count),
            bounds=scipy.optimize.Bounds(0.0, model.upper_bounds),
            constraints=constraints,
            options=options,
        )

    version = _highs_version()
    x = None if result.x is None else np.asarray(result.x, dtype=np.float64)
    dual_bound = getattr(result, "mip_dual_bound", None)
    dual_bound = float(dual_bound) if dual_bound is not None else None
    message = str(result.message)

    # scipy.optimize.milp status: 0 optimal, 1 iteration or time limit, 2 infeasible,
    # 3 unbounded, 4 other.
    if result.status == 0:
        return _SolverResult("highs", version, "optimal", x, dual_bound, message)
    if result.status == 1:
        return _SolverResult("highs", version, "time_limit", x, dual_bound, message)
    if result.status == 2:
        return _SolverResult("highs", version, "infeasible", None, None, message)
    return _SolverResult("highs", version, "failed", x, dual_bound, f"HiGHS failed: {message}")


# ---------------------------------------------------------------------------
# Verification and result assembly


@dataclass
class _VerifiedAllocation:
    choice: list[int]
    objective: float
    constraint_values: dict[str, float] = field(default_factory=dict)


def _verify_result(problem: MCKPProblem, model: _ScaledModel, result: _SolverResult) -> _VerifiedAllocation:
    """Check a solver result against the original problem and return the verified allocation.

    Raises SolverError naming the failed check.
    """
    solver_name = result.solver
    x = np.asarray(result.x, dtype=np.float64).ravel()
    if x.size != model.variable_count:
        raise SolverError(
            f"{solver_name} solution failed the size check: {x.size} values for {model.variable_count} variables"
        )

    rounded = np.round(x)
    distance = np.abs(x - rounded)
    if not np.all(np.isfinite(x)) or distance.max() > INTEGRALITY_TOLERANCE:
        worst = int(np.nanargmax(np.where(np.isfinite(x), distance, np.inf)))
        raise SolverError(
            f"{solver_name} solution failed the integrality check: variable {worst} is {float(x[worst])!r}, "
            f"more than {INTEGRALITY_TOLERANCE:g} from 0 or 1"
        )
    if np.any((rounded != 0) & (rounded != 1)):
        raise SolverError(f"{solver_name} solution failed the binary check: values outside {{0, 1}}")

    choice = []
    for i, layer_slice in enumerate(model.layer_slices):
        chosen = np.flatnonzero(rounded[layer_slice])
        if chosen.size != 1:
            labels = [problem.candidate_labels[i][c] for c in chosen]
            raise SolverError(
                f"{solver_name} solution failed the one-candidate-per-layer check: layer {i} "
                f"('{problem.layer_names[i]}') has {chosen.size} candidates chosen {labels}"
            )
        choice.append(int(chosen[0]))

    constraint_values = {}
    for constraint in problem.constraints:
        value = math.fsum(float(row[c]) for row, c in zip(constraint.coefficients, choice))
        if _exceeds(value, constraint.limit):
            value_text, limit_text = _display_pair(constraint, value, constraint.limit)
            raise SolverError(
                f"{solver_name} solution failed the budget check: constraint '{constraint.name}' "
                f"is {value_text} ({value!r} raw), over the limit of {limit_text} ({constraint.limit!r} raw)"
            )
        constraint_values[constraint.name] = value

    objective = math.fsum(float(values[c]) for values, c in zip(problem.objective, choice))
    return _VerifiedAllocation(choice, objective, constraint_values)


def _relative_gap(objective: float, lower_bound: float | None) -> float:
    if lower_bound is None or not math.isfinite(lower_bound):
        return math.inf
    difference = max(objective - lower_bound, 0.0)
    if difference == 0.0:
        return 0.0
    return difference / abs(objective) if objective != 0 else math.inf


def _pick_better_incumbent(
    problem: MCKPProblem, model: _ScaledModel, gurobi_result: _SolverResult, highs_result: _SolverResult
) -> _SolverResult:
    """Return whichever time-limited result has the lower verified objective.

    Used when Gurobi stopped at the time limit with an incumbent and HiGHS did not prove
    optimality either. A HiGHS result without a feasible point loses to the Gurobi incumbent.
    """
    if highs_result.x is None:
        return gurobi_result
    gurobi_objective = _verify_result(problem, model, gurobi_result).objective
    highs_objective = _verify_result(problem, model, highs_result).objective
    return gurobi_result if gurobi_objective < highs_objective else highs_result


def _refine_optimum(
    problem: MCKPProblem,
    model: _ScaledModel,
    solver_name: str,
    verified: _VerifiedAllocation,
    start: float,
    time_limit_s: float,
) -> tuple[_VerifiedAllocation, int]:
    """Re-solve with the objective scaled by the optimum's shifted total, and return the
    best verified allocation and the number of extra solves.

    A solver's optimum is exact only up to its optimality tolerance, about
    SOLVER_TOLERANCE * objective_scale in original units. When the optimum's shifted
    total is much smaller than objective_scale, for example because the layers with the
    largest objectives get their most precise candidate, that error can exceed 1e-9 of
    the total. Scaling by the incumbent's shifted total makes the tolerance relative to
    the optimum itself. Each round runs only while the total is below half of the
    current scale, and stops when a round finds no better allocation.
    """
    runner = _run_gurobi if solver_name == "gurobi" else _run_highs
    scale = model.objective_scale
    rounds = 0
    while rounds < MAX_REFINEMENT_ROUNDS:
        incumbent_total = model.shifted_total(verified.choice)
        if incumbent_total <= 0 or incumbent_total >= 0.5 * scale:
            break
        remaining_s = time_limit_s - (time.perf_counter() - start)
        if remaining_s <= 0:
            logger.warning("skipped the refinement solve because the time limit of %g s is spent", time_limit_s)
            break

        refined_model = model.rescaled_below(incumbent_total)
        try:
            result = runner(refined_model, remaining_s)
        except _GurobiUnavailable as exc:
            logger.warning("refinement solve with gurobi failed, keeping the previous optimum: %s", exc)
            break
        rounds += 1
        if result.status != "optimal" or result.x is None:
            logger.warning(
                "refinement solve with %s ended with status %s, keeping the previous optimum",
                solver_name,
                result.status,
            )
            break

        candidate = _verify_result(problem, refined_model, result)
        scale = incumbent_total
        if candidate.objective >= verified.objective:
            break
        verified = candidate
    return verified, rounds


def _finish(
    problem: MCKPProblem,
    model: _ScaledModel,
    result: _SolverResult,
    fallback_reason: str | None,
    start: float,
    time_limit_s: float,
) -> ILPSolution:
    if result.status == "infeasible":
        _raise_infeasible_combination(problem, result.solver)
    if result.x is None:
        if result.status == "time_limit":
            raise SolverError(
                f"{result.solver}: time limit of {time_limit_s:g} s reached with no feasible allocation; "
                "raise time_limit_s or loosen the budget"
            )
        raise SolverError(f"{result.solver} returned no allocation: {result.message}")
    if result.status == "failed":
        raise SolverError(f"{result.solver} did not solve the model: {result.message}")

    verified = _verify_result(problem, model, result)
    refinement_rounds = 0
    if result.status == "optimal":
        verified, refinement_rounds = _refine_optimum(problem, model, result.solver, verified, start, time_limit_s)
    lower_bound = None if result.dual_bound is None else model.original_objective(result.dual_bound)
    mip_gap = 0.0 if result.status == "optimal" else _relative_gap(verified.objective, lower_bound)
    wall_time_s = time.perf_counter() - start

    if result.status == "time_limit":
        logger.warning(
            "%s reached the time limit of %g s. Returning a feasible allocation that is not proven "
            "optimal (relative gap %.3g)",
            result.solver,
            time_limit_s,
            mip_gap,
        )
    logger.info(
        "solved bit-width ILP with %s %s: %d variables, %d constraints, objective %.6g, "
        "status %s, gap %.3g, %d refinement solves, %.3f s",
        result.solver,
        result.solver_version,
        model.variable_count,
        model.constraint_count,
        verified.objective,
        result.status,
        mip_gap,
        refinement_rounds,
        wall_time_s,
    )
    return ILPSolution(
        choice=verified.choice,
        objective=verified.objective,
        constraint_values=verified.constraint_values,
        solver=result.solver,
        solver_version=result.solver_version,
        status=result.status,
        mip_gap=mip_gap,
        wall_time_s=wall_time_s,
        fallback_reason=fallback_reason,
    )
