"""Collectives in a captured graph: find them, keep each with its ``wait_tensor``, describe them per segment.

Dynamo traces ``torch.distributed._functional_collectives`` (and in-place ``torch.distributed.all_reduce``,
which it rewrites) into ``torch.ops._c10d_functional.<collective>(..., group_name)`` followed by
``torch.ops._c10d_functional.wait_tensor``. The process group is baked into the graph as its *name*
(a string, ``'0'`` for the default group). For example::

    tensor = torch.ops._c10d_functional.all_reduce(h, 'sum', '0')
    h_1 = torch.ops._c10d_functional.wait_tensor(tensor)

:func:`hoist_waits` moves every ``wait_tensor`` right after its collective, so the default ``comm`` rule
puts both in one network segment and a nano-batch's collective has completed when the segment returns.
:func:`describe` names a segment's collectives (``all_reduce@0``) for the plan-time ordering checks.
"""

from __future__ import annotations

import operator
from typing import Any, Iterable, Sequence

import torch
import torch.fx

from dynaflow.errors import PartitionError, node_context
from dynaflow.collective_ops import collective_name, group_name_of, is_collective, is_wait, rows_across_ranks

__all__ = ["hoist_waits", "functionalize_inplace", "check_waits", "describe", "is_wait", "is_collective", "rows_across_ranks"]


def hoist_waits(gm: torch.fx.GraphModule) -> int:
    """Move each collective's ``wait_tensor`` (and the getitems of a coalesced one) right after it.

    Waiting earlier never changes values, only how long the transfer may overlap with the ops in between;
    keeping launch and wait together makes a network segment complete its collective before it returns.
    Returns the number of nodes moved.
    """
    moved = 0
    for node in list(gm.graph.nodes):
        if not is_collective(node):
            continue
        anchor = node
        users = sorted(node.users, key=_position(gm))
        chain: list[torch.fx.Node] = []
        for u in users:
            if is_wait(u):
                chain.append(u)
            elif u.op == "call_function" and u.target is operator.getitem:
                chain.append(u)
                chain.extend(w for w in sorted(u.users, key=_position(gm)) if is_wait(w))
        for u in chain:
            if anchor.next is not u:
                anchor.append(u)
                moved += 1
            anchor = u
    if moved:
        gm.graph.lint()
        gm.recompile()
    return moved


def functionalize_inplace(gm: torch.fx.GraphModule) -> int:
    """Rewrite ``t.copy_(wait_tensor(...))`` — how Dynamo captures in-place ``torch.distributed.all_reduce(t)``
    — so that later readers of ``t`` read the collective's result instead.

    Segments are ordered by data dependencies only; a reader of ``t`` in another segment would not depend on
    the segment holding the in-place copy and could run before it. The copy itself is dropped when ``t`` is a
    fresh intermediate; it stays when ``t`` is a graph input, a weight, or may be a view of another tensor (the
    caller or readers of the base can observe the write). A ``t`` with a view of its own (taken before the
    collective, read after it) is not rewritten: the view must see the write. Returns the number of rewrites.
    """
    done = 0
    order = _position(gm)
    for node in list(gm.graph.nodes):
        if not (node.op == "call_method" and node.target == "copy_" or
                node.op == "call_function" and getattr(node.target, "__name__", "") in ("copy_", "copy_.default")):
            continue
        if len(node.args) < 2 or not isinstance(node.args[1], torch.fx.Node) or not is_wait(node.args[1]):
            continue
        target, result = node.args[0], node.args[1]
        if not isinstance(target, torch.fx.Node):
            continue
        if any(u is not node and _may_alias(u) for u in target.users):
            # a view of ``t`` reads its memory: left as written, the in-place copy is ordered before every reader
            # of that memory by the write analysis (frontend/effects.py), as any in-place write is
            continue
        here = order(node)
        for user in list(target.users):
            if user is not node and order(user) > here:
                user.replace_input_with(target, result)
        for user in list(node.users):
            user.replace_input_with(node, result)
        if target.op not in ("placeholder", "get_attr") and not _may_alias(target):
            gm.graph.erase_node(node)
        done += 1
    if done:
        gm.graph.lint()
        gm.recompile()
    return done


_VIEW_OPS = frozenset({"view", "reshape", "narrow", "slice", "getitem", "select", "transpose", "permute", "expand",
                       "as_strided", "unsqueeze", "squeeze", "t", "unflatten", "flatten", "view_as", "split", "chunk",
                       "unbind", "diagonal", "movedim", "swapaxes", "unfold", "detach", "alias"})


def _may_alias(node: torch.fx.Node) -> bool:
    """True unless ``node`` is known to produce a fresh tensor (not a view of another one)."""
    val = node.meta.get("val", node.meta.get("example_value"))
    if isinstance(val, torch.Tensor):
        try:
            return bool(val._is_view())
        except Exception:  # noqa: BLE001 - fake tensors from old traces
            pass
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
    return str(name).split(".")[0].lower() in _VIEW_OPS
def check_waits(region_index: dict[torch.fx.Node, int], segments: Sequence[Any]) -> None:
    """Raise :class:`PartitionError` if a ``wait_tensor`` landed in another segment than its collective
    (the collective's segment would return a tensor still in flight, and a nano-batch view of it is garbage)."""
    for node, i in region_index.items():
        if is_wait(node) and isinstance(node.args[0], torch.fx.Node):
            j = region_index.get(node.args[0])
            if j is not None and j != i:
                raise PartitionError(
                    f"Collective {node.args[0].name!r} ({collective_name(node.args[0]) or 'a collective'}) is in segment "
                    f"{segments[j].name!r} but its wait_tensor {node.name!r} is in segment {segments[i].name!r}.\n"
                    f"{node_context(node)}\nFix: keep both in one segment — do not cut between them with rules or "
                    "markers (the default 'comm' rule keeps them together)."
                )


def _position(gm: torch.fx.GraphModule):  # type: ignore[no-untyped-def]
    index = {n: i for i, n in enumerate(gm.graph.nodes)}
    return lambda n: index[n]


def describe(nodes: Iterable[torch.fx.Node]) -> tuple[str, ...]:
    """The collectives among ``nodes`` in graph order, as ``"<collective>@<group name>"``."""
    return tuple(f"{collective_name(n)}@{group_name_of(n)}" for n in nodes if is_collective(n))
