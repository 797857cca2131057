"""dynaflow.strategies: the Strategy API, the registry, and the built-in strategies."""

from __future__ import annotations

import os
from typing import Any

from dynaflow.errors import StrategyError
from dynaflow.strategies import splits
from dynaflow.strategies.auto import Auto, Candidate
from dynaflow.strategies.base import ScheduleContext, SearchSpace, SearchSpec, Strategy
from dynaflow.strategies.eager import Eager
from dynaflow.strategies.registry import registry
from dynaflow.strategies.nanoflow import NanoFlow
from dynaflow.strategies.prefill_decode import PrefillDecode
from dynaflow.strategies.round_robin import RoundRobin
from dynaflow.strategies.sequential import Sequential
from dynaflow.strategies.two_batch_overlap import TwoBatchOverlap

__all__ = ["Strategy", "ScheduleContext", "SearchSpace", "SearchSpec", "Sequential", "Eager", "RoundRobin", "NanoFlow", "TwoBatchOverlap", "PrefillDecode",
           "Auto", "Candidate", "splits", "registry", "get", "check_data_spec", "available", "register_strategy", "load_strategy"]

for _cls in (Sequential, Eager, RoundRobin, NanoFlow, TwoBatchOverlap, PrefillDecode, Auto):
    registry.register(_cls.name, _cls)


def get(spec: Any, **options: Any) -> Strategy:
    """Resolve a strategy name, class, instance or ``"pkg.module:Class"`` string into an instance."""
    return registry.resolve(spec, **options)


def check_data_spec(spec: Any, source: str) -> None:
    """Refuse a ``"pkg.module:Class"`` strategy read from data (a config dict, an environment variable's JSON)
    whose module the program has not imported: importing runs the module's code, and data never does that
    (:meth:`~dynaflow.registry.Registry.load_class`). Names, classes and instances pass unchanged."""
    if isinstance(spec, str) and ":" in spec:
        registry.load_class(spec, source=source)


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
    if name_or_cls is not None and not isinstance(name_or_cls, str):  # register_strategy(a_function): not a class
        raise StrategyError(f"register_strategy needs a Strategy subclass or a name; got {name_or_cls!r}.")
    return deco


def load_strategy(path: str | os.PathLike[str]) -> Strategy:
    """A strategy from a YAML (or JSON) file: ``name`` (a registered name or ``"pkg.module:Class"`` naming a
    Strategy subclass of a module the program imported already; the file never imports or calls anything
    else) plus its options, e.g. ``{name: nanoflow, nano_batches: 3, sm_counts: {compute: 96, memory: 36}}``.
    Unknown keys are rejected with the nearest valid option name."""
    import yaml

    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except (OSError, UnicodeDecodeError, yaml.YAMLError, RecursionError) as exc:
        raise StrategyError(f"Cannot read strategy file {path!r}: {exc}") from None
    if not isinstance(data, dict) or "name" not in data:
        raise StrategyError(f"Strategy file {path!r} must be a mapping with a 'name' key (and the strategy's options); "
                            f"got {type(data).__name__}{' without name' if isinstance(data, dict) else ''}.")
    options = {k: v for k, v in data.items() if k != "name"}
    return registry.load(data["name"], options, source=path)
