"""Batch analysis: which values carry the batch dimension, and which nodes couple rows of the batch.

A tensor carries the batch at dim ``d`` when its symbolic size there is ``k·B`` (``B`` the batch symbol,
``k`` free of ``B``) and at no other dim. A node *couples* the batch when running it on row slices could
change its result: it reduces over the batch (its output loses ``B``), works along the batch dim
(``cumsum``, ``sort``, ``cat``, ``softmax`` over dim 0, ...), changes the rows-per-item factor ``k`` (``repeat``,
``cat``), regroups a flattened batch dim, gathers rows by a tensor index, creates batch-position values
(``arange(B)``), draws random numbers, writes batch data into a batch-free tensor, or updates batch-free
state in place (``length.add_(n)`` on a graph input or buffer: once per nano-batch it would apply the update
several times). A segment holding such a node becomes a barrier (or an error under ``strict=True``).

An in-place write into a tensor that carries the batch at a batch-aligned dim (a static KV cache
``keys[B, heads, max_len, dim].index_copy_(2, pos, k)``) is batch-local: each nano-batch writes its own rows
through a view of the cache. The order of writes against reads of the same storage is kept by
:mod:`.effects`.

Worked example: in ``h - h.mean(0)`` the ``mean`` node couples (``(B, 16) → (16,)``); the ``sub`` does not.
"""

from __future__ import annotations

import operator
from typing import Any, Iterable

import sympy
import torch
import torch.fx

from dynaflow.frontend.effects import is_inplace, storage_root, write_target
from dynaflow.frontend.collectives import rows_across_ranks
from dynaflow.frontend.rules import op_short_name

__all__ = ["meta_val", "find_batch_symbol", "find_batch_source", "BatchAnalysis", "analyze"]

SYM = "sym"  # marker for an int value that depends on the batch size

_RANDOM = {"rand", "randn", "randint", "rand_like", "randn_like", "randint_like", "bernoulli", "multinomial",
           "normal", "uniform_", "normal_", "bernoulli_", "random_", "exponential_", "randperm"}
# op -> (positional index of the dim argument, keyword names, default dim or None when required)
_ALONG_DIM: dict[str, tuple[int, tuple[str, ...], Any]] = {
    "cumsum": (1, ("dim",), None), "cumprod": (1, ("dim",), None), "cummax": (1, ("dim",), None),
    "cummin": (1, ("dim",), None), "logcumsumexp": (1, ("dim",), None),
    "softmax": (1, ("dim",), None), "log_softmax": (1, ("dim",), None), "_softmax": (1, ("dim",), None),
    "sort": (1, ("dim",), -1), "argsort": (1, ("dim",), -1), "msort": (1, (), 0),
    "flip": (1, ("dims",), None), "roll": (2, ("dims",), "all"), "diff": (2, ("dim",), -1),
    "topk": (2, ("dim",), -1), "kthvalue": (2, ("dim",), -1), "cat": (1, ("dim",), 0), "concat": (1, ("dim",), 0),
    "concatenate": (1, ("dim", "axis"), 0), "narrow": (1, ("dim",), None), "index_select": (1, ("dim",), None),
    "gather": (1, ("dim",), None), "scatter": (1, ("dim",), None), "scatter_add": (1, ("dim",), None),
    "scatter_reduce": (1, ("dim",), None), "index_add": (1, ("dim",), None), "index_copy": (1, ("dim",), None),
    "index_fill": (1, ("dim",), None), "take_along_dim": (2, ("dim",), "all"), "unique": (99, ("dim",), "all"),
    "unique_consecutive": (99, ("dim",), "all"), "nonzero": (99, (), "all"), "histc": (99, (), "all"),
    "bincount": (99, (), "all"), "unbind": (1, ("dim",), 0), "select": (1, ("dim",), None),
    "split": (2, ("dim",), 0), "chunk": (2, ("dim",), 0), "tensor_split": (2, ("dim",), 0),
    "split_with_sizes": (2, ("dim",), 0), "movedim": (99, (), None),
}
_RESHAPE = {"view", "reshape", "flatten", "unflatten", "view_as", "reshape_as", "_unsafe_view", "ravel"}


