"""The batch rules of ATen's own ops: views, factories, reductions, indexing, matmuls, attention,
normalization, convolution, pooling and Dynamo's functional collectives, each with the reason it couples.

The rule API and the generic builders are in :mod:`.aten_rules`; this module only fills its registry (the batch
analysis imports it, so the table is in place before any verdict).
"""

from __future__ import annotations

import contextlib
from typing import Sequence

import sympy
import torch

from dynaflow.frontend.aten_rules import (AtenCall, BatchRule, aligned, along_dims, dim_set, last_dims, no_elements,
                                          norm_dim, out_ndim, pointwise, register_batch_rule)
from dynaflow.frontend.row_layout import layout_of, regroups, reshaped, size_expr

__all__: list[str] = []


def _free(call: AtenCall) -> str | None:
    """Views and copies that keep every dim whole (``t``, ``permute``, ``clone``...): always row-local."""
    return None



# -- shapes: views and reshapes ----------------------------------------------------------------------------
def _view(call: AtenCall) -> str | None:
    """A view of a batch tensor must keep each item's rows together, the batch outer in one dim (what a
    boundary value needs). The analysis places views by their layout before this rule (:mod:`.row_layout`),
    rows interleaved inside one node included; on its own, the table accepts only the plain case."""
    d = call.dim("self")
    if d is None:
        return None  # a batch-free view with the batch size in its shape is caught by the caller (sizes)
    src, out = call.args["self"], call.out
    where = reshaped(layout_of(src, d, sympy.Integer(1), call.batch), out, call.batch)
    return None if where is not None and where[1] == 1 else regroups(src, out)


def _squeeze(call: AtenCall) -> str | None:
    """``squeeze`` keeps a dim of the whole batch (Dynamo's batch size is at least 2) but would drop it from a
    nano-batch of one row, changing every op after it: row-local only when the dims it squeezes exclude it."""
    d = call.dim("self")
    if d is None:
        return None
    dims = dim_set(call.args.get("dim"), call.ndim("self"))
    if dims is None or d in dims:
        return ("it squeezes the batch dim, which a nano-batch of one row would lose "
                "(name the dims to squeeze: x.squeeze(-1))")
    return None


# -- slicing and indexing -----------------------------------------------------------------------------------
_BIG = 2 ** 62


def _slice(call: AtenCall) -> str | None:
    d = call.dim("self")
    if d is None:
        return None
    src = call.args["self"]
    if norm_dim(call.args.get("dim", 0), src.dim()) != d:
        return None
    start, end, step = call.args.get("start"), call.args.get("end"), call.args.get("step", 1)
    whole = (start in (None, 0) and step == 1 and
             (end is None or (isinstance(end, int) and end >= _BIG) or size_expr(end) == size_expr(src.shape[d])))
    if whole or no_elements(call.out):  # no rows at all (a workspace cut to size 0): the same for every nano-batch
        return None
    return "it takes a slice of the rows along the batch dim"


def _along_arg(dim_name: str, what: str, input: str = "self") -> BatchRule:
    """Rule for ops that pick or split along the dim in argument ``dim_name`` (select, split, index_select...)."""
    def rule(call: AtenCall) -> str | None:
        d = call.dim(input)
        if d is not None and norm_dim(call.args.get(dim_name, 0), call.ndim(input)) == d:
            return f"it {what} along the batch dim (dim {d})"
        return None

    return rule


