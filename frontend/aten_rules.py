"""Batch rules for ATen ops: when running an op on row slices and concatenating equals running it whole.

The batch analysis (:mod:`.batching`) lowers every captured node to the ATen ops it dispatches and asks
this table about each one. A rule receives an :class:`AtenCall` (the op, its arguments bound by name, and
the batch dim of each tensor argument) and returns ``None`` when the op is row-local for those dims, or a
sentence saying why it couples the batch. An op with no rule couples: the table is an allow-list, so a
missing rule costs speed (a barrier), never correctness.

Facts every rule may rely on, checked by the caller: an input whose shape holds the batch symbol has a
batch dim (a value with the batch in two dims, or derived from batch positions, never reaches a rule);
the batch size appears in a non-tensor argument only where the rule lists the argument in ``sizes``; the
batch dim of each output is the one dim of its shape that holds the batch symbol.

Rules for user ops (custom kernels): ``register_batch_rule("mylib::op", rule)`` or, for an op that is
row-local along every dim but the ones it names, ``register_batch_rule("mylib::op", along_dims(...))``; for a
kernel that treats each row of some arguments on its own, ``rows(out=0, input=0)``. ATen's own ops are
registered by :mod:`.aten_table`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence

import sympy
import torch

from dynaflow.errors import ConfigError

__all__ = ["AtenCall", "BatchRule", "register_batch_rule", "rule_for", "has_rule", "along_dims", "last_dims", "rows",
           "dim_set", "pointwise", "ruled_ops", "no_elements", "RANDOM_AWARE"]

Placement = int | None


@dataclass(frozen=True)
class AtenCall:
    """One dispatched ATen op: ``args`` bound to schema names, ``dims`` the batch dim of each input tensor."""

    op: Any
    args: Mapping[str, Any]
    dims: Callable[[Any], Placement]
    batch: sympy.Symbol
    out: Any = None
    """The op's (fake) result."""
    steps: Callable[[Any], Any] = lambda t: None
    """For a batch-position tensor made inside the node (``arange(0, k·B, k)``: one value per batch row, the
    first of its ``k`` rows of a folded tensor), ``k``; ``None`` for every other tensor."""

    def step(self, name: str) -> Any:
        """:attr:`steps` of tensor argument ``name`` (``None`` when it holds no batch positions)."""
        t = self._arg(name)
        return self.steps(t) if isinstance(t, torch.Tensor) else None

    def dim(self, name: str) -> Placement:
        """The batch dim of tensor argument ``name`` (``None`` when batch-free or not given); a name the op's
        schema does not have raises ``KeyError`` (a rule written for another overload: the op couples)."""
        t = self._arg(name)
        return self.dims(t) if isinstance(t, torch.Tensor) else None

    def ndim(self, name: str) -> int:
        t = self._arg(name)
        return t.dim() if isinstance(t, torch.Tensor) else 0

    def _arg(self, name: str) -> Any:
        if name not in self.args:
            raise KeyError(f"{self.op} has no argument {name!r} (its arguments: {', '.join(self.args)})")
        return self.args[name]

    def tensors(self) -> list[torch.Tensor]:
        out: list[torch.Tensor] = []
        for v in self.args.values():
            if isinstance(v, torch.Tensor):
                out.append(v)
            elif isinstance(v, (list, tuple)):
                out.extend(t for t in v if isinstance(t, torch.Tensor))
        return out


BatchRule = Callable[[AtenCall], "str | None"]


@dataclass(frozen=True)
class _Entry:
    rule: BatchRule
    sizes: frozenset[str]
    makes_batch: bool
    positions: tuple[str, tuple[int, ...]] | None = None


_RULES: dict[str, _Entry] = {}


def register_batch_rule(ops: str | Iterable[str], rule: BatchRule, sizes: Sequence[str] = (),
                        makes_batch: bool = False, positions: tuple[str, tuple[int, ...]] | None = None) -> None:
    """Register ``rule`` for ops named ``"ns::name"`` (every overload) or ``"ns::name.overload"``.

    ``sizes`` lists the arguments that may hold the batch size (a view's ``size``): elsewhere a value
    derived from the batch size couples (each nano-batch would see its own size). ``makes_batch``: the op
    may give a batch-free input a batch dim from a size (a factory, ``expand``): each row holds the same values.
    ``positions = (argument, outputs)``: the argument that may hold batch positions made in the same node
    (offsets of the batch rows, checked by the rule through :meth:`AtenCall.step`), and the outputs that hold
    positions in turn. Positions differ per nano-batch, so any other use of them couples.
    """
    names = [ops] if isinstance(ops, str) else list(ops) if isinstance(ops, Iterable) else [ops]
    bad = [op for op in names if not isinstance(op, str) or op.count("::") != 1 or not all(op.split("::"))]
    if bad:
        raise ConfigError(f"register_batch_rule({bad[0]!r}, ...): name ops as 'namespace::name' or "
                             "'namespace::name.overload' (e.g. 'aten::softmax', 'mylib::rmsnorm').")
    if not callable(rule):
        raise ConfigError(f"register_batch_rule({names[0]!r}, {rule!r}): the rule must be a callable taking the "
                             "op's AtenCall (see dynaflow.frontend.aten_rules.rows) and returning None when it splits.")
    for op in names:
        _RULES[op] = _Entry(rule, frozenset(sizes), makes_batch, positions)


def _names(op: Any) -> tuple[str, str]:
    schema = op._schema
    base = schema.name
    return (f"{base}.{schema.overload_name}" if schema.overload_name else base), base


