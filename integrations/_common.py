"""What every host integration shares, with no host import: the error type, the request-aligned split
policy, the strategy wrapper that applies it, the mutation-threading graph pass and option parsing.

Why a request-aligned split: a serving engine's attention writes a request's new K/V into its cache and
reads the request's whole history back in the same op. If one request's tokens were cut across two
nano-batches, nano-batch ``i+1``'s attention would read K/V that nano-batch ``i``'s attention writes, an
ordering dynaflow's per-nano-batch dependency graph does not express. Cutting only at request boundaries
makes every nano-batch's attention independent, so any schedule the strategy picks stays correct.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import itertools

import json
import logging
from typing import Any, Mapping, Sequence

import torch
import torch.fx

from dynaflow import knobs
from dynaflow.config import DynaflowConfig
from dynaflow.errors import ConfigError, DynaflowError, StrategyError
from dynaflow.frontend.effects import write_targets
from dynaflow.ir import InputInfo, NanoGraph, Schedule, SplitConfig
from dynaflow.strategies import Strategy, check_data_spec, get as get_strategy
from dynaflow.strategies.base import SearchSpec
from dynaflow.strategies.splits import at_most

__all__ = ["IntegrationError", "request_aligned_split", "RequestAligned", "thread_mutations", "matching_rules",
           "parse_options", "enable_options", "make_strategy", "host_available", "active_options",
           "HOST_STATE_META"]

log = logging.getLogger("dynaflow.integrations")

HOST_STATE_META = "dynaflow_host_state"
"""fx node meta key set on nodes that read the engine's per-step state (attention ops and their aliases)."""


class IntegrationError(DynaflowError):
    """A host integration cannot be used as asked: host missing or of an unsupported version, bad options,
    or engine state dynaflow does not know how to split."""


def request_aligned_split(split: SplitConfig, lengths: Sequence[int], min_rows: int = 1) -> SplitConfig:
    """Move every cut of ``split`` to the nearest request boundary (cuts that collapse are merged).

    ``lengths`` are the rows per request in batch order; ``min_rows`` is the smallest nano-batch worth
    running on its own: nano-batches smaller than it are merged into a neighbour, and a batch with fewer
    than ``2 * min_rows`` rows, or a single request, gets one nano-batch (the fast path: no splitting, no
    per-nano-batch engine state). Example: ``even(12, 3)`` cuts at 4 and 8; requests ``[5, 3, 4]`` end at
    5, 8, 12, so the aligned split is ``(5, 3, 4)``.
    """
    total = sum(lengths)
    if total != split.batch_size:
        raise ConfigError(
            f"request lengths {tuple(lengths)} sum to {total} rows but the split covers {split.batch_size}; "
            "declare one length per request of this batch (dynaflow.requests)."
        )
    if min_rows < 1:
        raise ConfigError(f"min_rows={min_rows} must be >= 1.")
    sizes = _aligned_sizes(split.sizes, lengths, min_rows)
    # a per-resource re-split (nanoflow's stage_nano_batches) is aligned the same way: its nano-batches carry
    # engine state (attention metadata) as much as the main ones do
    stages = tuple((r, st) for r, st in ((r, _aligned_sizes(sz, lengths, min_rows)) for r, sz in split.stages)
                   if st != sizes)
    labels = split.labels if sizes == split.sizes else None  # already on request boundaries: the labels hold
    return SplitConfig(sizes, labels=labels, stages=stages)


def _aligned_sizes(sizes: tuple[int, ...], lengths: Sequence[int], min_rows: int) -> tuple[int, ...]:
    total = sum(lengths)
    if len(sizes) == 1 or len(lengths) == 1 or total < 2 * min_rows:
        return (total,)
    ends, acc = [], 0
    for n in lengths[:-1]:
        acc += n
        ends.append(acc)
    cuts: list[int] = []
    for stop in itertools.accumulate(sizes[:-1]):
        best = min(ends, key=lambda e: (abs(e - stop), e))
        if (not cuts or best > cuts[-1]) and best - (cuts[-1] if cuts else 0) >= min_rows and total - best >= min_rows:
            cuts.append(best)
    bounds = [0, *cuts, total]
    return tuple(b - a for a, b in zip(bounds, bounds[1:]))


