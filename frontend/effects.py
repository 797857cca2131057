"""In-place writes: which tensor a node writes, and the order that writes impose on other nodes.

A captured graph may update state in place — a KV cache row (``keys.index_copy_(2, pos, k)``), a step
counter (``length.add_(n)``). Data edges alone do not order such a write against the nodes that read the
same storage: the read ``sdpa(q, keys)`` takes the *placeholder* ``keys``, not the write's result. Once the
graph is cut into segments that a strategy may reorder or place on other lanes, that ordering must be
explicit. :func:`effect_pairs` gives it: for every in-place write ``w`` of a storage, every other access
``a`` of that storage (through any view of it) is ordered ``a → w`` when ``a`` came first in the graph and
``w → a`` otherwise. Partition turns these node pairs into segment dependencies.

Aliasing is over-approximated (a ``reshape`` is treated as a view): an extra ordering edge is always
safe, a missing one is a wrong answer.
"""

from __future__ import annotations

import operator
import weakref
from typing import Any, Callable

import torch
import torch.fx

from dynaflow.frontend.rules import op_short_name

__all__ = ["META_INPLACE", "is_inplace", "write_target", "write_targets", "storage_root", "view_base", "is_view",
           "aliases_of", "reads_metadata_only", "effect_pairs"]

_VIEW_OPS = {
    "getitem", "view", "view_as", "reshape", "reshape_as", "_unsafe_view", "narrow", "select", "slice",
    "transpose", "t", "permute", "expand", "expand_as", "unsqueeze", "squeeze", "flatten", "unflatten",
    "as_strided", "alias", "detach", "unbind", "split", "chunk", "movedim", "diagonal", "contiguous", "ravel",
}
"""Ops whose result may share storage with their first argument."""


_AUGMENTED = {operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv, operator.imod,
              operator.ipow, operator.iand, operator.ior, operator.ixor, operator.ilshift, operator.irshift,
              operator.imatmul}
"""``x += y`` and friends: Dynamo records them as ``operator.iadd(x, y)``; on a tensor they write ``x``."""


def _schema_writes(target: object) -> set[object]:
    """Positions and names of the arguments an op's schema marks written (``Tensor(a!)``). Dynamo graphs call
    the overload packet (``torch.ops._C.rotary_embedding``); its overloads are unioned (an extra write is safe)."""
    if isinstance(target, torch._ops.OpOverloadPacket):
        schemas = [getattr(target, name)._schema for name in target.overloads()]
    elif isinstance(target, torch._ops.OpOverload):
        schemas = [target._schema]
    else:
        return set()
    out: set[object] = set()
    for schema in schemas:
        for i, arg in enumerate(schema.arguments):
            if arg.alias_info is not None and arg.alias_info.is_write:
                out.update((arg.name, i) if not arg.kwarg_only else (arg.name,))
    return out


def _norm_signatures() -> dict[object, tuple[int, int, int, str, bool]]:
    import torch.nn.functional as F

    functional = (1, 2, 5)   # F.batch_norm(input, running_mean, running_var, weight, bias, training, ...)
    aten = (3, 4, 5)         # torch.batch_norm(input, weight, bias, running_mean, running_var, training, ...)
    return {F.batch_norm: (*functional, "training", False), F.instance_norm: (*functional, "use_input_stats", True),
            torch.batch_norm: (*aten, "training", True), torch.instance_norm: (*aten, "use_input_stats", True),
            "batch_norm": (*aten, "training", True), "instance_norm": (*aten, "use_input_stats", True),
            "native_batch_norm": (*aten, "training", True), "_batch_norm_impl_index": (*aten, "training", True),
            "cudnn_batch_norm": (*aten, "training", True), "miopen_batch_norm": (*aten, "training", True)}


_RUNNING_STATS = _norm_signatures()
"""Norms that update ``running_mean`` / ``running_var`` in place although their schemas do not say so (the
torch functions Dynamo records, and the aten ops by name): the two arguments' positions, the training flag's
position and name, and the flag's default."""