def meta_val(node: torch.fx.Node) -> Any:
    """The fake/example value fx recorded for ``node`` (Dynamo: ``example_value``; export/FakeTensorProp: ``val``)."""
    return node.meta.get("val", node.meta.get("example_value"))


def _expr(x: Any) -> sympy.Expr:
    if isinstance(x, torch.SymInt):
        return x.node.expr
    return sympy.Integer(int(x))


def find_batch_source(gm: torch.fx.GraphModule, batch_dim: int) -> tuple[sympy.Symbol, int, int] | None:
    """``(symbol, input index, dim)``: the first graph input whose size at ``batch_dim`` is a plain symbol."""
    for i, node in enumerate(gm.graph.find_nodes(op="placeholder")):
        val = meta_val(node)
        if isinstance(val, torch.Tensor) and val.dim() > batch_dim:
            e = _expr(val.shape[batch_dim])
            if isinstance(e, sympy.Symbol):
                return e, i, batch_dim
    return None


def find_batch_symbol(gm: torch.fx.GraphModule, batch_dim: int) -> sympy.Symbol | None:
    """The batch symbol (see :func:`find_batch_source`), or None when the batch is static."""
    src = find_batch_source(gm, batch_dim)
    return src[0] if src else None


def _short(node: torch.fx.Node) -> str:
    return op_short_name(node)