class RequestAligned(Strategy):
    """Wrap a strategy so its nano-batch cuts fall on request boundaries (see :func:`request_aligned_split`).

    Rules, lanes and planning are the wrapped strategy's; only ``split_config`` is post-processed, and only
    when the call declared its request layout (``dynaflow.requests``); otherwise the wrapped split is kept.
    """

    def __init__(self, inner: Strategy, min_rows: int = 1, max_nano: int | None = None) -> None:
        super().__init__(inner.nano_batches)
        self.inner = inner
        self.name = inner.name
        self.min_rows = min_rows
        self.max_nano = max_nano
        """The most nano-batches the engine has per-nano-batch state for (vLLM's metadata builders): a split
        with more (``prefill_decode`` cuts one per run of one phase) has its smallest neighbours merged."""
        self.graphs, self.passthrough = inner.graphs, inner.passthrough  # an autotuned winner's way of running

    def rules(self) -> Sequence[Any] | None:
        return self.inner.rules()

    def search(self) -> SearchSpec | None:
        """The wrapped strategy's search (``auto``), every candidate wrapped the same way: its winner, cached
        or measured, keeps to request boundaries and to the engine's nano-batch cap."""
        spec = self.inner.search()
        if spec is None:
            return None
        return dataclasses.replace(spec, wrap=lambda s: RequestAligned(s, self.min_rows, self.max_nano))

    def lanes(self, graph: NanoGraph):  # type: ignore[no-untyped-def]
        return self.inner.lanes(graph)

    def split_config(self, info: InputInfo) -> SplitConfig:
        split = self.inner.split_config(info)
        if info.request_lengths is None:
            return split
        aligned = request_aligned_split(split, info.request_lengths, self.min_rows)
        if self.max_nano is not None and aligned.max_num > self.max_nano:
            aligned = at_most(aligned, self.max_nano)
        if aligned != split:
            log.debug("request-aligned split: %s -> %s for requests %s", split, aligned, info.request_lengths)
        return aligned

    def plan(self, graph: NanoGraph, split: SplitConfig) -> Schedule:
        return self.inner.plan(graph, split)

    def describe(self) -> str:
        return f"{self.inner.describe()}; cuts on request boundaries (min {self.min_rows} rows per nano-batch)"

    def __repr__(self) -> str:
        cap = f", max_nano={self.max_nano}" if self.max_nano is not None else ""
        return f"RequestAligned({self.inner!r}, min_rows={self.min_rows}{cap})"


def thread_mutations(gm: torch.fx.GraphModule, mark: Any = None) -> int:
    """Make in-place writes visible as data flow: after each op that writes an argument ``x`` in place
    (e.g. vLLM's ``unified_attention_with_output(q, k, v, output, ...)``, which returns nothing), insert
    ``x' = aten.alias(x)`` and let every later reader of ``x`` read ``x'``. Segments cut from the graph
    then depend on the op that filled ``x``, not only on the one that allocated it. ``mark(node)`` says
    whether the op reads host state; the op and its aliases then get ``meta[HOST_STATE_META] = True``.
    Returns the number of aliases inserted."""
    nodes = list(gm.graph.nodes)
    order = {n: i for i, n in enumerate(nodes)}
    count = 0
    for node in nodes:
        host = bool(mark(node)) if mark is not None else False
        if host:
            node.meta[HOST_STATE_META] = True
        written = write_targets(node)
        anchor = node
        for x in written:
            later = [u for u in x.users if u is not node and order.get(u, -1) > order[node]]
            if not later:
                continue
            with gm.graph.inserting_after(anchor):
                alias = gm.graph.call_function(torch.ops.aten.alias.default, (x,))
            for key in ("val", "example_value"):
                if key in x.meta:
                    alias.meta[key] = x.meta[key]
            if host:
                alias.meta[HOST_STATE_META] = True
            for u in later:
                u.replace_input_with(x, alias)
            anchor = alias
            count += 1
    if count:
        gm.graph.lint()
        gm.recompile()
    return count


