"""The public entry points: ``compile``, ``parallelize`` and the ``"dynaflow"`` torch.compile backend.

``Compiled`` wraps a model: Dynamo captures it (batch dim marked dynamic; the hook is in
``dynaflow.frontend.capture``), each captured graph becomes a :class:`CompiledGraph` that is partitioned
once, planned once per batch size by the strategy (the passes are in ``dynaflow.planning``, the autotuner in
``dynaflow.tune``), and run by an executor (``dynaflow.backend``) on every call.
"""

from __future__ import annotations

import functools
import inspect
import logging
import threading
import types
import weakref
from typing import Any, Callable, Sequence, TextIO

import torch
import torch.fx

from dynaflow import distributed
from dynaflow.backend import Program, check_executor_name
from dynaflow.compiled_graph import CompiledGraph
from dynaflow.config import DynaflowConfig
from dynaflow.errors import CaptureError, ConfigError, DynaflowError, PartitionError
from dynaflow.floor_check import FloorCheck
from dynaflow.frontend import graph_breaks
from dynaflow.frontend.hook_watch import HookWatch, drop_captures, module_of
from dynaflow.frontend.graph_inputs import bound_arguments, tensors_within
from dynaflow.frontend.capture import (SHARED_BACKEND, GraphEntry, batch_size_of, check_layouts, check_outputs, flat_io,
                                       fx_state, mark_batch_dynamic, no_graph_error, run_dynamo)
from dynaflow.ir import Schedule
from dynaflow.planning import Plan, describe_inputs
from dynaflow.requests import current_requests
from dynaflow.strategies import Strategy, check_data_spec, get as get_strategy
from dynaflow.timeline import Timeline

__all__ = ["compile", "parallelize", "dynaflow_backend", "Compiled", "CompiledGraph", "Plan"]

log = logging.getLogger(__name__)

_CAPTURE_ANALYSIS = threading.RLock()
"""Held while a Dynamo capture is partitioned (:meth:`Compiled.graph_for`): the analysis runs ops on the fake
tensors Dynamo recorded in the graph, under the FakeTensorMode of that capture, and every ``Compiled`` sharing the
capture (one model class, :data:`SHARED_BACKEND`) prepares its own copy of the same graph with the same fake values
and mode. A FakeTensorMode is not thread-safe (its ``in_kernel_invocation`` flag is per mode, its dispatch-key
state per thread). Taken after ``Compiled._lock``; nothing under it takes another dynaflow lock or Dynamo's
``compile_lock``, and Dynamo's compile (which holds ``compile_lock``) never reaches ``graph_for``."""


