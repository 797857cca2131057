"""Functional-collective fx nodes: which node communicates, over which process group (by name).

Core, so both the frontend (partitioning) and the backend (per-lane communicators) can read them.
Dynamo records ``torch.ops._c10d_functional.all_reduce(h, 'sum', '0')``: the last argument,
``group_name``, is the registered name of the process group (``'0'`` is the default group).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx

__all__ = ["COLLECTIVES", "ROWS_ACROSS_RANKS", "collective_name", "is_collective", "is_wait", "group_arg_index",
           "group_name_of", "rows_across_ranks", "set_group_name"]

COLLECTIVES = frozenset({
    "all_reduce", "all_reduce_", "all_reduce_coalesced", "all_reduce_coalesced_",
    "all_gather_into_tensor", "all_gather_into_tensor_out", "all_gather_into_tensor_coalesced",
    "reduce_scatter_tensor", "reduce_scatter_tensor_coalesced", "all_to_all_single", "broadcast", "broadcast_",
})
"""Op names in the ``_c10d_functional`` / ``_c10d_functional_autograd`` namespaces that communicate."""

_NAMESPACES = ("_c10d_functional", "_c10d_functional_autograd")

ROWS_ACROSS_RANKS = frozenset({"all_gather_into_tensor", "all_gather_into_tensor_out",
                               "all_gather_into_tensor_coalesced", "reduce_scatter_tensor",
                               "reduce_scatter_tensor_coalesced", "all_to_all_single"})
"""Collectives that move rows of dim 0 between ranks: a nano-batch slice along dim 0 would change which
rows land on which rank, so they couple the batch when the batch is dim 0 (all_reduce and broadcast
are elementwise across ranks and split fine)."""


def _op(node: torch.fx.Node) -> tuple[str, str] | None:
    if node.op != "call_function":
        return None
    t = node.target
    if isinstance(t, torch._ops.OpOverload):
        ns, name = t.namespace, t._opname
    elif isinstance(t, torch._ops.OpOverloadPacket):
        ns, _, name = t._qualified_op_name.partition("::")
    else:
        return None
    return (ns, name) if ns in _NAMESPACES else None


def collective_name(node: torch.fx.Node) -> str | None:
    """``"all_reduce"`` for a functional collective node, else ``None`` (``wait_tensor`` is not one)."""
    op = _op(node)
    return op[1] if op is not None and op[1] in COLLECTIVES else None


def is_collective(node: torch.fx.Node) -> bool:
    return collective_name(node) is not None


def is_wait(node: torch.fx.Node) -> bool:
    op = _op(node)
    return op is not None and op[1] == "wait_tensor"


def _schema(node: torch.fx.Node) -> Any:
    t = node.target
    if isinstance(t, torch._ops.OpOverloadPacket):
        t = getattr(t, "default", None)
    return getattr(t, "_schema", None)


def group_arg_index(node: torch.fx.Node) -> int | str | None:
    """Where the group name sits: a positional index, ``"group_name"`` for a keyword, or ``None``."""
    if "group_name" in node.kwargs:
        return "group_name"
    schema = _schema(node)
    if schema is not None:
        for i, a in enumerate(schema.arguments):
            if a.name == "group_name":
                return i if i < len(node.args) else None
    strs = [i for i, a in enumerate(node.args) if isinstance(a, str)]
    return strs[-1] if strs else None


def group_name_of(node: torch.fx.Node) -> str:
    """The process-group name a collective node uses (``'0'`` is the default group)."""
    where = group_arg_index(node)
    value = node.kwargs["group_name"] if where == "group_name" else (node.args[where] if where is not None else None)
    return str(value) if value is not None else "?"


def rows_across_ranks(node: torch.fx.Node) -> bool:
    """True for a collective that exchanges rows of dim 0 between ranks (see :data:`ROWS_ACROSS_RANKS`)."""
    return collective_name(node) in ROWS_ACROSS_RANKS


def set_group_name(node: torch.fx.Node, name: str) -> None:
    """Point a collective node at another process group (by its registered name)."""
    where = group_arg_index(node)
    if where == "group_name":
        node.kwargs = {**node.kwargs, "group_name": name}
    elif where is not None:
        args = list(node.args)
        args[where] = name
        node.args = tuple(args)
