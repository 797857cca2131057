"""Count each segment's FLOPs and bytes with fake tensors (no real compute), for the roofline cost model.

Segments run in program order under ``FakeTensorMode`` with ``torch.utils.flop_counter.FlopCounterMode``
at two batch sizes; the counts are fitted as ``fixed + per_row · rows`` (:class:`~dynaflow.cost.LinearCount`).
Bytes are what a launch must move at least once: its tensor arguments, its outputs, and the parameters and
buffers it reads (a weight is re-read by every nano-batch — the fixed part).
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import torch
from torch.utils.flop_counter import FlopCounterMode

from dynaflow.cost import LinearCount
from dynaflow.segmented import SegmentedModule, ValueKind

__all__ = ["count_segments", "narrow_inputs"]

log = logging.getLogger(__name__)


def _nbytes(x: Any) -> int:
    if isinstance(x, torch.Tensor):
        return x.numel() * x.element_size()
    if isinstance(x, (list, tuple)):
        return sum(_nbytes(y) for y in x)
    return 0


def narrow_inputs(seg: SegmentedModule, inputs: Sequence[Any], batch: int, rows: int) -> list[Any]:
    """The first ``rows`` rows of every batch input (views) and ``rows`` for batch-size inputs."""
    out = list(inputs)
    for v in seg.values.values():
        if v.source != "input":
            continue
        x = inputs[v.index]
        if v.kind is ValueKind.BATCH and isinstance(x, torch.Tensor):
            d = v.batch_dim or 0
            k = x.size(d) // batch
            out[v.index] = x.narrow(d, 0, rows * k)
        elif v.kind is ValueKind.BATCH_SIZE:
            out[v.index] = rows
    return out


class _NoModuleTracker:
    """Stands in for ``FlopCounterMode``'s ``ModuleTracker``, which registers process-wide module forward hooks
    (``register_module_forward_pre_hook``) for as long as a counter is entered. Those hooks run around every module
    call on every thread: another thread's Dynamo trace then meets them (a graph break, or a capture that falls
    back to eager), and a ``Compiled``'s :class:`~dynaflow.frontend.hook_watch.HookWatch` sees the model's hooks
    change and drops Dynamo's compiled code while other threads run it. Only the total is read here, which
    ``FlopCounterMode`` books under ``"Global"``; nothing is registered."""

    parents = frozenset({"Global"})

    def __enter__(self) -> "_NoModuleTracker":
        return self

    def __exit__(self, *exc: Any) -> None:
        return None


def _counter() -> FlopCounterMode:
    counter = FlopCounterMode(display=False)
    counter.mod_tracker = _NoModuleTracker()  # type: ignore[assignment]
    return counter


def _count_once(seg: SegmentedModule, inputs: Sequence[Any], batch: int, rows: int) -> dict[str, tuple[float, float]]:
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode(allow_non_fake_inputs=True)
    flat = narrow_inputs(seg, inputs, batch, rows)
    env: dict[str, Any] = {}
    counts: dict[str, tuple[float, float]] = {}
    with mode:
        fake = [mode.from_tensor(x) if isinstance(x, torch.Tensor) else x for x in flat]
        for v in seg.values.values():
            if v.source == "input":
                env[v.name] = fake[v.index]
            elif v.source == "const":
                env[v.name] = seg.constants[v.name]
        for call in seg.calls:
            args = [env[a] for a in call.args]
            counter = _counter()
            with counter:
                out = call.fn(*args)
            outs = out if call.returns_tuple else (out,)
            for name, value in zip(call.outputs, outs):
                env[name] = value
            owned = 0
            module = call.module
            if isinstance(module, torch.nn.Module):
                owned = sum(_nbytes(p) for p in module.parameters()) + sum(_nbytes(b) for b in module.buffers())
            counts[call.segment.name] = (float(counter.get_total_flops()), float(_nbytes(args) + _nbytes(outs) + owned))
    return counts


def count_segments(seg: SegmentedModule, inputs: Sequence[Any], batch: int) -> dict[str, LinearCount]:
    """``{segment name: LinearCount}`` for the segments of ``seg`` given one real call's flat ``inputs``
    (batch size ``batch``). Segments that fake tensors cannot run are left out (the cost model then
    needs a measured profile for them) and logged."""
    sizes = [batch] + ([max(1, batch // 2)] if batch > 1 else [])
    runs = []
    for rows in sizes:
        try:
            runs.append((rows, _count_once(seg, inputs, batch, rows)))
        except Exception as exc:  # noqa: BLE001 - counting is best effort; measuring still works
            log.info("FLOP/byte counting at %d rows failed (%s: %s); segments need a measured profile.",
                     rows, type(exc).__name__, exc)
    out: dict[str, LinearCount] = {}
    if not runs:
        return out
    for name in runs[0][1]:
        pts = [(rows, *c[name]) for rows, c in runs if name in c]
        out[name] = LinearCount.fit(pts[0], pts[1] if len(pts) > 1 else None)
    return out
