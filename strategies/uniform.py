"""Uniform precision: one bit-width pair for every layer, the comparison baseline."""

from __future__ import annotations

import logging

from lampq_fx.allocation.ilp import InfeasibleBudgetError
from lampq_fx.allocation.solve import check_budget_feasible
from lampq_fx.allocation.space import Allocation, BitChoice, Budget, SearchSpace, layer_bops, model_size_mb
from lampq_fx.strategies.base import AllocationStrategy, register_strategy

logger = logging.getLogger(__name__)


class UniformStrategy(AllocationStrategy):
    """Pick the best uniform pair (w, a) that meets the budget.

    Pairs are ranked by min(w, a) and then by w + a, highest first. Each layer takes
    the pair, raised to its type's ``min_bits`` bound where one is set.
    """

    name = "uniform"

    def __init__(self, *, solver: str | None = None, time_limit_s: float | None = None) -> None:
        # Accepts the ILP strategies' options so that callers can pass one option set to
        # any strategy; uniform precision needs no solver.
        del solver, time_limit_s

    def _choices(self, session, space: SearchSpace, pair: tuple[int, int]) -> dict[str, BitChoice]:
        choices = {}
        for layer in session.layers:
            options = space.candidates(layer)
            weight = pair[0] if layer.has_weight else None
            fits = [c for c in options if (c.weight_bits or 0) >= (weight or 0) and c.act_bits >= pair[1]]
            choices[layer.name] = min(fits, key=lambda c: ((c.weight_bits or 0), c.act_bits)) if fits \
                else max(options, key=lambda c: ((c.weight_bits or 0), c.act_bits))
        return choices

    def _cost(self, session, budget: Budget, choices: dict[str, BitChoice]) -> float:
        layers = session.layers
        if budget.kind == "avg_weight_bits":
            weighted = [layer for layer in layers if layer.has_weight]
            return sum(l.weight_params * choices[l.name].weight_bits for l in weighted) / \
                max(1, sum(l.weight_params for l in weighted))
        if budget.kind == "size_mb":
            return model_size_mb(layers, choices, session.float_bytes)
        return sum(layer_bops(layer, choices[layer.name]) for layer in layers)

    def allocate(self, session, budget: Budget, space: SearchSpace) -> Allocation:
        candidates = {layer.name: space.candidates(layer) for layer in session.layers}
        check_budget_feasible(session.layers, candidates, budget, session.float_bytes)
        pairs = sorted(((w, a) for w in space.weight_bits for a in space.act_bits),
                       key=lambda p: (min(p), sum(p), p[0]), reverse=True)
        for pair in pairs:
            choices = self._choices(session, space, pair)
            if self._cost(session, budget, choices) <= budget.value * (1 + 1e-9):
                logger.info("uniform: W%dA%d meets %s", pair[0], pair[1], budget.label)
                return Allocation(choices=choices, strategy=self.name, budget=budget)
        raise InfeasibleBudgetError(
            f"no uniform bit-width in weights {space.weight_bits} × activations {space.act_bits} "
            f"meets the budget {budget.label}; a mixed allocation may still exist (use a mixed strategy)"
        )


register_strategy(UniformStrategy.name, UniformStrategy)
