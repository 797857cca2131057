"""The batch analysis against eager: ops claimed row-local split exactly, everything else is a barrier.

Three layers of evidence, none of which trusts the rule table:

* every case from issue 11 (ops that used to give a silently different answer) either equals eager or
  becomes a barrier that equals eager, and under ``strict=True`` raises ``BatchCouplingError`` naming the
  node and its source line;
* a property test draws ATen ops with random shapes, batch dims and arguments, runs the analysis on a
  one-op graph, and for every op it calls row-local checks split-then-merge against the whole op;
* ops without a rule couple, whatever the op.

``HYPOTHESIS_PROFILE=large pytest tests/test_batch_rules.py`` runs the property test with 20x the examples.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, strategies as st

import dynaflow
from dynaflow.errors import BatchCouplingError
from dynaflow.frontend import analyze, find_batch_symbol
from dynaflow.frontend.aten_rules import rule_for
from dynaflow.frontend.capture import symbolize

RR = dict(strategy="round_robin", nano_batches=2, executor="serial")


class Around(nn.Module):
    """``Linear(8, 8) -> fn -> Linear(8, 8)``: the shape of issue 11's examples."""

    def __init__(self, fn):
        super().__init__()
        self.a, self.b, self.fn = nn.Linear(8, 8), nn.Linear(8, 8), fn

    def forward(self, x):
        return self.b(self.fn(self.a(x)))


class Call(nn.Module):
    def __init__(self, fn, *mods):
        super().__init__()
        self.fn, self.mods = fn, nn.ModuleList(mods)

    def forward(self, x):
        return self.fn(x, *self.mods)


def _setitem_first(x):
    y = x * 2
    y[0] = 0
    return y


def _setitem_last(x):
    y = x * 2
    y[-1] = y[0]
    return y


def _cumsum_(x):
    y = x * 2
    y.cumsum_(0)
    return y


def _index_add(x):
    out = torch.zeros_like(x)
    idx = torch.arange(x.shape[0]).flip(0)
    out.index_add_(0, idx, x)
    return out


def _index_copy(x):
    out = torch.zeros_like(x)
    out.index_copy_(0, torch.arange(x.shape[0]).roll(1), x)
    return out


CASES = {
    "tril": (lambda: Around(torch.tril), (6, 8)),
    "triu": (lambda: Around(torch.triu), (6, 8)),
    "rot90": (lambda: Around(lambda h: torch.rot90(h, -1, [0, 1]).t()), (6, 8)),
    "normalize_dim0": (lambda: Around(lambda h: F.normalize(h, dim=0)), (6, 8)),
    "renorm": (lambda: Around(lambda h: torch.renorm(h, 2, 1, 1.0)), (6, 8)),
    "fft_dim0": (lambda: Around(lambda h: torch.fft.fft(h, dim=0).real), (6, 8)),
    "conv1d_on_t": (lambda: Around(lambda h: F.conv1d(h.t()[None], torch.ones(8, 8, 3), padding=1)[0].t()), (6, 8)),
    "avg_pool1d_on_t": (lambda: Around(lambda h: F.avg_pool1d(h.t()[None], 3, 1, 1)[0].t()), (6, 8)),
    "layer_norm_on_t": (lambda: Around(lambda h: F.layer_norm(h.t(), (h.shape[0],)).t()), (6, 8)),
    "group_norm_on_t": (lambda: Around(lambda h: F.group_norm(h.t()[None], 2)[0].t()), (6, 8)),
    "instance_norm_on_t": (lambda: Around(lambda h: F.instance_norm(h.t()[None])[0].t()), (6, 8)),
    "einsum_bd_cd": (lambda: Around(lambda h: torch.einsum("bd,cd->bd", h, h)), (6, 8)),
    "sdpa_over_rows": (lambda: Around(lambda h: F.scaled_dot_product_attention(
        h[None, None], h[None, None], h[None, None])[0, 0]), (6, 8)),
    "batchnorm_train": (lambda: Call(lambda x, m: m(x), nn.BatchNorm1d(8)).train(), (6, 8)),
    "batchnorm_train_untracked": (lambda: Call(lambda x, m: m(x), nn.BatchNorm1d(8, track_running_stats=False)).train(),
                                  (6, 8)),
    "divide_by_batch": (lambda: Around(lambda h: h / h.shape[0]), (6, 8)),
    "full_of_batch": (lambda: Call(lambda x: x + torch.full((x.shape[0], 1), float(x.shape[0]))), (6, 8)),
    "new_tensor_of_batch": (lambda: Call(lambda x: x * x.new_tensor(x.shape[0])), (6, 8)),
    "setitem_row0": (lambda: Call(_setitem_first), (6, 8)),
    "setitem_last_from_first": (lambda: Call(_setitem_last), (6, 8)),
    "cumsum_inplace_dim0": (lambda: Call(_cumsum_), (6, 8)),
    "index_add_rows": (lambda: Call(_index_add), (6, 8)),
    "index_copy_rows": (lambda: Call(_index_copy), (6, 8)),
    "encoder_sequence_first": (lambda: nn.TransformerEncoderLayer(8, 2, 16, dropout=0).eval(), (5, 6, 8)),
    "mha_sequence_first": (lambda: Call(lambda x, m: m(x, x, x)[0], nn.MultiheadAttention(8, 2)).eval(), (5, 6, 8)),
    "batch_in_two_dims": (lambda: Around(lambda h: h.t().unsqueeze(0).expand(h.shape[0], 8, h.shape[0]).sum(-1)),
                          (6, 8)),
    "gram_softmax": (lambda: Around(lambda h: (h @ h.t()).softmax(-1) @ h), (6, 8)),
    "cdist_min": (lambda: Around(lambda h: torch.cdist(h, h).min(-1).values[:, None] * h), (6, 8)),
    "squeeze_all": (lambda: Around(lambda h: h[:, None].squeeze() * 2), (6, 8)),
}


TORCH_MODULES = {"encoder_sequence_first", "mha_sequence_first", "batchnorm_train", "batchnorm_train_untracked"}


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("name", sorted(CASES))
def test_issue_cases_equal_eager_and_strict_names_the_node(name):
    factory, shape = CASES[name]
    torch.manual_seed(0)
    model = factory()
    eager_model, df_model = copy.deepcopy(model), copy.deepcopy(model)
    x = torch.randn(*shape)
    with torch.no_grad():
        ref = eager_model(x.clone())
        out = dynaflow.compile(df_model, **RR)(x.clone())
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    for key, value in _state(eager_model).items():  # running statistics too
        torch.testing.assert_close(_state(df_model)[key], value, atol=1e-6, rtol=1e-6, msg=key)
    torch._dynamo.reset()
    with pytest.raises(BatchCouplingError) as info, torch.no_grad():
        dynaflow.compile(copy.deepcopy(model), strict=True, **RR)(x.clone())
    message = str(info.value)
    if "specialised the batch dim" in message:  # torch 2.11 specializes new_tensor(B): the graph is one barrier
        return
    assert "node '" in message and "node: %" in message, message
    if name not in TORCH_MODULES:  # the source line of the user's code (torch's own modules carry none)
        assert "test_batch_rules.py" in message, message


