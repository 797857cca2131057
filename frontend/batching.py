"""Batch analysis: which values carry the batch dimension, and which nodes couple rows of the batch.

Default deny: a node is row-local only when every ATen op it dispatches has a rule in
:mod:`.aten_rules` that proves running it on row slices and concatenating equals running it whole, for
the batch dims involved. Anything else couples, and the segment holding it becomes a barrier (or an
error under ``strict=True``). A missing rule costs speed, never correctness.

A tensor carries the batch at dim ``d`` when its symbolic size there is ``k·B`` (``B`` the batch symbol,
``k`` free of ``B``) and at no other dim. Around the rules, the analysis also couples: a value with the
batch in two dims or not a whole multiple of it, the batch size used as a value (arithmetic, a fill
value, a tensor made from it) rather than as a shape, random draws on batch data, writes of batch data
into a batch-free tensor, and in-place updates of batch-free state (a step counter: once per nano-batch
it would run several times).

Worked example: in ``h - h.mean(0)`` the ``mean`` node lowers to ``aten.mean.dim(h, [0])``, whose rule
says it reduces along the batch dim: it couples; ``aten.sub.Tensor`` is pointwise and does not.
"""

from __future__ import annotations

from typing import Any, Iterable

import sympy
import torch
import torch.fx

from dynaflow.frontend import aten_math, aten_table  # noqa: F401  (fill the rule registry with ATen's ops)
from dynaflow.frontend.aten_rules import RANDOM_AWARE, AtenCall, no_elements, rule_for
from dynaflow.frontend.aten_trace import Dispatched, bind, call_key, fake_mode_of, lower_node
from dynaflow.frontend.effects import META_INPLACE, storage_root, write_targets
from dynaflow.frontend.row_layout import layout_of, regroups, reshaped, size_expr, treats_rows_apart
from dynaflow.frontend.rules import op_short_name

__all__ = ["meta_val", "candidate_symbols", "find_batch_symbol", "find_batch_source", "BatchAnalysis", "analyze"]

SYM = "sym"  # marker for an int value that depends on the batch size

def meta_val(node: torch.fx.Node) -> Any:
    """The fake/example value fx recorded for ``node`` (Dynamo: ``example_value``; export/FakeTensorProp: ``val``)."""
    return node.meta.get("val", node.meta.get("example_value"))


def find_batch_source(gm: torch.fx.GraphModule, batch_dim: int) -> tuple[sympy.Symbol, int, int] | None:
    """``(symbol, input index, dim)``: the batch symbol and the first graph input that carries it.

    Candidates are the plain symbols at ``batch_dim`` of the graph inputs. Dynamo gives inputs whose sizes
    never meet different symbols (``input_ids`` and an ``attention_mask`` that only feeds the mask
    construction), so the batch is the candidate most values of the graph carry: the one the model body
    works on. Inputs with another symbol are batch-free to the analysis (they run whole), which is safe.
    """
    first = candidate_symbols(gm, batch_dim)
    if len(first) <= 1:
        return next(((sym, i, batch_dim) for sym, i in first.items()), None)
    carried = {sym: 0 for sym in first}
    for node in gm.graph.nodes:
        val = meta_val(node)
        if isinstance(val, torch.Tensor):
            syms = set().union(*(size_expr(s).free_symbols for s in val.shape)) if val.dim() else set()
            for sym in carried.keys() & syms:
                carried[sym] += 1
    best = max(first, key=lambda sym: (carried[sym], -first[sym]))
    return best, first[best], batch_dim


def candidate_symbols(gm: torch.fx.GraphModule, batch_dim: int) -> dict[sympy.Symbol, int]:
    """The plain symbols at ``batch_dim`` of the graph inputs, each with the first input that has it."""
    first: dict[sympy.Symbol, int] = {}
    for i, node in enumerate(gm.graph.find_nodes(op="placeholder")):
        val = meta_val(node)
        if isinstance(val, torch.Tensor) and val.dim() > batch_dim:
            e = size_expr(val.shape[batch_dim])
            if isinstance(e, sympy.Symbol):
                first.setdefault(e, i)
    return first


