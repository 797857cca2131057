"""A differential safety net under the batch analysis: run each split segment whole and on row slices.

The analysis proves row-locality from rules; this check tests the proof on real inputs. At plan time
(``verify=True``, ``DYNAFLOW_VERIFY=1``, and in the test suite by default) every segment the analysis
judged row-local runs once on the whole batch and once per half, on copies of what it writes in place;
the halves, concatenated along each output's batch dim, must equal the whole within the dtype's
tolerance. A difference raises :class:`BatchCouplingError` naming the first node whose result differs,
so a wrong rule is caught at plan time instead of as a silently wrong answer. Segments tagged
``batch-local`` (the user's word) or ``nano-context`` (they read per-nano-batch engine state that only the
executor provides) are not run.
"""

from __future__ import annotations

import logging
from typing import Any, Collection, Sequence

import torch
import torch.fx

from dynaflow.errors import BatchCouplingError, node_context
from dynaflow.frontend.effects import storage_root, write_targets
from dynaflow.frontend.rules import op_short_name
from dynaflow.ir import SegmentKind
from dynaflow.sandbox import rng_preserved
from dynaflow.segmented import SegmentCall, SegmentedModule, Value, ValueKind

__all__ = ["check_split_equals_whole", "mutated_inputs", "overlapping_writes"]

log = logging.getLogger(__name__)


def _written_args(module: torch.fx.GraphModule | None) -> set[int]:
    """Positions of the placeholders a segment writes in place (through any view)."""
    if module is None:
        return set()
    placeholders = list(module.graph.find_nodes(op="placeholder"))
    out = set()
    for node in module.graph.nodes:
        for target in write_targets(node):
            root = storage_root(target)
            if root in placeholders:
                out.add(placeholders.index(root))
    return out


_UNINITIALIZED = {"empty", "empty_like", "new_empty", "empty_strided", "new_empty_strided", "empty_permuted"}


def _uninitialized(module: torch.fx.GraphModule | None) -> set[int]:
    """Positions of a segment's outputs that are fresh uninitialized buffers (``torch.empty_like``): their
    contents are whatever memory held, so they are not compared."""
    if module is None:
        return set()
    outs = module.graph.output_node().args[0]
    outs = list(outs) if isinstance(outs, (tuple, list)) else [outs]
    return {i for i, o in enumerate(outs) if isinstance(o, torch.fx.Node) and _is_empty(o)}


def _is_empty(node: torch.fx.Node) -> bool:
    """A fresh uninitialized buffer, or a view of one (``torch.empty(...).view(-1, heads, dim)``)."""
    root = storage_root(node)
    return root.op in ("call_function", "call_method") and op_short_name(root) in _UNINITIALIZED


def _rows(v: Value, x: Any, batch: int, lo: int, hi: int) -> Any:
    if v.kind is ValueKind.BATCH_SIZE:
        return hi - lo
    if v.kind is not ValueKind.BATCH or not isinstance(x, torch.Tensor):
        return x
    k = x.shape[v.batch_dim] // batch
    return x.narrow(v.batch_dim, lo * k, (hi - lo) * k)


def _copies(args: list[Any], written: set[int]) -> list[Any]:
    """Copies of the tensor arguments: a segment may update state inside an op that is not marked in place
    (``F.batch_norm`` updates its running statistics), and the check must leave no trace."""
    return [a.clone() if isinstance(a, torch.Tensor) else a for a in args]


def _close(a: Any, b: Any) -> bool:
    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
        return True if not isinstance(a, torch.Tensor) and not isinstance(b, torch.Tensor) else False
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if not a.is_floating_point() and not a.is_complex():
        return torch.equal(a, b)
    try:
        rtol, atol = torch.testing._comparison.default_tolerances(a)
        torch.testing.assert_close(a, b, rtol=4 * rtol, atol=4 * atol, equal_nan=True)
        return True
    except AssertionError:
        return False


