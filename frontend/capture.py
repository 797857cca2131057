"""Capture helpers: mark the batch dim dynamic for Dynamo, make a plain GraphModule's batch symbolic,
and check that a model's outputs are tensors (or tuples / dicts of them)."""

from __future__ import annotations

import inspect
from typing import Any, Sequence

import torch
import torch.fx
import torch.utils._pytree as pytree

from dynaflow.errors import CaptureError, ConfigError

__all__ = ["batch_size_of", "mark_batch_dynamic", "symbolize", "check_outputs", "flat_io"]


def batch_size_of(tensors: Sequence[Any], batch_dim: int, where: str = "inputs") -> int:
    """The batch size: size ``batch_dim`` of the first tensor that has that dim."""
    shapes = []
    for t in tensors:
        if isinstance(t, torch.Tensor):
            if t.dim() > batch_dim:
                return int(t.shape[batch_dim])
            shapes.append(tuple(t.shape))
    raise ConfigError(
        f"batch_dim={batch_dim} but no tensor among the {where} has that dim (tensor shapes: {shapes or 'none'}). "
        f"Pass batch_dim=<the index of the batch dimension>, e.g. batch_dim=0."
    )


def mark_batch_dynamic(args: tuple[Any, ...], kwargs: dict[str, Any], batch_dim: int) -> int:
    """Mark dim ``batch_dim`` dynamic on every input tensor whose size there equals the batch size.

    Returns the batch size. Size-1 batches are left static (Dynamo specialises 0/1 sizes).
    """
    leaves = pytree.tree_leaves((args, kwargs))
    batch = batch_size_of(leaves, batch_dim)
    if batch >= 2:
        for t in leaves:
            if isinstance(t, torch.Tensor) and t.dim() > batch_dim and t.shape[batch_dim] == batch:
                torch._dynamo.maybe_mark_dynamic(t, batch_dim)
    return batch


def symbolize(gm: torch.fx.GraphModule, inputs: Sequence[Any], batch_dim: int) -> None:
    """Propagate fake tensors through ``gm`` with the batch dim symbolic, filling ``node.meta["val"]``.

    Used for GraphModules from ``symbolic_trace`` or ``torch.export`` that the Dynamo backend never saw.
    """
    from torch._dynamo.source import ConstantSource
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext

    batch = batch_size_of(inputs, batch_dim)
    mode = FakeTensorMode(shape_env=ShapeEnv(), allow_non_fake_inputs=True)
    fakes = []
    for i, t in enumerate(inputs):
        if isinstance(t, torch.Tensor):
            dyn = [DimDynamic.DYNAMIC if (d == batch_dim and s == batch and batch >= 2) else DimDynamic.STATIC
                   for d, s in enumerate(t.shape)]
            fakes.append(mode.from_tensor(t, symbolic_context=StatelessSymbolicContext(dynamic_sizes=dyn),
                                          source=ConstantSource(f"input{i}")))
        else:
            fakes.append(t)
    try:
        with mode:
            _RecordValues(gm, mode).run(*fakes)
    except Exception as exc:
        raise CaptureError(
            f"Could not propagate a symbolic batch dim through the GraphModule ({type(exc).__name__}: {exc}). "
            "If it was made by torch.export with a static batch, export it with "
            "dynamic_shapes={...: {0: torch.export.Dim('batch')}}; or pass the nn.Module itself to dynaflow.compile."
        ) from exc


def flat_io(gm: torch.fx.GraphModule) -> tuple[Any, Any]:
    """``(flatten(*args, **kwargs) -> list, unflatten(outputs) -> tree)`` honouring a pytree codegen (export).

    Keyword arguments are bound to ``gm.forward``'s signature first, as calling the GraphModule would do, so an
    exported ``forward(self, x, *, scale)`` takes ``scale=`` (the codegen's ``process_inputs`` is positional only).
    """
    codegen = gm.graph._codegen
    signature = inspect.signature(gm.forward)

    def flatten(*args: Any, **kwargs: Any) -> list[Any]:
        if kwargs:
            try:
                bound = signature.bind(*args, **kwargs)
            except TypeError as exc:
                raise CaptureError(f"The GraphModule's forward{signature} does not accept these inputs: {exc}.") from None
            bound.apply_defaults()
            args = bound.args + tuple(bound.kwargs.values())
        return list(codegen.process_inputs(*args))

    return flatten, codegen.process_outputs


def check_outputs(out: Any, who: str = "The model") -> None:
    """Raise :class:`CaptureError` unless ``out`` is a tensor or (nested) tuples/lists/dicts of tensors."""
    leaves, spec = pytree.tree_flatten(out)
    bad = [type(x).__name__ for x in leaves if not isinstance(x, torch.Tensor) and x is not None]
    if bad:
        raise CaptureError(
            f"{who} returned {type(out).__name__} holding non-tensor values ({', '.join(sorted(set(bad)))}); dynaflow "
            "needs a tensor or tuples/lists/dicts of tensors, because every output is split and merged along the "
            "batch. Return tensors only (for transformers models pass use_cache=False, or return_dict with tensors)."
        )


class _RecordValues(torch.fx.Interpreter):
    """Run a graph on fake inputs and keep every node's value in ``node.meta["val"]`` — sizes and ints too
    (torch 2.11's FakeTensorProp keeps a ``torch.Size`` as a tuple with ``None`` for its static entries and
    no value for the ints taken from it; the batch analysis reads both)."""

    def __init__(self, gm: torch.fx.GraphModule, mode: Any):
        super().__init__(gm)
        self.mode = mode

    def run_node(self, n: torch.fx.Node) -> Any:
        out = super().run_node(n)
        if n.op == "get_attr" and isinstance(out, torch.Tensor):
            out = self.mode.from_tensor(out)  # weights as fake tensors, like every other value
        n.meta["val"] = out
        return out
