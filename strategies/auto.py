"""``auto``: let the autotuner pick the strategy and its parameters per input bucket.

``Auto`` only *describes* the search — which strategies, nano-batch counts, SM splits and staggers to try,
and how many of the best predictions to measure. ``dynaflow.tune`` runs the search (simulate every
candidate on the cost model, measure the best few on the real executor, cache the winner on disk) and
the compiled model plans each bucket with the winner.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from dynaflow.errors import StrategyError, did_you_mean
from dynaflow.phase_bound import PhaseBound
from dynaflow.ir import InputInfo, NanoGraph, Resource, Schedule, SplitConfig
from dynaflow.strategies.base import SearchSpace, SearchSpec, Strategy
from dynaflow.strategies.sequential import Sequential

__all__ = ["Auto", "Candidate"]


@dataclass(frozen=True)
class Candidate:
    """One point of the search space: a registered strategy name and its options."""

    strategy: str
    options: tuple[tuple[str, Any], ...] = ()
    graphs: bool = False
    """Run the step as a CUDA graph (a variant the autotuner measures on the cuda executor)."""

    def build(self, source: str = "an autotune candidate") -> Strategy:
        """The strategy this candidate names (its ``graphs`` attribute set when the step runs as a CUDA graph).
        Candidates come from data (the autotune cache, YAML files), so only registered names and Strategy
        subclasses are accepted; errors name ``source``."""
        from dynaflow.strategies.registry import registry

        strategy = registry.load(self.strategy, {k: (dict(v) if isinstance(v, tuple) and v and isinstance(v[0], tuple)
                                                     else v) for k, v in self.options}, source=source)
        if self.graphs:
            strategy.graphs = True
        return strategy

    def with_graphs(self) -> "Candidate":
        return Candidate(self.strategy, self.options, graphs=True)

    def to_json(self) -> dict[str, Any]:
        out = {"strategy": self.strategy, "options": {k: _plain(v) for k, v in self.options}}
        return {**out, "graphs": True} if self.graphs else out

    @classmethod
    def from_json(cls, data: Any, source: str = "an autotune candidate") -> "Candidate":
        """Parse ``{"strategy": name, "options": {...}}``; anything else raises a StrategyError naming ``source``."""
        options = data.get("options", {}) if isinstance(data, dict) else None
        if (not isinstance(data, dict) or not isinstance(data.get("strategy"), str) or not isinstance(options, dict)
                or not all(isinstance(k, str) for k in options)):
            raise StrategyError(f"{source}: a candidate must be {{'strategy': <registered name>, 'options': "
                                f"{{<option>: <value>}}}}; got {data!r:.200}.")
        graphs = data.get("graphs", False)
        if not isinstance(graphs, bool):
            raise StrategyError(f"{source}: a candidate's 'graphs' must be true or false; got {graphs!r:.60}.")
        try:
            return cls(data["strategy"], tuple(sorted((k, _frozen(v)) for k, v in options.items())), graphs)
        except TypeError as exc:  # an unhashable option value (a list of dicts, ...)
            raise StrategyError(f"{source}: candidate {data!r:.200} has an option value dynaflow cannot use: {exc}") from None

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={_plain(v)}" for k, v in self.options)
        return f"{self.strategy}({opts})" + (" +cuda-graph" if self.graphs else "")


def _frozen(v: Any) -> Any:
    if isinstance(v, dict):
        return tuple(sorted(v.items()))
    if isinstance(v, list):
        return tuple(v)
    return v


def _plain(v: Any) -> Any:
    if isinstance(v, tuple) and v and all(isinstance(x, tuple) and len(x) == 2 for x in v):
        return dict(v)
    if isinstance(v, tuple):
        return list(v)
    return v


def _cand(strategy: str, **options: Any) -> Candidate:
    return Candidate(strategy, tuple(sorted((k, _frozen(v)) for k, v in options.items())))


class Auto(Strategy):
    """Search strategies × nano-batch counts × SM splits × staggers; simulate all, measure the best few."""

    name = "auto"

    def __init__(self, max_nano_batches: int = 4, strategies: Sequence[str] | None = None, measure_top_k: int = 2,
                 repeats: int = 5, sm_steps: int = 4, cache: bool = True,
                 candidates: Sequence[Candidate | dict[str, Any]] | None = None, buckets: str = "pow2",
                 decode_bound: float | None = 1.2) -> None:
        super().__init__(None)
        if not isinstance(max_nano_batches, int) or max_nano_batches < 1:
            raise StrategyError(f"Strategy 'auto': max_nano_batches={max_nano_batches!r} must be an int >= 1.")
        counts = (("measure_top_k", measure_top_k, 0), ("repeats", repeats, 1), ("sm_steps", sm_steps, 1))
        for name, value, low in counts:
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise StrategyError(f"Strategy 'auto': {name}={value!r} must be an int >= {low}.")
        if buckets not in ("pow2", "exact"):
            raise StrategyError(f"Strategy 'auto': buckets={buckets!r} must be 'pow2' (tune once per power-of-two "
                                "bucket of rows and requests, the default) or 'exact' (tune every batch size).")
        self.buckets = buckets
        self.decode_bound = PhaseBound("decode", decode_bound) if decode_bound is not None else None
        """Measured candidates that split decode rows off (``prefill_decode``) must finish them within this
        factor of their standalone time (:mod:`dynaflow.phase_bound`); ``None``: no bound."""
        self.max_nano_batches = max_nano_batches
        if strategies is not None and (isinstance(strategies, str) or not all(isinstance(n, str) for n in strategies)):
            raise StrategyError(f"Strategy 'auto': strategies={strategies!r} must be a list of registered strategy "
                                "names, e.g. strategies=['nanoflow', 'two_batch_overlap'].")
        self.strategies = tuple(strategies) if strategies else None
        """Registered names to search; ``None``: every registered strategy (a user's registered one too)."""
        self.measure_top_k = measure_top_k
        self.repeats = repeats
        self.sm_steps = sm_steps
        self.cache = cache
        self.fixed = tuple(c if isinstance(c, Candidate) else Candidate.from_json(c, source="Strategy 'auto' candidates")
                           for c in candidates) if candidates else None
        for c in self.fixed or ():  # refuse a "module:attr" that is not a Strategy class now, before any search
            if ":" in c.strategy:
                from dynaflow.strategies.registry import registry

                registry.load_class(c.strategy, source="Strategy 'auto' candidates")
        self._fallback = Sequential()

    def candidates(self, info: InputInfo, resources: set[Resource], num_sms: int | None = None,
                   granularity: int = 8) -> list[Candidate]:
        """The search space for one bucket: every registered strategy's :meth:`~Strategy.search_candidates`,
        in registration order. Sequential with one nano-batch is always first: the baseline no winner may be
        predicted slower than; ``eager`` (the captured graph as is) always second: the floor always measured."""
        floors = [_cand("sequential"), _cand("eager")]
        if self.fixed is not None:
            return floors + [c for c in self.fixed if c not in floors]
        from dynaflow.strategies.registry import registry

        space = SearchSpace(info, frozenset(resources), num_sms, granularity, self.max_nano_batches, self.sm_steps)
        names = [name for name, _ in registry.classes()]
        unknown = [n for n in self.strategies or () if n not in names]
        if unknown:
            raise StrategyError(f"Strategy 'auto': strategies names {unknown[0]!r}, which is not registered."
                                f"{did_you_mean(unknown[0], names)} Registered: {', '.join(names)}.")
        out = list(floors)
        for name, cls in registry.classes():
            if self.strategies is not None and name not in self.strategies:
                continue
            out += [_cand(name, **options) for options in cls.search_candidates(space)]
        return list(dict.fromkeys(out))

    def search(self) -> SearchSpec:
        return SearchSpec(self.candidates, self.buckets, self.measure_top_k, self.repeats, self.cache, self._fallback,
                          self.decode_bound)

    # Used as-is (outside a compiled model's tuner) Auto behaves like sequential execution.
    def split_config(self, info: InputInfo) -> SplitConfig:
        return self._fallback.split_config(info)

    def plan(self, graph: NanoGraph, split: SplitConfig) -> Schedule:
        return self._fallback.plan(graph, split)

    def describe(self) -> str:
        over = (f"{len(self.fixed)} given candidates" if self.fixed is not None
                else ", ".join(self.strategies or ["every registered strategy"]))
        return (f"autotuned per {self.buckets} bucket over {over} (up to {self.max_nano_batches} nano-batches), "
                f"measuring the best {self.measure_top_k}")

    def __repr__(self) -> str:
        bound = self.decode_bound.factor if self.decode_bound is not None else None
        space = (f"strategies={list(self.strategies)!r}, " if self.strategies is not None else "") + (
            f"candidates={[repr(c) for c in self.fixed]!r}, " if self.fixed is not None else "")
        return (f"Auto({space}max_nano_batches={self.max_nano_batches}, measure_top_k={self.measure_top_k}, "
                f"repeats={self.repeats}, sm_steps={self.sm_steps}, buckets={self.buckets!r}, decode_bound={bound})")