def _merge(parts: Sequence[Any], like: Any) -> Any:
    """Concatenate nano results along the one dim where they differ from the whole result."""
    if not all(isinstance(p, torch.Tensor) for p in parts) or not isinstance(like, torch.Tensor):
        return None
    for d in range(like.dim()):
        if sum(p.shape[d] for p in parts) == like.shape[d] and all(
                p.shape[:d] + p.shape[d + 1:] == like.shape[:d] + like.shape[d + 1:] for p in parts):
            return torch.cat(list(parts), dim=d)
    return parts[0] if all(p.shape == like.shape for p in parts) else None


def _first_differing_node(module: torch.fx.GraphModule, whole: list[Any], halves: list[list[Any]]) -> torch.fx.Node | None:
    def trace(args: list[Any]) -> dict[torch.fx.Node, Any]:
        seen: dict[torch.fx.Node, Any] = {}

        class _Rec(torch.fx.Interpreter):
            def run_node(self, n: torch.fx.Node) -> Any:
                out = super().run_node(n)
                seen[n] = out
                return out

        _Rec(module).run(*args)
        return seen

    ref = trace(whole)
    parts = [trace(h) for h in halves]
    for node in module.graph.nodes:
        if node.op in ("placeholder", "output") or not isinstance(ref.get(node), torch.Tensor) or _is_empty(node):
            continue
        merged = _merge([p.get(node) for p in parts], ref[node])
        if merged is not None and not _close(merged, ref[node]):
            return node
    return None