def find_batch_symbol(gm: torch.fx.GraphModule, batch_dim: int) -> sympy.Symbol | None:
    """The batch symbol (see :func:`find_batch_source`), or None when the batch is static."""
    src = find_batch_source(gm, batch_dim)
    return src[0] if src else None


def _short(node: torch.fx.Node) -> str:
    return op_short_name(node)


class BatchAnalysis:
    """Per-node batch facts: ``dims[node]`` is the batch dim of its value (``None`` when batch-free, ``SYM``
    for a batch-dependent number, a tuple for multi-output nodes); ``coupling[node]`` says why it couples."""

    def __init__(self, gm: torch.fx.GraphModule, batch: sympy.Symbol | None, cache: dict[Any, Any] | None = None,
                 others: Iterable[sympy.Symbol] = ()):
        self.gm = gm
        self.batch = batch
        self.others = frozenset(others) - {batch}
        """Other inputs' symbols at the batch dim: inputs the caller passed with the batch's size there that
        Dynamo never tied to the batch (only an op whose fake kernel checks no shapes could meet both)."""
        self.dims: dict[torch.fx.Node, Any] = {}
        self.coupling: dict[torch.fx.Node, str] = {}
        self.touches: set[torch.fx.Node] = set()
        self.bad: dict[torch.fx.Node, str] = {}
        """Nodes whose value holds the batch but not as one whole dim (two dims, not a multiple)."""
        self.whole_graph: str | None = None
        """Why no segment of the graph may split (its traced values cannot be trusted), or ``None``."""
        self._mode: Any = None
        self._cache: dict[Any, str | None] = cache if cache is not None else {}
        """Verdicts per (target, argument shapes and batch dims): shared by the analyses of one graph."""

    # -- classification of values -------------------------------------------------------------------
    def classify(self, val: Any) -> tuple[Any, str | None]:
        """(batch dim or None or SYM or tuple, problem) for one fake value, from its symbolic shape."""
        B = self.batch
        if B is None:
            return None, None
        if isinstance(val, (tuple, list)):
            parts = [self.classify(v) for v in val]
            problem = next((p for _, p in parts if p), None)
            return tuple(d for d, _ in parts), problem
        if isinstance(val, (torch.SymInt, torch.SymFloat, torch.SymBool)):
            return (SYM if B in val.node.expr.free_symbols else None), None
        if not isinstance(val, torch.Tensor):
            return None, None
        hits = [d for d, s in enumerate(val.shape) if B in size_expr(s).free_symbols]
        if not hits:
            return None, None
        if len(hits) > 1:
            return None, f"its output {tuple(val.shape)} has the batch size in dims {hits}"
        d = hits[0]
        k = sympy.simplify(size_expr(val.shape[d]) / B)
        if B in k.free_symbols or not k.is_integer:
            return None, f"its output size {val.shape[d]} at dim {d} is not a multiple k·{B} of the batch"
        return d, None

    def of(self, a: Any) -> Any:
        return self.dims.get(a) if isinstance(a, torch.fx.Node) else None

    # -- the analysis -------------------------------------------------------------------------------
    def run(self) -> "BatchAnalysis":
        if self.batch is not None:
            self._mode = fake_mode_of([meta_val(n) for n in self.gm.graph.find_nodes(op="placeholder")])
        for node in self.gm.graph.nodes:
            if node.op == "output":
                continue
            val = meta_val(node)
            dims, problem = self.classify(val)
            self.dims[node] = dims
            if problem:
                self.bad[node] = problem
            if node.op in ("placeholder", "get_attr") or self.batch is None:
                continue
            reason = self._node_reason(node, val, problem)
            if reason:
                self.coupling[node] = reason
            elif node not in self.coupling:
                state = self._state_update(node) or self._self_overlap(node) or self._misaligned_write(node)
                if state:
                    self.coupling[node] = state
            changed = node.args[0] if node.args and _short(node) in META_INPLACE else None
            if isinstance(changed, torch.fx.Node) and storage_root(changed).op != "placeholder":
                self.whole_graph = (f"node {node.name!r} changes the shape or strides of a value computed in the graph "
                                    f"in place ({_short(node)}); the traced shapes of that value are the changed ones")
        return self

    def _misaligned_write(self, node: torch.fx.Node) -> str | None:
        """An in-place write through a view whose batch items do not sit where its storage's items sit
        (``x.view(4, -1)[0].fill_(0)`` of a ``(B, 4)`` ``x``: element ``i`` of the view is not item ``i``). Split,
        a nano-batch would write into rows of the storage that other nano-batches own and read."""
        for target in write_targets(node):
            root = storage_root(target)
            if target is root or self.batch is None:
                continue
            t, r = meta_val(target), meta_val(root)
            dt, dr = self.dims.get(target), self.dims.get(root)
            if not isinstance(t, torch.Tensor) or not isinstance(r, torch.Tensor) or (dt is None and dr is None):
                continue
            if not (isinstance(dt, int) and isinstance(dr, int) and _item_stride(t, dt, self.batch) is not None
                    and _item_stride(t, dt, self.batch) == _item_stride(r, dr, self.batch)):
                return (f"it writes {target.name!r} in place, a view of {root.name!r} whose batch items are laid out "
                        "differently from that tensor's: a nano-batch would write rows other nano-batches own")
        return None

    def _self_overlap(self, node: torch.fx.Node) -> str | None:
        """An in-place write whose source is another view of the tensor it writes (``v.copy_(v[:, :1])``): whether
        PyTorch accepts the overlap depends on the strides, which differ between the whole batch and one row."""
        targets = write_targets(node)
        for target in targets:
            root = storage_root(target)
            for a in self._inputs(node):  # another written view (rotary's q and k of one qkv) is its own write
                if a not in targets and isinstance(meta_val(a), torch.Tensor) and storage_root(a) is root:
                    return (f"it writes {target.name!r} in place from {a.name!r}, a view of the same tensor; "
                            "PyTorch's overlap check differs between the whole batch and a nano-batch")
        return None

    def _node_reason(self, node: torch.fx.Node, val: Any, problem: str | None) -> str | None:
        """Why ``node`` couples the batch, or None when it is row-local (or touches no batch data)."""
        ins = self._inputs(node)
        bad_in = next((a for a in ins if a in self.bad), None)
        batch_in = any(self._carries(self.of(a)) for a in ins)
        sym_in = any(self.of(a) == SYM for a in ins) or any(
            _is_batch_sym(x, self.batch) for x in _flat_consts(node))
        out_batch = self._carries(self.dims[node]) or problem is not None
        if not (batch_in or sym_in or out_batch or bad_in is not None):
            # batch-free, but a split segment would repeat it per nano-batch: a random draw must happen once
            return self._lowered(node, False) if _may_draw(node, val) else None
        self.touches.add(node)
        if bad_in is not None:
            return f"it uses {bad_in.name!r}, whose value holds the batch but not as one dim ({self.bad[bad_in]})"
        if problem:
            return problem
        if self.dims[node] == SYM and any(u.op == "output" for u in node.users) and not (
                isinstance(val, torch.SymInt) and val.node.expr == self.batch):
            return (f"it returns an int computed from the batch size ({val}), which a nano-batch would compute from "
                    "its own rows")
        if self.dims[node] == SYM or (not out_batch and not batch_in and _is_number(val)):
            return None  # size arithmetic: its users decide whether the batch size is used as a shape
        if _is_marker(node):
            return None
        return self._lowered(node, sym_in)

    def _lowered(self, node: torch.fx.Node, sym_in: bool) -> str | None:
        """Lower ``node`` to ATen ops and check each against its batch rule."""
        key = self._key(node)
        if key is not None and key in self._cache:
            return self._cache[key]
        reason = self._check_lowered(node, sym_in)
        if key is not None:
            self._cache[key] = reason
        return reason

    def _check_lowered(self, node: torch.fx.Node, sym_in: bool) -> str | None:
        short = _short(node)
        if short in META_INPLACE:
            return f"it changes a tensor's shape or strides in place ({short})"
        args, kwargs = torch.fx.node.map_arg((node.args, node.kwargs), meta_val)
        seed: dict[int, Any] = {}
        for a in self._inputs(node):
            v = meta_val(a)
            if isinstance(v, torch.Tensor):
                seed[id(v)] = self.dims.get(a)
        target = _ATEN_OF.get(node.target, node.target) if node.op == "call_function" else None
        if isinstance(target, torch._ops.OpOverload) and rule_for(target) is not None:
            # already an ATen op with a rule (export graphs, collectives), or a torch function that is one
            # (linear: its decomposition's views depend on the torch version); composite ones are lowered below
            calls = [Dispatched(target, tuple(args), dict(kwargs), meta_val(node))]
            result = meta_val(node)
        else:
            mode = self._mode or fake_mode_of((args, kwargs))
            if mode is None:
                return "dynaflow cannot lower it to ATen ops (no fake values were recorded)"
            try:
                calls, result = lower_node(self.gm, node, args, kwargs, mode)
            except Exception as exc:  # noqa: BLE001 - anything we cannot analyse couples
                return f"dynaflow cannot lower it to ATen ops ({type(exc).__name__}: {str(exc)[:120]})"
        hidden = _hidden_write(calls, (args, kwargs))
        if hidden:
            return hidden
        place = _Placements(seed, self.batch)
        used_sym = False
        for call in calls:
            reason, saw_sym = self._check_call(call, place)
            used_sym |= saw_sym
            if reason:
                return f"{reason} [{call.op}]"
        if sym_in and not used_sym:
            return "it uses the batch size as a value (dynaflow cannot follow it into a shape)"
        results = [t for t in torch.utils._pytree.tree_leaves(result) if isinstance(t, torch.Tensor)]
        if any(id(t) in place.positions for t in results):
            return "its result holds batch positions (from an arange over the batch size), which differ per nano-batch"
        if any(place.is_interleaved(t) for t in results):
            return "its result holds the batch rows interleaved with other rows (a view folded outer rows into them)"
        return None

    def _check_call(self, call: Dispatched, place: "_Placements") -> tuple[str | None, bool]:
        """(why one dispatched ATen op couples or None, whether a batch-size argument reached it)."""
        op = call.op
        if op.namespace == "prim" or op._schema.name in _IGNORED_NAMES:
            return None, False
        bound = bind(op, call.args, call.kwargs)
        syms = [name for name, v in bound.items() if _holds_batch_sym(v, self.batch)]
        tensors = [t for t in torch.utils._pytree.tree_leaves(bound) if isinstance(t, torch.Tensor)]
        for t in tensors:
            if place.unknown(t):
                return "it reads a tensor that holds the batch but not as one dim", bool(syms)
        batch_in = any(place(t) is not None for t in tensors)
        outs = [t for t in torch.utils._pytree.tree_leaves(call.out) if isinstance(t, torch.Tensor)]
        out_dims = [place.learn(t) for t in outs]
        if any(d is _BAD for d in out_dims):
            return "its result holds the batch in more than one dim (or not as a whole multiple)", bool(syms)
        out_batch = any(d is not None for d in out_dims)
        if self.others and (batch_in or out_batch):
            for t in (*tensors, *outs):
                foreign = sorted(map(str, self.others & set().union(*(size_expr(n).free_symbols for n in t.shape))))
                if foreign:
                    return (f"it meets batch rows with a tensor {tuple(t.shape)} sized by another input's dynamic dim "
                            f"({foreign[0]}) that Dynamo never tied to the batch: if that tensor holds the batch too, "
                            "each nano-batch would get all of its rows. Fix: if it is batch data, tie the two in the "
                            "model (torch._check(t.shape[0] == x.shape[0]))", bool(syms))
        if not (batch_in or syms or out_batch) and _draws(op, bound):  # repeated per nano-batch, it draws more
            return "it draws random numbers, which must happen once per step", False
        if not (batch_in or syms or out_batch):
            return None, False
        entry = rule_for(op)
        if entry is None:
            return f"dynaflow has no batch rule for {op}", bool(syms)
        src = bound.get("self")
        if op._schema.name in _SAME_VALUES and place.step(src) is not None and len(outs) == 1:
            place.positions[id(outs[0])] = place.step(src)  # the same positions under another name
            return None, bool(syms)
        reason = place.read_positions(bound, entry)
        if reason:
            return reason, bool(syms)
        stray = [n for n in syms if n not in entry.sizes]
        if stray:
            if op._schema.name == "aten::arange":
                step = _position_step(bound, self.batch)
                if step is not None and len(outs) == 1:  # the rows' offsets, for an op that reads them to come
                    place.positions[id(outs[0])] = step
                    return None, True
                return "it creates batch-position values (arange over the batch size)", True
            return f"it uses the batch size as a value (argument {stray[0]!r})", True
        if op._schema.name in _RESHAPES and isinstance(src, torch.Tensor) and place(src) is not None and len(outs) == 1:
            return place.reshape(src, outs[0]), bool(syms)  # the layout decides, interleaved or not
        interleaved = [t for t in tensors if place.is_interleaved(t)]
        if interleaved:
            reason = place.keep_interleaved(op, interleaved[0], tensors, outs)
            if reason:
                return reason, bool(syms)
        if torch.Tag.nondeterministic_seeded in op.tags and op._schema.name not in RANDOM_AWARE:
            return "it draws random numbers, so a nano-batch would see a different random stream", bool(syms)
        if out_batch and not batch_in and not entry.makes_batch:
            return "it lays a batch-free tensor out as batch rows", bool(syms)
        try:
            reason = entry.rule(AtenCall(op, bound, place, self.batch, call.out, place.step))
        except KeyError as exc:  # a rule naming an argument this overload lacks proves nothing: it couples
            return f"dynaflow's batch rule does not fit this overload ({exc.args[0]})", bool(syms)
        except Exception as exc:  # noqa: BLE001 - a rule that fails proves nothing either (a user's rule included)
            return f"its batch rule raised {type(exc).__name__}: {str(exc)[:120]}", bool(syms)
        if reason:
            return reason, bool(syms)
        for i in entry.positions[1] if entry.positions else ():
            place.positions[id(outs[i])] = POSITIONS
        if batch_in and outs and not out_batch and not entry.makes_batch and not all(map(no_elements, outs)):
            return "its result has no batch dim: it reduces over or picks from the rows of the batch", bool(syms)
        for arg in op._schema.arguments:
            if arg.alias_info is not None and arg.alias_info.is_write:
                target = bound.get(arg.name)
                if isinstance(target, torch.Tensor) and place(target) is None and (batch_in or out_batch):
                    return "it writes batch data into a batch-free tensor in place", bool(syms)
        return None, bool(syms)

    def _key(self, node: torch.fx.Node) -> Any:
        """A cache key that is equal for nodes doing the same thing to values of the same shapes and batch
        dims (the layers of a deep model); ``None`` when an argument cannot be keyed."""
        return call_key(node, lambda a, v: (self.dims.get(a), str(tuple(v.shape)), str(v.stride()), v.dtype,
                                           v.device.type, a in self.bad))

    def _state_update(self, node: torch.fx.Node) -> str | None:
        """An in-place write into a batch-free graph input or buffer (a step counter): it must run once per step.

        Run per nano-batch it would apply the update once per nano-batch (``n.add_(1)`` twice for two), so it is
        coupling even though no batch data flows into it.
        """
        if self.batch is None:
            return None
        for target in write_targets(node):
            if self._carries(self.of(target)):
                continue
            root = storage_root(target)
            if root.op in ("placeholder", "get_attr"):
                return (f"it updates {root.name!r}, a batch-free graph input or buffer, in place; it must run once "
                        "per step, not once per nano-batch")
        return None

    def _inputs(self, node: torch.fx.Node) -> list[torch.fx.Node]:
        out: list[torch.fx.Node] = []
        torch.fx.node.map_arg((node.args, node.kwargs), lambda n: out.append(n) or n)
        return out

    @staticmethod
    def _carries(d: Any) -> bool:
        if isinstance(d, tuple):
            return any(BatchAnalysis._carries(x) for x in d)
        return isinstance(d, int) and not isinstance(d, bool)

    def reasons(self, nodes: Iterable[torch.fx.Node]) -> list[tuple[torch.fx.Node, str]]:
        return [(n, self.coupling[n]) for n in nodes if n in self.coupling]


