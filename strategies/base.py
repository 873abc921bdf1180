"""The strategy interface and the name registry."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import TYPE_CHECKING, ClassVar

from lampq_fx.allocation.space import Allocation, Budget, SearchSpace

if TYPE_CHECKING:
    from lampq_fx.session import LampQSession

_REGISTRY: dict[str, Callable[..., "AllocationStrategy"]] = {}


class AllocationStrategy(ABC):
    """Chooses one bit-width pair per layer of a session's model under a budget."""

    name: ClassVar[str]

    @abstractmethod
    def allocate(self, session: "LampQSession", budget: Budget, space: SearchSpace) -> Allocation:
        """Return an allocation of ``space`` candidates that meets ``budget``."""


def register_strategy(name: str, factory: Callable[..., AllocationStrategy]) -> None:
    if name in _REGISTRY:
        raise ValueError(f"strategy {name!r} is already registered")
    _REGISTRY[name] = factory


def strategy_names() -> list[str]:
    return sorted(_REGISTRY)


def get_strategy(name: str, **options) -> AllocationStrategy:
    """Build the strategy registered as ``name`` with keyword ``options``."""
    try:
        factory = _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown strategy {name!r}; available: {', '.join(strategy_names())}") from None
    return factory(**options)