class BatchAnalysis:
    """Per-node batch facts: ``dims[node]`` is the batch dim of its value (``None`` when batch-free, ``SYM``
    for a batch-dependent int, a tuple for multi-output nodes); ``coupling[node]`` says why it couples."""

    def __init__(self, gm: torch.fx.GraphModule, batch: sympy.Symbol | None):
        self.gm = gm
        self.batch = batch
        self.dims: dict[torch.fx.Node, Any] = {}
        self.coupling: dict[torch.fx.Node, str] = {}
        self.touches: set[torch.fx.Node] = set()
        self.positional: set[torch.fx.Node] = set()

    # -- classification of values -------------------------------------------------------------------
    def classify(self, val: Any) -> tuple[Any, str | None]:
        """(batch dim or None or SYM or tuple, problem) for one fake value."""
        B = self.batch
        if B is None:
            return None, None
        if isinstance(val, (tuple, list)):
            parts = [self.classify(v) for v in val]
            problem = next((p for _, p in parts if p), None)
            return tuple(d for d, _ in parts), problem
        if isinstance(val, torch.SymInt):
            return (SYM if B in val.node.expr.free_symbols else None), None
        if not isinstance(val, torch.Tensor):
            return None, None
        hits = [d for d, s in enumerate(val.shape) if B in _expr(s).free_symbols]
        if not hits:
            return None, None
        if len(hits) > 1:
            return None, f"its output {tuple(val.shape)} has the batch size in dims {hits}"
        d = hits[0]
        k = sympy.simplify(_expr(val.shape[d]) / B)
        if B in k.free_symbols:
            return None, f"its output size {val.shape[d]} at dim {d} is not a multiple k·{B} of the batch"
        return d, None

    def multiplier(self, val: torch.Tensor, dim: int) -> sympy.Expr:
        return sympy.simplify(_expr(val.shape[dim]) / self.batch)

    def of(self, a: Any) -> Any:
        return self.dims.get(a) if isinstance(a, torch.fx.Node) else None

    # -- the analysis -------------------------------------------------------------------------------
    def run(self) -> "BatchAnalysis":
        for node in self.gm.graph.nodes:
            if node.op == "output":
                continue
            dims, problem = self.classify(meta_val(node))
            if node.op == "call_function" and node.target is operator.getitem and isinstance(self.of(node.args[0]), tuple):
                idx = node.args[1]
                parent = self.of(node.args[0])
                dims = parent[idx] if isinstance(idx, int) and idx < len(parent) else dims
            self.dims[node] = dims
            if node.op in ("placeholder", "get_attr"):
                continue
            reason = problem or self._coupling(node, dims) or self._positional(node)
            if self._touches(node, dims):
                self.touches.add(node)
            if reason and self._touches(node, dims):
                self.coupling[node] = reason
            elif node not in self.coupling:
                state = self._state_update(node)
                if state:
                    self.coupling[node] = state
        return self

    def _state_update(self, node: torch.fx.Node) -> str | None:
        """An in-place write into a batch-free graph input or buffer (a step counter): it must run once per step.

        Run per nano-batch it would apply the update once per nano-batch (``n.add_(1)`` twice for two), so it is
        coupling even though no batch data flows into it.
        """
        if self.batch is None or not is_inplace(node):
            return None
        target = write_target(node)
        if target is None or self._carries(self.of(target)):
            return None
        root = storage_root(target)
        if root.op not in ("placeholder", "get_attr"):
            return None
        return (f"it updates {root.name!r}, a batch-free graph input or buffer, in place; it must run once per step, "
                "not once per nano-batch")

    def _positional(self, node: torch.fx.Node) -> str | None:
        """Track values derived from batch positions (``arange(B)``): they mean different rows per nano-batch.

        Using such a value as an *index* does not propagate it (the result holds the indexed data).
        """
        if node in self.coupling:
            return None
        short = _short(node)
        ins = self._inputs(node)
        if short in ("getitem", "index_select", "gather", "take", "take_along_dim", "index") and len(ins) > 1:
            ins = [ins[0]] if isinstance(node.args[0], torch.fx.Node) else ins
        src = next((a for a in ins if a in self.positional), None)
        if src is None:
            return None
        self.positional.add(node)
        return f"it uses batch-position values computed by {src.name!r}"

    def _inputs(self, node: torch.fx.Node) -> list[torch.fx.Node]:
        out: list[torch.fx.Node] = []
        torch.fx.node.map_arg((node.args, node.kwargs), lambda n: out.append(n) or n)
        return out

    @staticmethod
    def _carries(d: Any) -> bool:
        if isinstance(d, tuple):
            return any(BatchAnalysis._carries(x) for x in d)
        return isinstance(d, int) and not isinstance(d, bool)

    def _touches(self, node: torch.fx.Node, dims: Any) -> bool:
        ins = [self.of(a) for a in self._inputs(node)]
        return self._carries(dims) or any(self._carries(d) or d == SYM for d in ins) or dims == SYM

    def _coupling(self, node: torch.fx.Node, dims: Any) -> str | None:
        if self.batch is None:
            return None
        short = _short(node)
        inputs = self._inputs(node)
        batch_ins = [a for a in inputs if isinstance(self.of(a), int) and not isinstance(self.of(a), bool)]
        sym_in = any(self.of(a) == SYM for a in inputs) or any(
            isinstance(x, torch.SymInt) and self.batch in x.node.expr.free_symbols for x in _flat_consts(node))
        if not (batch_ins or sym_in or self._carries(dims)):
            return None
        val = meta_val(node)
        if short in _RANDOM or (short in ("dropout", "dropout_", "feature_dropout") and _dropout_training(node)):
            return "it draws random numbers, so a nano-batch would see a different random stream"
        if short == "arange" and sym_in:
            self.positional.add(node)
            return "it creates batch-position values (arange over the batch size)"
        if _is_inplace(node, short):
            target = node.args[0] if node.args else None
            if isinstance(target, torch.fx.Node) and not self._carries(self.of(target)):
                return "it writes batch data into a batch-free tensor in place"
        if batch_ins and not self._carries(dims) and _has_tensor(val):
            shape = tuple(val.shape) if isinstance(val, torch.Tensor) else type(val).__name__
            return f"it reduces over the batch: its output {shape} has no batch dim"
        src = node.args[0] if node.args else None
        src_dim = self.of(src) if isinstance(src, torch.fx.Node) else None
        if short in ("cat", "concat", "concatenate", "stack") and isinstance(src, (list, tuple)):
            carriers = [self.of(a) for a in src if isinstance(a, torch.fx.Node) and isinstance(self.of(a), int)]
            src_dim = carriers[0] if carriers else None
        if src_dim == 0 and rows_across_ranks(node):
            return (f"it exchanges rows of the batch dim (dim 0) between ranks ({short}): a nano-batch slice would "
                    "send different rows to each rank; put the batch in another dim (e.g. [world, batch, ...])")
        if short in _ALONG_DIM and isinstance(src_dim, int):
            reason = self._along_dim(node, short, src_dim, src)
            if reason:
                return reason
        if short in ("getitem", "__getitem__", "index", "index_put", "index_put_", "setitem") and isinstance(src_dim, int):
            idx = node.args[1] if len(node.args) > 1 else None
            if _has_tensor_index(idx):
                return "it indexes rows with a tensor index (a gather/scatter across the batch)"
        if short in _RESHAPE and isinstance(src_dim, int) and isinstance(dims, int):
            if not self._prefix_ok(meta_val(src), src_dim, val, dims):
                return (f"it regroups the batch dim: {tuple(meta_val(src).shape)} -> {tuple(val.shape)} does not keep "
                        f"the batch as the outermost factor")
        elif isinstance(src, torch.fx.Node) and isinstance(src_dim, int) and isinstance(dims, int) and isinstance(val, torch.Tensor):
            src_val = meta_val(src)
            if isinstance(src_val, torch.Tensor) and src_val.dim() == val.dim() and src_dim == dims:
                if sympy.simplify(self.multiplier(src_val, src_dim) - self.multiplier(val, dims)) != 0:
                    return (f"it changes the rows per batch item along the batch dim "
                            f"({src_val.shape[src_dim]} -> {val.shape[dims]})")
        return None

    def _along_dim(self, node: torch.fx.Node, short: str, src_dim: int, src: Any) -> str | None:
        pos, names, default = _ALONG_DIM[short]
        dim: Any = default
        for n in names:
            if n in node.kwargs:
                dim = node.kwargs[n]
        if len(node.args) > pos:
            dim = node.args[pos]
        if dim == "all" or dim is None:
            return f"it works on the whole tensor including the batch dim ({short})"
        ref = meta_val(src[0] if isinstance(src, (list, tuple)) else src)
        ndim = ref.dim() if isinstance(ref, torch.Tensor) else 0
        dims = dim if isinstance(dim, (list, tuple)) else [dim]
        try:
            norm = {int(d) % max(ndim, 1) for d in dims}
        except (TypeError, ValueError):
            return f"it works along a dim dynaflow cannot read ({dim!r}) in {short}"
        if src_dim in norm:
            return f"it works along the batch dim (dim={src_dim}) in {short}"
        return None

    def _prefix_ok(self, src: Any, src_dim: int, out: Any, out_dim: int) -> bool:
        if not isinstance(src, torch.Tensor) or not isinstance(out, torch.Tensor):
            return False
        pre_in = sympy.Mul(*[_expr(s) for s in src.shape[:src_dim]])
        pre_out = sympy.Mul(*[_expr(s) for s in out.shape[:out_dim]])
        return sympy.simplify(pre_in - pre_out) == 0

    def reasons(self, nodes: Iterable[torch.fx.Node]) -> list[tuple[torch.fx.Node, str]]:
        return [(n, self.coupling[n]) for n in nodes if n in self.coupling]


