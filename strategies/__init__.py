"""dynaflow.strategies: the Strategy API, the registry, and the built-in strategies."""

from __future__ import annotations

from typing import Any

from dynaflow.errors import StrategyError
from dynaflow.registry import Registry
from dynaflow.strategies.base import ScheduleContext, Strategy
from dynaflow.strategies.nanoflow import NanoFlow
from dynaflow.strategies.round_robin import RoundRobin
from dynaflow.strategies.sequential import Sequential

__all__ = ["Strategy", "ScheduleContext", "Sequential", "RoundRobin", "NanoFlow", "registry", "get", "available",
           "register_strategy"]

registry: Registry[Strategy] = Registry("strategy", Strategy, StrategyError, entry_point_group="dynaflow.strategies")
for _cls in (Sequential, RoundRobin, NanoFlow):
    registry.register(_cls.name, _cls)


def get(spec: Any, **options: Any) -> Strategy:
    """Resolve a strategy name, class, instance or ``"pkg.module:Class"`` string into an instance."""
    return registry.resolve(spec, **options)


def available() -> list[str]:
    """Names of every registered strategy (built-ins and ``dynaflow.strategies`` entry points)."""
    return registry.available()


def register_strategy(name_or_cls: Any = None, *, replace: bool = False) -> Any:
    """Register a strategy class: ``@register_strategy``, ``@register_strategy("name")`` or a direct call."""
    def deco(cls: type[Strategy]) -> type[Strategy]:
        name = name_or_cls if isinstance(name_or_cls, str) else getattr(cls, "name", cls.__name__)
        if not (isinstance(cls, type) and issubclass(cls, Strategy)):
            raise StrategyError(f"register_strategy needs a Strategy subclass; got {cls!r}.")
        registry.register(name, cls, replace=replace)
        return cls

    if isinstance(name_or_cls, type):
        return deco(name_or_cls)
    return deco
