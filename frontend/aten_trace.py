"""Lower one captured fx node to the ATen ops it dispatches, on the fake values Dynamo recorded.

The batch analysis keys its rules on ATen overloads, a finite set, rather than on the open-ended
torch-level call forms of a Dynamo graph (``F.layer_norm(h.t(), ...)``, ``x[0] = 0``, ``torch.rot90``).
Running the node's target on its recorded fake inputs under a dispatch mode yields exactly those ops,
after composite ops have decomposed. Guards the run would add to Dynamo's shape environment are
suppressed, so the analysis never specializes the captured graph.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
import torch.fx
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["Dispatched", "lower_node", "fake_mode_of", "bind", "call_key", "call_module_on_fakes"]


@dataclass(frozen=True)
class Dispatched:
    """One ATen op the node ran: overload, positional and keyword args, result (fake tensors)."""

    op: Any
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    out: Any

    def __repr__(self) -> str:
        return f"Dispatched({self.op})"


class _Recorder(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.calls: list[Dispatched] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self.calls.append(Dispatched(func, tuple(args), dict(kwargs), out))
        return out


def fake_mode_of(values: Any) -> Any:
    """The FakeTensorMode of the first fake tensor in ``values`` (nested lists/tuples/dicts), or None."""
    for v in torch.utils._pytree.tree_leaves(values):
        mode = getattr(v, "fake_mode", None)
        if mode is not None:
            return mode
    return None


@contextlib.contextmanager
def _quiet(mode: Any) -> Iterator[None]:
    env = getattr(mode, "shape_env", None)
    allow = mode.allow_non_fake_inputs
    mode.allow_non_fake_inputs = True  # parameters of a call_module node are real tensors
    try:
        with (env.suppress_guards() if env is not None else contextlib.nullcontext()), mode:
            yield
    finally:
        mode.allow_non_fake_inputs = allow


def lower_node(gm: torch.fx.GraphModule, node: torch.fx.Node, args: tuple[Any, ...], kwargs: dict[str, Any],
               mode: Any) -> tuple[list[Dispatched], Any]:
    """Run ``node`` on fake ``args``/``kwargs`` under ``mode``; the ATen ops it dispatched and its result."""
    rec = _Recorder()
    # outside inference mode: there, composite ops (aten.linear) reach the mode whole instead of decomposed
    with _quiet(mode), torch.inference_mode(False), torch.no_grad(), rec:
        if node.op == "call_method":
            out = getattr(args[0], str(node.target))(*args[1:], **kwargs)
        elif node.op == "call_module":
            out = call_module_on_fakes(gm.get_submodule(str(node.target)), mode, args, kwargs)
        else:
            out = node.target(*args, **kwargs)
    return rec.calls, out


def call_module_on_fakes(module: torch.nn.Module, mode: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Call a ``call_module`` node's module with its parameters and buffers as fake tensors of ``mode``: an
    in-place update of its own state (BatchNorm's running stats in training, a step counter) then writes a fake,
    which the analysis sees, and never the module's real tensors."""
    state = {name: mode.from_tensor(t, static_shapes=True)  # weights' sizes are constants, as in Dynamo's graphs
             for name, t in (*module.named_parameters(remove_duplicate=False),
                             *module.named_buffers(remove_duplicate=False))}
    return torch.func.functional_call(module, state, args, kwargs, tie_weights=False, strict=False)


_SCHEMA_NAMES: dict[Any, tuple[tuple[str, Any], ...]] = {}


def bind(op: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """Arguments of an ATen call by schema name, defaults filled in."""
    names = _SCHEMA_NAMES.get(op)
    if names is None:
        names = _SCHEMA_NAMES[op] = tuple(
            (a.name, a.default_value if a.has_default_value() else None) for a in op._schema.arguments)
    bound = {name: default for name, default in names}
    for (name, _), value in zip(names, args):
        bound[name] = value
    bound.update(kwargs)
    return bound


_PLAIN = (int, float, bool, str, type(None), torch.dtype, torch.device, torch.layout, torch.memory_format)
_SYM = (torch.SymInt, torch.SymFloat, torch.SymBool)


def call_key(node: torch.fx.Node, tensor_key: Callable[[torch.fx.Node, torch.Tensor], Any]) -> Any:
    """A key equal for two nodes making the same call on values of the same kind (the layers of a deep model),
    so a verdict found by running one node holds for the others: the op, the target, and every argument by
    value (plain constants), by expression (symbolic sizes) or by ``tensor_key`` (input node, its traced
    tensor); ``None`` when an argument cannot be keyed or the target is unhashable."""
    if node.op == "call_module":
        return None
    ok = True

    def key_of(a: Any) -> Any:
        nonlocal ok
        if isinstance(a, torch.fx.Node):
            v = a.meta.get("val", a.meta.get("example_value"))
            if isinstance(v, torch.Tensor):
                return ("T", tensor_key(a, v))
            if isinstance(v, _SYM):
                return ("S", str(v.node.expr))
            if isinstance(v, (int, float, bool, str, type(None))):
                return ("V", v)
        elif isinstance(a, (list, tuple)):
            return tuple(key_of(x) for x in a)
        elif isinstance(a, dict):
            return tuple((k, key_of(x)) for k, x in a.items())
        elif isinstance(a, slice):
            return ("slice", key_of(a.start), key_of(a.stop), key_of(a.step))
        elif a is Ellipsis:
            return "..."
        elif isinstance(a, _PLAIN):
            return a
        elif isinstance(a, _SYM):
            return ("S", str(a.node.expr))
        ok = False
        return None

    key = (node.op, node.target, key_of(node.args), key_of(node.kwargs))
    if not ok:
        return None
    try:
        hash(key)
    except TypeError:  # an unhashable target or constant
        return None
    return key
