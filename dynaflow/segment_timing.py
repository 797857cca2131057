"""Time every segment of a partitioned graph on a real executor, one whole nano-batch of ``rows`` rows at a time.

Used by ``dynaflow.profile`` (a saved profile) and by the cost model when it has no estimate for a segment
(FLOP counting failed on it): a segment the roofline cannot price is measured, never a crash. Inputs the graph
writes in place are timed on private copies, with the random generators put back (:mod:`dynaflow.sandbox`), so
timing never changes the caller's data; a graph whose ops may write state that is not an argument is not run again
at all (:func:`replayable`).
"""

from __future__ import annotations

import logging
import statistics
from typing import Any, Sequence

import torch

from dynaflow import knobs
from dynaflow.backend import executors
from dynaflow.flops import narrow_inputs
from dynaflow.ir import InputInfo, SplitConfig
from dynaflow.planning import make_plan
from dynaflow.sandbox import private_writes, sandboxed
from dynaflow.segmented import SegmentedModule
from dynaflow.strategies import Sequential

__all__ = ["time_segments", "private_writes", "halving_sizes", "replayable", "replay_blocker", "PURE"]

PURE = "pure"
"""The segment hint that declares its ops free of hidden writes (see :data:`dynaflow.ir.HINTS`)."""

log = logging.getLogger(__name__)


def halving_sizes(batch: int, smallest: int = 1) -> list[int]:
    """``batch`` and its halves down to ``smallest`` (at least 1), ascending: the row counts to time."""
    sizes, n = [], batch
    while n >= max(1, smallest):
        sizes.append(n)
        if n == 1:
            break
        n //= 2
    return sorted(set(sizes))


def time_segments(seg: SegmentedModule, inputs: Sequence[Any], batch: int, sizes: Sequence[int], repeats: int,
                  executor: str, label: str = "graph") -> dict[str, dict[int, float]]:
    """``{segment: {rows: median seconds}}`` from sequential runs at each size in ``sizes`` (``repeats`` timed
    runs after one warm-up); on the cuda executor launch times come from CUDA events."""
    ex = executors.resolve(executor, **({"gpu_timeline": True} if executor == "cuda" else {}))
    sync = torch.cuda.synchronize if executor == "cuda" else None
    timings: dict[str, dict[int, float]] = {s.name: {} for s in seg.segments}
    try:
        with knobs.scope(DYNAFLOW_TIMELINE=1), sandboxed(inputs, seg.inputs.written) as box:
            for rows in sizes:
                flat = narrow_inputs(seg, box.inputs, batch, rows)
                program = make_plan(seg, Sequential(), InputInfo(rows), SplitConfig.whole(rows), label=label).program
                samples: dict[str, list[float]] = {s.name: [] for s in seg.segments}
                for i in range(repeats + 1):
                    box.reset()  # each run starts from the caller's values: a static cache's fill level too
                    ex.run(program, flat)
                    if sync:
                        sync()
                    if i == 0 or ex.last_timeline is None:
                        continue  # warm-up
                    for e in ex.last_timeline.events:
                        samples[e.op.split("[")[0]].append(e.duration)
                for name, values in samples.items():
                    if values:
                        timings[name][rows] = statistics.median(values)
    finally:
        ex.close()
    return timings


def _pure_leaf(owner: torch.nn.Module, target: str) -> bool:
    """Whether a ``call_module`` leaf (a GraphModule from ``symbolic_trace``) changes nothing when run again: a
    torch.nn module without buffers (a user's leaf, or BatchNorm's running stats, may update its own state)."""
    try:
        module = owner.get_submodule(target)
    except AttributeError:
        return False
    return type(module).__module__.startswith("torch.nn.") and next(module.buffers(), None) is None


_VISIBLE_EFFECTS = {"aten", "prims", "_c10d_functional", "c10d_functional", "dynaflow"}
"""Op namespaces whose writes are all declared in their schemas (what dynaflow copies before timing a step)."""


def replayable(seg: SegmentedModule) -> bool:
    """Whether timing a step (running it again, on private copies of the inputs it writes) leaves everything as
    it was: no segment is an opaque callable or a leaf module that may update its own state, and no op comes from
    a library whose kernels may write state that is not an argument (an engine's KV cache reached through its
    forward context), unless its segment is tagged ``pure`` (the user's word for it)."""
    return replay_blocker(seg) is None


def replay_blocker(seg: SegmentedModule) -> str | None:
    """What makes a step not :func:`replayable` (the segment and the op), or None."""
    for call in seg.calls:
        if PURE in call.segment.hints:
            continue
        where = f"segment {call.segment.name!r}"
        graph = getattr(call.module, "graph", None)
        if graph is None:
            return f"{where} is an opaque callable"
        for node in graph.nodes:
            if node.op == "call_module" and not _pure_leaf(call.module, str(node.target)):
                return f"{where} calls leaf module {node.target!r}, which may update its own state"
            if node.op != "call_function":
                continue
            target = node.target
            if isinstance(target, torch._ops.OpOverload):
                ns = target.namespace
            elif isinstance(target, torch._ops.OpOverloadPacket):
                ns = target._qualified_op_name.split("::")[0]
            else:
                continue  # torch functions and Python callables: traced, their effects are in the graph
            if ns not in _VISIBLE_EFFECTS:
                return f"{where} calls {target}, a library op that may write state no argument shows"
    return None