_BAD = object()
"""Placement of a tensor that holds the batch but not as one whole dim."""


class _Placements:
    """Batch dims of the fake tensors one node's ATen ops pass around, by identity; results are placed
    by their symbolic shape (the one dim holding the batch symbol)."""

    def __init__(self, seed: dict[int, Any], batch: sympy.Symbol):
        self.known = dict(seed)
        self.batch = batch
        self.outer: dict[int, sympy.Expr] = {}
        """Tensors whose batch dim holds ``outer·B·k`` rows, the batch in the middle (:mod:`.row_layout`)."""
        self.positions: dict[int, Any] = {}
        """Tensors of batch positions: ``arange(0, k·B, k)`` (its ``k``), or an op's output declared to hold
        positions (:data:`POSITIONS`). Each nano-batch computes its own, so only a declared reader may use them."""

    def step(self, t: Any) -> Any:
        return self.positions.get(id(t)) if isinstance(t, torch.Tensor) else None

    def read_positions(self, bound: dict[str, Any], entry: Any) -> str | None:
        """Why an op may not read the batch positions among its arguments (None when it reads none, or only in
        the argument its rule declares)."""
        allowed = entry.positions[0] if entry.positions else None
        for name, v in bound.items():
            for t in v if isinstance(v, (list, tuple)) else (v,):
                if isinstance(t, torch.Tensor) and id(t) in self.positions and name != allowed:
                    return ("it computes with batch positions (an arange over the batch size), which differ per "
                            "nano-batch")
        return None

    def __call__(self, t: Any) -> int | None:
        if not isinstance(t, torch.Tensor):
            return None
        d = self.known[id(t)] if id(t) in self.known else self.learn(t)
        return d if isinstance(d, int) and not isinstance(d, bool) else None

    def unknown(self, t: torch.Tensor) -> bool:
        """A tensor whose shape holds the batch but has no valid batch dim (bad, or a stray shape)."""
        d = self.known.get(id(t), "missing")
        if d == "missing":
            d = self.learn(t)
        return d is _BAD

    def is_interleaved(self, t: torch.Tensor) -> bool:
        return id(t) in self.outer

    def reshape(self, src: torch.Tensor, out: torch.Tensor) -> str | None:
        """Place the view ``out`` of ``src`` by the layout it keeps (see :mod:`.row_layout`), or say why not."""
        d = self(src)
        where = reshaped(layout_of(src, d, self.outer.get(id(src), sympy.Integer(1)), self.batch), out, self.batch)
        if where is None:
            return regroups(src, out)
        self.known[id(out)] = where[0]
        if where[1] != 1:
            self.outer[id(out)] = where[1]
        return None

    def keep_interleaved(self, op: Any, ref: torch.Tensor, tensors: list[torch.Tensor],
                         outs: list[torch.Tensor]) -> str | None:
        """An op on a tensor whose batch rows are interleaved with outer rows: it must treat rows apart, and every
        batch tensor it reads or makes must hold the batch the same way; its outputs stay interleaved."""
        if not treats_rows_apart(op):
            return ("it works across the rows of a tensor whose batch rows are interleaved with other rows (a view "
                    f"folded outer rows into the batch dim: {tuple(ref.shape)})")
        pattern = (self.outer[id(ref)], size_expr(ref.shape[self(ref)]))
        for t in tensors:
            if self(t) is not None and (self.outer.get(id(t), 1), size_expr(t.shape[self(t)])) != pattern:
                return "it mixes batch rows interleaved with other rows and batch rows laid out otherwise"
        for t in outs:
            if self(t) is not None:
                if size_expr(t.shape[self(t)]) != pattern[1]:
                    return "it changes the rows of a tensor whose batch rows are interleaved with other rows"
                self.outer[id(t)] = pattern[0]
        return None

    def learn(self, t: torch.Tensor) -> Any:
        hits = [i for i, s in enumerate(t.shape) if self.batch in size_expr(s).free_symbols]
        if not hits:
            d: Any = None
        elif len(hits) > 1:
            d = _BAD
        else:
            k = sympy.simplify(size_expr(t.shape[hits[0]]) / self.batch)
            d = hits[0] if self.batch not in k.free_symbols and k.is_integer else _BAD
        self.known[id(t)] = d
        return d