def _check_call(call: SegmentCall, seg: SegmentedModule, env: dict[str, Any], batch: int) -> None:
    values = [seg.values[a] for a in call.args]
    args = [env[a] for a in call.args]
    written = _written_args(call.module)
    whole = call.fn(*_copies(args, written))
    whole = list(whole) if call.returns_tuple else [whole]
    cuts = [(0, batch // 2), (batch // 2, batch)]
    halves_args = [[_rows(v, x, batch, lo, hi) for v, x in zip(values, args)] for lo, hi in cuts]
    halves = []
    for h in halves_args:
        try:
            out = call.fn(*_copies(h, written))
        except Exception as exc:  # noqa: BLE001 - e.g. engine state sized for the whole step: cannot check
            log.warning("differential check: segment %r does not run on half a batch on its own (%s: %s); "
                        "not checked", call.segment.name, type(exc).__name__, str(exc)[:160])
            return
        halves.append(list(out) if call.returns_tuple else [out])
    fresh = _uninitialized(call.module)
    for j, name in enumerate(call.outputs):
        v = seg.values[name]
        if v.kind is ValueKind.BATCH_SIZE or not isinstance(whole[j], torch.Tensor) or j in fresh:
            continue
        merged = _merge([h[j] for h in halves], whole[j]) if v.kind is ValueKind.BATCH else None
        candidates = [merged] if v.kind is ValueKind.BATCH else [h[j] for h in halves]
        if any(c is None or not _close(c, whole[j]) for c in candidates):
            _raise(call, name, [_copies(a, written) for a in [args, *halves_args]])


def _raise(call: SegmentCall, output: str, runs: list[list[Any]]) -> None:
    node = _first_differing_node(call.module, runs[0], runs[1:]) if call.module is not None else None
    where = f"node {node.name!r}\n{node_context(node)}" if node is not None else f"output {output!r}"
    raise BatchCouplingError(
        f"Segment {call.segment.name!r} was judged row-local by the batch analysis, but running it on two halves "
        f"of the batch and concatenating differs from running it whole, first at {where}\n"
        "This is a missing or wrong batch rule in dynaflow (please report it). Fix now: tag the segment "
        "'barrier' (dynaflow.Op(..., tags=('barrier',))) or register a batch rule for the op "
        "(dynaflow.frontend.aten_rules.register_batch_rule)."
    )


def check_split_equals_whole(seg: SegmentedModule, inputs: Sequence[Any], batch: int) -> int:
    """Run every split segment whole and on two halves of ``batch`` (in program order, feeding each the
    whole results of the previous ones); raise :class:`BatchCouplingError` on a difference. Returns the
    number of segments checked. The random generators are put back afterwards (the real step draws next)."""
    if batch < 2:
        return 0
    with rng_preserved():
        return _check_calls(seg, inputs, batch)


def _check_calls(seg: SegmentedModule, inputs: Sequence[Any], batch: int) -> int:
    env: dict[str, Any] = {name: v for name, v in seg.constants.items()}
    for name, v in seg.values.items():
        if v.source == "input":
            env[name] = inputs[v.index]
    checked = 0
    for call in seg.calls:
        trusted = call.segment.hints & {"batch-local", "nano-context"}  # the user's word / per-nano engine state
        sizes_in = any(isinstance(env[a], (tuple, list)) for a in call.args)  # a torch.Size: per-nano value unknown
        if call.segment.kind is SegmentKind.SPLIT and not trusted and not sizes_in and any(
                seg.values[a].kind is ValueKind.BATCH for a in call.args):
            _check_call(call, seg, env, batch)
            checked += 1
        args = [env[a] for a in call.args]
        written = _written_args(call.module)
        out = call.fn(*_copies(args, written))  # the real run happens in the program; keep inputs untouched
        for name, o in zip(call.outputs, list(out) if call.returns_tuple else [out]):
            env[name] = o
    log.debug("differential check: %d split segments equal whole", checked)
    return checked


def mutated_inputs(gm: torch.fx.GraphModule) -> tuple[int, ...]:
    """Positions of the graph inputs the graph writes in place (through any view)."""
    return tuple(sorted(_written_args(gm)))


def _span(t: torch.Tensor) -> tuple[int, int]:
    """(first byte, one past the last byte) of a tensor's elements, as addresses."""
    if t.numel() == 0:
        return 0, 0
    extent = 1 + sum((s - 1) * abs(st) for s, st in zip(t.shape, t.stride()))
    start = t.data_ptr()
    return start, start + extent * t.element_size()


def _storage_range(t: torch.Tensor) -> tuple[int, int]:
    """The address range of a tensor's whole storage."""
    storage = t.untyped_storage()
    return storage.data_ptr(), storage.data_ptr() + storage.nbytes()


def overlapping_writes(inputs: Sequence[Any], written: Sequence[int],
                       among: Collection[int] | None = None) -> tuple[int, int] | None:
    """A pair (written input, other input) whose memory overlaps, or None. Split into nano-batches, a write
    through one view would land in rows the other view's nano-batches have already read (or not yet).

    Memory, not storage objects, is compared: two storages may share it (``torch.from_numpy`` of overlapping
    numpy slices, ``from_dlpack``). Runs when the inputs' fingerprints change: only tensors whose storage's
    address range meets a written input's (rare) have their byte spans computed. ``among``: the positions whose
    tensors changed since a call of the same inputs found no overlap; only pairs with one of them can overlap
    now (the others' byte spans are the ones checked then), so only those are checked."""
    moved = None if among is None else frozenset(among)
    ranges: list[tuple[int, int, int]] = []
    for i in written:
        a = inputs[i] if i < len(inputs) else None
        if isinstance(a, torch.Tensor) and a.device.type != "meta":
            ranges.append((i, *_storage_range(a)))
    if not ranges:
        return None
    every = moved is None or any(i in moved for i, _, _ in ranges)  # a moved write meets every other input
    for j, b in enumerate(inputs):
        if not isinstance(b, torch.Tensor) or b.device.type == "meta" or not (every or j in moved):  # type: ignore[operator]
            continue
        lo, hi = _storage_range(b)
        for i, wlo, whi in ranges:
            if (i != j and lo < whi and wlo < hi and inputs[i].device == b.device
                    and (moved is None or i in moved or j in moved)):
                sa, ea = _span(inputs[i])
                sb, eb = _span(b)
                if sa < eb and sb < ea:
                    return i, j
    return None
    for j, b in enumerate(inputs):
        if not isinstance(b, torch.Tensor) or b.device.type == "meta":
            continue
        lo, hi = _storage_range(b)
        for i, wlo, whi in ranges:
            if i != j and lo < whi and wlo < hi and inputs[i].device == b.device:
                sa, ea = _span(inputs[i])
                sb, eb = _span(b)
                if sa < eb and sb < ea:
                    return i, j
    return None