def _index_rows(dim_name: str, index: str, sources: Sequence[str], what: str, along_dim: bool = False) -> BatchRule:
    """gather / scatter (``index`` as large as the data, ``along_dim=False``) and index_copy / index_add /
    index_fill (a 1-D ``index`` of positions along ``dim``, ``along_dim=True``). Row-local when the indexed dim is
    not the batch dim and every data tensor holds the batch at one dim with one size; a gather or scatter index
    holds it there too (row ``i`` of the index pairs with row ``i`` of the data, so a batch-free table or a data
    tensor with ``k·B`` rows would pair differently per nano-batch), a 1-D index is batch-free (each row gets
    every position it lists)."""
    def rule(call: AtenCall) -> str | None:
        data = [n for n in ("self", *sources) if isinstance(call.args.get(n), torch.Tensor)]
        d_index = call.dim(index)
        placed = [call.dim(n) for n in data]
        if d_index is None and all(d is None for d in placed):
            return None
        if along_dim and d_index is not None:
            return f"it {what} at the positions a batch-carrying index lists, which every row gets"
        dim = norm_dim(call.args.get(dim_name, 0), max(call.ndim("self"), 1))
        if any(d is None for d in placed) or (not along_dim and d_index is None):
            return f"it {what} between batch rows and a batch-free tensor (or index), pairing rows by position"
        tensors = [call.args[n] for n in data] + ([] if along_dim else [call.args[index]])
        dims = placed + ([] if along_dim else [d_index])
        if len(set(dims)) != 1 or dims[0] == dim:
            return f"it {what} rows across the batch"
        if len({size_expr(t.shape[d]) for t, d in zip(tensors, dims)}) != 1:
            return f"it {what} between tensors holding different numbers of rows per batch item"
        return None

    return rule


def _index_select(call: AtenCall) -> str | None:
    d, d_index = call.dim("self"), call.dim("index")
    if d is not None and d_index is not None:
        return "it selects rows of a batch tensor with a batch index"
    if d is not None and norm_dim(call.args["dim"], call.ndim("self")) == d:
        return "it selects along the batch dim"
    return None


def _index(call: AtenCall) -> str | None:
    """``self[indices]`` (advanced indexing): the batch dim of ``self`` is not indexed and the indices are
    batch-free; or ``self`` is batch-free and the batch-carrying indices line up (an embedding lookup)."""
    indices = list(call.args["indices"])
    d = call.dim("self")
    idx = [t for t in indices if isinstance(t, torch.Tensor)]
    if d is not None:
        if d < len(indices) and indices[d] is not None:
            return "it indexes the batch dim with a tensor (a gather across the batch)"
        if any(call.dims(t) is not None for t in idx):
            return "it indexes a batch tensor with batch-carrying indices"
        return None
    return aligned(call, idx, out_ndim(idx))


def _index_put(call: AtenCall) -> str | None:
    """``self[indices] = values``: a batch ``self`` not indexed along its batch dim, batch-free indices, and
    values that hold the batch where ``self[indices]`` does (or broadcast there)."""
    indices = list(call.args["indices"])
    d = call.dim("self")
    values = call.args["values"]
    if d is None:
        return "it writes into a batch-free tensor" if call.dims(values) is not None else None
    if d < len(indices) and indices[d] is not None:
        return "it writes rows picked by a tensor index along the batch dim"
    if any(call.dims(t) is not None for t in indices if isinstance(t, torch.Tensor)):
        return "it writes with batch-carrying indices"
    dest = call.args["self"]
    with getattr(dest, "fake_mode", None) or contextlib.nullcontext():
        picked = torch.ops.aten.index.Tensor(dest, indices)
    hits = [i for i, s in enumerate(picked.shape) if call.batch in size_expr(s).free_symbols]
    if len(hits) != 1:
        return "it writes a region whose batch dim dynaflow cannot locate"
    return aligned(call, [picked, values], picked.dim()) if call.dims(values) is not None or values.dim() else None


def _cat(call: AtenCall) -> str | None:
    tensors = [t for t in call.args["tensors"] if isinstance(t, torch.Tensor) and not (t.dim() == 1 and t.shape[0] == 0)]
    dims = {call.dims(t) for t in tensors}
    if dims == {None}:
        return None
    if len(dims) != 1:
        return "it concatenates batch and batch-free tensors (or batch tensors with the batch at different dims)"
    (d,) = dims
    if norm_dim(call.args.get("dim", 0), tensors[0].dim()) == d:
        return "it concatenates along the batch dim"
    return None


def _pad(call: AtenCall) -> str | None:
    d = call.dim("self")
    if d is None:
        return None
    pad, ndim = list(call.args["pad"]), call.ndim("self")
    pos = ndim - 1 - d  # pad pairs run from the last dim backwards
    if 2 * pos + 1 < len(pad) and (pad[2 * pos] != 0 or pad[2 * pos + 1] != 0):
        return "it pads along the batch dim"
    return None