_SAME_VALUES = frozenset({"aten::detach", "aten::alias", "aten::lift_fresh", "aten::lift_fresh_copy", "aten::clone"})
"""Ops whose result holds the values of their input, in its layout: batch positions stay positions."""
POSITIONS = "positions"
"""The step of a tensor of batch positions that no rule may read as offsets (an op's position output)."""


def _hidden_write(calls: list[Dispatched], given: Any) -> str | None:
    """Why the node couples if one of its ATen ops writes a tensor the node was neither given nor made (its
    module's own state, such as BatchNorm's running stats or a step counter in a ``call_module`` leaf, or a
    global): split, that write would happen once per nano-batch. Tensors count by storage, so a view the node
    made of such state is that state."""
    known = {_storage(t) for t in torch.utils._pytree.tree_leaves(given) if isinstance(t, torch.Tensor)}
    for call in calls:
        schema = call.op._schema
        bound = bind(call.op, call.args, call.kwargs)
        for arg in schema.arguments:
            if arg.alias_info is not None and arg.alias_info.is_write:
                for t in torch.utils._pytree.tree_leaves(bound.get(arg.name)):
                    if isinstance(t, torch.Tensor) and _storage(t) not in known:
                        return (f"it writes a tensor it was not given ({arg.name} {tuple(t.shape)} of {call.op}: a "
                                "module's own state or a global), which a split would update once per nano-batch")
        outs = call.out if isinstance(call.out, (tuple, list)) else (call.out,)
        for ret, t in zip(schema.returns, outs):
            if ret.alias_info is None and isinstance(t, torch.Tensor):  # a new tensor, not a view of an argument
                known.add(_storage(t))
    return None


