"""``dynaflow.mark(name, tags=...)``: an in-code segment marker, a no-op in eager mode that survives capture.

It is a registered custom op (``dynaflow::mark``) declared side-effectful, so Dynamo, export and dead
code elimination keep it; the partitioner starts a new segment named ``name`` at each marker.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch.fx.node import has_side_effect

__all__ = ["mark", "is_marker", "marker_args"]


@torch.library.custom_op("dynaflow::mark", mutates_args=())
def _mark_op(name: str, tags: str) -> None:
    return None


@_mark_op.register_fake
def _(name: str, tags: str) -> None:
    return None


has_side_effect(torch.ops.dynaflow.mark.default)
_MARKER_TARGETS = (torch.ops.dynaflow.mark.default, torch.ops.dynaflow.mark, _mark_op)


def mark(name: str, tags: Iterable[str] | str = ()) -> None:
    """Start a new segment called ``name`` here; ``tags`` may name a resource and hints.

    Example inside a forward::

        dynaflow.mark("attn", tags=("memory", "no-cudagraph"))
    """
    if not isinstance(name, str) or not name:
        from dynaflow.errors import PartitionError

        raise PartitionError(f"dynaflow.mark needs a non-empty segment name; got {name!r}.")
    tag_str = tags if isinstance(tags, str) else ",".join(tags)
    torch.ops.dynaflow.mark(name, tag_str)


def is_marker(node: torch.fx.Node) -> bool:
    return node.op == "call_function" and node.target in _MARKER_TARGETS


def marker_args(node: torch.fx.Node) -> tuple[str, tuple[str, ...]]:
    """``(name, tags)`` of a marker node."""
    args = list(node.args) + [node.kwargs.get("name"), node.kwargs.get("tags")]
    name = args[0] if isinstance(args[0], str) else node.kwargs.get("name", "marked")
    tags = node.args[1] if len(node.args) > 1 else node.kwargs.get("tags", "")
    return str(name), tuple(t.strip() for t in str(tags or "").split(",") if t.strip())