def _restride(call: AtenCall) -> str | None:
    """``as_strided`` that only restates the strides of size-1 dims (a reduction's result laid out in its
    input's memory format): every element keeps its address, so the batch rows keep theirs."""
    src = call.args["self"]
    size, stride = list(call.args["size"]), list(call.args["stride"])
    offset = call.args.get("storage_offset")
    same = (len(size) == src.dim() and all(size_expr(a) == size_expr(b) for a, b in zip(size, src.shape))
            and (offset is None or size_expr(offset) == size_expr(src.storage_offset()))
            and all(size_expr(n) == 1 or size_expr(a) == size_expr(b)
                    for n, a, b in zip(size, stride, src.stride())))
    return None if same else "it reinterprets the memory of the batch rows (as_strided)"


def _repeat(call: AtenCall) -> str | None:
    """Tiling: a batch-free input tiled the batch size times (``weight.repeat(B)`` in ``F.instance_norm``) is a
    periodic tensor whose batch rows are all the same; a batch input may not be tiled along its batch dim."""
    d = call.dim("self")
    if d is None:
        return None
    repeats = list(call.args["repeats"])
    at = d + len(repeats) - call.ndim("self")
    return None if repeats[at] == 1 else "it repeats the batch dim (changes the rows per item)"


# -- matmuls, attention, norms, convolutions ------------------------------------------------------------------
def _matmul(a: str, b: str, bias: str | None = None, batched: bool = False) -> BatchRule:
    """``a @ b`` (mm / addmm / bmm / baddbmm): the batch rides the rows of ``a``, the columns of ``b`` or
    (bmm) the shared leading dim of both; it never sits on the contracted dim."""
    lead = 1 if batched else 0

    def rule(call: AtenCall) -> str | None:
        da, db = call.dim(a), call.dim(b)
        ok = {(lead, None): lead, (None, lead + 1): lead + 1}
        if batched:
            ok[(0, 0)] = 0
        if (da, db) == (None, None):
            out = None
        elif (da, db) in ok:
            out = ok[(da, db)]
        else:
            return f"it contracts or pairs rows across the batch (batch dims {da} and {db} of its operands)"
        if bias is not None and isinstance(call.args.get(bias), torch.Tensor):
            t = call.args[bias]
            nd = 3 if batched else 2
            db_ = call.dims(t)
            if db_ is not None and (out is None or db_ + nd - t.dim() != out):
                return "its bias holds the batch on another dim than the product"
            if db_ is None and out is not None:
                at = out - (nd - t.dim())
                if at >= 0 and t.shape[at] != 1:
                    return "its batch-free bias is not broadcast along the batch dim"
        return None

    return rule


def _attention(q: str, k: str, v: str, mask: str | None, dropout: str = "dropout_p") -> BatchRule:
    """Fused scaled-dot-product attention: the batch sits on a leading (batch or head) dim of q, k and v alike,
    never on the sequence or feature dims; a mask holds it at the same dim or broadcasts there."""
    def rule(call: AtenCall) -> str | None:
        dims = {call.dim(q), call.dim(k), call.dim(v)}
        if dims == {None}:
            return None
        if len(dims) != 1:
            return "its query, key and value hold the batch at different dims"
        (d,) = dims
        ndim = call.ndim(q)
        if d >= ndim - 2:
            return (f"it attends along the batch dim (dim {d} of a {ndim}-d query is a sequence or feature dim); "
                    "if the inputs are sequence-first (batch_first=False), compile with batch_dim=1")
        if float(call.args.get(dropout, 0.0) or 0.0) != 0.0:
            return "it draws random numbers (attention dropout)"
        m = call.args.get(mask) if mask else None
        if isinstance(m, torch.Tensor):
            return aligned(call, [call.args[q], m], ndim)
        return None

    return rule


_PER_CHANNEL = ("weight", "bias", "running_mean", "running_var")


