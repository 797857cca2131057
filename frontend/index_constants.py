"""Index lists as device constants: ``x[..., [-2], :]`` indexes with a tensor made once, on ``x``'s device.

Advanced indexing with a Python list builds a CPU index tensor and copies it to the indexed tensor's device
on every call (Falcon's fused QKV split does this). On a GPU that is a host-to-device copy from pageable
memory each step, which blocks the host, and which a CUDA-graph capture refuses outright ("Cannot copy
between CPU and CUDA tensors during CUDA graph capture"). :func:`lift_index_lists` gives each such list a
constant ``int64`` (or ``bool``) tensor on the device of the tensor it indexes, a buffer of the graph read
through ``get_attr``: the same elements, selected the same way, without the copy.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx

__all__ = ["lift_index_lists"]


def _device_of(node: Any) -> torch.device | None:
    """The device of the tensor ``node`` makes, from the capture's metadata (Dynamo's or shape propagation's)."""
    if not isinstance(node, torch.fx.Node):
        return None
    val = node.meta.get("example_value", node.meta.get("val"))
    return val.device if isinstance(val, torch.Tensor) else None


def _plain(index: Any) -> bool:
    """A flat, non-empty list of plain ints, or of plain bools (a mask): what ``torch.tensor`` turns into the
    index tensor the list stands for. Anything else (symbolic sizes, nodes, nesting) is left alone."""
    return (isinstance(index, list) and bool(index)
            and (all(type(i) is int for i in index) or all(type(i) is bool for i in index)))


def lift_index_lists(gm: torch.fx.GraphModule) -> int:
    """Replace every plain index list of a ``getitem`` in ``gm`` by a constant index tensor on the indexed
    tensor's device (module docstring); returns how many lists were replaced. A ``getitem`` whose indexed value
    has no recorded device keeps its list."""
    lifted = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not operator.getitem or len(node.args) != 2:
            continue
        base, index = node.args
        device = _device_of(base)
        if device is None:
            continue
        mode = getattr(base.meta.get("example_value", base.meta.get("val")), "fake_mode", None)
        parts = list(index) if isinstance(index, tuple) else [index]
        if not any(_plain(p) for p in parts):
            continue
        new_parts = []
        for p in parts:
            if _plain(p):
                name = f"_dynaflow_index_{lifted}"
                while hasattr(gm, name):
                    name += "_"
                gm.register_buffer(name, torch.tensor(p, device=device), persistent=False)
                with gm.graph.inserting_before(node):
                    const = gm.graph.get_attr(name)
                value = getattr(gm, name)  # the metadata holds it as the capture holds its values: fake, if they are
                const.meta["val"] = const.meta["example_value"] = mode.from_tensor(value) if mode is not None else value
                new_parts.append(const)
                lifted += 1
            else:
                new_parts.append(p)
        node.args = (base, tuple(new_parts) if isinstance(index, tuple) else new_parts[0])
    if lifted:
        gm.graph.lint()
        gm.recompile()
    return lifted