def _storage(t: torch.Tensor) -> Any:
    try:
        return t.untyped_storage()._cdata
    except Exception:  # noqa: BLE001 - a tensor without storage (a sparse or nested one): itself
        return ("tensor", id(t))


def _position_step(bound: dict[str, Any], batch: sympy.Symbol) -> Any:
    """``k`` when an arange is ``arange(0, k·B, k)`` over integers (row ``b``'s first of ``k`` rows), else None."""
    start, end, step = bound.get("start", 0), bound.get("end"), bound.get("step", 1)
    dtype = bound.get("dtype")
    if isinstance(step, bool) or not isinstance(step, int) or step < 1 or not _is_zero(start):
        return None
    if dtype is not None and (dtype.is_floating_point or dtype.is_complex):
        return None
    if not isinstance(end, (int, torch.SymInt)) or sympy.simplify(size_expr(end) - step * batch) != 0:
        return None
    return step


def _item_stride(t: torch.Tensor, d: int, batch: sympy.Symbol) -> sympy.Expr | None:
    """The distance in elements from one batch item to the next along dim ``d`` (``k`` rows per item times the
    dim's stride), or ``None`` when the dim does not hold ``k·B`` rows."""
    k = sympy.simplify(size_expr(t.shape[d]) / batch)
    if batch in k.free_symbols or not k.is_integer:
        return None
    return sympy.expand(k * size_expr(t.stride()[d]))