def _batch_norm(training_arg: str | bool) -> BatchRule:
    """Batch norm: per-channel statistics over every dim but the channel dim (1) in training mode, stored
    running statistics in eval mode (``training_arg=False``, or the argument is false).

    With the batch off dim 1, training mode couples (statistics over the batch) and eval mode is row-local.
    With the batch in the channel dim (``F.instance_norm`` folds ``(B, C, L)`` into ``(1, B·C, L)``) each batch
    row is a channel of its own, normalized by its own statistics: row-local when every per-channel tensor
    given holds the batch at dim 0 too (instance norm's repeated weight), and in training mode no running
    statistics are updated."""
    def rule(call: AtenCall) -> str | None:
        d = call.dim("input")
        if d is None:
            return None
        training = training_arg is not False and call.args.get(training_arg, True)
        if d != 1:
            return "it normalizes with statistics over the batch (batch norm in training mode)" if training else None
        given = [n for n in _PER_CHANNEL if isinstance(call.args.get(n), torch.Tensor)]
        if any(call.dim(n) != 0 for n in given):
            return ("batch norm normalizes per channel (dim 1), which holds the batch, with per-channel tensors "
                    "that do not")
        if training and any(n.startswith("running") for n in given):
            return "it updates running statistics of channels that hold the batch (batch norm in training mode)"
        return None

    return rule


def _first_dim_only(input: str, what: str) -> BatchRule:
    def rule(call: AtenCall) -> str | None:
        d = call.dim(input)
        return None if d in (None, 0) else f"it {what}, and the batch sits on dim {d}, not dim 0"

    return rule


def _spatial(n: int, input: str = "self") -> BatchRule:
    """Pooling over the last ``n`` dims: independent along the leading (batch, channel) dims."""
    return last_dims(n, input)


def _nll_loss(call: AtenCall) -> str | None:
    """A per-sample loss (``reduction="none"``) is row-local along dim 0 of the scores and the targets; a mean
    or sum reduces over the batch."""
    d, d_target = call.dim("self"), call.dim("target")
    if d is None and d_target is None:
        return None
    if call.args.get("reduction") != 0:
        return "it reduces the loss over the batch (reduction mean or sum)"
    if d != 0 or d_target != 0 or call.dim("weight") is not None:
        return "its scores and targets do not both hold the batch at dim 0"
    return None


def _fused_layer(inputs: Sequence[str]) -> BatchRule:
    """PyTorch's fused transformer paths (``nn.TransformerEncoderLayer`` / ``nn.MultiheadAttention`` in eval
    with ``batch_first=True``): attention within each sample and per-token layers, the batch at dim 0 of the
    ``inputs``; the mask (an attention mask, a key padding mask or both merged) may hold it at dim 0 too."""
    def rule(call: AtenCall) -> str | None:
        for name, t in call.args.items():
            if not isinstance(t, torch.Tensor) or call.dims(t) is None:
                continue
            if name not in (*inputs, "mask"):
                return f"its argument {name!r} holds the batch, but only {list(inputs)} and the mask may"
            if call.dims(t) != 0:
                return f"it attends within each sample of dim 0, and {name!r} holds the batch at dim {call.dims(t)}"
        return None

    return rule


def _dropout(call: AtenCall) -> str | None:
    if call.args.get("train") is False or float(call.args.get("p", 0.0)) == 0.0:
        return None
    return "it draws random numbers, so a nano-batch would see a different random stream"


def _embedding(call: AtenCall) -> str | None:
    return "it looks rows up in a batch-carrying table" if call.dim("weight") is not None else None


def _embedding_bag(call: AtenCall) -> str | None:
    """``F.embedding_bag`` on a 2-D input: each row of the input is one bag, so the op is row-local when its
    ``offsets`` are the batch rows' own (``arange(0, k·B, k)`` over the flattened ``[B·k]`` indices)."""
    if call.dim("weight") is not None:
        return "it looks rows up in a batch-carrying table"
    step = call.step("offsets")
    if not isinstance(step, int) or call.dim("indices") != 0 or call.args.get("include_last_offset"):
        return ("its bags are given by offsets that are not one bag per batch row (a 1-D input with offsets: the "
                "bags of a nano-batch start at another offset)")
    indices = call.args["indices"]
    if sympy.simplify(size_expr(indices.shape[0]) - step * call.batch) != 0:
        return f"its {tuple(indices.shape)} indices are not {step} per batch row"
    weights = call.args.get("per_sample_weights")
    if weights is not None and (call.dim("per_sample_weights") != 0 or tuple(weights.shape) != tuple(indices.shape)):
        return "its per-sample weights are not laid out like its indices"
    return None