def _running_stats_written(node: torch.fx.Node) -> list[object]:
    """The running statistics a norm call updates: both, unless its training flag is a literal ``False``."""
    if node.op != "call_function":
        return []
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        target = target._schema.name.split("::")[-1]
    elif isinstance(target, torch._ops.OpOverloadPacket):
        target = target._qualified_op_name.split("::")[-1]
    try:
        sig = _RUNNING_STATS.get(target)  # type: ignore[call-overload]
    except TypeError:  # an unhashable callable
        return []
    if sig is None:
        return []
    mean_at, var_at, flag_at, flag_name, default = sig
    flag = node.args[flag_at] if len(node.args) > flag_at else node.kwargs.get(flag_name, default)
    if flag is False:
        return []
    return [node.args[i] if len(node.args) > i else node.kwargs.get(k)
            for i, k in ((mean_at, "running_mean"), (var_at, "running_var"))]


def write_targets(node: torch.fx.Node) -> tuple[torch.fx.Node, ...]:
    """The input nodes ``node`` writes in place: every argument its op schema marks written (vLLM's
    ``onednn_mm(out, x, ...)``, ``rotary_embedding(positions, q, k, ...)``) and the running statistics a
    norm updates in training, else ``out=``, else the first argument of ``x.add_(1)``, ``x += 1``, ``x[i] = v``."""
    if node.op not in ("call_function", "call_method"):
        return ()
    return _cached(node, _WRITES, lambda: tuple(dict.fromkeys((*_named_writes(node), *_dispatched_writes(node)))))


_WRITES = "dynaflow_writes"


def _cached(node: torch.fx.Node, key: str, compute: Callable[[], Any]) -> Any:
    """``compute()`` kept in ``node.meta[key]`` for the node's current arguments: a pass that rewires them
    (``replace_input_with``), or a graph copy (which shares ``meta`` with the original's nodes), recomputes."""
    hit = node.meta.get(key)
    if hit is not None and hit[0] is node.args and hit[1] is node.kwargs:
        return hit[2]
    value = compute()
    node.meta[key] = (node.args, node.kwargs, value)
    return value


def _named_writes(node: torch.fx.Node) -> tuple[torch.fx.Node, ...]:
    """Writes the call form shows: running statistics, schema-marked arguments, ``out=``, ``x.add_``, ``x += y``."""
    stats = [t for t in _running_stats_written(node) if isinstance(t, torch.fx.Node)]
    if stats:
        return tuple(dict.fromkeys(stats))
    writes = _schema_writes(node.target) if node.op == "call_function" else set()
    if writes:
        found: list[torch.fx.Node] = []
        values = [*((i, a) for i, a in enumerate(node.args)), *node.kwargs.items()]
        for key, value in values:
            if key in writes:
                found.extend(v for v in (value if isinstance(value, (list, tuple)) else (value,))
                             if isinstance(v, torch.fx.Node))
        return tuple(dict.fromkeys(found))
    if not _writes_first_argument(node):
        return ()
    target = node.kwargs.get("out", node.args[0] if node.args else None)
    return (target,) if isinstance(target, torch.fx.Node) else ()


def _dispatched_writes(node: torch.fx.Node) -> tuple[torch.fx.Node, ...]:
    """Writes only the ATen ops show (``F.relu(x, inplace=True)``, ``torch._foreach_add_([x[0]], 1)``, a torch
    function that writes an argument): run on its traced fake values, every ATen op the node dispatches is read
    for arguments its schema marks written (``Tensor(a!)``), and each written storage is traced back to the input
    nodes holding it. A node that cannot be run, or a shape-changing in-place op (running it would change the
    traced values), has the writes its call form shows."""
    inputs = [n for n in node.all_input_nodes if isinstance(_val(n), torch.Tensor)]
    if not inputs or op_short_name(node) in META_INPLACE:
        return ()
    key = _shape_key(node, inputs)
    memo = _MEMO.setdefault(node.graph, {})
    if key is not None and key in memo:
        return tuple(inputs[i] for i in memo[key])
    found = _run_for_writes(node, inputs)
    if key is not None:
        memo[key] = tuple(inputs.index(n) for n in found)
    return found


