"""Names and roles of a captured graph's inputs: which forward argument (or module attribute) each placeholder
is, which ones the graph writes in place, and which ones the caller declared persistent (``static_inputs``).

Dynamo orders placeholders by first use, not by the forward's signature, so inputs are named after their
source: ``x``, ``caches[0]`` (an element of a list argument), ``layers.0.weight`` / ``cache`` (a module's
parameter or buffer). A ``static_inputs`` entry names an argument (covering every tensor inside it: ``caches``
covers ``caches[0]`` and ``caches[1]``), a module attribute path, a placeholder's own name, or an int: the
placeholder's position.
"""

from __future__ import annotations

import inspect
import re
from typing import Any, Mapping, Sequence

import torch
import torch.fx

from dynaflow.errors import ConfigError, did_you_mean
from dynaflow.frontend.differential import mutated_inputs
from dynaflow.frontend.effects import storage_root
from dynaflow.segmented import InputRoles

__all__ = ["input_name", "input_label", "input_roles", "output_aliased_inputs", "bound_arguments", "tensors_within",
           "objects_within"]

_ARG = re.compile(r"L\['(\w+)'\]")
_SOURCE = re.compile(r"L\['(\w+)'\](?:\.tensors\[.*\])?")  # the argument (or a tensor of it), not its size
_TARGET = re.compile(r"L_(\w+?)_(?:tensors_\w*)?")
_ATTR_TARGET = re.compile(r"_(?:modules|parameters|buffers)_")
_ITEM_TARGET = re.compile(r"(\w+?)_(\d+)")
_ATTR = re.compile(r"\._(?:modules|parameters|buffers)\['([^']+)'\]|\.(\w+)")


def _source_name(node: torch.fx.Node) -> str | None:
    source = getattr(node.meta.get("grapharg"), "source", None)
    if source is None:
        return None
    return str(source.name() if callable(getattr(source, "name", None)) else getattr(source, "name", ""))


def input_name(node: torch.fx.Node) -> str | None:
    """The forward argument a Dynamo placeholder came from (``L['positions']`` -> ``positions``), when the
    placeholder is that argument itself (or a tensor of an engine's tensor bundle)."""
    name = _source_name(node)
    m = _SOURCE.fullmatch(name) if name else None
    if m:
        return m.group(1)
    m = _TARGET.fullmatch(node.target) if isinstance(node.target, str) else None  # Dynamo's target: L_input_ids_
    return m.group(1) if m else None


def input_label(node: torch.fx.Node) -> str:
    """A readable name for a placeholder: ``x``, ``caches[0]``, a module attribute's dotted path
    (``layers.0.weight``), or the placeholder's own name when it is none of those."""
    name = _source_name(node)
    m = _ARG.match(name) if name else None
    if not m:
        return _label_of_target(str(node.target))
    rest = name[m.end():]  # type: ignore[index]
    attrs = [a or b for a, b in _ATTR.findall(rest)]
    if attrs and rest.startswith("."):
        return ".".join(attrs)  # an attribute (path) of the argument: the module's own parameters and buffers
    return m.group(1) + rest.replace("'", "")


def _label_of_target(target: str) -> str:
    """The same label from Dynamo's placeholder name alone (a copied graph loses the source):
    ``L_self_modules_lin_parameters_weight_`` -> ``lin.weight``, ``L_caches_0_`` -> ``caches[0]``."""
    if not (target.startswith("L_") and target.endswith("_")):
        return target
    body = target[2:-1]
    parts = _ATTR_TARGET.split(body)
    if len(parts) > 1:
        return ".".join(parts[1:])
    m = _ITEM_TARGET.fullmatch(body)
    return f"{m.group(1)}[{m.group(2)}]" if m else body


def _matches(entry: str, label: str, node: torch.fx.Node) -> bool:
    return entry in (label, str(node.target)) or label.startswith(entry + "[") or label.startswith(entry + ".")


