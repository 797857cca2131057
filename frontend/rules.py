"""Split rules: which fx nodes form their own segment.

A rule matches nodes; each maximal run of consecutive nodes matched by the same rule *instance*
(for ``Mod``: the same module instance, e.g. ``layers.0.mlp`` vs ``layers.1.mlp``) becomes a segment,
and the unmatched nodes between them form glue segments. Rules print like the code that builds them.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from dynaflow.errors import PartitionError
from dynaflow.ir import HINTS, Resource

__all__ = ["Rule", "Op", "Mod", "Seq", "Where", "as_rule", "default_rules", "op_name", "op_short_name", "module_stack"]

_RESOURCES = {r.value for r in Resource}


def op_name(node: torch.fx.Node) -> str:
    """A readable, regex-friendly name of what a node calls, e.g. ``torch._C._nn.linear``, ``Tensor.view``."""
    t = node.target
    if node.op == "call_method":
        return f"Tensor.{t}"
    if node.op == "call_module":
        return f"module.{t}"
    if isinstance(t, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        return str(t)
    mod = getattr(t, "__module__", None) or ""
    name = getattr(t, "__qualname__", None) or getattr(t, "__name__", None) or str(t)
    if mod in ("", "builtins", "_operator", "operator"):
        return f"operator.{name}" if mod in ("_operator", "operator") else name
    return f"{mod}.{name}"


def op_short_name(node: torch.fx.Node) -> str:
    """The bare op name, lower case: ``linear`` for ``torch._C._nn.linear``, ``cumsum`` for ``aten.cumsum.default``."""
    t = node.target
    if isinstance(t, torch._ops.OpOverload):
        return t._opname.lower()
    if isinstance(t, torch._ops.OpOverloadPacket):
        return t._qualified_op_name.split("::")[-1].lower()
    return op_name(node).rsplit(".", 1)[-1].lower()


_DYNAMO_PREFIX = re.compile(r"^L\['[^']*'\](\[\d+\])*\.?")


def module_stack(node: torch.fx.Node) -> list[tuple[str, type | str]]:
    """``[(qualname, class), ...]`` from outermost to innermost, with Dynamo's ``L['self']`` prefix removed."""
    stack = node.meta.get("nn_module_stack") or {}
    out = []
    for path, cls in stack.values():
        path = _DYNAMO_PREFIX.sub("", str(path))
        path = re.sub(r"\._modules\['([^']*)'\]", r".\1", path)
        out.append((path, cls))
    return out


def _split_tags(tags: Sequence[str] | str | None, who: str) -> tuple[Resource | None, frozenset[str]]:
    if tags is None:
        return None, frozenset()
    items = [t.strip() for t in (tags.split(",") if isinstance(tags, str) else tags) if t.strip()]
    resource, hints = None, set()
    for t in items:
        if t in _RESOURCES:
            resource = Resource(t)
        elif t in HINTS:
            hints.add(t)
        else:
            from dynaflow.errors import did_you_mean

            raise PartitionError(
                f"{who}: unknown tag {t!r}.{did_you_mean(t, sorted(_RESOURCES | HINTS))} "
                f"Valid tags: resources {sorted(_RESOURCES)}, hints {sorted(HINTS)}."
            )
    return resource, frozenset(hints)


@dataclass(frozen=True)
class Rule:
    """Base: ``match(node)`` returns a region key (nodes with equal keys in a row share a segment) or None."""

    name: str = ""
    tags: tuple[str, ...] = ()

    def match(self, node: torch.fx.Node) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def label(self) -> str:
        return self.name or type(self).__name__.lower()

    @property
    def resource(self) -> Resource | None:
        return _split_tags(self.tags, repr(self))[0]

    @property
    def hints(self) -> frozenset[str]:
        return _split_tags(self.tags, repr(self))[1]

    def _tag_repr(self) -> str:
        out = f", name={self.name!r}" if self.name else ""
        return out + (f", tags={self.tags!r}" if self.tags else "")


def _check_tags(rule: Rule) -> None:
    object.__setattr__(rule, "tags", tuple(rule.tags) if not isinstance(rule.tags, str) else (rule.tags,))
    _split_tags(rule.tags, repr(rule))


