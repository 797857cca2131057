"""Capture: mark the batch dim dynamic for Dynamo, make a plain GraphModule's batch symbolic, check that a
model's outputs are tensors (or tuples / dicts of them), and the Dynamo hook — one shared backend whose
captured graphs are answered by the owner whose call is in flight (:func:`run_dynamo`), with Dynamo's
exceptions turned into dynaflow errors."""

from __future__ import annotations

import copy
import inspect
import threading
from typing import Any, Callable, Sequence

import torch
import torch.fx
import torch.utils._pytree as pytree
from torch.fx.experimental.symbolic_shapes import ConstraintViolationError

from dynaflow.errors import CaptureError, ConfigError, DynaflowError
from dynaflow.frontend.graph_inputs import objects_within
from dynaflow.frontend.aten_trace import call_module_on_fakes

__all__ = ["batch_size_of", "check_layouts", "mark_batch_dynamic", "symbolize", "check_outputs", "flat_io", "fx_state",
           "GraphEntry", "SharedBackend", "SHARED_BACKEND", "run_dynamo", "no_graph_error"]


def batch_size_of(tensors: Sequence[Any], batch_dim: int, where: str = "inputs") -> int:
    """The batch size: size ``batch_dim`` of the first tensor that has that dim."""
    shapes = []
    for t in tensors:
        if isinstance(t, torch.Tensor):
            if t.dim() > batch_dim:
                return int(t.shape[batch_dim])
            shapes.append(tuple(t.shape))
    raise ConfigError(
        f"batch_dim={batch_dim} but no tensor among the {where} has that dim (tensor shapes: {shapes or 'none'}). "
        f"Pass batch_dim=<the index of the batch dimension>, e.g. batch_dim=0."
    )


_PLAIN = frozenset({torch.Tensor, torch.nn.Parameter, type(None), int, float, bool, str})
"""Argument types that are pytree leaves (checked by exact type, the fast path of :func:`mark_batch_dynamic`)."""


def check_layouts(leaves: Sequence[Any]) -> None:
    """A :class:`ConfigError` for an input tensor dynaflow cannot split: nested (jagged) or sparse. Their rows
    are not slices of one strided tensor, and Dynamo captures neither as a graph input."""
    for i, t in enumerate(leaves):
        if isinstance(t, torch.Tensor) and (t.is_nested or t.layout is not torch.strided):
            kind = "a nested (jagged) tensor" if t.is_nested else f"a {t.layout} tensor"
            raise ConfigError(
                f"Input {i} is {kind}; dynaflow splits strided dense tensors only (rows are slices along the batch "
                "dim). Pass it dense (t.to_dense(), or torch.nested.to_padded_tensor(t, 0) with a mask), or call "
                "the model without dynaflow for this input."
            )


def _leaves(x: Any, out: list[Any]) -> None:
    """``pytree.tree_leaves(x)`` appended to ``out``, without pytree's per-node dispatch for the containers a
    call is made of (tuples, lists, dicts: walked here in pytree's order); anything else goes to pytree."""
    kind = type(x)
    if kind in _PLAIN:
        out.append(x)
    elif kind is tuple or kind is list:
        for a in x:
            _leaves(a, out)
    elif kind is dict:
        for a in x.values():
            _leaves(a, out)
    else:
        out.extend(pytree.tree_leaves(x))


def mark_batch_dynamic(args: tuple[Any, ...], kwargs: dict[str, Any], batch_dim: int) -> int:
    """Mark dim ``batch_dim`` dynamic on every input tensor whose size there equals the batch size.

    Returns the batch size. Size-1 batches are left static (Dynamo specialises 0/1 sizes).
    """
    leaves: list[Any] = []
    _leaves(args, leaves)
    if kwargs:
        _leaves(kwargs, leaves)
    check_layouts(leaves)
    tensors = [t for t in leaves if isinstance(t, torch.Tensor)]
    batch = batch_size_of(tensors, batch_dim)
    if batch >= 2:
        for t in tensors:
            if (batch_dim not in getattr(t, "_dynamo_weak_dynamic_indices", ()) and t.dim() > batch_dim
                    and t.shape[batch_dim] == batch):
                # marked once per tensor: a decode loop passes the same caches every step, and the mark (a
                # Dynamo-disabled call) costs microseconds of host time the GPU would wait on
                torch._dynamo.maybe_mark_dynamic(t, batch_dim)
    return batch