def matching_rules(gm: torch.fx.GraphModule, rules: Sequence[Any]) -> list[Any]:
    """The rules that match some node of ``gm``: engine graphs vary (a piece without collectives, a graph
    without attention), and dynaflow rejects a rule that matches nothing, which is right for a user's own
    rules but not for an integration's stock list."""
    from dynaflow.frontend.rules import Seq, as_rule

    out, claimed = [], set()
    for rule in (as_rule(r) for r in rules):
        if isinstance(rule, Seq):
            out.append(rule)
            continue
        hits = {n for n in gm.graph.nodes if n not in claimed and rule.match(n) is not None}
        if hits:  # the first matching rule claims a node, so later rules must match something else
            claimed |= hits
            out.append(rule)
    return out


def host_available(module: str) -> bool:
    """True when the host package is importable (found without importing it)."""
    return importlib.util.find_spec(module) is not None


def active_options(given: Mapping[str, Any] | None, host: str) -> dict[str, Any]:
    """The options an integration runs with: those given to its ``enable()``, else its
    ``DYNAFLOW_<HOST>_OPTIONS`` environment variable."""
    if given is not None:
        return dict(given)
    return parse_options(knobs.integration_options(host), f"DYNAFLOW_{host.upper()}_OPTIONS")


def enable_options(options: Mapping[str, Any] | None, host: str, display: str, supported: str,
                   available: bool) -> dict[str, Any]:
    """What a host integration's ``enable()`` starts with: the host must be installed, and the options given
    (or its ``DYNAFLOW_<HOST>_OPTIONS`` environment variable) are parsed and checked."""
    if not available:
        raise IntegrationError(f"dynaflow.integrations.{host}.enable(): {display} is not installed; "
                               f"`pip install {host}` (tested: {host}{supported}).")
    return parse_options(dict(options) if options is not None else knobs.integration_options(host),
                         f"dynaflow.integrations.{host}.enable(options)")


def parse_options(options: Mapping[str, Any] | str | None, source: str) -> dict[str, Any]:
    """Integration options from a dict or a JSON string (an env var), checked against DynaflowConfig plus
    ``min_rows`` and ``piecewise`` (vLLM); unknown keys raise :class:`IntegrationError` naming ``source``."""
    if options is None or options == "":
        return {}
    if isinstance(options, str):
        try:
            options = json.loads(options)
        except (json.JSONDecodeError, RecursionError) as exc:
            raise IntegrationError(f"{source}: options must be a JSON object, e.g. '{{\"nano_batches\": 2}}'; "
                                   f"got {options[:200]!r} ({exc}).") from None
    if not isinstance(options, Mapping):
        raise IntegrationError(f"{source}: options must be a JSON object / dict; got {type(options).__name__}.")
    data = dict(options)
    min_rows = data.pop("min_rows", 1)
    if not isinstance(min_rows, int) or min_rows < 1:
        raise IntegrationError(f"{source}: min_rows={min_rows!r} must be an int >= 1 (tokens per nano-batch).")
    extra = {"min_rows": min_rows}
    if "piecewise" in data:
        extra["piecewise"] = data.pop("piecewise")
        if not isinstance(extra["piecewise"], bool):
            raise IntegrationError(f"{source}: piecewise={extra['piecewise']!r} must be true or false.")
    try:
        cfg = DynaflowConfig.from_dict(data)
    except ConfigError as exc:
        raise IntegrationError(f"{source}: {exc}") from None
    try:
        check_data_spec(cfg.strategy, source)  # data never imports a module
    except StrategyError as exc:
        raise IntegrationError(str(exc)) from None
    return {**data, **extra}


def make_strategy(opts: Mapping[str, Any], max_nano: int | None = None) -> tuple[DynaflowConfig, Strategy]:
    """The DynaflowConfig and the request-aligned strategy for parsed integration options (``max_nano``: see
    :class:`RequestAligned`; ``auto``'s candidates are wrapped one by one, and the cap is part of its tuning
    cache key through the wrapper's repr)."""
    data = dict(opts)
    min_rows = data.pop("min_rows", 1)
    data.pop("piecewise", None)
    cfg = DynaflowConfig.from_dict(data)
    inner = get_strategy(cfg.strategy, **dict(cfg.strategy_options))
    if cfg.nano_batches is not None and inner.search() is None:
        inner.nano_batches = cfg.nano_batches
    return cfg.replace(nano_batches=None), RequestAligned(inner, min_rows, max_nano)