def _factory(call: AtenCall) -> str | None:
    return None


# -- the table ------------------------------------------------------------------------------------------------
_A = "aten::"
for _name in ("t", "transpose", "permute", "unsqueeze", "alias", "detach", "detach_", "clone", "_to_copy",
              "lift_fresh", "lift_fresh_copy", "view_as_real", "view_as_complex", "_conj", "resolve_conj",
              "resolve_neg", "contiguous", "_assert_tensor_metadata", "to", "expand_copy", "permute_copy",
              "transpose_copy", "unsqueeze_copy", "t_copy", "alias_copy", "clone_", "positive"):
    register_batch_rule(_A + _name, _free)
register_batch_rule([_A + "squeeze", _A + "squeeze_copy"], _squeeze)
register_batch_rule(_A + "expand", _free, sizes=("size",), makes_batch=True)
register_batch_rule([_A + "view", _A + "_unsafe_view", _A + "reshape", _A + "view_copy"], _view,
                    sizes=("size", "shape"))
for _name in ("empty", "empty_strided", "zeros", "ones", "full", "new_empty", "new_empty_strided", "new_zeros",
              "new_ones", "new_full", "empty_like", "zeros_like", "ones_like", "full_like", "scalar_tensor",
              "empty_permuted"):
    register_batch_rule(_A + _name, _factory, sizes=("size", "stride", "physical_layout"), makes_batch=True)
register_batch_rule(_A + "arange", _factory)  # any batch-size argument couples (it makes batch positions)
register_batch_rule([_A + "copy_", _A + "copy", _A + "fill_", _A + "fill", _A + "zero_", _A + "zero",
                     _A + "masked_fill", _A + "masked_fill_", _A + "where", _A + "_to_copy", _A + "type_as",
                     _A + "clamp", _A + "clamp_", _A + "lerp", _A + "lerp_", _A + "_conj_physical"], pointwise)
# elementwise ops ATen does not tag pointwise
# (``_prelu_kernel`` gets its weight already shaped to broadcast, ``(1, C, 1, ...)``)
register_batch_rule([_A + "hardswish", _A + "hardswish_", _A + "polar", _A + "real", _A + "imag",
                     _A + "_prelu_kernel"], pointwise)
register_batch_rule(_A + "isin", lambda c: "the set it tests against holds the batch"
                    if c.dim("test_elements") is not None else None)
register_batch_rule(_A + "native_dropout", _dropout)

# reductions and scans along dims
for _name, _args, _default in (
        ("sum", ("dim",), None), ("mean", ("dim",), None), ("amax", ("dim",), ()), ("amin", ("dim",), ()),
        ("aminmax", ("dim",), None), ("prod", ("dim",), None), ("var", ("dim",), None), ("std", ("dim",), None),
        ("var_mean", ("dim",), None), ("std_mean", ("dim",), None), ("any", ("dim",), None),
        ("all", ("dim",), None), ("argmax", ("dim",), None), ("argmin", ("dim",), None), ("max", ("dim",), None),
        ("min", ("dim",), None), ("logsumexp", ("dim",), None), ("linalg_vector_norm", ("dim",), None),
        ("norm", ("dim",), None), ("nansum", ("dim",), None), ("count_nonzero", ("dim",), None),
        ("median", ("dim",), None), ("nanmedian", ("dim",), None), ("mode", ("dim",), -1),
        ("kthvalue", ("dim",), -1), ("topk", ("dim",), -1), ("sort", ("dim",), -1), ("argsort", ("dim",), -1),
        ("cumsum", ("dim",), None), ("cumsum_", ("dim",), None), ("cumprod", ("dim",), None),
        ("cummax", ("dim",), None), ("cummin", ("dim",), None), ("logcumsumexp", ("dim",), None),
        ("_softmax", ("dim",), None), ("_log_softmax", ("dim",), None), ("_safe_softmax", ("dim",), None),
        ("softmax", ("dim",), None), ("log_softmax", ("dim",), None), ("flip", ("dims",), None),
        ("roll", ("dims",), None), ("_fft_r2c", ("dim",), None), ("_fft_c2c", ("dim",), None),
        ("_fft_c2r", ("dim",), None), ("glu", ("dim",), -1)):
    register_batch_rule(_A + _name, along_dims(*_args, default=_default))