@dataclass(frozen=True, repr=False)
class Op(Rule):
    """Match nodes whose op name (see :func:`op_name`) contains a match of ``pattern`` (``re.search``)."""

    pattern: str = ""

    def __init__(self, pattern: str, *, name: str = "", tags: Sequence[str] | str = ()):
        if not isinstance(pattern, str) or not pattern:
            raise PartitionError(f"Op(...) needs a non-empty regex string; got {pattern!r}.")
        try:
            re.compile(pattern)
        except re.error as exc:
            raise PartitionError(f"Op({pattern!r}): invalid regex ({exc}).") from None
        object.__setattr__(self, "pattern", pattern)
        object.__setattr__(self, "name", name or re.sub(r"\W+", "_", pattern.split("|")[0]).strip("_").lower() or "op")
        object.__setattr__(self, "tags", tags)
        _check_tags(self)

    def match(self, node: torch.fx.Node) -> Any:
        if node.op not in ("call_function", "call_method", "call_module"):
            return None
        return self if re.search(self.pattern, op_name(node)) else None

    def __repr__(self) -> str:
        return f"Op({self.pattern!r}{self._tag_repr()})"


@dataclass(frozen=True, repr=False)
class Mod(Rule):
    """Match nodes executed inside a module: by class (or class name regex), or by qualname glob.

    ``Mod(LlamaMLP)``, ``Mod("LlamaMLP|MixtralSparseMoeBlock")`` and ``Mod("model.layers.*.mlp")`` all work;
    each module *instance* is its own segment.
    """

    target: Any = None

    def __init__(self, target: Any, *, name: str = "", tags: Sequence[str] | str = ()):
        if not (isinstance(target, type) or (isinstance(target, str) and target)):
            raise PartitionError(
                f"Mod(...) needs a module class, a class-name regex or a qualname glob; got {target!r}."
            )
        if isinstance(target, str):
            try:
                re.compile(target)
            except re.error:
                pass  # a glob such as 'layers.*.mlp[0]' need not be a regex
        label = target.__name__ if isinstance(target, type) else re.sub(r"\W+", "_", target.split("|")[0])
        object.__setattr__(self, "target", target)
        object.__setattr__(self, "name", name or label.strip("_").lower() or "mod")
        object.__setattr__(self, "tags", tags)
        _check_tags(self)

    def _matches(self, path: str, cls: type | str) -> bool:
        t = self.target
        if isinstance(t, type):
            return isinstance(cls, type) and issubclass(cls, t)
        cls_name = cls.__name__ if isinstance(cls, type) else str(cls).rsplit(".", 1)[-1]
        try:
            if re.fullmatch(t, cls_name):
                return True
        except re.error:
            pass
        return fnmatch.fnmatchcase(path, t)

    def match(self, node: torch.fx.Node) -> Any:
        for path, cls in module_stack(node):  # outermost match wins: a MoE block holds its experts
            if self._matches(path, cls):
                return (self, path)
        return None

    def __repr__(self) -> str:
        t = self.target.__name__ if isinstance(self.target, type) else repr(self.target)
        return f"Mod({t}{self._tag_repr()})"


@dataclass(frozen=True, repr=False)
class Where(Rule):
    """Match nodes for which a predicate ``fn(node) -> bool`` holds (a bare callable in ``rules`` becomes one)."""

    fn: Callable[[torch.fx.Node], bool] | None = None

    def __init__(self, fn: Callable[[torch.fx.Node], bool], *, name: str = "", tags: Sequence[str] | str = ()):
        if not callable(fn):
            raise PartitionError(f"Where(...) needs a callable node -> bool; got {fn!r}.")
        object.__setattr__(self, "fn", fn)
        object.__setattr__(self, "name", name or getattr(fn, "__name__", "where").strip("<>").replace("lambda", "where"))
        object.__setattr__(self, "tags", tags)
        _check_tags(self)

    def match(self, node: torch.fx.Node) -> Any:
        return self if self.fn(node) else None  # type: ignore[misc]

    def __repr__(self) -> str:
        return f"Where({getattr(self.fn, '__name__', 'fn')}{self._tag_repr()})"


