"""Interleaved batch rows inside one node: ``(L, B, E) -> (L*B, E) -> linear -> (L, B, E)``.

The batch analysis places the batch at one dim holding ``k·B`` rows, item ``b`` owning rows ``[b·k, (b+1)·k)``.
A view can also fold outer rows *into* that dim, ``o·B·k`` rows with the batch in the middle (PyTorch's
``multi_head_attention_forward`` flattens ``(L, B, E)`` to ``(L*B, E)`` around its projections). Such a tensor
is row-local to ops that treat every row of the dim on its own (elementwise ops, the rows of a matmul), and a
later view can give the batch its own dim back. This module decides those two things; the analysis lets an
interleaved tensor live only between the ATen ops of one node (never as a node's value, which must be
``k·B`` rows with the batch outer: that is what a nano-batch's slice of a boundary value is).
"""

from __future__ import annotations

from typing import Any

import sympy
import torch

__all__ = ["Layout", "size_expr", "size_prod", "layout_of", "reshaped", "regroups", "ROW_WISE_OPS",
           "treats_rows_apart"]

Layout = tuple[sympy.Expr, sympy.Expr]
"""``(O, I)``: in the tensor's row-major element order, element ``(a·B + b)·I + i`` (``a < O``, ``i < I``) belongs
to batch item ``b``; a view keeps the element order, so it keeps the layout."""

ROW_WISE_OPS = frozenset({"aten::addmm", "aten::mm", "aten::clone", "aten::_to_copy", "aten::alias", "aten::detach",
                          "aten::contiguous"})
"""Ops (besides pointwise ones) whose every output row along the batch dim depends on the same input row only, so
any grouping of batch items into that dim survives them (the analysis still checks the op's own rule)."""


def size_expr(x: Any) -> sympy.Expr:
    """A size (an int or a ``SymInt``) as a sympy expression."""
    return x.node.expr if isinstance(x, torch.SymInt) else sympy.Integer(int(x))


def size_prod(xs: Any) -> sympy.Expr:
    """The product of sizes, expanded."""
    return sympy.expand(sympy.Mul(*[size_expr(x) for x in xs]))


def _whole(x: sympy.Expr, batch: sympy.Symbol) -> bool:
    """A positive whole number that does not depend on the batch size."""
    x = sympy.simplify(x)
    return batch not in x.free_symbols and bool(x.is_integer) and bool(x.is_positive)


def layout_of(t: torch.Tensor, dim: int, outer: sympy.Expr, batch: sympy.Symbol) -> Layout:
    """The layout of ``t`` with the batch at ``dim`` as ``outer·B·k`` rows (``outer`` 1: the batch is outer)."""
    k = sympy.simplify(size_expr(t.shape[dim]) / (outer * batch))
    return sympy.expand(size_prod(t.shape[:dim]) * outer), sympy.expand(k * size_prod(t.shape[dim + 1:]))


def reshaped(layout: Layout, out: torch.Tensor, batch: sympy.Symbol) -> tuple[int, sympy.Expr] | None:
    """Where a view of a tensor with ``layout`` holds the batch: ``(dim, outer)`` (``outer`` 1 when the batch is
    outer in that dim), or ``None`` when no single dim holds each item's rows in one pattern."""
    hits = [i for i, s in enumerate(out.shape) if batch in size_expr(s).free_symbols]
    if len(hits) != 1:
        return None
    d = hits[0]
    o_total, inner = layout
    outer = sympy.simplify(o_total / size_prod(out.shape[:d]))
    if not _whole(outer, batch):
        return None
    k = sympy.simplify(size_expr(out.shape[d]) / (outer * batch))
    if not _whole(k, batch) or sympy.expand(k * size_prod(out.shape[d + 1:]) - inner) != 0:
        return None
    return d, outer


def regroups(src: torch.Tensor, out: torch.Tensor) -> str:
    """Why a view of ``src`` as ``out`` couples: it interleaves batch items."""
    return f"it regroups the batch dim: {tuple(src.shape)} -> {tuple(out.shape)} interleaves batch items"


def treats_rows_apart(op: Any) -> bool:
    """Whether ``op`` keeps every row of its batch dim apart (see :data:`ROW_WISE_OPS`)."""
    return op._schema.name in ROW_WISE_OPS or (torch.Tag.pointwise in op.tags
                                               and torch.Tag.nondeterministic_seeded not in op.tags)