def bound_arguments(fn: Any, args: Sequence[Any], kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """The call's arguments by the names of ``fn``'s (a module's ``forward``) parameters; keywords a ``**kwargs``
    parameter takes keep their own names. Empty when the call does not bind."""
    target = fn.forward if isinstance(fn, torch.nn.Module) else fn
    try:
        bound = inspect.signature(target).bind(*args, **kwargs)
    except (TypeError, ValueError):
        return dict(kwargs)
    out: dict[str, Any] = {}
    for name, value in bound.arguments.items():
        kind = bound.signature.parameters[name].kind
        if kind is inspect.Parameter.VAR_KEYWORD:
            out.update(value)
        else:
            out[name] = value
    return out


def objects_within(value: Any, depth: int = 6) -> list[Any]:
    """Every object inside an argument, itself first: the items of lists, tuples and dicts, and the attributes
    of other objects (a transformers ``StaticCache``'s layers and their ``keys`` and ``values``), ``depth``
    levels down; modules and classes are not opened."""
    out: list[Any] = []
    seen: set[int] = set()

    def walk(v: Any, left: int) -> None:
        if id(v) in seen or left < 0:
            return
        seen.add(id(v))
        out.append(v)
        if isinstance(v, torch.Tensor):
            return
        if isinstance(v, (list, tuple)):
            for x in v:
                walk(x, left - 1)
        elif isinstance(v, Mapping):
            for x in v.values():
                walk(x, left - 1)
        elif hasattr(v, "__dict__") and not isinstance(v, (type, torch.nn.Module)):
            for x in vars(v).values():
                walk(x, left - 1)

    walk(value, depth)
    return out


def tensors_within(value: Any, depth: int = 6) -> list[torch.Tensor]:
    """The tensors among :func:`objects_within`."""
    return [v for v in objects_within(value, depth) if isinstance(v, torch.Tensor)]


def input_roles(gm: torch.fx.GraphModule, static_inputs: Sequence[Any] = (),
                found: Mapping[str, Sequence[int]] | None = None) -> InputRoles:
    """The roles of ``gm``'s inputs; an entry of ``static_inputs`` that names no tensor input raises
    :class:`ConfigError` listing the inputs there are. ``found``: per entry naming an argument of the call, the
    inputs the call passed inside it (:func:`tensors_within`), whatever Dynamo named them (none: the graph does
    not read that argument, which is no error)."""
    nodes = list(gm.graph.find_nodes(op="placeholder"))
    labels = tuple(input_label(n) for n in nodes)
    declared: set[int] = set()
    for entry in static_inputs:
        if isinstance(entry, int) and not isinstance(entry, bool):
            if not 0 <= entry < len(nodes):
                raise ConfigError(f"static_inputs: position {entry} is out of range: the graph has {len(nodes)} "
                                  f"inputs ({', '.join(labels)}). Name the input instead, e.g. static_inputs=['{labels[-1] if labels else 'kv_cache'}'].")
            hit = [entry]
        else:
            hit = [i for i, (n, lab) in enumerate(zip(nodes, labels)) if _matches(str(entry), lab, n)]
            hit = sorted({*hit, *(found or {}).get(str(entry), ())})
            if not hit and str(entry) in (found or {}):
                continue  # an argument of the call that this graph does not read (after a graph break, a None)
            if not hit:
                raise ConfigError(f"static_inputs: {entry!r} names no input of the graph.{did_you_mean(str(entry), labels)} "
                                  f"Its inputs are: {', '.join(labels)}.")
        for i in hit:
            val = nodes[i].meta.get("example_value", nodes[i].meta.get("val"))
            if val is not None and not isinstance(val, torch.Tensor):
                raise ConfigError(f"static_inputs: {labels[i]!r} is a {type(val).__name__}, not a tensor; only tensor "
                                  "inputs have storage to keep. Remove it from static_inputs.")
            declared.add(i)
    return InputRoles(labels, frozenset(mutated_inputs(gm)), frozenset(declared), output_aliased_inputs(gm))


def output_aliased_inputs(gm: torch.fx.GraphModule) -> frozenset[int]:
    """Positions of the inputs whose storage a graph output shares (the input itself, a view of it, or an
    in-place result on it)."""
    index = {n: i for i, n in enumerate(gm.graph.find_nodes(op="placeholder"))}
    out = next((n for n in gm.graph.nodes if n.op == "output"), None)
    roots: set[int] = set()
    if out is not None:
        for node in out.all_input_nodes:
            root = storage_root(node)
            if root in index:
                roots.add(index[root])
    return frozenset(roots)