@pytest.mark.parametrize("batch, nano", [(3, 2), (5, 3), (2, 2), (4, 3)])
@pytest.mark.parametrize("form", ["squeeze()", "squeeze(0)", "squeeze((0, 1))"])
def test_squeeze_keeps_the_batch_dim_of_a_one_row_nano_batch(form, batch, nano):
    """A no-op on the whole batch (Dynamo's batch size is at least 2), ``squeeze`` would drop the batch dim of
    a nano-batch of one row, so the op after it reduces another dim: it runs on the whole batch instead."""
    squeeze = {"squeeze()": lambda h: h.squeeze(), "squeeze(0)": lambda h: h.squeeze(0),
               "squeeze((0, 1))": lambda h: h.squeeze((0, 1))}[form]
    torch.manual_seed(0)
    model = Around(lambda h: squeeze(h[:, None]).sum(1, keepdim=True) * h)
    x = torch.randn(batch, 8)
    with torch.no_grad():
        ref = model(x)
        compiled = dynaflow.compile(copy.deepcopy(model), strategy="round_robin", nano_batches=nano, executor="serial")
        torch.testing.assert_close(compiled(x), ref, atol=1e-5, rtol=1e-5)
    kept = [s for s in compiled.last_graph.segmented.segments if s.kind.value == "barrier"]
    assert any("squeezes the batch dim" in (s.reason or "") for s in kept), compiled.explain()
    with torch.no_grad():  # a named other dim keeps the split
        named = dynaflow.compile(Around(lambda h: h[:, None].squeeze(1) * 2), **RR)
        named(x)
    assert all(s.kind.value != "barrier" for s in named.last_graph.segmented.segments), named.explain()


class _Table(nn.Module):
    """``Linear(8, 8)`` and a batch-free ``(16, 8)`` table for the indexing cases below."""

    def __init__(self, fn):
        super().__init__()
        self.lin, self.tab, self.fn = nn.Linear(8, 8), nn.Parameter(torch.randn(16, 8)), fn

    def forward(self, x):
        return self.fn(self, x)


def _ids(x, k=8):
    return (x.abs() * 7).long() % k


INDEXING = {
    # row i of the index reads row i of a batch-free table: the row's position in the batch matters
    "gather_batch_free_table": lambda m, x: torch.gather(m.tab, 1, _ids(m.lin(x))),
    # data with 2 rows per batch item against an index with one: row i pairs with row i, not with item i
    "gather_two_rows_per_item": lambda m, x: torch.gather(m.lin(x).repeat_interleave(2, 0), 1, _ids(x)),
    "scatter_two_rows_per_item": lambda m, x: torch.scatter(m.lin(x).repeat_interleave(2, 0), 1, _ids(x), x),
    "scatter_add_two_rows_per_item": lambda m, x: m.lin(x).repeat_interleave(2, 0).scatter_add(1, _ids(x), x),
    # a 1-D index built from the rows: every row gets every column it lists
    "index_fill_batch_index": lambda m, x: m.lin(x).index_fill(1, _ids(x[:, 0]), 0.0),
    "index_add_batch_index": lambda m, x: m.lin(x).index_add(1, _ids(x[:, 0]), x[:, :1].expand(-1, x.shape[0])),
    # row-local: the same rows everywhere (kept split)
    "gather_same_rows": lambda m, x: torch.gather(m.lin(x), 1, _ids(x)),
    "index_copy_batch_free_index": lambda m, x: m.lin(x).index_copy(1, torch.tensor([3, 1]), x[:, :2] * 2),
}


@pytest.mark.parametrize("batch, nano", [(6, 2), (5, 3), (7, 2)])
@pytest.mark.parametrize("name", sorted(INDEXING))
def test_gather_scatter_and_index_ops_pair_rows_as_eager_does(name, batch, nano):
    torch.manual_seed(0)
    model = _Table(INDEXING[name])
    x = torch.randn(batch, 8)
    compiled = dynaflow.compile(copy.deepcopy(model), strategy="round_robin", nano_batches=nano, executor="serial")
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), atol=1e-5, rtol=1e-5)
    barriers = [s for s in compiled.last_graph.segmented.segments if s.kind.value == "barrier"]
    assert bool(barriers) == (name not in ("gather_same_rows", "index_copy_batch_free_index")), compiled.explain()