_MEMO: "weakref.WeakKeyDictionary[torch.fx.Graph, dict[Any, tuple[int, ...]]]" = weakref.WeakKeyDictionary()
"""Per graph, the written inputs (by position) of the nodes run so far, by :func:`_shape_key`: the layers of a
deep model run each distinct call once."""


def _shape_key(node: torch.fx.Node, inputs: list[torch.fx.Node]) -> Any:
    """Equal for two nodes making the same call on values of the same shapes, strides and dtypes whose inputs
    share storage in the same pattern; ``None`` when an argument cannot be keyed."""
    from dynaflow.frontend.aten_trace import call_key

    storages: dict[int, int] = {}

    def tensor_key(_: torch.fx.Node, v: torch.Tensor) -> Any:
        root = storages.setdefault(v.untyped_storage()._cdata, len(storages))
        return str(tuple(v.shape)), str(v.stride()), v.dtype, v.device.type, root

    return call_key(node, tensor_key)


def _run_for_writes(node: torch.fx.Node, inputs: list[torch.fx.Node]) -> tuple[torch.fx.Node, ...]:
    from dynaflow.frontend.aten_trace import bind, fake_mode_of, lower_node

    args, kwargs = torch.fx.node.map_arg((node.args, node.kwargs), _val)
    mode = fake_mode_of((args, kwargs))
    if mode is None:
        return ()
    try:
        calls, _ = lower_node(node.graph.owning_module, node, args, kwargs, mode)  # type: ignore[arg-type]
    except Exception:  # noqa: BLE001 - not runnable on fakes: the call form decides
        return ()
    by_id = {id(_val(n)): n for n in inputs}
    found: list[torch.fx.Node] = []
    for call in calls:
        if not call.op._schema.is_mutable:
            continue
        bound = bind(call.op, call.args, call.kwargs)
        for arg in call.op._schema.arguments:
            if arg.alias_info is not None and arg.alias_info.is_write:
                for t in torch.utils._pytree.tree_leaves(bound.get(arg.name)):
                    if not isinstance(t, torch.Tensor):
                        continue
                    if id(t) in by_id:  # an input itself (``copy_(v, v[:, :1])`` writes ``v``, not the view)
                        found.append(by_id[id(t)])
                    else:  # a view made inside the node: every input sharing its storage may be written
                        storage = t.untyped_storage()._cdata
                        found += [n for n in inputs if _val(n).untyped_storage()._cdata == storage]  # type: ignore[union-attr]
    return tuple(dict.fromkeys(found))


META_INPLACE = {"t_", "transpose_", "squeeze_", "unsqueeze_", "resize_", "resize_as_", "as_strided_", "set_",
                 "swapdims_", "swapaxes_"}
"""In-place ops that change a tensor's shape or strides: never run on the traced values (it would change them)."""


def _writes_first_argument(node: torch.fx.Node) -> bool:
    short = op_short_name(node)
    if short in ("setitem", "__setitem__") or node.target is operator.setitem:
        return True
    if node.target in _AUGMENTED or short in ("__iadd__", "__isub__", "__imul__", "__itruediv__"):
        first = node.args[0] if node.args else None
        val = first.meta.get("val", first.meta.get("example_value")) if isinstance(first, torch.fx.Node) else None
        return isinstance(val, torch.Tensor)  # on ints (sizes) ``+=`` rebinds, it does not write
    if isinstance(node.target, torch._ops.OpOverload):
        return node.target._schema.is_mutable
    if "out" in node.kwargs:
        return True
    if getattr(node.target, "__module__", None) in ("operator", "_operator"):
        return False  # ``operator.and_`` / ``or_`` / ``not_`` are ``a & b``: the in-place ones are _AUGMENTED
    return short.endswith("_") and not short.endswith("__")


