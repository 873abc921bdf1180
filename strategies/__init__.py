"""Bit-allocation strategies behind one interface, selectable by name.

This folder is installed as ``lampq_fx.strategies``. Each strategy turns a
``LampQSession`` and a ``Budget`` into an ``Allocation``:

- ``lampq``: type-aware Fisher Ω, ILP, iterative update (the method of this package)
- ``lampq-noiter``: the same without the iterative update
- ``lampq-block``: LampQ with one bit pair per transformer block instead of per layer
- ``fisher-ilp``: plain Fisher (no α_t) + ILP, no iterative update
- ``hawq-v2``: Hutchinson Hessian traces × quantization error + ILP
- ``uniform``: every layer at the highest common bit-width the budget allows
"""

from lampq_fx.strategies.base import AllocationStrategy, get_strategy, register_strategy, strategy_names
from lampq_fx.strategies.hawq import HawqV2Strategy
from lampq_fx.strategies.lampq import LampQStrategy
from lampq_fx.strategies.uniform import UniformStrategy

__all__ = [
    "AllocationStrategy",
    "HawqV2Strategy",
    "LampQStrategy",
    "UniformStrategy",
    "get_strategy",
    "register_strategy",
    "strategy_names",
]
