"""Random models for differential tests against eager: a program of ops drawn from a vocabulary of row-local
ops, ops that couple the batch, in-place writes (of intermediates, of views, of an input), views that are
copies on some shapes, random draws, norms with running statistics and segment cuts.

A :class:`Program` is plain data (what Hypothesis draws and shrinks); :class:`RandomModel` runs it. Every op
maps a (B, D) tensor to a (B, D) tensor, so any op can follow any other.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

import dynaflow

D = 8
MAX_ROWS = 16
"""Rows of the model's cache buffer: more than any batch the tests draw or pad to."""


def _written(h: torch.Tensor, write: Callable[[torch.Tensor], object]) -> torch.Tensor:
    y = h.clone()
    write(y)
    return y


def _mha_seq_first(h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Attention over two halves of each row, sequence first: PyTorch's MHA flattens ``(2, B, E)`` to
    ``(2*B, E)`` around its projections, so the batch rows interleave inside the node."""
    e = D // 2
    q = h.view(-1, 2, e).transpose(0, 1)
    out, _ = F.multi_head_attention_forward(q, q, q, e, 2, torch.cat([w[:, :e], w[:e, :e]]), None, None, None,
                                            False, 0.0, w[:e, e:], None, training=False, need_weights=False)
    return out.transpose(0, 1).reshape(h.shape[0], D)


UNARY: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    # row-local
    "linear": lambda h, w: h @ w,
    "gelu": lambda h, w: F.gelu(h),
    "layer_norm": lambda h, w: F.layer_norm(h, (D,)),
    "softmax": lambda h, w: h.softmax(-1),
    "rms": lambda h, w: h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6),
    "where": lambda h, w: torch.where(h > 0, h, h * 0.1),
    "gather_cols": lambda h, w: torch.gather(h, 1, torch.zeros_like(h, dtype=torch.long)),
    "expand_col": lambda h, w: h[:, :1].expand(-1, D) + h,
    "repeat_cols": lambda h, w: h[:, : D // 2].repeat(1, 2),
    "dropout_eval": lambda h, w: F.dropout(h, 0.3, training=False),  # returns its input itself
    "reshape_flat": lambda h, w: h.reshape(h.shape[0] * 2, D // 2).relu().reshape(h.shape[0], D),
    "transposed": lambda h, w: (w @ h.T).T,  # the batch in dim 1 in between
    "outer": lambda h, w: (h.unsqueeze(1) * h.unsqueeze(2)).mean(1),
    "embed": lambda h, w: w[(h.abs() * 3).long().clamp(max=D - 1)].mean(1),
    "sort_cols": lambda h, w: h.sort(-1).values + h.topk(2, -1).values[:, :1],
    "conv_cols": lambda h, w: F.conv1d(h.unsqueeze(1), w[:1, :3].unsqueeze(1), padding=1).squeeze(1),
    "to_same": lambda h, w: h.to(h.dtype),  # returns its input itself
    "half_roundtrip": lambda h, w: h.half().float(),
    "argmax_gather": lambda h, w: torch.gather(h, 1, h.argmax(-1, keepdim=True)).expand(-1, D) + h,
    "mha_seq_first": lambda h, w: _mha_seq_first(h, w),  # one node folding outer rows into the batch dim
    "interpolate": lambda h, w: F.interpolate(h.view(-1, 2, D // 2), size=D // 2 + 2, mode="linear")[..., :D // 2]
    .reshape(h.shape[0], D),
    "pixel_shuffle": lambda h, w: F.pixel_shuffle(h.view(-1, 4, 1, D // 4), 2).reshape(h.shape[0], D),
    "nll_per_row": lambda h, w: h + F.cross_entropy(h, (h[:, 0].abs() * 5).long() % D, reduction="none")[:, None],
    "instance_norm": lambda h, w: F.instance_norm(h.view(h.shape[0], 4, D // 4), weight=w[0, :4], bias=w[1, :4])
    .reshape(h.shape[0], D),
    "bag_per_row": lambda h, w: h + F.embedding_bag((h[:, :3].abs() * 5).long() % D, w, mode="mean"),  # a bag a row
    "squeeze_named": lambda h, w: h[:, None].squeeze(1) * 1.0,
    "gather_same_rows": lambda h, w: torch.gather(h, 1, (h.abs() * 3).long() % D),
    # coupling
    "sum_rows": lambda h, w: h + h.sum(0, keepdim=True),
    "mean_all": lambda h, w: h - h.mean(),
    "cumsum_rows": lambda h, w: torch.cumsum(h, 0) * 0.1,
    "flip_rows": lambda h, w: h.flip(0),
    "roll_rows": lambda h, w: torch.roll(h, 1, 0),
    "norm_over_rows": lambda h, w: F.layer_norm(h.T, (h.shape[0],)).T,
    "row_index": lambda h, w: h + torch.arange(h.shape[0], dtype=h.dtype)[:, None] * 0.01,
    "bags_of_flat_ids": lambda h, w: h + F.embedding_bag((h[:, 0].abs() * 5).long() % D, w,
                                                         torch.arange(0, h.shape[0] - 1, 2))[:1],  # own offsets
    "batch_size_value": lambda h, w: h * (1.0 / h.shape[0]),
    "tril_rows": lambda h, w: torch.tril(torch.ones(h.shape[0], h.shape[0])) @ h * 0.1,
    "gram": lambda h, w: h @ (h.T @ h) * 0.01,
    "first_row": lambda h, w: h + h[0],
    "shift_rows": lambda h, w: torch.cat([h[1:], h[:1]]),
    "max_all": lambda h, w: h / (h.abs().max() + 1),
    "median_mask": lambda h, w: h.masked_fill(h > h.median(), 0.0),
    "dropout_train": lambda h, w: F.dropout(h, 0.3, training=True),
    "sort_rows": lambda h, w: h.sort(0).values,
    "nll_mean": lambda h, w: h + F.cross_entropy(h, (h[:, 0].abs() * 5).long() % D),
    "pad_rows": lambda h, w: F.pad(h, (0, 0, 1, 0))[:-1],
    "index_add_rows": lambda h, w: torch.zeros_like(h).index_add_(0, torch.arange(h.shape[0]).flip(0), h),
    "squeeze_all": lambda h, w: h[:, None].squeeze() * 1.0,  # drops the batch dim of a one-row nano-batch
    "gather_table": lambda h, w: torch.gather(w.repeat(2, 1), 1, (h.abs() * 3).long() % D),  # row i of a table
    "index_fill_rows": lambda h, w: h.index_fill(1, (h[:, 0].abs() * 3).long() % D, 0.0),  # every row's columns
    # copies and in-place writes
    "column_major": lambda h, w: h.T.contiguous().T,  # a copy on many rows, a view of ``h`` on one
    "set_row0": lambda h, w: _written(h, lambda y: y.__setitem__(0, 1.0)),
    "add_rows_below": lambda h, w: _written(h, lambda y: y[1:].add_(y[:-1].clone())),
    "scale_col0": lambda h, w: _written(h, lambda y: y[:, 0].mul_(2.0)),
}
BINARY: dict[str, Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "add": lambda a, b, w: a + b,
    "mul": lambda a, b, w: a * b,
    "cat_linear": lambda a, b, w: torch.cat([a, b], -1) @ w,
    "cross_rows": lambda a, b, w: a @ (b.T @ a) * 0.01,
}
SPECIAL = ("batch_norm", "cache_write", "cut", "graph_break", "write_earlier", "inplace_result", "write_earlier_row",
           "write_input", "write_through_split", "view_of", "write_earlier_kw", "write_row_foreach")
"""Ops :class:`RandomModel` runs itself: a BatchNorm (train or eval), a ``dynaflow.mark`` segment cut, a Dynamo
graph break (the step becomes several captured graphs), a write of the batch's rows into a module buffer
(a cache) read back after, an in-place write of an earlier value (or of the
model's first input, or through one result of ``tensor_split``; or its result used on), a plain view of an earlier value,
writes that only the dispatched ATen op shows (``inplace=True``, a ``_foreach_*_`` list)."""


@dataclass(frozen=True)
class Op:
    name: str
    a: int
    """Index of the first operand among the values so far (inputs first)."""
    b: int = 0
    train: bool = False


@dataclass(frozen=True)
class Program:
    inputs: int
    ops: tuple[Op, ...]
    outputs: tuple[int, ...]

    def __repr__(self) -> str:
        body = ", ".join(f"v{self.inputs + i}={o.name}(v{o.a}{f', v{o.b}' if o.name in BINARY else ''})"
                         for i, o in enumerate(self.ops))
        return f"Program({self.inputs} inputs: {body}; returns {', '.join(f'v{i}' for i in self.outputs)})"


class RandomModel(nn.Module):
    def __init__(self, program: Program, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.program = program
        self.weights = nn.ParameterList(
            nn.Parameter(torch.randn(2 * D if op.name == "cat_linear" else D, D, generator=g) * 0.3)
            for op in program.ops)
        self.norms = nn.ModuleList(nn.BatchNorm1d(D).train(op.train) for op in program.ops if op.name == "batch_norm")
        self.register_buffer("cache", torch.zeros(MAX_ROWS, D))

    def forward(self, *xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        values, norms = list(xs), iter(self.norms)
        for op, w in zip(self.program.ops, self.weights):
            a = values[op.a]
            if op.name in BINARY:
                v = BINARY[op.name](a, values[op.b], w)
            elif op.name in UNARY:
                v = UNARY[op.name](a, w)
            elif op.name == "batch_norm":
                v = next(norms)(a)
            elif op.name == "cut":
                dynaflow.mark("cut")
                v = a * 1.0
            elif op.name == "cache_write":
                self.cache[: a.shape[0]] = a * 0.5
                v = self.cache[: a.shape[0]] + self.cache[: a.shape[0]].sum(0)
            elif op.name == "graph_break":
                torch._dynamo.graph_break()
                v = a * 1.0
            elif op.name == "write_earlier":
                a.mul_(1.1)
                v = a
            elif op.name == "write_earlier_row":
                a[-1] = 0.5
                v = a + 0
            elif op.name == "inplace_result":  # the in-place op's result (the tensor it wrote) flows on
                v = a.add_(0.25)
            elif op.name == "write_through_split":
                torch.tensor_split(a, 2, dim=1)[0].mul_(1.1)
                v = a * 1.0
            elif op.name == "write_earlier_kw":  # the write shows only in the ATen op it dispatches
                F.leaky_relu(a, 0.5, inplace=True)
                v = a
            elif op.name == "write_row_foreach":  # a write through an element of a list argument
                torch._foreach_mul_([a[-1]], 1.5)
                v = a + 0
            elif op.name == "write_input":
                xs[0].add_(0.25)
                v = xs[0] * 1.0 + a
            else:  # view_of
                v = a[:, :]
            values.append(v)
        return tuple(values[i] for i in self.program.outputs)
