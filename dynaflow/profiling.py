"""``dynaflow.profile``: measure every segment of a model at a few nano-batch sizes on a real executor.

The model is compiled (or an already compiled one reused), called once to capture its graphs, and each
graph's segments are timed sequentially, one nano-batch of ``rows`` rows at a time, at every size in
``sizes`` (default: the batch, halves down to 1). Medians over ``repeats`` go into one
:class:`~dynaflow.profiles.Profile` per graph, keyed by (model hash, device, dtype); pass the result (or
the saved file) as ``config={"profile": ...}`` and the cost model prefers it to the roofline.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from dynaflow.api import Compiled, CompiledGraph, compile as df_compile
from dynaflow.cost import device_spec
from dynaflow.errors import ConfigError
from dynaflow.planning import describe_inputs
from dynaflow.profiles import Profile, model_hash, save_profiles
from dynaflow.segment_timing import halving_sizes, time_segments

__all__ = ["profile", "ProfileResult"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProfileResult:
    """The profiles of every captured graph of one model; ``save(path)`` merges them into a JSON file."""

    profiles: tuple[Profile, ...]

    def save(self, path: str) -> str:
        return save_profiles(list(self.profiles), path)

    def table(self) -> str:
        lines = []
        for p in self.profiles:
            lines.append(repr(p))
            for seg, pts in p.timings.items():
                lines.append(f"  {seg:<24} " + "  ".join(f"{r}:{t * 1e6:.1f}µs" for r, t in sorted(pts.items())))
        return "\n".join(lines)

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self.profiles)

    def __repr__(self) -> str:
        return f"ProfileResult({', '.join(map(repr, self.profiles))})"


def _profile_graph(graph: CompiledGraph, inputs: Sequence[Any], sizes: Sequence[int] | None, repeats: int,
                   executor: str) -> Profile:
    seg = graph.segmented
    assert seg is not None
    batch = graph.batch_size(inputs)
    sizes = sorted(set(int(s) for s in (sizes or halving_sizes(batch))))
    bad = [s for s in sizes if s < 1 or s > batch]
    if bad:
        raise ConfigError(f"profile sizes {bad} are outside 1..{batch} (the batch of the call that was profiled).")
    if seg.batch_symbol is None:
        sizes = [batch]  # a static-batch capture can only run its own batch size
    facts = describe_inputs(inputs, batch)
    timings = time_segments(seg, inputs, batch, sizes, repeats, executor, graph.label)
    return Profile(model_hash(seg), device_spec(facts.device).name, facts.dtype, timings,
                   {"graph": graph.label, "batch": batch, "sizes": sizes, "repeats": repeats, "executor": executor})


def profile(model: Any, *args: Any, sizes: Sequence[int] | None = None, repeats: int = 5, executor: str = "serial",
            **kwargs: Any) -> ProfileResult:
    """Measure per-segment times of ``model`` (a module/function, or a ``dynaflow.compile`` result) on
    ``args``; segment times come from the executor's timeline (on CUDA the timeline must use CUDA events).

    Example::

        prof = dynaflow.profile(model, x, sizes=[1, 4, 8])
        prof.save("profile.json")
        fast = dynaflow.compile(model, strategy="auto", config={"profile": "profile.json"})
    """
    if repeats < 1:
        raise ConfigError(f"profile repeats={repeats} must be >= 1.")
    compiled = model if isinstance(model, Compiled) else df_compile(model, strategy="sequential", executor="serial")
    recorded: dict[int, Sequence[Any]] = {}
    with torch.no_grad():
        compiled(*args, **kwargs)  # capture the graphs
        for g in compiled.graphs:
            g._record = recorded  # the next call leaves each graph's flat inputs here
        try:
            compiled(*args, **kwargs)
        finally:
            for g in compiled.graphs:
                g._record = None
        profiles = []
        for g in compiled.graphs:
            inputs = recorded.get(id(g))
            if inputs is None:
                log.info("profile: %s did not run on these inputs; skipped", g.label)
                continue
            profiles.append(_profile_graph(g, inputs, sizes, repeats, executor))
    return ProfileResult(tuple(profiles))