def is_inplace(node: torch.fx.Node) -> bool:
    """Whether ``node`` writes into one of its inputs (``x.add_(1)``, ``x += 1``, ``x[i] = v``, ``out=`` variants,
    custom ops whose schema marks an argument written)."""
    return bool(write_targets(node))


def write_target(node: torch.fx.Node) -> torch.fx.Node | None:
    """The first input node an in-place ``node`` writes into (:func:`write_targets` has them all)."""
    targets = write_targets(node)
    return targets[0] if targets else None


_VIEW_ATTRIBUTES = {"T", "mT", "H", "mH", "real", "imag", "data"}
"""Tensor attributes that are views (Dynamo records ``x.T`` as ``getattr(x, "T")``)."""


def view_base(node: torch.fx.Node) -> torch.fx.Node | None:
    """The input node whose storage ``node``'s result may share: the first argument of a view op (``view``,
    ``x.T``, ``split``...), or any argument its traced value shares storage with (``F.dropout`` in eval returns
    its input itself); ``None`` for a tensor of its own."""
    if node.op not in ("call_function", "call_method") or not node.args or not isinstance(node.args[0], torch.fx.Node):
        return None
    first = node.args[0]
    if node.target is getattr:
        return first if len(node.args) > 1 and node.args[1] in _VIEW_ATTRIBUTES else None
    if node.target is operator.getitem and _returns_several(first):
        # one result of a call returning several: the input that result shares storage with (``split`` views
        # its first argument, ``broadcast_tensors`` each of its arguments, ``topk``'s results are their own)
        bases = _element_bases(first)
        i = node.args[1] if len(node.args) > 1 else None
        return bases[i] if isinstance(i, int) and -len(bases) <= i < len(bases) else _first_tensor(first)
    if op_short_name(node) in _VIEW_OPS:
        return first
    if write_targets(node):  # an in-place op returns what it wrote: ``aliases_of`` follows the write instead
        return None
    if _returns_several(node):  # the sequence itself: an alias of what any of its results shares
        return next((b for b in _element_bases(node) if b is not None), None)
    if not isinstance(_val(node), torch.Tensor):
        return None
    def probe() -> torch.fx.Node | None:
        probed = _probe(node)
        return probed[0] if probed is not None else _first_tensor(node)

    return _cached(node, _PROBED, probe)


_PROBED = "dynaflow_view_base"
_PROBED_ELEMENTS = "dynaflow_element_bases"


def _val(n: torch.fx.Node) -> object:
    return n.meta.get("val", n.meta.get("example_value"))


def _returns_several(node: torch.fx.Node) -> bool:
    """A call whose result is a sequence of tensors (``split``, ``topk``, ``broadcast_tensors``)."""
    val = _val(node)
    return (node.op in ("call_function", "call_method") and isinstance(val, (tuple, list))
            and any(isinstance(t, torch.Tensor) for t in val))


def _first_tensor(node: torch.fx.Node) -> torch.fx.Node | None:
    return next((n for n in node.all_input_nodes if isinstance(_val(n), torch.Tensor)), None)


def _element_bases(node: torch.fx.Node) -> list[torch.fx.Node | None]:
    """Per result of ``node`` (a call returning several tensors), the input whose storage it shares."""
    def probe() -> list[torch.fx.Node | None]:
        n = len(_val(node))  # type: ignore[arg-type]
        if op_short_name(node) in _VIEW_OPS:
            return [node.args[0]] * n  # type: ignore[list-item]
        probed = _probe(node)
        return list(probed) if probed is not None and len(probed) == n else [_first_tensor(node)] * n

    return _cached(node, _PROBED_ELEMENTS, probe)