def rule_for(op: Any) -> _Entry | None:
    """The rule of an ATen overload: by overload name, by op name, by the op's functional form, or by its
    ``pointwise`` tag; ``None`` when the op has none (it couples)."""
    full, base = _names(op)
    for key in (full, base):
        entry = _RULES.get(key)
        if entry is not None:
            return entry
    if torch.Tag.pointwise in op.tags and torch.Tag.nondeterministic_seeded not in op.tags:
        return _POINTWISE
    if base.endswith("_") and not base.endswith("__"):  # add_.Tensor -> add.Tensor
        packet = getattr(getattr(torch.ops, op.namespace, None), op._schema.name.split("::")[-1][:-1], None)
        functional = getattr(packet, op._overloadname, None) if packet is not None else None
        if functional is not None and functional is not op:
            return rule_for(functional)
    return None


RANDOM_AWARE = frozenset({"aten::native_dropout", "aten::_scaled_dot_product_flash_attention_for_cpu",
                          "aten::_scaled_dot_product_flash_attention", "aten::_scaled_dot_product_efficient_attention",
                          "aten::_scaled_dot_product_cudnn_attention",
                          "aten::_scaled_dot_product_fused_attention_overrideable"})
"""Ops tagged random whose rule checks the randomness itself (a dropout probability of 0 draws nothing)."""


def has_rule(op: Any) -> bool:
    return rule_for(op) is not None


def ruled_ops() -> list[str]:
    """Names of the ops with an explicit rule (pointwise ops are found by their tag as well)."""
    return sorted(_RULES)


# -- helpers ---------------------------------------------------------------------------------------------
def norm_dim(d: int, ndim: int) -> int:
    return d % max(ndim, 1)


def dim_set(value: Any, ndim: int) -> set[int] | None:
    """A dim argument as a set of normalized dims; ``None`` for "every dim" (``None`` or ``[]``)."""
    if value is None:
        return None
    seq = list(value) if isinstance(value, (list, tuple)) else [value]
    if not seq:
        return None
    return {norm_dim(int(d), ndim) for d in seq}


def along_dims(*arg_names: str, default: Any = None, input: str = "self") -> BatchRule:
    """Rule for an op that works along the dims given by its arguments ``arg_names`` (every dim when they
    are ``None`` or empty) and is independent along all others."""
    def rule(call: AtenCall) -> str | None:
        d = call.dim(input)
        if d is None:
            return None
        ndim = call.ndim(input)
        work: set[int] = set()
        for name in arg_names:
            dims = dim_set(call.args.get(name, default), ndim)
            if dims is None:
                return f"it works along every dim of its input ({name}=all), the batch dim {d} included"
            work |= dims
        if d in work:
            return f"it works along the batch dim (dim {d})"
        return None

    return rule


def rows(**row_dims: int) -> BatchRule:
    """Rule for a kernel that treats each row of the named tensors on its own (vLLM's ``rms_norm(out, input,
    weight, eps)``: ``rows(out=0, input=0)``): every named tensor present holds the batch at its given dim, or
    none does; every other tensor argument (weights, tables) must be batch-free."""
    def rule(call: AtenCall) -> str | None:
        carried = {}
        for name, t in call.args.items():
            tensors = t if isinstance(t, (list, tuple)) else [t]
            for x in tensors:
                if not isinstance(x, torch.Tensor):
                    continue
                d = call.dims(x)
                if name not in row_dims:
                    if d is not None:
                        return f"its argument {name!r} holds the batch (dim {d}), but only {sorted(row_dims)} may"
                    continue
                want = norm_dim(row_dims[name], x.dim())
                carried[name] = d == want
                if d is not None and d != want:
                    return f"its argument {name!r} holds the batch at dim {d}, not at dim {want}"
        if carried and len(set(carried.values())) > 1:
            free = sorted(n for n, c in carried.items() if not c)
            return f"its row arguments {free} are batch-free while the others hold the batch"
        return None

    return rule


def last_dims(n_name: str | int, input: str = "self") -> BatchRule:
    """Rule for an op that works on the last ``n`` dims (an int, or the length of argument ``n_name``)."""
    def rule(call: AtenCall) -> str | None:
        d = call.dim(input)
        if d is None:
            return None
        n = n_name if isinstance(n_name, int) else len(call.args[n_name])
        if d >= call.ndim(input) - n:
            return f"it works on the last {n} dims, which hold the batch dim {d}"
        return None

    return rule


def aligned(call: AtenCall, tensors: Sequence[torch.Tensor], out_ndim: int) -> str | None:
    """Broadcast check: every batch input lands on the same output dim; batch-free inputs are size 1 there."""
    targets = {call.dims(t) + out_ndim - t.dim() for t in tensors if call.dims(t) is not None}
    if len(targets) > 1:
        return f"its inputs hold the batch at different dims after broadcasting ({sorted(targets)})"
    if not targets:
        return None
    (target,) = targets
    for t in tensors:
        if call.dims(t) is None:
            at = target - (out_ndim - t.dim())
            if at >= 0 and t.shape[at] != 1:
                return (f"it combines the batch rows with a batch-free tensor of shape {tuple(t.shape)} that is "
                        f"not broadcast along the batch dim")
    return None


def no_elements(t: Any) -> bool:
    """A tensor with no elements whatever the batch size (a concrete 0 in its shape): every nano-batch makes the
    same empty tensor, so an op whose result it is picks nothing from the rows."""
    return isinstance(t, torch.Tensor) and any(isinstance(s, int) and s == 0 for s in t.shape)


def out_ndim(tensors: Sequence[torch.Tensor]) -> int:
    return max((t.dim() for t in tensors), default=0)


def pointwise(call: AtenCall) -> str | None:
    """Elementwise with broadcasting (ATen's ``pointwise`` tag): row-local when the batch dims line up."""
    tensors = call.tensors()
    return aligned(call, tensors, out_ndim(tensors))


_POINTWISE = _Entry(pointwise, frozenset(), False)