def _is_zero(x: Any) -> bool:
    return not isinstance(x, bool) and isinstance(x, (int, torch.SymInt)) and sympy.simplify(size_expr(x)) == 0


_RESHAPES = frozenset({"aten::view", "aten::_unsafe_view", "aten::reshape", "aten::view_copy"})
"""Views that regroup dims: placed by the layout they keep (:mod:`.row_layout`), interleaved or not."""
_ATEN_OF = {torch._C._nn.linear: torch.ops.aten.linear.default,
            torch.nn.functional.linear: torch.ops.aten.linear.default}
"""Torch functions that are exactly one ATen op with a rule: checked as that op, without lowering."""
_IGNORED_NAMES = frozenset({"aten::sym_size", "aten::sym_stride", "aten::sym_numel", "aten::sym_storage_offset",
                            "aten::size", "aten::stride", "aten::numel", "aten::dim", "aten::storage_offset",
                            "aten::is_contiguous", "aten::is_same_size", "aten::_assert_tensor_metadata",
                            "aten::is_non_overlapping_and_dense"})
"""Metadata queries (some torch versions dispatch ``aten.size`` inside ``linear``): they never read data."""


def _is_batch_sym(x: Any, batch: sympy.Symbol) -> bool:
    return isinstance(x, (torch.SymInt, torch.SymFloat, torch.SymBool)) and batch in x.node.expr.free_symbols