def analyze(gm: torch.fx.GraphModule, batch: sympy.Symbol | None) -> BatchAnalysis:
    return BatchAnalysis(gm, batch).run()


def _flat_consts(node: torch.fx.Node) -> list[Any]:
    out: list[Any] = []

    def walk(x: Any) -> None:
        if isinstance(x, (list, tuple)):
            for y in x:
                walk(y)
        elif isinstance(x, dict):
            for y in x.values():
                walk(y)
        else:
            out.append(x)

    walk((node.args, node.kwargs))
    return out


def _has_tensor(val: Any) -> bool:
    if isinstance(val, torch.Tensor):
        return True
    if isinstance(val, (list, tuple)):
        return any(_has_tensor(v) for v in val)
    return False


def _has_tensor_index(idx: Any) -> bool:
    if isinstance(idx, torch.fx.Node):
        return isinstance(meta_val(idx), torch.Tensor)
    if isinstance(idx, (list, tuple)):
        return any(_has_tensor_index(i) for i in idx)
    return False


def _dropout_training(node: torch.fx.Node) -> bool:
    training = node.kwargs.get("training", node.args[2] if len(node.args) > 2 else True)
    p = node.kwargs.get("p", node.args[1] if len(node.args) > 1 else 0.5)
    return bool(training) and p != 0


def _is_inplace(node: torch.fx.Node, short: str) -> bool:
    return is_inplace(node)
