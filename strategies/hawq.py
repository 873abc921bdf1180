"""HAWQ-v2 style allocation: Hutchinson Hessian traces × quantization error, then the ILP.

    Ω_i(b_w, b_a) = ½ · [ tr(H_i) · mse_W,i(b_w) + Σ_k tr(F^X_i,k) · mse_X,i,k(b_a) ]

The weight term follows HAWQ-v2 (Dong et al., NeurIPS 2020): the average Hessian
eigenvalue tr(H_i)/n_i times the squared error ||ΔW_i||² = n_i · mse. HAWQ-v2 scores
weights only, so the activation term keeps the empirical Fisher of the layer input,
as LampQ does. With fixed activation bits that term does not change the allocation. There
are no type scales and no iterative update, so the comparison isolates the
curvature estimate. The Hessian traces do not depend on the budget, so the session
computes them once and later budgets reuse them, as the float Fisher is reused.
"""

from __future__ import annotations

import time

from lampq_fx.allocation.solve import allocate_ilp
from lampq_fx.allocation.space import Allocation, Budget, SearchSpace
from lampq_fx.metrics.fisher import FisherTrace
from lampq_fx.strategies.base import AllocationStrategy, register_strategy


class HawqV2Strategy(AllocationStrategy):
    name = "hawq-v2"

    def __init__(self, *, probes: int = 16, solver: str = "auto", time_limit_s: float = 60.0) -> None:
        self.probes = probes
        self.solver = solver
        self.time_limit_s = time_limit_s

    def allocate(self, session, budget: Budget, space: SearchSpace) -> Allocation:
        started = time.perf_counter()
        table = session.sensitivity(space, type_aware=False)
        hessian = session.hessian_traces(self.probes)
        curvature = {name: FisherTrace(hessian.traces.get(name, 0.0), list(trace.inputs))
                     for name, trace in table.fisher.items()}
        allocation = allocate_ilp(table, budget, float_bytes=session.float_bytes, strategy=self.name,
                                  fisher=curvature, solver=self.solver, time_limit_s=self.time_limit_s)
        allocation.solver = dict(allocation.solver, backward_passes=hessian.backward_passes,
                                 allocation_time_s=time.perf_counter() - started)
        return allocation


register_strategy(HawqV2Strategy.name, HawqV2Strategy)
