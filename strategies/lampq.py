"""LampQ: type-aware Fisher sensitivity, optimal ILP allocation, iterative update.

After Kim et al., "LampQ: Towards Accurate Layer-wise Mixed Precision Quantization
for Vision Transformers", AAAI 2026 (arXiv 2511.10004).

Iterative update: quantizing early layers changes the gradients that later layers
see, so the float-model Fisher misjudges them. The first ILP uses the float-model
traces F_0. Before round 1 the model is also quantized with the uniform allocation
of the same budget (when one exists), whose traces F_u describe the operating point
of the budget. Round r quantizes the model with the allocation A_(r-1), measures the
Fisher traces F_r of the partly quantized model, and re-solves the ILP with the mean
of all traces measured so far. The mean damps a back-and-forth that re-solving on
F_r alone shows: a coarse layer raises its neighbours' traces, the next ILP moves
bits to them, and the round after moves them back. Every allocation's calibration loss is measured, the
uniform one included, and the lowest one is kept. So when the sensitivity model
cannot find a mixed allocation that beats uniform precision on the calibration set,
LampQ returns the uniform allocation, and ``solver['selected_round']`` is "uniform". The loop stops when an
allocation repeats or after ``rounds`` rounds.
"""

from __future__ import annotations

import logging
import time

from lampq_fx.allocation.solve import allocate_ilp, block_groups
from lampq_fx.allocation.space import Allocation, Budget, SearchSpace
from lampq_fx.metrics.fisher import FisherTrace
from lampq_fx.strategies.base import AllocationStrategy, register_strategy

logger = logging.getLogger(__name__)


def _mean_traces(history: list[dict[str, FisherTrace]]) -> dict[str, FisherTrace]:
    count = len(history)
    mean = {}
    for name in history[0]:
        weight = sum(h[name].weight for h in history) / count
        inputs = [sum(h[name].inputs[k] for h in history) / count for k in range(len(history[0][name].inputs))]
        mean[name] = FisherTrace(weight, inputs)
    return mean


class LampQStrategy(AllocationStrategy):
    """LampQ allocation; ``type_aware`` and ``rounds`` switch its parts off for ablations."""

    name = "lampq"

    def __init__(self, *, type_aware: bool = True, rounds: int = 3, solver: str = "auto",
                 time_limit_s: float = 60.0, name: str | None = None,
                 uniform_start: bool = True, granularity: str = "layer") -> None:
        if granularity not in ("layer", "block"):
            raise ValueError(f"granularity must be 'layer' or 'block', got {granularity!r}")
        self.granularity = granularity
        if rounds < 0:
            raise ValueError(f"rounds must be ≥ 0, got {rounds}")
        self.type_aware = type_aware
        self.rounds = rounds
        self.solver = solver
        self.time_limit_s = time_limit_s
        self.uniform_start = uniform_start
        if name is not None:
            self.name = name

    def _uniform_candidate(self, session, budget: Budget, space: SearchSpace) -> Allocation | None:
        from lampq_fx.allocation.ilp import InfeasibleBudgetError
        from lampq_fx.strategies.uniform import UniformStrategy
        try:
            return UniformStrategy().allocate(session, budget, space)
        except InfeasibleBudgetError:
            return None

    def _solve(self, session, table, budget: Budget, fisher) -> Allocation:
        groups = block_groups(session.layers) if self.granularity == "block" else None
        return allocate_ilp(table, budget, float_bytes=session.float_bytes, strategy=self.name,
                            fisher=fisher, solver=self.solver, time_limit_s=self.time_limit_s,
                            groups=groups)

    def allocate(self, session, budget: Budget, space: SearchSpace) -> Allocation:
        started = time.perf_counter()
        table = session.sensitivity(space, type_aware=self.type_aware)
        history = [table.fisher]
        allocation = self._solve(session, table, budget, table.fisher)
        loss = session.calibration_loss(allocation) if self.rounds else None
        rounds_log = [{"round": 0, "changed_layers": [], "calibration_loss": loss,
                       "objective": allocation.objective}]
        if self.rounds:
            logger.info("%s round 0: calibration loss %.4f (float %.4f)", self.name, loss,
                        session.calibration_loss(None))
        best, best_loss, best_round = allocation, loss, 0
        seen = {allocation.key()}
        previous = allocation

        uniform = self._uniform_candidate(session, budget, space) if self.rounds and self.uniform_start else None
        if uniform is not None:
            history.append(session.fisher(uniform))
            uniform_loss = session.calibration_loss(uniform)
            seen.add(uniform.key())
            rounds_log.append({"round": "uniform", "changed_layers": [], "calibration_loss": uniform_loss,
                               "objective": None})
            logger.info("%s: uniform start, calibration loss %.4f", self.name, uniform_loss)
            if uniform_loss < best_loss:
                best, best_loss, best_round = uniform, uniform_loss, "uniform"

        for round_index in range(1, self.rounds + 1):
            history.append(session.fisher(previous))
            candidate = self._solve(session, table, budget, _mean_traces(history))
            changed = sorted(name for name, choice in candidate.choices.items()
                             if previous.choices[name] != choice)
            if candidate.key() in seen:
                rounds_log.append({"round": round_index, "changed_layers": changed,
                                   "calibration_loss": None, "objective": candidate.objective,
                                   "stopped": "allocation repeats"})
                logger.info("%s round %d: allocation repeats an earlier round, stopping",
                            self.name, round_index)
                break
            seen.add(candidate.key())
            loss = session.calibration_loss(candidate)
            rounds_log.append({"round": round_index, "changed_layers": changed,
                               "calibration_loss": loss, "objective": candidate.objective})
            logger.info("%s round %d: %d layers changed, calibration loss %.4f", self.name,
                        round_index, len(changed), loss)
            if loss < best_loss:
                best, best_loss, best_round = candidate, loss, round_index
            previous = candidate

        best.rounds = rounds_log
        best.strategy = self.name
        # For a kept uniform allocation, the solver block describes the round-0 ILP.
        best.solver = dict(best.solver or allocation.solver, selected_round=best_round,
                           allocation_time_s=time.perf_counter() - started)
        if best_round == "uniform":
            best.objective = sum(layer.omega[best.choices[layer.name].label] for layer in session.layers)
            logger.info("%s: no mixed allocation beat uniform precision on the calibration set; "
                        "keeping the uniform allocation", self.name)
        return best


register_strategy("lampq", LampQStrategy)
register_strategy("lampq-noiter", lambda **options: LampQStrategy(
    **{"rounds": 0, "name": "lampq-noiter", **options}))
register_strategy("lampq-block", lambda **options: LampQStrategy(
    **{"granularity": "block", "name": "lampq-block", **options}))
register_strategy("fisher-ilp", lambda **options: LampQStrategy(
    **{"type_aware": False, "rounds": 0, "name": "fisher-ilp", **options}))
