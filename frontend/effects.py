"""In-place writes: which tensor a node writes, and the order that writes impose on other nodes.

A captured graph may update state in place — a KV cache row (``keys.index_copy_(2, pos, k)``), a step
counter (``length.add_(n)``). Data edges alone do not order such a write against the nodes that read the
same storage: the read ``sdpa(q, keys)`` takes the *placeholder* ``keys``, not the write's result. Once the
graph is cut into segments that a strategy may reorder or place on other lanes, that ordering must be
explicit. :func:`effect_pairs` gives it: for every in-place write ``w`` of a storage, every other access
``a`` of that storage (through any view of it) is ordered ``a → w`` when ``a`` came first in the graph and
``w → a`` otherwise. Partition turns these node pairs into segment dependencies.

Aliasing is over-approximated (a ``reshape`` is treated as a view): an extra ordering edge is always
safe, a missing one is a wrong answer.
"""

from __future__ import annotations

import operator

import torch
import torch.fx

from dynaflow.frontend.rules import op_short_name

__all__ = ["is_inplace", "write_target", "write_targets", "storage_root", "effect_pairs"]

_VIEW_OPS = {
    "getitem", "view", "view_as", "reshape", "reshape_as", "_unsafe_view", "narrow", "select", "slice",
    "transpose", "t", "permute", "expand", "expand_as", "unsqueeze", "squeeze", "flatten", "unflatten",
    "as_strided", "alias", "detach", "unbind", "split", "chunk", "movedim", "diagonal", "contiguous",
}
"""Ops whose result may share storage with their first argument."""


_AUGMENTED = {operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv, operator.imod,
              operator.ipow, operator.iand, operator.ior, operator.ixor, operator.ilshift, operator.irshift,
              operator.imatmul}
"""``x += y`` and friends: Dynamo records them as ``operator.iadd(x, y)``; on a tensor they write ``x``."""


def _schema_writes(target: object) -> set[object]:
    """Positions and names of the arguments an op's schema marks written (``Tensor(a!)``). Dynamo graphs call
    the overload packet (``torch.ops._C.rotary_embedding``); its overloads are unioned (an extra write is safe)."""
    if isinstance(target, torch._ops.OpOverloadPacket):
        schemas = [getattr(target, name)._schema for name in target.overloads()]
    elif isinstance(target, torch._ops.OpOverload):
        schemas = [target._schema]
    else:
        return set()
    out: set[object] = set()
    for schema in schemas:
        for i, arg in enumerate(schema.arguments):
            if arg.alias_info is not None and arg.alias_info.is_write:
                out.update((arg.name, i) if not arg.kwarg_only else (arg.name,))
    return out


def write_targets(node: torch.fx.Node) -> tuple[torch.fx.Node, ...]:
    """The input nodes ``node`` writes in place: every argument its op schema marks written (vLLM's
    ``onednn_mm(out, x, ...)``, ``rotary_embedding(positions, q, k, ...)``), else ``out=``, else the first
    argument of ``x.add_(1)``, ``x += 1``, ``x[i] = v``."""
    if node.op not in ("call_function", "call_method"):
        return ()
    writes = _schema_writes(node.target) if node.op == "call_function" else set()
    if writes:
        found: list[torch.fx.Node] = []
        values = [*((i, a) for i, a in enumerate(node.args)), *node.kwargs.items()]
        for key, value in values:
            if key in writes:
                found.extend(v for v in (value if isinstance(value, (list, tuple)) else (value,))
                             if isinstance(v, torch.fx.Node))
        return tuple(dict.fromkeys(found))
    if not _writes_first_argument(node):
        return ()
    target = node.kwargs.get("out", node.args[0] if node.args else None)
    return (target,) if isinstance(target, torch.fx.Node) else ()


def _writes_first_argument(node: torch.fx.Node) -> bool:
    short = op_short_name(node)
    if short in ("setitem", "__setitem__") or node.target is operator.setitem:
        return True
    if node.target in _AUGMENTED or short in ("__iadd__", "__isub__", "__imul__", "__itruediv__"):
        first = node.args[0] if node.args else None
        val = first.meta.get("val", first.meta.get("example_value")) if isinstance(first, torch.fx.Node) else None
        return isinstance(val, torch.Tensor)  # on ints (sizes) ``+=`` rebinds, it does not write
    if isinstance(node.target, torch._ops.OpOverload):
        return node.target._schema.is_mutable
    if "out" in node.kwargs:
        return True
    return short.endswith("_") and not short.endswith("__")


def is_inplace(node: torch.fx.Node) -> bool:
    """Whether ``node`` writes into one of its inputs (``x.add_(1)``, ``x += 1``, ``x[i] = v``, ``out=`` variants,
    custom ops whose schema marks an argument written)."""
    return bool(write_targets(node))


def write_target(node: torch.fx.Node) -> torch.fx.Node | None:
    """The first input node an in-place ``node`` writes into (:func:`write_targets` has them all)."""
    targets = write_targets(node)
    return targets[0] if targets else None


def _is_view(node: torch.fx.Node) -> bool:
    return (node.op in ("call_function", "call_method") and op_short_name(node) in _VIEW_OPS
            and bool(node.args) and isinstance(node.args[0], torch.fx.Node))


def storage_root(node: torch.fx.Node) -> torch.fx.Node:
    """Follow view ops back to the node that owns the storage (a placeholder, a constant or a computed tensor)."""
    while _is_view(node):
        node = node.args[0]
    return node


def _aliases(root: torch.fx.Node) -> set[torch.fx.Node]:
    """``root`` and every node that may view its storage: views of it and in-place ops on it (they return it)."""
    seen = {root}
    todo = [root]
    while todo:
        n = todo.pop()
        for user in n.users:
            if user in seen:
                continue
            if (_is_view(user) and user.args[0] is n) or n in write_targets(user):
                seen.add(user)
                todo.append(user)
    return seen


def _reads_metadata_only(node: torch.fx.Node) -> bool:
    """A size / stride query (its value is an int, a SymInt or a ``torch.Size``): it never sees the data."""
    val = node.meta.get("val", node.meta.get("example_value"))
    return isinstance(val, (int, torch.SymInt, torch.SymBool, torch.SymFloat, torch.Size)) and not isinstance(val, bool)


def effect_pairs(gm: torch.fx.GraphModule) -> list[tuple[torch.fx.Node, torch.fx.Node]]:
    """``(first, then)`` node pairs that must keep their graph order because one writes what the other accesses."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    pairs: set[tuple[torch.fx.Node, torch.fx.Node]] = set()
    alias_cache: dict[torch.fx.Node, set[torch.fx.Node]] = {}
    for w in gm.graph.nodes:
        for target in write_targets(w):
            root = storage_root(target)
            aliases = alias_cache.get(root)
            if aliases is None:
                aliases = alias_cache[root] = _aliases(root)
            for a in aliases:
                for user in list(a.users) + ([a] if a.op != "placeholder" else []):
                    if user is w or user.op == "output" or _reads_metadata_only(user):
                        continue
                    pairs.add((user, w) if order[user] < order[w] else (w, user))
    return sorted(pairs, key=lambda p: (order[p[0]], order[p[1]]))