def symbolize(gm: torch.fx.GraphModule, inputs: Sequence[Any], batch_dim: int) -> None:
    """Propagate fake tensors through ``gm`` with the batch dim symbolic, filling ``node.meta["val"]``.

    Used for GraphModules from ``symbolic_trace`` or ``torch.export`` that the Dynamo backend never saw.
    """
    from torch._dynamo.source import ConstantSource
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext

    batch = batch_size_of(inputs, batch_dim)
    mode = FakeTensorMode(shape_env=ShapeEnv(), allow_non_fake_inputs=True)
    fakes = []
    for i, t in enumerate(inputs):
        if isinstance(t, torch.Tensor):
            dyn = [DimDynamic.DYNAMIC if (d == batch_dim and s == batch and batch >= 2) else DimDynamic.STATIC
                   for d, s in enumerate(t.shape)]
            fakes.append(mode.from_tensor(t, symbolic_context=StatelessSymbolicContext(dynamic_sizes=dyn),
                                          source=ConstantSource(f"input{i}")))
        else:
            fakes.append(t)
    try:
        # the caller's dispatch modes (torch's CUDA sanitizer reads every tensor's data pointer) must not see
        # the fake tensors of this analysis
        with torch.utils._python_dispatch._disable_current_modes(), mode:
            _RecordValues(gm, mode).run(*fakes)
    except Exception as exc:
        if "DataDependent" in type(exc).__name__:  # a value read as a Python number: no fake tensor holds it
            raise CaptureError(
                f"The GraphModule reads a tensor's value as a Python number (float(t), t.item(), a branch on it), so "
                f"dynaflow cannot analyse it on fake tensors ({type(exc).__name__}: {str(exc)[:200]}). Pass the "
                "nn.Module itself to dynaflow.compile: Dynamo captures around such reads."
            ) from exc
        raise CaptureError(
            f"Could not propagate a symbolic batch dim through the GraphModule ({type(exc).__name__}: {exc}). "
            "If it was made by torch.export with a static batch, export it with "
            "dynamic_shapes={...: {0: torch.export.Dim('batch')}}; or pass the nn.Module itself to dynaflow.compile."
        ) from exc


def flat_io(gm: torch.fx.GraphModule) -> tuple[Any, Any]:
    """``(flatten(*args, **kwargs) -> list, unflatten(outputs) -> tree)`` honouring a pytree codegen (export).

    Keyword arguments are bound to ``gm.forward``'s signature first, as calling the GraphModule would do, so an
    exported ``forward(self, x, *, scale)`` takes ``scale=`` (the codegen's ``process_inputs`` is positional only),
    and left-out arguments take their defaults.
    """
    codegen = gm.graph._codegen
    signature = inspect.signature(gm.forward)
    arity = len(signature.parameters)

    def flatten(*args: Any, **kwargs: Any) -> list[Any]:
        if kwargs or len(args) < arity:  # keywords, or defaults to fill in
            try:
                bound = signature.bind(*args, **kwargs)
            except TypeError as exc:
                raise CaptureError(f"The GraphModule's forward{signature} does not accept these inputs: {exc}.") from None
            bound.apply_defaults()
            args = bound.args + tuple(bound.kwargs.values())
        return list(codegen.process_inputs(*args))

    return flatten, codegen.process_outputs


def fx_state(gm: torch.fx.GraphModule) -> Callable[[], tuple[Any, ...]]:
    """A function giving what a GraphModule's graph reads from the module besides its inputs: each ``get_attr``
    tensor and each ``call_module`` leaf with its mode, parameters, buffers and hooks, by identity, dtype and
    device. dynaflow prepares a GraphModule once; a change here (``load_state_dict(assign=True)``, a replaced
    submodule, ``.half()``, ``train()``) must prepare it again, as eager would see it."""
    gets = sorted({str(n.target) for n in gm.graph.find_nodes(op="get_attr")})
    leaves = sorted({str(n.target) for n in gm.graph.find_nodes(op="call_module")})

    def find(path: str) -> Any:
        obj: Any = gm
        for part in path.split("."):
            obj = getattr(obj, part, None)
        return obj

    def tensor(t: Any) -> tuple[Any, ...]:
        return (id(t), t.dtype, t.device) if isinstance(t, torch.Tensor) else (id(t),)

    def state() -> tuple[Any, ...]:
        out: list[Any] = [tensor(find(path)) for path in gets]
        for path in leaves:
            m = find(path)
            out.append(id(m))
            if isinstance(m, torch.nn.Module):
                for sub in m.modules():
                    out.append((sub.training, len(sub._forward_hooks), len(sub._forward_pre_hooks)))
                    out += [tensor(t) for t in sub._parameters.values()]
                    out += [tensor(t) for t in sub._buffers.values()]
        return tuple(out)

    return state


