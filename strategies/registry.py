"""The strategy registry (``dynaflow.strategies.registry``): filled by ``dynaflow.strategies`` with the
built-ins, by ``register_strategy`` and by the ``dynaflow.strategies`` entry-point group. ``auto`` iterates it,
so every registered strategy that declares :meth:`~dynaflow.strategies.base.Strategy.search_candidates`
is searched."""

from __future__ import annotations

from dynaflow.errors import StrategyError
from dynaflow.registry import Registry
from dynaflow.strategies.base import Strategy

__all__ = ["registry"]

registry: Registry[Strategy] = Registry("strategy", Strategy, StrategyError, entry_point_group="dynaflow.strategies")