@dataclass(frozen=True, repr=False)
class Seq(Rule):
    """Match a run of consecutive compute nodes matching ``rules[0]``, then ``rules[1]``, ... as one segment.

    ``Seq(Op("matmul"), Op("softmax"), Op("matmul"))`` makes a hand-written attention one segment.
    Matching is done by :meth:`find`, over the whole node list, not node by node.
    """

    rules: tuple[Rule, ...] = ()

    def __init__(self, *rules: Any, name: str = "", tags: Sequence[str] | str = ()):
        if len(rules) < 2:
            raise PartitionError(f"Seq(...) needs at least two rules; got {len(rules)}.")
        object.__setattr__(self, "rules", tuple(as_rule(r) for r in rules))
        object.__setattr__(self, "name", name or "_".join(r.label for r in self.rules))
        object.__setattr__(self, "tags", tags)
        _check_tags(self)

    def match(self, node: torch.fx.Node) -> Any:
        return None  # Seq is matched by find(), see partition.assign_regions

    def find(self, nodes: Sequence[torch.fx.Node]) -> list[tuple[int, int]]:
        """``(start, stop)`` index ranges into ``nodes`` where the sequence occurs (non-overlapping)."""
        out, i = [], 0
        while i < len(nodes):
            j, k = i, 0
            while j < len(nodes) and k < len(self.rules):
                if self.rules[k].match(nodes[j]) is not None:
                    while j < len(nodes) and self.rules[k].match(nodes[j]) is not None:
                        j += 1
                    k += 1
                elif _is_trivial(nodes[j]) and k > 0:
                    j += 1
                else:
                    break
            if k == len(self.rules):
                out.append((i, j))
                i = j
            else:
                i += 1
        return out

    def __repr__(self) -> str:
        return f"Seq({', '.join(map(repr, self.rules))}{self._tag_repr()})"


_TRIVIAL = re.compile(r"getitem|Tensor\.(view|reshape|transpose|permute|contiguous|size|to|unsqueeze|squeeze|expand)$|sym_size")


def _is_trivial(node: torch.fx.Node) -> bool:
    return bool(_TRIVIAL.search(op_name(node)))


def as_rule(obj: Any) -> Rule:
    """Accept a rule object or wrap a bare callable as :class:`Where`."""
    if isinstance(obj, Rule):
        return obj
    if isinstance(obj, type) and issubclass(obj, torch.nn.Module):
        return Mod(obj)
    if callable(obj):
        return Where(obj)
    raise PartitionError(
        f"Cannot use {obj!r} as a split rule: pass dynaflow.Op(regex), dynaflow.Mod(class or qualname), "
        "dynaflow.Seq(...), or a callable node -> bool."
    )


COLLECTIVE_PATTERN = (
    r"_c10d_functional|c10d_functional|_functional_collectives|all_reduce|all_gather|reduce_scatter|"
    r"all_to_all|wait_tensor|broadcast"
)


_COPY = re.compile(r"(^|\.)(_to_copy|to|copy_|copy|cuda|cpu|_copy_from)(\.|$)")


def _device_type(value: Any) -> str | None:
    device = getattr(value, "device", None)
    return getattr(device, "type", None)


def host_device_copy(node: torch.fx.Node) -> bool:
    """A copy between host and device memory (``x.to("cuda")``, ``dst.copy_(pinned)``, ``x.cpu()``): its
    input and output tensors live on different device types (read from the nodes' fake values)."""
    if node.op not in ("call_function", "call_method") or not _COPY.search(op_name(node)):
        return False
    out = node.meta.get("example_value", node.meta.get("val"))
    args = [a for a in node.all_input_nodes]
    types = {_device_type(a.meta.get("example_value", a.meta.get("val"))) for a in args} | {_device_type(out)}
    types.discard(None)
    return len(types) > 1


def default_rules() -> list[Rule]:
    """Cut around collectives, host <-> device copies, attention cores and each block's MLP / MoE; everything
    else is glue."""
    return [
        Op(COLLECTIVE_PATTERN, name="comm", tags=("network",)),
        Where(host_device_copy, name="transfer", tags=("transfer",)),
        Op(r"scaled_dot_product_attention|flash_attn|flex_attention|paged_attention|unified_attention|decode_attention",
           name="attention", tags=("memory",)),
        Mod(r"(?i).*(mlp|moe|feedforward|feed_forward|ffn|experts).*", name="mlp", tags=("compute",)),
    ]