class Compiled:
    """A model compiled by dynaflow: call it like the model; inspect it with ``explain()``."""

    def __init__(self, model: Callable[..., Any], config: DynaflowConfig):
        check_executor_name(config.executor)
        self.model = model
        self.config = config = _named_static_inputs(model, config)
        self.strategy: Strategy = get_strategy(config.strategy, **dict(config.strategy_options))
        self.graphs: list[CompiledGraph] = []
        self._checked = False
        self._lock = threading.Lock()
        self._by_entry: dict[GraphEntry, CompiledGraph] = {}
        self._local = threading.local()
        """The batch size of the call in flight on each Python thread (read by static captures)."""
        self.graph_breaks: list[str] = []
        """Dynamo's reasons for cutting the model into several graphs (its graph breaks), for ``explain()``."""
        self._as_is: set[tuple[Any, ...]] = set()
        """Call keys (:func:`call_key`) of calls that run the model itself, skipping Dynamo (see ``__call__``)."""
        self.direct_calls = 0
        """Calls that ran the model itself: a batch of 0 rows, the eager floor won their bucket, a torch.func
        transform is active, or Dynamo ran the call eagerly after earlier calls were split (its recompile limit)."""
        self._warned_transform = self._warned_fallback = False
        self.floor_check = FloorCheck()
        """``auto``'s whole-call comparison with the model itself (:mod:`dynaflow.floor_check`)."""
        self._static_names = tuple(e for e in config.static_inputs if isinstance(e, str))
        """``static_inputs`` entries that may name a forward argument: its tensors are found in the call itself
        (a cache object's attributes too), since Dynamo's input names are lossy."""
        weakref.finalize(self, _release_graphs, self.graphs)
        self._fx = isinstance(model, torch.fx.GraphModule)
        owner = None if self._fx else module_of(model)
        self.hook_watch: HookWatch | None = HookWatch([owner]) if owner is not None else None
        """Notices module hooks added or removed after a capture (:mod:`dynaflow.frontend.hook_watch`); ``None``
        for a plain function, whose compiles guard every module's hooks in Dynamo instead."""
        if self._fx:
            self._flatten, self._unflatten = flat_io(model)
            self._fx_state = fx_state(model)
            self._fx_seen: tuple[Any, ...] | None = None
        else:
            self._compiled = torch.compile(model, backend=SHARED_BACKEND, dynamic=None)
        try:
            functools.update_wrapper(self, model, updated=())
        except (AttributeError, TypeError):
            pass

    def graph_for(self, entry: GraphEntry, inputs: Sequence[Any] = ()) -> CompiledGraph:
        """This model's CompiledGraph for a graph Dynamo captured (made on first use, from a private copy of
        the captured graph: partitioning rewrites it, and other Compiled objects may share the capture);
        ``inputs``: the graph's inputs in this call."""
        with self._lock:
            graph = self._by_entry.get(entry)
            if graph is None:
                label = f"graph{len(self.graphs)}"
                try:
                    with _CAPTURE_ANALYSIS:
                        graph = CompiledGraph(entry.copy_gm(), self.config, self.strategy, label=label)
                        graph.static_found = self._static_positions(inputs)
                        graph.prepare()
                except DynaflowError:
                    raise
                except Exception as exc:  # a user rule (a Where predicate) or a strategy's rules() raised
                    raise PartitionError(
                        f"{label}: partitioning the captured graph failed with {type(exc).__name__}: {exc}. A split "
                        "rule raised (a Where(...) predicate or a bare callable in rules= must return True/False for "
                        "every fx node, e.g. check node.op and node.target before reading node.args)."
                    ) from exc
                me = weakref.ref(self)
                graph.batch_hint = lambda: getattr(getattr(me(), "_local", None), "batch", 0)
                graph.batch_marked = getattr(self._local, "batch", 0) >= 2
                self._by_entry[entry] = graph
                self.graphs.append(graph)
            return graph

    def watch_hooks(self, *modules: torch.nn.Module) -> None:
        """Declare the modules a compiled function runs (an integration's step function): their hooks are
        watched per call (:mod:`dynaflow.frontend.hook_watch`) instead of guarded by Dynamo in every compile."""
        self.hook_watch = HookWatch(modules)

    def _check_hooks(self) -> None:
        """Hooks may have changed: if a hook of a watched module was added or removed since the captures,
        capture again (nothing to do before the first capture). Under the lock: a concurrent call that also saw
        the counter move waits until the captures are dropped."""
        with self._lock:
            if not self.hook_watch.changed() or not self._by_entry:  # type: ignore[union-attr]
                return
            drop_captures(f"{type(self.model).__name__}: module hooks changed since the capture")
            _release_graphs(self.graphs)
            self.graphs.clear()
            self._by_entry.clear()
            self._as_is.clear()

    def _static_positions(self, inputs: Sequence[Any]) -> dict[str, tuple[int, ...]]:
        """Per ``static_inputs`` name that resolves in the call in flight (an argument, a path inside one such as
        ``caches.k``, or a module attribute path such as ``l.weight``), the graph inputs that are tensors inside
        what it names, by identity. None for a graph that does not read it: one after a graph break, or a
        ``None`` argument. A name that resolves nowhere is left to :func:`input_roles`, which matches it against
        the graph's input labels or refuses it by name."""
        call = getattr(self._local, "call", None)
        if not self._static_names or call is None:
            return {}
        arguments = bound_arguments(self.model, *call)
        found = {}
        for name in self._static_names:
            target = _resolve_path(name, arguments, self.model)
            if target is not _UNRESOLVED:
                ids = {id(t) for t in (_module_tensors(target) if isinstance(target, torch.nn.Module)
                                       else tensors_within(target))}
                found[name] = tuple(i for i, x in enumerate(inputs) if id(x) in ids)
        return found

    @torch._dynamo.disable
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        # Never traced by an outer torch.compile (a parent module compiled whole, or dynaflow inside dynaflow):
        # the outer graph breaks here and this call runs through dynaflow's own capture.
        if torch._C._functorch.peek_interpreter_stack() is not None:
            return self._in_transform(args, kwargs)
        if self._fx:
            return self._call_fx(args, kwargs)
        if self._static_names:
            self._local.call = (args, kwargs)
        batch = self._local.batch = mark_batch_dynamic(args, kwargs, self.config.batch_dim)
        if self.hook_watch is not None and self.hook_watch.moved():
            self._check_hooks()
        # no rows: nothing to split or overlap, unless other ranks have some (the call takes part in their step)
        if batch == 0 and distributed.world_size() == 1:
            self.direct_calls += 1
            return self.model(*args, **kwargs)
        key = call_key(args, kwargs) if self._as_is or self.floor_check.active else None
        if key is not None and key in self._as_is:
            self.direct_calls += 1
            return self.model(*args, **kwargs)
        if self.floor_check.active:
            assert key is not None
            out, verdict = self.floor_check.run(
                key, f"calls like this batch-{batch} one", lambda: self._direct(args, kwargs),
                lambda: self._through_dynaflow(args, kwargs, batch, key),
                describe_inputs(torch.utils._pytree.tree_leaves((args, kwargs)), batch).on_cuda)
            if verdict is not None and not verdict.keeps_dynaflow:
                self._as_is.add(key)
            return out
        return self._through_dynaflow(args, kwargs, batch, key)

    def _in_transform(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """A call inside a torch.func transform (``vmap``, ``grad``, ``jacrev``): the model itself runs. The
        transform's state is per thread, which lanes on other threads would not see, and Dynamo, asked to capture
        under it, gives up on the model's code for every later call too."""
        if not self._warned_transform:
            self._warned_transform = True
            log.info("%s called inside a torch.func transform: the model runs itself there, unsplit",
                     type(self.model).__name__)
        self.direct_calls += 1
        return self.model(*args, **kwargs)

    def _direct(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        self._local.call = None
        self.direct_calls += 1
        return self.model(*args, **kwargs)

    def _graph_calls(self) -> int:
        graphs = self.graphs
        return graphs[0].calls if len(graphs) == 1 else sum(g.calls for g in graphs)

    def _through_dynaflow(self, args: tuple[Any, ...], kwargs: dict[str, Any], batch: int, key: Any = None) -> Any:
        """One call through Dynamo and the captured graphs. ``key``: the call's :func:`call_key`, when the caller
        computed it already."""
        before = self._graph_calls()
        breaks = graph_breaks.snapshot()
        now: list[str] = []
        try:
            out = run_dynamo(self, self._compiled, args, kwargs, self.model, self.config.batch_dim, batch)
        finally:
            if self._static_names:
                self._local.call = None  # the call's arguments are not kept past it
            graph_breaks.record_since(breaks, now)
            self.graph_breaks += [b for b in now if b not in self.graph_breaks]
        if not self._checked:
            check_outputs(out, inputs=(args, kwargs))
            self._checked = True
        after = self._graph_calls()
        if after == before:
            if before == 0:  # never a graph: this model cannot be split as called (the error says why and how)
                raise no_graph_error(self.model, now)
            return self._fell_back(out, now)
        if after == before + 1 and not self.graph_breaks:
            self._note_as_is(args, kwargs, batch, key)
        return out

    def _fell_back(self, out: Any, breaks: Sequence[str]) -> Any:
        """A call Dynamo ran eagerly after earlier calls gave dynaflow graphs (its recompile limit, reached by
        ordinary changes between calls): the model has run, effects included, so its answer is returned, with a
        warning the first time, rather than an error after the effects."""
        self.direct_calls += 1
        if not self._warned_fallback:
            self._warned_fallback = True
            log.warning("%s: Dynamo ran this call eagerly, without a graph for dynaflow (the answer is eager's, "
                        "unsplit); later calls like it will too: %s", type(self.model).__name__,
                        no_graph_error(self.model, breaks))
        return out

    def _note_as_is(self, args: tuple[Any, ...], kwargs: dict[str, Any], batch: int, key: Any = None) -> None:
        """After a call whose one graph ran as captured (``auto`` measured its eager floor fastest for this
        bucket): later calls with the same :func:`call_key` run the model itself, without Dynamo's guards and
        frame (~10-30 µs a call), so the floor is plain eager. Only for a call Dynamo ran as one graph (a model
        without graph breaks) and not in distributed lockstep, where every rank must plan. The key holds every
        argument's shape (a decode step after a prefill of the same batch is a call of its own). A call ``auto``
        planned (a split, a CUDA graph) is put on probation instead: :mod:`dynaflow.floor_check` times the next
        calls like it whole, through dynaflow and as the model itself, and the faster keeps them."""
        graph = self.last_graph
        if graph is None or (graph.distributed is not None and graph.distributed.agreeing):
            return
        if not graph.ran_as_is:
            if self.strategy.name == "auto":  # a planned call: time it whole against the model itself
                self.floor_check.start(key if key is not None else call_key(args, kwargs))
            return
        self._as_is.add(key if key is not None else call_key(args, kwargs))
        log.info("%s: calls like this one (batch %d) run the model itself from now on (the eager floor won their "
                 "bucket)", graph.label, batch)

    def _call_fx(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        flat = list(self._flatten(*args, **kwargs))
        check_layouts(flat)
        batch = batch_size_of(flat, self.config.batch_dim)
        # no rows: nothing to split or overlap, unless other ranks have some (the call takes part in their step)
        if batch == 0 and distributed.world_size() == 1:
            self.direct_calls += 1
            return self.model(*args, **kwargs)
        state = self._fx_state()
        if state != self._fx_seen:  # weights, leaves or their modes changed since the graphs were prepared
            with self._lock:
                if self._fx_seen is not None and self.graphs:
                    log.info("%s: the GraphModule's attributes changed since it was prepared: preparing it again",
                             type(self.model).__name__)
                    _release_graphs(self.graphs)
                    self.graphs.clear()
                self._fx_seen = state
        out = self._fx_graph(flat, batch)(*flat)
        out = self._unflatten(out)
        if not self._checked:
            check_outputs(out)
            self._checked = True
        return out

    def _fx_graph(self, flat: list[Any], batch: int) -> CompiledGraph:
        """The prepared graph for a GraphModule call: the one whose batch dim is symbolic, else one prepared at
        this batch (a first call of one row, or an export with a static batch, leaves the batch static: another
        batch is prepared anew, which makes it symbolic or says why it cannot be)."""
        for graph in self.graphs:
            if graph.segmented is not None and (graph.segmented.batch_symbol is not None or graph.fx_batch == batch):
                return graph
        with self._lock:
            graph = CompiledGraph(self.model, self.config, self.strategy, label=f"graph{len(self.graphs)}")
            graph.prepare(flat, from_fx=True)
            graph.fx_batch = batch
            self.graphs.append(graph)
        return graph

    # -- inspection -----------------------------------------------------------------------------------
    @property
    def last_graph(self) -> CompiledGraph | None:
        if len(self.graphs) == 1:  # the common model (no graph break): read on every call
            return self.graphs[0]
        ran = [g for g in self.graphs if g.last_plan is not None]
        if ran:
            return max(ran, key=lambda g: g.last_call_seq)
        return self.graphs[-1] if self.graphs else None

    @property
    def last_timeline(self) -> Timeline | None:
        g = self.last_graph
        return g.last_timeline if g else None

    @property
    def schedule(self) -> Schedule | None:
        g = self.last_graph
        return g.last_plan.schedule if g and g.last_plan else None

    @property
    def program(self) -> Program | None:
        g = self.last_graph
        return g.last_plan.program if g and g.last_plan else None

    def __reduce_ex__(self, protocol: Any) -> Any:
        raise ConfigError(self._no_copy("pickled"))

    def __deepcopy__(self, memo: Any) -> Any:
        raise ConfigError(self._no_copy("copied"))

    def _no_copy(self, what: str) -> str:
        return (f"A dynaflow.Compiled of {type(self.model).__name__} cannot be {what}: it holds lane threads, locks "
                "and captured graphs. Copy or save the model itself (copy.deepcopy(model), torch.save(model."
                "state_dict())) and call dynaflow.compile on the copy.")

    def explain(self, file: TextIO | None = None) -> str:
        """Segments, tags, split config and schedule table of every captured graph; printed to ``file``."""
        head = f"dynaflow: strategy {self.strategy.name!r} ({self.strategy.describe()}), executor {self.config.executor!r}"
        body = [g.explain() for g in self.graphs] or [
            f"(not captured yet: {self.direct_calls} call(s) ran the model itself, unsplit: a batch of 0 rows, or "
            "inside a torch.func transform; a call with rows captures it)" if self.direct_calls else
            "(not captured yet: call the model once)"]
        if self.floor_check.verdicts:
            body.append("auto's floor check (whole calls, dynaflow against the model itself):\n"
                        + "\n".join(f"  - {v!r}" for v in self.floor_check.verdicts))
        if self.graph_breaks:
            body.insert(0, f"graph breaks ({len(self.graphs)} graphs, each planned on its own):\n"
                        + "\n".join(f"  - {reason}" for reason in self.graph_breaks))
        text = "\n\n".join([head] + body)
        if file is not None:
            file.write(text + "\n")
        return text

    def __repr__(self) -> str:
        return f"dynaflow.Compiled({type(self.model).__name__}, strategy={self.strategy.name!r}, graphs={len(self.graphs)})"


_UNRESOLVED = object()


def _resolve_path(name: str, arguments: dict[str, Any], model: Any) -> Any:
    """What a ``static_inputs`` name reaches: an argument of the call, then dotted steps into it (dict keys, list
    indices, attributes; a ``None`` on the way is an argument this call leaves out); else the same steps from the
    model itself (``"l.weight"``), which must reach tensors. ``_UNRESOLVED`` when neither does (a typo, or a
    label only Dynamo's graph knows)."""
    first, *rest = name.split(".")
    if first in arguments:
        obj = _walk(arguments[first], rest)
        if obj is not _UNRESOLVED:
            return obj
    obj = _walk(model, [first, *rest])
    if obj is None or (isinstance(obj, torch.nn.Module) and not _module_tensors(obj)) or (
            not isinstance(obj, torch.nn.Module) and not tensors_within(obj)):
        return _UNRESOLVED  # a model attribute that holds no tensor (a flag, a method): no input to declare
    return obj


def _walk(obj: Any, steps: Sequence[str]) -> Any:
    for step in steps:
        if obj is None:
            return None
        if isinstance(obj, dict):
            obj = obj.get(step, _UNRESOLVED)
        elif isinstance(obj, (list, tuple)) and step.isdigit():
            obj = obj[int(step)] if int(step) < len(obj) else _UNRESOLVED
        else:
            obj = getattr(obj, step, _UNRESOLVED)
        if obj is _UNRESOLVED:
            return obj
    return obj


def _module_tensors(module: torch.nn.Module) -> list[torch.Tensor]:
    return [*module.parameters(), *module.buffers()]


def _named_static_inputs(model: Callable[..., Any], config: DynaflowConfig) -> DynaflowConfig:
    """``static_inputs`` positions of the model's forward arguments, as names (Dynamo orders a graph's inputs
    by first use, not by the signature); a GraphModule's positions are its placeholders' and stay as they are."""
    if isinstance(model, torch.fx.GraphModule) or not any(isinstance(e, int) for e in config.static_inputs):
        return config
    fn = model.forward if isinstance(model, torch.nn.Module) else model
    params = [p.name for p in inspect.signature(fn).parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    names = []
    for e in config.static_inputs:
        if isinstance(e, int) and not 0 <= e < len(params):
            raise ConfigError(f"static_inputs: position {e} is not a positional argument of {getattr(fn, '__qualname__', fn)} "
                              f"({', '.join(params) or 'none'}). Name the argument instead.")
        names.append(params[e] if isinstance(e, int) else e)
    return config.replace(static_inputs=tuple(names))


def _release_graphs(graphs: list[CompiledGraph]) -> None:
    for g in graphs:
        g.release()


def _config(config: DynaflowConfig | dict[str, Any] | None, **options: Any) -> DynaflowConfig:
    """``config`` (a DynaflowConfig, a dict of options or None) with the options passed by keyword applied."""
    if config is not None and not isinstance(config, DynaflowConfig):
        config = DynaflowConfig.from_dict(config)  # a dict, or a ConfigError naming what was passed
        if options.get("strategy", _UNSET) is _UNSET:  # a dict of options may be a YAML file's: data imports nothing
            check_data_spec(config.strategy, "config={'strategy': ...}")
    base = config or DynaflowConfig()
    changed = {k: v for k, v in options.items() if v is not _UNSET}
    DynaflowConfig.check_names(changed)
    return base.replace(**changed) if changed else base


_UNSET: Any = object()


def compile(
    model: Callable[..., Any],
    *,
    strategy: Any = _UNSET,
    nano_batches: int | None = _UNSET,
    rules: Sequence[Any] | None = _UNSET,
    executor: str = _UNSET,
    batch_dim: int = _UNSET,
    strict: bool = _UNSET,
    verify: bool = _UNSET,
    config: DynaflowConfig | dict[str, Any] | None = None,
    **options: Any,
) -> Compiled:
    """Compile ``model`` (an ``nn.Module``, a function, a ``torch.fx.GraphModule`` or a
    ``torch.export.ExportedProgram``) for nano-batch overlap.

    The result is called like the model and returns outputs equal to eager execution. Any other
    :class:`~dynaflow.config.DynaflowConfig` option may be passed by keyword too (``cuda_graphs=True``,
    ``strategy_options={...}``); it overrides the same option in ``config``.
    """
    cfg = _config(config, strategy=strategy, nano_batches=nano_batches, rules=rules, executor=executor,
                  batch_dim=batch_dim, strict=strict, verify=verify, **options)
    return Compiled(_compilable(model), cfg)


def _compilable(model: Any) -> Callable[..., Any]:
    """``model`` as something Dynamo captures: an ExportedProgram becomes its module; what Dynamo cannot capture
    (TorchScript, a non-callable) is a :class:`ConfigError` that says what to pass instead."""
    if isinstance(model, torch.export.ExportedProgram):
        return model.module()
    if isinstance(model, (torch.jit.ScriptModule, torch.jit.ScriptFunction)):
        raise ConfigError(f"dynaflow.compile cannot capture a TorchScript {type(model).__name__} (torch.compile does "
                          "not trace TorchScript). Pass the nn.Module or function before torch.jit.script/trace.")
    if isinstance(model, type):  # a class is callable, but calling it builds an instance
        fix = (f"dynaflow.compile({model.__name__}(...)) on an instance, or decorate the class with "
               "@dynaflow.parallelize" if issubclass(model, torch.nn.Module) else "an instance or a function")
        raise ConfigError(f"dynaflow.compile got the class {model.__qualname__}, not a model: pass {fix}.")
    if not callable(model):
        raise ConfigError(f"dynaflow.compile needs an nn.Module, a function, a torch.fx.GraphModule or an "
                          f"ExportedProgram; got {type(model).__name__} ({model!r:.80}).")
    return model


def parallelize(obj: Any = None, **options: Any) -> Any:
    """Decorator form of :func:`compile` for a function or an ``nn.Module`` subclass.

    ``@dynaflow.parallelize`` or ``@dynaflow.parallelize(strategy="round_robin", nano_batches=2)``; on a class,
    each instance is compiled on its first call and exposes the :class:`Compiled` as ``instance.dynaflow``.
    """
    def deco(target: Any) -> Any:
        if isinstance(target, type) and issubclass(target, torch.nn.Module):
            return _parallelize_class(target, options)
        if inspect.isfunction(target) and _looks_like_a_method(target):
            return _ParallelMethod(target, options)
        if callable(target):
            return compile(target, **options)
        raise CaptureError(f"@dynaflow.parallelize decorates a function or an nn.Module subclass; got {target!r}.")

    return deco(obj) if obj is not None else deco


def _looks_like_a_method(fn: Callable[..., Any]) -> bool:
    """Whether a function is (likely) a method: its first parameter is ``self``, or it is defined in a class body
    (``Net.forward``, whatever its first parameter is called) and takes an argument."""
    params = list(inspect.signature(fn).parameters)
    if params[:1] == ["self"]:
        return True
    scope = fn.__qualname__.split(".")[:-1]
    return bool(params) and bool(scope) and scope[-1] != "<locals>"


class _ParallelMethod:
    """``@dynaflow.parallelize`` on a method (``def forward(self, x)``): each instance compiles its bound method
    on first use; the compiled object is kept beside the instance, not in it (copies and pickles stay plain).
    Called with no instance (under ``@staticmethod``, or through the class with another first argument), it is
    the plain function, compiled once."""

    def __init__(self, fn: Callable[..., Any], options: dict[str, Any]) -> None:
        self.fn, self.options = fn, options
        self._per: "weakref.WeakKeyDictionary[Any, Compiled]" = weakref.WeakKeyDictionary()
        self._owner: type | None = None
        self._plain: Compiled | None = None
        functools.update_wrapper(self, fn)

    def __set_name__(self, owner: type, name: str) -> None:
        self._owner = owner  # set in a class body (a @staticmethod on top hides it: that one has no instance)

    def __get__(self, instance: Any, owner: type | None = None) -> Any:
        if instance is None:
            return self
        compiled = self._per.get(instance)
        if compiled is None:
            compiled = self._per[instance] = compile(types.MethodType(self.fn, instance), **self.options)
        return compiled

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        owner = self._owner
        if args and (isinstance(args[0], owner) if owner is not None else next(
                iter(inspect.signature(self.fn).parameters)) == "self"):  # through the class: Net.forward(net, x)
            return self.__get__(args[0])(*args[1:], **kwargs)
        if self._plain is None:
            self._plain = compile(self.fn, **self.options)
        return self._plain(*args, **kwargs)


_INSTANCES: "weakref.WeakKeyDictionary[torch.nn.Module, Compiled]" = weakref.WeakKeyDictionary()
"""The compiled object of each instance of a ``@dynaflow.parallelize`` class, kept beside it (not in its
``__dict__``), so ``copy.deepcopy`` and ``torch.save`` of the instance copy the module only."""


def _parallelize_class(cls: type[torch.nn.Module], options: dict[str, Any]) -> type[torch.nn.Module]:
    module_call = torch.nn.Module.__call__

    def __call__(self: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        compiled = _INSTANCES.get(self)
        if compiled is None:
            me = weakref.ref(self)  # the compiled object must not keep its instance alive

            def run(*a: Any, **k: Any) -> Any:
                return module_call(me(), *a, **k)

            compiled = _INSTANCES[self] = compile(run, **options)
        return compiled(*args, **kwargs)

    cls.__call__ = __call__  # type: ignore[method-assign]
    cls.dynaflow = property(lambda self: _INSTANCES.get(self))  # type: ignore[attr-defined]
    return cls


def dynaflow_backend(gm: torch.fx.GraphModule, example_inputs: list[Any], options: dict[str, Any] | None = None,
                     mode: str | None = None) -> CompiledGraph:
    """The ``torch.compile(model, backend="dynaflow", options={...})`` backend. ``mode`` (torch.compile's
    Inductor modes) has no meaning here: it is refused by name."""
    if mode is not None:
        raise ConfigError(f"torch.compile(..., backend='dynaflow', mode={mode!r}): modes are Inductor's. Pass dynaflow "
                          "options instead: options={'cuda_graphs': True} (what mode='reduce-overhead' does) or "
                          "{'inductor': True}.")
    cfg = DynaflowConfig.from_dict(options or {})
    return CompiledGraph(gm, cfg, get_strategy(cfg.strategy, **dict(cfg.strategy_options))).prepare()


def _register() -> None:
    from torch._dynamo.backends.registry import _BACKENDS, register_backend

    if "dynaflow" not in _BACKENDS or _BACKENDS.get("dynaflow") is None:
        register_backend(dynaflow_backend, name="dynaflow")


_register()


def call_key(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...]:
    """What a call of a compiled model is known by when it may skip Dynamo: each argument's shape, dtype, device
    and grad requirement (tensors), value (plain scalars and strings) or type (anything else), one level into
    tuples, lists and dicts; grad mode; and the declared request layout. Calls that Dynamo would trace into
    another graph differ in one of these (a decode step and a prefill of the same batch differ in shape)."""
    return (tuple(_arg_key(a) for a in args), tuple((k, _arg_key(v)) for k, v in kwargs.items()),
            torch.is_grad_enabled(), current_requests())


def _arg_key(x: Any, depth: int = 0) -> Any:
    if isinstance(x, torch.Tensor):
        return (x.shape, x.dtype, x.device, x.requires_grad)
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    if depth == 0 and isinstance(x, (tuple, list)):
        return (type(x), tuple(_arg_key(v, 1) for v in x))
    if depth == 0 and isinstance(x, dict):
        return (dict, tuple((k, _arg_key(v, 1)) for k, v in x.items()))
    return type(x)