register_batch_rule(_A + "renorm", lambda c: None if c.dim("self") in (None, norm_dim(c.args["dim"], c.ndim("self")))
                    else "it renormalizes slices that span the batch")

# slicing, splitting, indexing
register_batch_rule(_A + "select", _along_arg("dim", "picks one row"))
register_batch_rule(_A + "slice", _slice, sizes=("end",))
register_batch_rule([_A + "split", _A + "split_with_sizes", _A + "unsafe_split", _A + "unbind",
                     _A + "split_copy", _A + "unbind_copy"], _along_arg("dim", "splits"))
register_batch_rule(_A + "diagonal", lambda c: "it takes a diagonal through the batch dim"
                    if c.dim("self") is not None and c.dim("self") in
                    {norm_dim(c.args.get("dim1", 0), c.ndim("self")), norm_dim(c.args.get("dim2", 1), c.ndim("self"))}
                    else None)
register_batch_rule(_A + "index_select", _index_select)
register_batch_rule(_A + "gather", _index_rows("dim", "index", (), "gathers"))
register_batch_rule([_A + "scatter", _A + "scatter_", _A + "scatter_add", _A + "scatter_add_", _A + "scatter_reduce",
                     _A + "scatter_reduce_"], _index_rows("dim", "index", ("src",), "scatters"))
register_batch_rule([_A + "index_copy", _A + "index_copy_", _A + "index_add", _A + "index_add_", _A + "index_fill",
                     _A + "index_fill_"], _index_rows("dim", "index", ("source",), "writes", along_dim=True))
register_batch_rule(_A + "index.Tensor", _index)
register_batch_rule([_A + "index_put", _A + "index_put_", _A + "_index_put_impl_", _A + "_unsafe_index_put"], _index_put)
register_batch_rule(_A + "embedding", _embedding)
register_batch_rule((_A + "_embedding_bag", _A + "_embedding_bag_forward_only"), _embedding_bag,
                    positions=("offsets", (1,)))  # offset2bag holds each index's bag: a position
register_batch_rule(_A + "cat", _cat)
register_batch_rule(_A + "constant_pad_nd", _pad)
register_batch_rule(_A + "repeat", _repeat, sizes=("repeats",), makes_batch=True)
register_batch_rule([_A + "as_strided", _A + "as_strided_"], _restride, sizes=("size", "stride"))
register_batch_rule([_A + "tril", _A + "triu", _A + "tril_", _A + "triu_"], last_dims(2))

# matmuls and attention
def _linear(call: AtenCall) -> str | None:
    """``x @ W.T + b`` over the last dim of ``x``: row-local unless the batch is that dim or in W / b."""
    d = call.dim("input")
    if call.dim("weight") is not None or call.dim("bias") is not None:
        return "its weight or bias holds the batch"
    if d is not None and d == call.ndim("input") - 1:
        return "it contracts along the batch dim (the batch is the feature dim)"
    return None


register_batch_rule(_A + "linear", _linear)
register_batch_rule(_A + "mm", _matmul("self", "mat2"))
register_batch_rule(_A + "addmm", _matmul("mat1", "mat2", bias="self"))
register_batch_rule(_A + "_addmm_activation", _matmul("mat1", "mat2", bias="self"))
register_batch_rule(_A + "bmm", _matmul("self", "mat2", batched=True))
register_batch_rule(_A + "baddbmm", _matmul("batch1", "batch2", bias="self", batched=True))
register_batch_rule(_A + "mv", lambda c: "it contracts along the batch dim" if c.dim("vec") is not None or
                    c.dim("self") not in (None, 0) else None)