def _holds_batch_sym(v: Any, batch: sympy.Symbol) -> bool:
    if isinstance(v, (list, tuple)):
        return any(_holds_batch_sym(x, batch) for x in v)
    return _is_batch_sym(v, batch)


def _is_number(val: Any) -> bool:
    return isinstance(val, (int, float, bool, torch.SymInt, torch.SymFloat, torch.SymBool, torch.Size))


def _is_marker(node: torch.fx.Node) -> bool:
    from dynaflow.frontend.markers import is_marker

    return is_marker(node)


def analyze(gm: torch.fx.GraphModule, batch: sympy.Symbol | None, cache: dict[Any, Any] | None = None,
            others: Iterable[sympy.Symbol] = ()) -> BatchAnalysis:
    """Run the batch analysis on ``gm``; ``cache`` carries verdicts between analyses of the same graph;
    ``others``: the other candidate batch symbols (:func:`candidate_symbols`), which must not meet the batch."""
    return BatchAnalysis(gm, batch, cache, others).run()


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


def _draws(op: Any, bound: dict[str, Any]) -> bool:
    """Whether a call draws from the random generator: an op tagged random, unless it is one whose draw its
    arguments switch off (dropout in eval or with a probability of 0)."""
    if torch.Tag.nondeterministic_seeded not in op.tags:
        return False
    if op._schema.name not in RANDOM_AWARE:
        return True
    p = bound.get("p", bound.get("dropout_p", 0.0))
    return bound.get("train", bound.get("training")) is not False and float(p or 0.0) != 0.0


def _may_draw(node: torch.fx.Node, val: Any) -> bool:
    """A batch-free node worth lowering to see whether it draws random numbers: a call that makes a tensor
    (sizes, views, markers and Python builtins draw nothing)."""
    if node.op not in ("call_function", "call_method") or _is_marker(node):
        return False
    if not any(isinstance(v, torch.Tensor) for v in torch.utils._pytree.tree_leaves(val)):
        return False
    return not (node.op == "call_function" and getattr(node.target, "__module__", None) in ("_operator", "builtins"))