def _probe(node: torch.fx.Node) -> list[torch.fx.Node | None] | None:
    """Run ``node`` on its traced fake values and return, per tensor of its result, the input whose storage it
    shares (ops that may return their input: ``F.dropout`` in eval, ``x.to(x.dtype)``; ``tensor_split`` and
    ``broadcast_tensors`` views). ``None`` when it cannot be run: the caller then assumes the alias, since an
    extra alias costs an ordering edge and a missing one a wrong answer."""
    from dynaflow.frontend.aten_trace import fake_mode_of, lower_node

    tensors = [n for n in node.all_input_nodes if isinstance(_val(n), torch.Tensor)]
    if not tensors:
        return [None] * (len(_val(node)) if _returns_several(node) else 1)  # type: ignore[arg-type]
    args, kwargs = torch.fx.node.map_arg((node.args, node.kwargs), _val)
    mode = fake_mode_of((args, kwargs))
    if mode is None:
        return None
    try:
        _, out = lower_node(node.graph.owning_module, node, args, kwargs, mode)  # type: ignore[arg-type]
    except Exception:  # noqa: BLE001 - not runnable on fakes: assume the alias
        return None
    storages = {n: _val(n).untyped_storage()._cdata for n in tensors}  # type: ignore[union-attr]

    def base(t: object) -> torch.fx.Node | None:
        if not isinstance(t, torch.Tensor):
            return None
        mine = t.untyped_storage()._cdata
        return next((n for n, s in storages.items() if s == mine), None)

    return [base(t) for t in out] if isinstance(out, (tuple, list)) else [base(out)]


def is_view(node: torch.fx.Node) -> bool:
    return view_base(node) is not None


def storage_root(node: torch.fx.Node) -> torch.fx.Node:
    """Follow view ops, and in-place ops to what they wrote (``x.add_(1)`` returns ``x``), back to the node that
    owns the storage (a placeholder, a constant or a computed tensor)."""
    while (base := view_base(node) or _returned_target(node)) is not None:
        node = base
    return node


def _returned_target(node: torch.fx.Node) -> torch.fx.Node | None:
    """The written argument an in-place op returns (``add_``, ``copy_``, an ``out=`` call), or ``None``."""
    val = _val(node)
    if not isinstance(val, torch.Tensor):
        return None
    targets = write_targets(node)
    mine = val.untyped_storage()._cdata
    same = [t for t in targets if isinstance(_val(t), torch.Tensor) and _val(t).untyped_storage()._cdata == mine]
    return same[0] if same else (targets[0] if len(targets) == 1 else None)


def aliases_of(root: torch.fx.Node) -> set[torch.fx.Node]:
    """``root`` and every node that may view its storage: views of it and in-place ops on it (they return it)."""
    seen = {root}
    todo = [root]
    while todo:
        n = todo.pop()
        for user in n.users:
            if user in seen:
                continue
            if view_base(user) in seen or any(t in seen for t in write_targets(user)):
                seen.add(user)
                todo.append(user)
            elif _returns_several(user):  # broadcast_tensors(y, x)[1]: a result may view a later argument
                for result in user.users:
                    if result not in seen and view_base(result) in seen:
                        seen.add(result)
                        todo.append(result)
    return seen


def reads_metadata_only(node: torch.fx.Node) -> bool:
    """A size / stride query (its value is an int, a SymInt or a ``torch.Size``): it never sees the data."""
    val = node.meta.get("val", node.meta.get("example_value"))
    return isinstance(val, (int, torch.SymInt, torch.SymBool, torch.SymFloat, torch.Size)) and not isinstance(val, bool)


def effect_pairs(gm: torch.fx.GraphModule) -> list[tuple[torch.fx.Node, torch.fx.Node]]:
    """``(first, then)`` node pairs that must keep their graph order because one writes what the other accesses."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    pairs: set[tuple[torch.fx.Node, torch.fx.Node]] = set()
    alias_cache: dict[torch.fx.Node, set[torch.fx.Node]] = {}
    for w in gm.graph.nodes:
        for target in write_targets(w):
            root = storage_root(target)
            aliases = alias_cache.get(root)
            if aliases is None:
                aliases = alias_cache[root] = aliases_of(root)
            for a in aliases:
                for user in list(a.users) + ([a] if a.op != "placeholder" else []):
                    if user is w or user.op == "output" or reads_metadata_only(user):
                        continue
                    pairs.add((user, w) if order[user] < order[w] else (w, user))
    return sorted(pairs, key=lambda p: (order[p[0]], order[p[1]]))