register_batch_rule(_A + "_scaled_dot_product_flash_attention_for_cpu", _attention("query", "key", "value", "attn_mask"))
register_batch_rule(_A + "_scaled_dot_product_flash_attention", _attention("query", "key", "value", None))
register_batch_rule(_A + "_scaled_dot_product_efficient_attention", _attention("query", "key", "value", "attn_bias"))
register_batch_rule(_A + "_scaled_dot_product_cudnn_attention", _attention("query", "key", "value", "attn_bias"))
register_batch_rule(_A + "_scaled_dot_product_fused_attention_overrideable",
                    _attention("query", "key", "value", "attn_bias"))

# normalization, convolution, pooling
register_batch_rule([_A + "native_layer_norm", _A + "_fused_rms_norm"], last_dims("normalized_shape", "input"),
                    sizes=("normalized_shape",))
register_batch_rule(_A + "native_group_norm", _first_dim_only("input", "normalizes each sample of dim 0"),
                    sizes=("N", "HxW"))
register_batch_rule(_A + "native_batch_norm", _batch_norm("training"))
register_batch_rule(_A + "_native_batch_norm_legit_no_training", _batch_norm(False))
register_batch_rule([_A + "_native_batch_norm_legit", _A + "_native_batch_norm_legit_functional"], _batch_norm("training"))
register_batch_rule([_A + "convolution", _A + "_convolution"],
                    _first_dim_only("input", "convolves over channels and spatial dims"))
register_batch_rule([_A + "avg_pool2d", _A + "max_pool2d_with_indices", _A + "_adaptive_avg_pool2d",
                     _A + "adaptive_max_pool2d", _A + "_upsample_nearest_exact2d", _A + "upsample_nearest2d"],
                    _spatial(2))
register_batch_rule([_A + "avg_pool3d", _A + "max_pool3d_with_indices", _A + "_adaptive_avg_pool3d"], _spatial(3))
# resampling, padding and patches over the trailing dims (``F.interpolate``, ``F.pad(mode="reflect")``,
# ``nn.PixelShuffle``, ``F.unfold`` / ``F.fold``): independent along the leading dims
register_batch_rule([_A + "upsample_nearest1d", _A + "_upsample_nearest_exact1d", _A + "upsample_linear1d",
                     _A + "reflection_pad1d", _A + "replication_pad1d"], _spatial(1))
register_batch_rule([_A + "upsample_bilinear2d", _A + "upsample_bicubic2d", _A + "_upsample_bilinear2d_aa",
                     _A + "_upsample_bicubic2d_aa", _A + "reflection_pad2d", _A + "replication_pad2d",
                     _A + "col2im"], _spatial(2))
register_batch_rule([_A + "upsample_nearest3d", _A + "_upsample_nearest_exact3d", _A + "upsample_trilinear3d",
                     _A + "reflection_pad3d", _A + "replication_pad3d", _A + "pixel_shuffle", _A + "pixel_unshuffle",
                     _A + "im2col"], _spatial(3))
register_batch_rule([_A + "channel_shuffle", _A + "native_channel_shuffle"],
                    _first_dim_only("self", "shuffles the channels of each sample"))
register_batch_rule([_A + "nll_loss_forward", _A + "nll_loss2d_forward"], _nll_loss)
register_batch_rule(_A + "_transformer_encoder_layer_fwd", _fused_layer(("src",)))
register_batch_rule(_A + "_native_multi_head_attention", _fused_layer(("query", "key", "value")))

# collectives (Dynamo's functional collectives): elementwise across ranks, or moving rows of dim 0
for _name in ("all_reduce", "all_reduce_", "broadcast", "broadcast_", "wait_tensor"):
    register_batch_rule("_c10d_functional::" + _name, pointwise)
def _rows_across_ranks(name: str) -> BatchRule:
    def rule(call: AtenCall) -> str | None:
        if call.dim("input") != 0:
            return None
        return (f"it exchanges rows of the batch dim (dim 0) between ranks ({name}): a nano-batch slice would send "
                "different rows to each rank; put the batch in another dim (e.g. [world, batch, ...])")

    return rule


for _name in ("all_gather_into_tensor", "reduce_scatter_tensor", "all_to_all_single"):
    register_batch_rule("_c10d_functional::" + _name, _rows_across_ranks(_name))