def check_outputs(out: Any, who: str = "The model", inputs: Any = None) -> None:
    """Raise :class:`CaptureError` unless ``out`` is a tensor or (nested) tuples/lists/dicts of tensors; other
    values are allowed only where they are objects the call was given (``inputs``): a transformers cache passed
    in and returned, which Dynamo hands back as it is."""
    leaves, _ = pytree.tree_flatten_with_path(out)
    odd = [(path, x) for path, x in leaves if not isinstance(x, torch.Tensor) and x is not None]
    if odd and inputs is not None:
        given = {id(o) for o in objects_within(inputs)}
        odd = [(path, x) for path, x in odd if id(x) not in given]
    if odd:
        bad = ", ".join(f"{type(x).__name__} at output{pytree.keystr(path)}" if path else
                        f"{type(x).__name__}, which dynaflow does not look inside" for path, x in odd[:4])
        raise CaptureError(
            f"{who} returned {type(out).__name__} holding non-tensor values ({bad}); dynaflow "
            "needs a tensor or tuples/lists/dicts of tensors (or objects it was passed, such as a cache), because "
            "every output is split and merged along the batch. Return tensors only (for transformers models pass "
            "use_cache=False, or return_dict with tensors)."
        )


class _RecordValues(torch.fx.Interpreter):
    """Run a graph on fake inputs and keep every node's value in ``node.meta["val"]`` — sizes and ints too
    (torch 2.11's FakeTensorProp keeps a ``torch.Size`` as a tuple with ``None`` for its static entries and
    no value for the ints taken from it; the batch analysis reads both)."""

    def __init__(self, gm: torch.fx.GraphModule, mode: Any):
        super().__init__(gm)
        self.mode = mode

    def call_module(self, target: Any, args: Any, kwargs: Any) -> Any:
        return call_module_on_fakes(self.fetch_attr(target), self.mode, tuple(args), dict(kwargs))

    def run_node(self, n: torch.fx.Node) -> Any:
        out = super().run_node(n)
        if n.op == "get_attr" and isinstance(out, torch.Tensor):
            out = self.mode.from_tensor(out)  # weights as fake tensors, like every other value
        n.meta["val"] = out
        return out


# -- the Dynamo hook ---------------------------------------------------------------------------------
_OWNERS = threading.local()
"""``stack``: the owners (compiled models) whose call is in flight on this Python thread (innermost last)."""


class _HookGuards:
    """Dynamo guards on every module's hook dicts in the compiles dynaflow starts for an owner that does not watch
    its modules' hooks itself (a plain function: which modules it calls is unknown; a module or a module's method
    has a :class:`~dynaflow.frontend.hook_watch.HookWatch`, far cheaper per call). By default Dynamo skips them
    (``skip_nnmodule_hook_guards``), so a forward hook or pre-hook added to a submodule after the first call would
    be ignored by the cached graph: a silently different answer. The setting is switched off from the start of a
    compile on a thread with such a dynaflow call in flight to its end (Dynamo's compile callbacks), so only those
    compiles get the guards. ``torch._dynamo.reset()`` drops the callbacks: each call re-installs them when they
    are gone (:meth:`install`, a list lookup)."""

    def __init__(self) -> None:
        self._saved: list[Any] = []
        self._start, self._end = self.start, self.end  # one bound method each, found again by identity

    def start(self, *_: Any) -> None:
        config = torch._dynamo.config
        self._saved.append(config.skip_nnmodule_hook_guards)
        stack = getattr(_OWNERS, "stack", None)
        if stack and getattr(stack[-1], "hook_watch", None) is None:  # an owner that watches its hooks needs none
            config.skip_nnmodule_hook_guards = False

    def end(self, *_: Any) -> None:
        if self._saved:
            torch._dynamo.config.skip_nnmodule_hook_guards = self._saved.pop()

    def install(self) -> None:
        handler = torch._dynamo.callback_handler
        if self._start not in handler.start_callbacks:
            self._saved.clear()
            handler.register_start_callback(self._start)
            handler.register_end_callback(self._end)


_HOOK_GUARDS = _HookGuards()


class GraphEntry:
    """What Dynamo caches for one captured graph. One :class:`SharedBackend` serves every owner, so models of
    one class share Dynamo's cache entries (no recompile limit after many compiles, and the cache holds no
    model); each call runs the calling owner's ``graph_for(entry, inputs)`` for this capture."""

    def __init__(self, gm: torch.fx.GraphModule):
        self.gm = gm  # never the example inputs: Dynamo keeps this entry, and they hold the model's weights

    def copy_gm(self) -> torch.fx.GraphModule:
        """A private copy of the captured graph for one owner: partitioning rewrites it, and other owners may
        share this capture."""
        return torch.fx.GraphModule(self.gm, copy.deepcopy(self.gm.graph))

    def __call__(self, *inputs: Any) -> Any:
        stack = getattr(_OWNERS, "stack", None)
        if not stack:
            raise CaptureError(
                "A graph captured for dynaflow.compile ran outside a dynaflow.Compiled call (Dynamo reused its cache "
                "entry for another torch.compile wrapper). Call the model through the object dynaflow.compile returns."
            )
        return stack[-1].graph_for(self, inputs)(*inputs)