def test_a_graph_after_a_break_with_fewer_rows_than_nano_batches_runs_with_fewer():
    """``nano_batches`` is asked for the call's batch; a graph after a graph break may hold fewer rows."""
    class Halves(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(8, 8)

        def forward(self, x):
            keep = (torch.arange(x.shape[0]) % 2 == 0).nonzero().squeeze(1)  # a graph break: data-dependent rows
            return self.lin(self.lin(x)[keep])

    torch.manual_seed(0)
    model = Halves()
    compiled = dynaflow.compile(copy.deepcopy(model), strategy="round_robin", nano_batches=3, executor="serial")
    with torch.no_grad():
        for batch in (6, 4):
            x = torch.randn(batch, 8)
            torch.testing.assert_close(compiled(x), model(x), atol=1e-5, rtol=1e-5)
    with pytest.raises(dynaflow.ConfigError, match="nano_batches=3 is invalid for a batch of 2 rows"), torch.no_grad():
        compiled(torch.randn(2, 8))  # the call's own batch: the count is an error, as documented


class _CountsRows(nn.Module):
    """A Python counter of the rows seen: Dynamo returns its new value, ``seen + B``, as a graph output."""

    def __init__(self):
        super().__init__()
        self.lin, self.seen = nn.Linear(8, 8), 0

    def forward(self, x):
        self.seen += x.shape[0]
        return self.lin(x) * self.seen


def test_an_int_computed_from_the_batch_size_and_returned_is_the_whole_batchs():
    """``seen + B`` leaves the graph (the attribute's new value): computed per nano-batch it would use the
    nano-batch's size, so its node runs on the whole batch (it was a PartitionError that named no fix)."""
    model = _CountsRows()
    compiled = dynaflow.compile(copy.deepcopy(model), **RR)
    with torch.no_grad():
        for batch in (6, 5, 7, 4):
            x = torch.randn(batch, 8)
            torch.testing.assert_close(compiled(x), model(x), atol=1e-5, rtol=1e-5)
    assert compiled.model.seen == model.seen == 22


def test_sequence_first_attention_suggests_batch_dim_1():
    model = nn.TransformerEncoderLayer(8, 2, 16, dropout=0).eval()
    with pytest.raises(BatchCouplingError, match="batch_dim=1"), torch.no_grad():
        dynaflow.compile(model, strict=True, **RR)(torch.randn(5, 6, 8))
    torch._dynamo.reset()
    x = torch.randn(5, 6, 8)
    with torch.no_grad():
        compiled = dynaflow.compile(model, batch_dim=1, **RR)
        torch.testing.assert_close(compiled(x), model(x), atol=1e-5, rtol=1e-5)
    kinds = {s.kind.value for s in compiled.last_graph.segmented.segments}
    assert "split" in kinds


def test_overlapping_input_views_run_unsplit():
    def f(a, b):
        a.add_(1)
        return b * 2

    t = torch.arange(12.0).reshape(12, 1)
    ref_t = t.clone()
    ref = f(ref_t[0:6], ref_t[3:9])
    compiled = dynaflow.compile(f, **RR)
    out = compiled(t[0:6], t[3:9])
    assert torch.equal(out, ref) and torch.equal(t, ref_t)
    assert compiled.last_graph.last_plan.split.num == 1  # overlapping views of a written input: unsplit
    disjoint = torch.arange(12.0).reshape(12, 1)
    compiled(disjoint[0:6], disjoint[6:12])
    assert compiled.last_graph.last_plan.split.num == 2


def test_inputs_sharing_memory_through_two_storages_run_unsplit():
    """``torch.from_numpy`` of overlapping numpy slices gives two storage objects over the same memory: the
    overlap check compares addresses, not storage objects."""
    np = pytest.importorskip("numpy")

    def f(a, b):
        a.add_(1)
        return b * 2

    arr = np.arange(12.0, dtype=np.float32).reshape(12, 1)
    ref_arr = arr.copy()
    compiled = dynaflow.compile(f, **RR)
    a, b = torch.from_numpy(arr[0:6]), torch.from_numpy(arr[3:9])
    assert a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr()
    out = compiled(a, b)
    ref = f(torch.from_numpy(ref_arr[0:6]), torch.from_numpy(ref_arr[3:9]))
    assert torch.equal(out, ref) and (arr == ref_arr).all()
    assert compiled.last_graph.last_plan.split.num == 1
    compiled(torch.from_numpy(arr[0:6]), torch.from_numpy(arr[6:12]))  # disjoint memory: split
    assert compiled.last_graph.last_plan.split.num == 2


def test_the_overlap_verdict_follows_the_inputs_from_call_to_call():
    """The verdict is kept for the last inputs' fingerprints (pointer, shape, strides): a call whose views move
    into or out of overlap, with the same shapes, is checked again; a repeat of the same views is not."""
    def f(a, b):
        a.add_(1)
        return b * 2

    compiled = dynaflow.compile(f, **RR)
    t = torch.arange(24.0).reshape(24, 1)
    ref_t = t.clone()
    for lo in (0, 3, 3, 6, 0, 6, 3):  # b = rows 6 - lo .. 12 - lo: it overlaps a = rows 0 .. 6 for lo > 0
        out = compiled(t[0:6], t[6 - lo:12 - lo])
        ref = f(ref_t[0:6], ref_t[6 - lo:12 - lo])
        assert torch.equal(out, ref) and torch.equal(t, ref_t), lo
        assert compiled.last_graph.last_plan.split.num == (1 if lo else 2), lo  # lo > 0: b overlaps a
    for lo in (0, 3, 0, 6, 5, 6, 0):  # now the written view moves (a = rows lo .. lo + 6) and b stays put
        out = compiled(t[lo:lo + 6], t[6:12])
        ref = f(ref_t[lo:lo + 6], ref_t[6:12])
        assert torch.equal(out, ref) and torch.equal(t, ref_t), lo
        assert compiled.last_graph.last_plan.split.num == (1 if lo else 2), lo


def test_an_overlap_check_after_a_clean_call_looks_at_the_moved_inputs_only():
    """``among``: the positions that changed since a call without overlap. Pairs of unchanged inputs are not
    looked at again; any pair with a moved side is, whether the moved side is the written one or not."""
    from dynaflow.frontend.differential import overlapping_writes

    t = torch.zeros(10, 4)
    assert overlapping_writes([t[0:5], t[4:9], t[3:4]], [0], among=[2]) == (0, 2)  # moved reader meets the write
    assert overlapping_writes([t[0:5], t[4:9], t[3:4]], [0], among=[0]) == (0, 1)  # moved write meets every input
    assert overlapping_writes([t[0:5], t[4:9], t[6:7]], [0], among=[2]) is None  # (0, 1) was not moved
    assert overlapping_writes([t[0:5], t[4:9]], [0], among=[]) is None


def test_overlap_detection_uses_storage_and_byte_ranges():
    from dynaflow.frontend.differential import overlapping_writes

    t = torch.zeros(10, 4)
    assert overlapping_writes([t[0:5], t[4:9]], [0]) == (0, 1)
    assert overlapping_writes([t[0:5], t[5:10]], [0]) is None
    assert overlapping_writes([t[:, 0:2], t[:, 2:4]], [0]) == (0, 1)  # interleaved columns share a byte range
    assert overlapping_writes([t[0:5], torch.zeros(5, 4)], [0]) is None
    assert overlapping_writes([t[0:5], t[0:5]], [1]) == (1, 0)
    # several storages, several written inputs: only views of a written input's storage are compared
    assert overlapping_writes([t[0:2], torch.zeros(3), t[2:4], t[3:5], t.T], [1, 2]) == (2, 3)
    assert overlapping_writes([t[0:2], torch.zeros(3), t[2:4]], [1, 2]) is None


def test_explain_names_barrier_nodes_and_why():
    compiled = dynaflow.compile(Around(torch.tril), **RR)
    with torch.no_grad():
        compiled(torch.randn(6, 8))
    text = compiled.explain()
    assert "barrier" in text and "tril" in text and "last 2 dims" in text


# -- the rule table against eager ---------------------------------------------------------------------------
aten = torch.ops.aten


def _dims(x, lo, hi):
    return [x.shape[i] for i in range(lo, hi)]  # symbolic_trace: sizes one by one (a Proxy is not iterable)


def _dim(draw, ndim):
    return draw(st.integers(0, ndim - 1))


@st.composite
def _op_cases(draw):
    """(name, fn(x) -> tensor, x, batch dim) drawn from the rule table's families."""
    name, fn, ndim, fixed = draw(_op_fns())
    bdim = draw(st.integers(0, ndim - 1), label="batch_dim")
    shape = fixed or [draw(st.integers(2, 4), label=f"size{i}") for i in range(ndim)]
    shape = list(shape)
    shape[bdim] = draw(st.integers(2, 5), label="batch")
    SHAPE[:] = shape
    SHAPE.append(bdim)
    return name, fn, torch.randn(*shape), bdim


SHAPE: list[int] = []
"""The concrete shape (then the batch dim) of the example: constants in the drawn functions use it, so
that symbolic tracing sees only the batch size as symbolic."""


@st.composite
def _op_fns(draw):
    """(name, fn(x), ndim, fixed shape or None)."""
    ndim = draw(st.integers(1, 4))
    d = _dim(draw, ndim)
    keep = draw(st.booleans())
    family = draw(st.sampled_from([
        "unary", "binary", "sum", "mean", "amax", "var", "softmax", "log_softmax", "cumsum", "sort", "topk", "flip",
        "roll", "transpose", "permute", "unsqueeze", "select", "slice", "split", "unbind", "index_select", "gather",
        "cat", "pad", "repeat", "tril", "mm_right", "mm_left", "bmm", "layer_norm", "view_merge", "view_split",
        "expand", "diagonal", "argmax", "logsumexp", "native_group_norm", "constant_fill", "index", "embedding", "sdpa", "gather_row0", "linear",
        "pixel_shuffle", "pixel_unshuffle", "im2col", "col2im", "upsample", "reflection_pad", "channel_shuffle",
        "nll_loss", "batch_norm", "linalg", "cdist", "bucketize", "searchsorted", "elementwise_extra", "grid_sample",
        "affine_grid", "max_unpool", "squeeze",
    ]))
    if family in ("pixel_shuffle", "pixel_unshuffle", "im2col", "upsample", "channel_shuffle"):
        op = {"pixel_shuffle": lambda x: aten.pixel_shuffle.default(x, 2),
              "pixel_unshuffle": lambda x: aten.pixel_unshuffle.default(x, 2),
              "im2col": lambda x: aten.im2col.default(x, [2, 2], [1, 1], [0, 0], [2, 2]),
              "upsample": lambda x: aten.upsample_bilinear2d.default(x, [5, 3], False),
              "channel_shuffle": lambda x: aten.channel_shuffle.default(x, 2)}[family]
        return family, op, 4, (3, 4, 4, 2)
    if family == "col2im":
        return family, lambda x: aten.col2im.default(x, [4, 4], [2, 2], [1, 1], [0, 0], [2, 2]), 3, (2, 8, 4)
    if family == "reflection_pad":
        return family, lambda x: aten.reflection_pad2d.default(x, [1, 1, 1, 0]), 3, (2, 3, 3)
    if family == "nll_loss":
        reduction = draw(st.sampled_from([0, 1]))
        return family, lambda x: aten.nll_loss_forward.default(
            x.log_softmax(-1), (x.abs() * 7).long()[:, 0] % x.shape[-1], None, reduction, -100)[0], 2, None
    if family == "unary":
        op = draw(st.sampled_from([aten.exp.default, aten.relu.default, aten.neg.default, aten.sigmoid.default]))
        return family, lambda x: op(x), ndim, None
    if family == "binary":
        bshape = [draw(st.sampled_from([1, "same"])) for _ in range(ndim)]
        op = draw(st.sampled_from([aten.add.Tensor, aten.mul.Tensor, aten.maximum.default]))
        return family, lambda x: op(x, torch.ones([SHAPE[i] if s == "same" and i != SHAPE[-1] else 1
                                                   for i, s in enumerate(bshape)]) * 0.5), ndim, None
    if family in ("sum", "mean", "amax", "argmax", "logsumexp"):
        op = {"sum": aten.sum.dim_IntList, "mean": aten.mean.dim, "amax": aten.amax.default,
              "argmax": aten.argmax.default, "logsumexp": aten.logsumexp.default}[family]
        return family, lambda x: op(x, d if family == "argmax" else [d], keep), ndim, None
    if family == "var":
        return family, lambda x: aten.var.correction(x, [d], correction=0, keepdim=keep), ndim, None
    if family in ("softmax", "log_softmax"):
        op = aten._softmax.default if family == "softmax" else aten._log_softmax.default
        return family, lambda x: op(x, d, False), ndim, None
    if family == "cumsum":
        return family, lambda x: aten.cumsum.default(x, d), ndim, None
    if family == "sort":
        return family, lambda x: aten.sort.default(x, d)[0], ndim, None
    if family == "topk":
        return family, lambda x: aten.topk.default(x, 1, d)[0], ndim, None
    if family == "flip":
        return family, lambda x: aten.flip.default(x, [d]), ndim, None
    if family == "roll":
        return family, lambda x: aten.roll.default(x, [1], [d]), ndim, None
    if family == "transpose":
        e = _dim(draw, ndim)
        return family, lambda x: aten.transpose.int(x, d, e).contiguous(), ndim, None
    if family == "permute":
        perm = draw(st.permutations(list(range(ndim))))
        return family, lambda x: aten.permute.default(x, perm).contiguous(), ndim, None
    if family == "unsqueeze":
        e = draw(st.integers(0, ndim))
        return family, lambda x: aten.unsqueeze.default(x, e), ndim, None
    if family == "squeeze":  # a 1-row nano-batch must not lose its batch dim
        which = draw(st.sampled_from(["all", "dim", "dims"]))
        op = {"all": lambda x: aten.squeeze.default(x), "dim": lambda x: aten.squeeze.dim(x, d),
              "dims": lambda x: aten.squeeze.dims(x, [d, (d + 1) % ndim])}[which]
        return f"squeeze_{which}", lambda x: op(x) * 2, ndim, None
    if family == "select":
        return family, lambda x: aten.select.int(x, d, 0), ndim, None
    if family == "slice":
        return family, lambda x: aten.slice.Tensor(x, d, 0, 1), ndim, None
    if family == "split":
        return family, lambda x: aten.split.Tensor(x, 1, d)[0], ndim, None
    if family == "unbind":
        return family, lambda x: aten.unbind.int(x, d)[0], ndim, None
    if family == "index_select":
        return family, lambda x: aten.index_select.default(x, d, torch.tensor([1, 0])), ndim, None
    if family == "gather":
        return family, lambda x: aten.gather.default(x, d, torch.zeros_like(x, dtype=torch.long)), ndim, None
    if family == "linear":
        return family, lambda x: aten.linear.default(x, torch.ones(3, SHAPE[-2]) / 3, torch.ones(3)), ndim, None
    if family == "gather_row0":  # an index that is size 1 along the batch: it reads row 0 only
        return family, lambda x: aten.gather.default(x, (SHAPE[-1] + 1) % len(SHAPE[:-1]), torch.zeros(
            [1 if i == SHAPE[-1] else 1 for i in range(len(SHAPE) - 1)], dtype=torch.long)), ndim, None
    if family == "cat":
        return family, lambda x: aten.cat.default([x, x * 2], d), ndim, None
    if family == "pad":
        e = _dim(draw, ndim)
        return family, lambda x: aten.constant_pad_nd.default(x, [0, 0] * (ndim - 1 - e) + [1, 1], 0.0), ndim, None
    if family == "index":
        return family, lambda x: aten.index.Tensor(x, [None] * d + [torch.tensor([1, 0])]), ndim, None
    if family == "embedding":
        return family, lambda x: aten.embedding.default(torch.arange(12.0).reshape(6, 2), (x.abs() * 2).long() % 6), ndim, None
    if family == "sdpa":
        return (family, lambda x: aten._scaled_dot_product_flash_attention_for_cpu.default(x, x, x)[0], 4,
                None)
    if family == "repeat":
        return family, lambda x: aten.repeat.default(x, [2 if i == d else 1 for i in range(ndim)]), ndim, None
    if family == "tril":
        return family, lambda x: aten.tril.default(x), max(ndim, 2), None
    if family == "mm_right":
        return family, lambda x: aten.mm.default(x, torch.ones(SHAPE[1], 3) / 3), 2, None
    if family == "mm_left":
        return family, lambda x: aten.mm.default(torch.ones(3, SHAPE[0]) / 3, x), 2, None
    if family == "bmm":
        return family, lambda x: aten.bmm.default(x, aten.transpose.int(x, 1, 2)), 3, None
    if family == "layer_norm":
        n = draw(st.integers(1, ndim))
        return family, lambda x: aten.native_layer_norm.default(x, _dims(x, ndim - n, ndim), None, None, 1e-5)[0], ndim, None
    if family == "view_merge" and ndim >= 2:
        e = draw(st.integers(0, ndim - 2))
        return family, lambda x: aten.view.default(x.contiguous(), _dims(x, 0, e) + [x.shape[e] * x.shape[e + 1]]
                                                   + _dims(x, e + 2, ndim)), ndim, None
    if family == "view_split":
        return family, lambda x: aten.view.default(x, _dims(x, 0, d) + [x.shape[d], 1] + _dims(x, d + 1, ndim)), ndim, None
    if family == "expand":
        return family, lambda x: aten.expand.default(aten.unsqueeze.default(x, 0), [2] + _dims(x, 0, ndim)), ndim, None
    if family == "diagonal" and ndim >= 2:
        e = (d + 1) % ndim
        return family, lambda x: aten.diagonal.default(x, 0, d, e), ndim, None
    if family == "linalg":  # a batch of 3x3 problems; the batch may land in the matrix dims (then it couples)
        which = draw(st.sampled_from(["inv", "det", "slogdet", "eigh", "qr", "svd", "solve", "solve_vec", "cholesky",
                                      "lu_solve", "triangular", "matrix_exp"]))

        def spd(x):
            return x @ x.transpose(-1, -2) + 3 * torch.eye(3)

        op = {"inv": lambda x: torch.linalg.inv(spd(x)), "det": lambda x: torch.linalg.det(spd(x)),
              "slogdet": lambda x: torch.linalg.slogdet(spd(x))[1], "eigh": lambda x: torch.linalg.eigvalsh(spd(x)),
              "qr": lambda x: torch.linalg.qr(x)[1].abs(), "svd": lambda x: torch.linalg.svdvals(x),
              "solve": lambda x: torch.linalg.solve(spd(x), x), "solve_vec": lambda x: torch.linalg.solve(spd(x), x[..., 0]),
              "cholesky": lambda x: torch.linalg.cholesky(spd(x)),
              "lu_solve": lambda x: (lambda f: torch.linalg.lu_solve(f[0], f[1], x))(torch.linalg.lu_factor(spd(x))),
              "triangular": lambda x: torch.linalg.solve_triangular(torch.linalg.cholesky(spd(x)), x, upper=False),
              "matrix_exp": lambda x: torch.linalg.matrix_exp(x * 0.1)}[which]
        return f"linalg_{which}", op, 3, (2, 3, 3)
    if family == "cdist":  # against itself (batch in the leading dim or the rows) or a batch-free point set
        other = draw(st.sampled_from(["self", "fixed"]))
        return family, (lambda x: torch.cdist(x, x.flip(-1))) if other == "self" else (
            lambda x: torch.cdist(x, torch.linspace(-1, 1, 2 * SHAPE[1]).view(2, SHAPE[1]))), 2, (3, 4)
    if family == "bucketize":
        return family, lambda x: torch.bucketize(x, torch.tensor([-1.0, 0.0, 0.5])).float(), ndim, None
    if family == "searchsorted":
        return family, lambda x: torch.searchsorted(torch.tensor([-1.0, 0.0, 0.5]), x.contiguous()).float(), ndim, None
    if family == "elementwise_extra":
        which = draw(st.sampled_from(["hardswish", "log_sigmoid", "isin", "prelu"]))
        op = {"hardswish": lambda x: aten.hardswish.default(x), "log_sigmoid": lambda x: aten.log_sigmoid_forward(x)[0],
              "isin": lambda x: torch.isin((x * 3).round(), torch.tensor([0.0, 1.0])).float(),
              "prelu": lambda x: torch.nn.functional.prelu(  # a weight per channel (one when they are the batch)
                  x, torch.linspace(0.1, 0.3, SHAPE[1]) if SHAPE[-1] != 1 else torch.tensor([0.2]))}[which]
        return which, op, 3, (2, 3, 2)
    if family == "grid_sample":  # a grid per sample made from it, or a fixed one (the batch then in the channels)
        shared = draw(st.booleans())
        return family, lambda x: torch.nn.functional.grid_sample(
            x, torch.linspace(-1, 1, SHAPE[0] * 8).view(SHAPE[0], 2, 2, 2) if shared and SHAPE[-1] != 0
            else x[:, :2].permute(0, 2, 3, 1).tanh(), align_corners=False), 4, (2, 3, 4, 4)
    if family == "affine_grid":
        return family, lambda x: aten.affine_grid_generator.default(x, [x.shape[0], 1, 4, 5], False), 3, (3, 2, 3)
    if family == "max_unpool":
        def unpool(x):
            pooled = aten.max_pool2d_with_indices.default(x, [2, 2])
            return aten.max_unpool2d.default(pooled[0], pooled[1], [4, 4])

        return family, unpool, 4, (2, 3, 4, 4)
    if family == "batch_norm":  # per-channel weights (batch data when the batch is the channel dim)
        training = draw(st.booleans())
        return family, lambda x: aten.native_batch_norm.default(
            x, torch.linspace(0.5, 1.5, x.shape[1]), torch.linspace(-1.0, 1.0, x.shape[1]), None if training else
            torch.linspace(-0.2, 0.2, x.shape[1]), None if training else torch.linspace(0.5, 2.0, x.shape[1]),
            training, 0.1, 1e-5)[0], 3, None
    if family == "native_group_norm":
        return family, lambda x: aten.native_group_norm.default(x, None, None, x.shape[0], x.shape[1], 1, 2, 1e-5)[0], 2, (2, 4)
    return "constant_fill", lambda x: aten.new_zeros.default(x, [x.shape[d], 2]) + 1, ndim, None


class _One(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


@given(case=_op_cases())
def test_rule_table_row_local_claims_hold_against_eager(case):
    name, fn, x, bdim = case
    batch = x.shape[bdim]
    try:
        ref = fn(x)
    except (RuntimeError, IndexError, ValueError):
        return  # not a valid call for this shape (eager rejects it too)
    gm = torch.fx.symbolic_trace(_One(fn))
    try:
        symbolize(gm, [x], bdim)
    except dynaflow.errors.CaptureError:
        return  # the op specializes the batch size (no symbolic trace possible)
    batch_sym = find_batch_symbol(gm, bdim)
    if batch_sym is None:
        return  # the op fixed the batch size (a constant of that size): Dynamo would specialize too
    ba = analyze(gm, batch_sym)
    if ba.coupling:
        return  # a barrier: always correct
    out_node = gm.graph.output_node().args[0]
    out_dim = ba.dims.get(out_node)
    h = batch // 2
    parts = [fn(x.narrow(bdim, 0, h)), fn(x.narrow(bdim, h, batch - h))]
    if isinstance(out_dim, int):
        merged = torch.cat(parts, dim=out_dim)
        torch.testing.assert_close(merged, ref, atol=1e-5, rtol=1e-5, msg=f"{name}: split != whole")
    else:
        for p in parts:
            torch.testing.assert_close(p, ref, msg=f"{name}: batch-free result depends on the rows")


TRAILING = {
    "unfold_fold": lambda x: F.fold(F.unfold(x, 2, stride=2) * 2, (6, 6), 2, stride=2),
    "pixel_shuffle": lambda x: F.pixel_unshuffle(F.pixel_shuffle(x[:, :4], 2).relu(), 2),
    "interpolate": lambda x: F.interpolate(F.pad(x, (1, 1, 1, 1), mode="reflect"), size=(5, 7), mode="bilinear"),
    "cross_entropy_none": lambda x: F.cross_entropy(x, (x[:, 0].abs() * 3).long() % 3, reduction="none"),
    "channel_shuffle": lambda x: F.channel_shuffle(x * 2, 3) if hasattr(F, "channel_shuffle") else x * 2,
}


@pytest.mark.parametrize("name", sorted(TRAILING))
def test_ops_over_trailing_dims_split_and_equal_eager(name):
    """Resampling, padding, patch and per-sample loss ops (rules above the property test's reach where Dynamo
    alone keeps the batch symbolic): split, never a barrier, and equal to eager at three batch sizes."""
    fn = TRAILING[name]
    compiled = dynaflow.compile(fn, **RR)
    for batch in (3, 4, 6):
        x = torch.randn(batch, 6, 6, 6, generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            torch.testing.assert_close(compiled(x), fn(x))
    kinds = [s.kind for s in compiled.last_graph.segmented.segments]
    assert kinds == [dynaflow.SegmentKind.SPLIT], compiled.explain()


@torch.library.custom_op("dftest_rules::center", mutates_args=())
def _center(x: torch.Tensor) -> torch.Tensor:
    return x - x.mean(0)  # couples the rows of dim 0


@_center.register_fake
def _(x):
    return torch.empty_like(x)


def test_a_rule_naming_an_argument_the_op_lacks_couples():
    """A rule written for an argument ``input`` on an op whose argument is ``x`` cannot see the batch tensor:
    it must not pass the op as row-local (it did, an absent argument reading as batch-free: wrong rows)."""
    from dynaflow.frontend.aten_rules import last_dims, register_batch_rule

    register_batch_rule("dftest_rules::center", last_dims(1, "input"))
    compiled = dynaflow.compile(lambda x: torch.ops.dftest_rules.center(x) * 2, **RR)
    x = torch.randn(4, 3)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), (x - x.mean(0)) * 2)
    reasons = [s.reason for s in compiled.last_graph.segmented.segments if s.kind is dynaflow.SegmentKind.BARRIER]
    assert len(reasons) == 1 and "has no argument 'input'" in reasons[0], compiled.explain()


UNRULED = [aten.trace.default, aten.histc.default, aten.nonzero.default, aten.masked_select.default,
           aten.kron.default, aten.cross.default, aten.linalg_cross.default,
           aten.take.default, aten.put.default, aten.unique_dim.default, aten.rot90.default, aten.cholesky.default,
           aten.addbmm.default, aten.block_diag.default, aten.tensordot.default]


@pytest.mark.parametrize("op", UNRULED, ids=str)
def test_ops_outside_the_table_couple(op):
    assert rule_for(op) is None, f"{op} has a rule: move it out of UNRULED"
    from dynaflow.frontend.aten_trace import Dispatched
    from dynaflow.frontend.batching import BatchAnalysis, _Placements

    gm = torch.fx.symbolic_trace(_One(lambda x: x + 1))
    x = torch.randn(4, 3)
    symbolize(gm, [x], 0)
    sym = find_batch_symbol(gm, 0)
    fake = next(iter(gm.graph.find_nodes(op="placeholder"))).meta["val"]
    ba = BatchAnalysis(gm, sym)
    reason, _ = ba._check_call(Dispatched(op, (fake,), {}, fake), _Placements({id(fake): 0}, sym))
    assert reason and "no batch rule" in reason


@torch.library.custom_op("dftest_rules::add_row_bias", mutates_args=())
def _add_row_bias(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return x + bias[: x.shape[0]]  # row i of x gets row i of bias: bias is batch data the fake kernel never ties


@_add_row_bias.register_fake
def _(x, bias):
    return torch.empty_like(x)


@pytest.mark.parametrize("tied", [False, True])
def test_an_input_with_its_own_batch_symbol_never_meets_the_batch_unsplit(tied):
    """Both inputs carry the batch at dim 0, but the only op that meets them has a fake kernel that checks no
    shapes, so Dynamo gives them two symbols. The analysis took the second input as batch-free and handed
    every nano-batch all of its rows (silently wrong). It is now a barrier naming the symbol and the fix; with
    the fix (``torch._check`` tying the sizes) the op splits."""
    from dynaflow.frontend.aten_rules import register_batch_rule

    # the user's rule: rows of x at dim 0; the bias either holds the same rows or is batch-free
    register_batch_rule("dftest_rules::add_row_bias",
                        lambda call: None if call.dim("x") in (None, 0) and call.dim("bias") in (None, 0) else "no")

    def fn(x, bias):
        if tied:
            torch._check(bias.shape[0] == x.shape[0])
        return torch.ops.dftest_rules.add_row_bias(x * 2, bias) + 1

    compiled = dynaflow.compile(fn, **RR)
    for batch in (4, 6):
        g = torch.Generator().manual_seed(batch)
        x, bias = torch.randn(batch, 3, generator=g), torch.randn(batch, 3, generator=g)
        with torch.no_grad():
            torch.testing.assert_close(compiled(x, bias), fn(x, bias))
    reasons = [s.reason for s in compiled.last_graph.segmented.segments if s.kind is dynaflow.SegmentKind.BARRIER]
    if tied:
        assert reasons == [], compiled.explain()
    else:
        assert len(reasons) == 1 and "never tied to the batch" in reasons[0] and "torch._check" in reasons[0]


# -- batch rows interleaved with outer rows inside one node (``(L, B, E) -> (L*B, E)``) ----------------------
_LIB = torch.library.Library("dftest_rows", "DEF")
_W = torch.randn(6, 5, generator=torch.Generator().manual_seed(7))
_INTERLEAVED = {
    # name: (body of a one-node op on x [L=3, B, 6], whether the batch analysis may split it)
    "project_rows": (lambda x, w: (x.reshape(-1, 6) @ w).reshape(3, -1, 5), True),   # MHA's projections
    "scale_then_back": (lambda x, w: (x.reshape(-1, 6) * 2 + 1).view(3, -1, 6), True),
    "regroup_items": (lambda x, w: x.reshape(-1, 6).reshape(-1, 3, 6)[:, 0], False),   # rows of other items
    "return_interleaved": (lambda x, w: x.reshape(-1, 6) * 2, False),                    # (3*B, 6) as B-outer: wrong
    "softmax_across_rows": (lambda x, w: x.reshape(-1, 6).softmax(0).reshape(3, -1, 6), False),
    "cumsum_across_rows": (lambda x, w: x.reshape(-1, 6).cumsum(0).reshape(3, -1, 6), False),
    "mix_with_plain_rows": (lambda x, w: (x.reshape(-1, 6) + x.transpose(0, 1).reshape(-1, 6)).reshape(3, -1, 6),
                            False),
}
for _name, (_body, _) in _INTERLEAVED.items():
    _LIB.define(f"{_name}(Tensor x, Tensor w) -> Tensor")
    _LIB.impl(_name, _body, "CompositeImplicitAutograd")


@pytest.mark.parametrize("name", sorted(_INTERLEAVED))
def test_batch_rows_interleaved_inside_one_node_split_only_when_restored(name):
    """A node whose ATen ops fold outer rows into the batch dim (``nn.MultiheadAttention`` flattens
    ``(L, B, E)`` to ``(L*B, E)`` around its projections) splits when every op on the folded rows keeps them
    apart and a view gives the batch its own dim back; otherwise it is a barrier. Either way it equals eager."""
    body, splits = _INTERLEAVED[name]
    op = getattr(torch.ops.dftest_rows, name)
    compiled = dynaflow.compile(lambda x, w: op(x, w) * 1.5, batch_dim=1, **RR)
    for batch in (4, 5, 2):
        x = torch.randn(3, batch, 6, generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            torch.testing.assert_close(compiled(x, _W), body(x, _W) * 1.5)
    kinds = {s.kind for s in compiled.last_graph.segmented.segments}
    assert (dynaflow.SegmentKind.BARRIER not in kinds) == splits, compiled.explain()


@pytest.mark.parametrize("batch_first", [False, True], ids=["seq-first", "batch-first"])
def test_multihead_attention_splits_and_equals_eager(batch_first):
    """``nn.MultiheadAttention`` (outputs and averaged weights, with a key padding mask): one node whose
    projections interleave the batch rows. It splits and equals eager (it was a barrier)."""
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2, batch_first=batch_first).eval()

    def fn(x):  # pad the keys whose first feature exceeds 1 (a [batch, keys] mask)
        return mha(x, x, x, key_padding_mask=(x[..., 0] if batch_first else x[..., 0].transpose(0, 1)) > 1.0)

    compiled = dynaflow.compile(fn, batch_dim=0 if batch_first else 1, **RR)
    for batch in (4, 5):
        g = torch.Generator().manual_seed(batch)
        x = torch.randn(batch, 6, 8, generator=g) if batch_first else torch.randn(6, batch, 8, generator=g)
        with torch.no_grad():
            for got, want in zip(compiled(x), fn(x), strict=True):
                torch.testing.assert_close(got, want)
    assert [s.kind for s in compiled.last_graph.segmented.segments] == [dynaflow.SegmentKind.SPLIT], \
        compiled.explain()


# -- batch positions made inside one node (``arange(0, k·B, k)``: F.embedding_bag's offsets) -----------------
_BAGS = torch.randn(20, 6, generator=torch.Generator().manual_seed(11))


def _bag_offsets(ids: torch.Tensor) -> torch.Tensor:
    return torch.arange(0, ids.numel(), ids.shape[1])


_POSITIONS = {
    # name: (body of a one-node op on ids [B, 4] and a table [20, 6], whether the batch analysis may split it)
    "bag_per_row": (lambda ids, w: torch.embedding_bag(w, ids.reshape(-1), _bag_offsets(ids))[0], True),
    "positions_as_values": (lambda ids, w: w[ids].sum(1) + torch.arange(ids.shape[0]).unsqueeze(1), False),
    "positions_returned": (lambda ids, w: torch.arange(ids.shape[0]), False),
    "bag_of_each_index": (lambda ids, w: aten._embedding_bag(w, ids.reshape(-1), _bag_offsets(ids), False, 2)[1]
                          .view(-1, 4).float() @ w[:4], False),  # offset2bag (mode max): each index's bag number
    "columns_as_bags": (lambda ids, w: torch.embedding_bag(w, ids.t().reshape(-1), _bag_offsets(ids))[0], False),
    "offsets_of_other_rows": (lambda ids, w: torch.embedding_bag(w, ids.repeat(1, 2).reshape(-1), _bag_offsets(ids))[0],
                              False),  # 4 per bag over 8 indices per row: bag b is half of row b // 2
}
_PLIB = torch.library.Library("dftest_positions", "DEF")
for _name, (_body, _) in _POSITIONS.items():
    _PLIB.define(f"{_name}(Tensor ids, Tensor w) -> Tensor")
    _PLIB.impl(_name, _body, "CompositeImplicitAutograd")


@pytest.mark.parametrize("name", sorted(_POSITIONS))
def test_batch_positions_inside_one_node_split_only_as_offsets_of_their_rows(name):
    """An arange over the batch inside one node gives each nano-batch its own positions (0.. its size). They
    split only as the offsets of their own rows (one bag per row of ``F.embedding_bag``); added to values,
    returned, regrouped or shifted they are a barrier. Either way the result equals eager."""
    body, splits = _POSITIONS[name]
    op = getattr(torch.ops.dftest_positions, name)
    compiled = dynaflow.compile(lambda ids, w: op(ids, w) * 1.5, **RR)
    for batch in (4, 5, 2):
        ids = torch.randint(0, 20, (batch, 4), generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            torch.testing.assert_close(compiled(ids, _BAGS), body(ids, _BAGS) * 1.5)
    kinds = {s.kind for g in compiled.graphs for s in g.segmented.segments}
    assert (dynaflow.SegmentKind.BARRIER not in kinds) == splits, compiled.explain()


@pytest.mark.parametrize("mode,weighted,padding_idx", [("sum", False, None), ("sum", True, None),
                                                       ("mean", False, 3), ("max", False, None)])
def test_embedding_bag_of_rows_splits_and_equals_eager(mode, weighted, padding_idx):
    """``nn.EmbeddingBag`` on a 2-D input (a bag per row: DLRM's sparse features) splits; on a flat input with
    its own offsets a nano-batch's bags would start elsewhere, so that stays a barrier."""
    torch.manual_seed(0)
    bag = nn.EmbeddingBag(20, 6, mode=mode, padding_idx=padding_idx).eval()

    def rows(ids, w):
        return bag(ids, per_sample_weights=w if weighted else None) * 2

    def flat(ids, offsets):
        return bag(ids, offsets) * 2

    compiled = dynaflow.compile(rows, **RR)
    for batch in (4, 5, 3):
        g = torch.Generator().manual_seed(batch)
        ids, w = torch.randint(0, 20, (batch, 3), generator=g), torch.rand(batch, 3, generator=g)
        with torch.no_grad():
            torch.testing.assert_close(compiled(ids, w), rows(ids, w))
    assert [s.kind for s in compiled.last_graph.segmented.segments] == [dynaflow.SegmentKind.SPLIT], \
        compiled.explain()
    compiled = dynaflow.compile(flat, **RR)
    ids, offsets = torch.randint(0, 20, (10,)), torch.tensor([0, 2, 3, 7])
    with torch.no_grad():
        torch.testing.assert_close(compiled(ids, offsets), flat(ids, offsets))
    assert dynaflow.SegmentKind.SPLIT not in {s.kind for s in compiled.last_graph.segmented.segments}


@pytest.mark.parametrize("rows,splits", [(0, True), (1, False)])
def test_a_slice_to_no_rows_splits_and_any_other_couples(rows, splits):
    """vLLM's modular MoE kernel cuts its workspaces from one batch-sized buffer, a workspace it does not need
    to zero rows (``buf.flatten()[:0].view(0)``): every nano-batch gets the same empty tensor, so that slice is
    row-local. Keeping the first row is not."""
    def fn(x):
        workspace = torch.empty(x.shape[0] * 8)
        unused = workspace.flatten()[:0].view(0)
        return x * 2 + unused.sum() + x[:rows].sum()

    compiled = dynaflow.compile(fn, **RR)
    for batch in (4, 5):
        x = torch.randn(batch, 8, generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            torch.testing.assert_close(compiled(x), fn(x))
    reasons = [s.reason for s in compiled.last_graph.segmented.segments if s.kind is dynaflow.SegmentKind.BARRIER]
    assert (reasons == []) == splits, compiled.explain()
    assert all("slice of the rows" in r for r in reasons), reasons


@pytest.mark.parametrize("name,make,splits", [
    ("affine", lambda: nn.InstanceNorm2d(4, affine=True), True),
    ("plain", lambda: nn.InstanceNorm2d(4), True),
    ("tracked_eval", lambda: nn.InstanceNorm2d(4, affine=True, track_running_stats=True).eval(), True),
    ("tracked_train", lambda: nn.InstanceNorm2d(4, affine=True, track_running_stats=True).train(), False),
])
def test_instance_norm_splits_unless_it_updates_running_statistics(name, make, splits):
    """``F.instance_norm`` folds ``(B, C, H, W)`` into ``(1, B·C, H, W)``, tiles its weight ``B`` times and runs
    batch norm in training mode: every batch row is a channel of its own, so it splits (it was a barrier: the
    tiling used the batch size, and training-mode batch norm was read as statistics over the batch). Updating
    running statistics averages over the batch, so that stays a barrier; outputs and statistics equal eager."""
    torch.manual_seed(0)
    model, reference = make(), make()
    if model.weight is not None:
        with torch.no_grad():
            model.weight.uniform_(0.5, 1.5)
            model.bias.uniform_(-0.5, 0.5)
    reference.load_state_dict(model.state_dict())
    compiled = dynaflow.compile(model, **RR)
    for batch in (4, 5):
        x = torch.randn(batch, 4, 5, 6, generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            torch.testing.assert_close(compiled(x), reference(x))
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(model.state_dict()[key], value, msg=key)
    reasons = [s.reason for s in compiled.last_graph.segmented.segments if s.kind is dynaflow.SegmentKind.BARRIER]
    assert (reasons == []) == splits, compiled.explain()


_THETA = torch.tensor([[0.9, 0.1, 0.0], [-0.1, 0.9, 0.1]])
_CENTROIDS = torch.randn(5, 6, generator=torch.Generator().manual_seed(3))
BATCHED_MATH = {
    # name: a model of x [B, 6, 6, 6] built from ATen's batched math (rules in frontend/aten_math.py)
    "spatial_transformer": lambda x: F.grid_sample(
        x, F.affine_grid(_THETA.expand(x.shape[0], 2, 3), list(x.shape), align_corners=False), align_corners=False),
    "distances_to_centroids": lambda x: torch.cdist(x.flatten(2).transpose(1, 2)[..., :6], _CENTROIDS).softmax(-1),
    "bucketize": lambda x: torch.bucketize(x, torch.tensor([-1.0, 0.0, 1.0])).float() + x,
    "batched_solve": lambda x: torch.linalg.solve(x[:, 0] @ x[:, 0].transpose(1, 2) + 6 * torch.eye(6), x[:, 1]),
    "inverse_and_logdet": lambda x: torch.linalg.inv(x[:, 0] @ x[:, 0].mT + torch.eye(6)) * torch.linalg.slogdet(
        x[:, 1] @ x[:, 1].mT + torch.eye(6))[1][:, None, None],
    "mobilenet_activations": lambda x: F.prelu(F.hardswish(x), torch.full((6,), 0.1)) + F.logsigmoid(x),
    "unpool": lambda x: F.max_unpool2d(*F.max_pool2d(x, 2, return_indices=True), 2),
}


@pytest.mark.parametrize("name", sorted(BATCHED_MATH))
def test_batched_math_splits_and_equals_eager(name):
    """Ops that solve one problem per row (matrices, point sets, sampling grids): split, never a barrier, and
    equal to eager at three batch sizes through Dynamo (each was a barrier: no rule)."""
    fn = BATCHED_MATH[name]
    compiled = dynaflow.compile(fn, **RR)
    for batch in (3, 4, 6):
        x = torch.randn(batch, 6, 6, 6, generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            torch.testing.assert_close(compiled(x), fn(x), rtol=1e-4, atol=1e-5)
    kinds = {s.kind for g in compiled.graphs for s in g.segmented.segments}
    assert kinds == {dynaflow.SegmentKind.SPLIT}, compiled.explain()


@pytest.mark.parametrize("name,fn,splits", [
    # Swin's pooler: the pooled (B, C, 1, 1) result is restrided to its transposed input's memory format
    ("pool_transposed", lambda x: torch.flatten(nn.functional.adaptive_avg_pool1d(x.transpose(1, 2), 1), 1), True),
    ("overlapping_rows", lambda x: x.contiguous().as_strided((x.shape[0], 6, 8), (8, 8, 1)) * 1, False),
    ("rows_of_another_length", lambda x: x.contiguous().as_strided((x.shape[0], 5, 8), (40, 8, 1)) * 1, False),
])
def test_as_strided_splits_only_when_it_keeps_every_address(name, fn, splits):
    """``as_strided`` that restates only the strides of size-1 dims keeps every element where it is: row-local.
    One that makes rows overlap or shifts them reads other rows' memory: a barrier."""
    compiled = dynaflow.compile(fn, **RR)
    for batch in (4, 5):
        x = torch.randn(batch + 1, 6, 8, generator=torch.Generator().manual_seed(batch))[:batch]
        with torch.no_grad():
            torch.testing.assert_close(compiled(x), fn(x))
    reasons = [s.reason for s in compiled.last_graph.segmented.segments if s.kind is dynaflow.SegmentKind.BARRIER]
    assert (reasons == []) == splits, compiled.explain()