class SharedBackend:
    """A Dynamo backend that wraps each captured graph in a :class:`GraphEntry`."""

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list[Any]) -> GraphEntry:
        return GraphEntry(gm)


SHARED_BACKEND = SharedBackend()


def run_dynamo(owner: Any, compiled: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any],
               model: Any, batch_dim: int, batch: int) -> Any:
    """Call ``compiled`` (a ``torch.compile`` of ``model`` on :data:`SHARED_BACKEND`) with ``owner`` answering
    the captured graphs; Dynamo's exceptions become dynaflow errors that say what to change."""
    _HOOK_GUARDS.install()
    _OWNERS.stack = stack = getattr(_OWNERS, "stack", [])
    stack.append(owner)
    try:
        return compiled(*args, **kwargs)
    except torch._dynamo.exc.BackendCompilerFailed as exc:
        inner = getattr(exc, "inner_exception", None) or exc.__cause__
        if isinstance(inner, DynaflowError):
            raise inner.with_traceback(None) from None
        raise CaptureError(f"torch.compile failed while dynaflow compiled the captured graph: {exc}") from exc
    except ConstraintViolationError as exc:
        raise CaptureError(
            f"{type(model).__name__} fixes the batch size: Dynamo proved that dim {batch_dim} of "
            f"the inputs (size {batch}) must be a constant, so the batch cannot be split "
            f"({str(exc).splitlines()[0]}). Typical cause: a literal batch in .view(6, 8), .reshape(6, -1), "
            ".expand(6, 8) or torch.zeros(6, ...). Use -1 or x.shape[0] for the batch dim instead "
            "(x.view(-1, 8), x.expand(x.shape[0], 8))."
        ) from None
    except torch._dynamo.exc.TorchDynamoException as exc:
        raise CaptureError(f"Dynamo could not capture {type(model).__name__} for dynaflow: "
                           f"{type(exc).__name__}: {exc}") from exc
    finally:
        stack.pop()


def no_graph_error(model: Any, breaks: Sequence[str] = ()) -> CaptureError:
    """Why torch.compile ran ``model`` without handing dynaflow a graph, and what to do (``breaks``: the
    graph-break reasons Dynamo gave during the call)."""
    rnns = []
    if isinstance(model, torch.nn.Module):
        rnns = [f"{name or 'the model'} ({type(m).__name__})" for name, m in model.named_modules()
                if isinstance(m, torch.nn.RNNBase)]
    if rnns:
        return CaptureError(
            f"{type(model).__name__} contains {', '.join(rnns)}: Dynamo does not trace nn.LSTM / nn.GRU / "
            "nn.RNN modules (it runs them eagerly), so there was no graph for dynaflow to split. Compile the "
            "layers around the RNN instead (dynaflow.compile on the submodules before and after it), or write "
            "the recurrence with nn.LSTMCell / nn.GRUCell in a Python loop."
        )
    inplace = [name or "the model" for name, m in (model.named_modules() if isinstance(model, torch.nn.Module) else ())
               if getattr(m, "_compiled_call_impl", None) is not None]
    if inplace:
        return CaptureError(
            f"torch.compile ran {type(model).__name__} without handing any graph to dynaflow: {', '.join(inplace[:3])} "
            "was compiled in place with module.compile(), so calling it runs that torch.compile instead. Pass the "
            "module to dynaflow.compile before calling .compile() on it (or undo it: module._compiled_call_impl = None)."
        )
    modes = [type(m).__name__ for m in torch.utils._python_dispatch._get_current_dispatch_mode_stack()]
    if modes:
        return CaptureError(
            f"torch.compile ran {type(model).__name__} without handing any graph to dynaflow: a dispatch mode is "
            f"active ({', '.join(modes)}; torch's CUDA sanitizer, TORCH_CUDA_SANITIZER=1, is one), and Dynamo "
            "runs frames eagerly under one. Pass dynaflow.compile a torch.fx.symbolic_trace(model) (no Dynamo "
            "involved), or call the model outside the mode."
        )
    if breaks:
        return CaptureError(
            f"torch.compile ran {type(model).__name__} without handing any graph to dynaflow: Dynamo broke the "
            "graph before it captured any op, and ran the rest eagerly. Its reasons:\n"
            + "\n".join(f"  - {b}" for b in breaks) + "\nAn op whose output shape depends on the values (torch.unique, "
            "nonzero) or that reads a value as a Python number breaks the graph; a break inside a loop runs the rest of "
            "the frame eagerly. Compile the parts before and after that op with dynaflow.compile on their own, or move "
            "the break out of the loop."
        )
    return CaptureError(
        "torch.compile ran the model without handing any graph to dynaflow (Dynamo fell back to eager, e.g. "
        "its recompile limit was hit after many compiles of the same model class). Call "
        "torch._dynamo.reset() between compiles or raise torch._dynamo.config.recompile_limit."
    )
