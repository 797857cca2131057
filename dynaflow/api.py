"""The public entry points: ``compile``, ``parallelize`` and the ``"dynaflow"`` torch.compile backend.

``Compiled`` wraps a model: Dynamo captures it (batch dim marked dynamic), each captured graph becomes a
:class:`CompiledGraph` that is partitioned once, planned once per input bucket (batch size) by the
strategy, lowered to a Program, and run by an executor on every call.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import io
import itertools
import logging
import sys
from dataclasses import dataclass
from typing import Any, Callable, Sequence, TextIO

import torch
import torch.fx

from dynaflow import knobs
from dynaflow.backend import Program, executors, lower
from dynaflow.backend.comm import DistributedPlanner
from dynaflow.config import DynaflowConfig
from dynaflow.errors import BackendError, CaptureError, ConfigError, DynaflowError, StrategyError
from dynaflow.frontend.batching import find_batch_source
from dynaflow.frontend.capture import batch_size_of, check_outputs, flat_io, mark_batch_dynamic, symbolize
from dynaflow.frontend.partition import partition
from dynaflow.ir import InputInfo, NanoGraph, Schedule, SplitConfig
from dynaflow.requests import RequestLayout, current_requests
from dynaflow.segmented import SegmentedModule
from dynaflow.strategies import Strategy, get as get_strategy
from dynaflow.timeline import Timeline
from dynaflow.verify import verify_graph, verify_schedule

__all__ = ["compile", "parallelize", "dynaflow_backend", "Compiled", "CompiledGraph", "Plan"]

log = logging.getLogger("dynaflow")
_CALL_SEQ = itertools.count()


@dataclass(frozen=True)
class Plan:
    """Everything decided for one input bucket."""

    info: InputInfo
    split: SplitConfig
    graph: NanoGraph
    schedule: Schedule
    program: Program


class CompiledGraph:
    """One captured fx graph: partitioned once, planned per batch size, run by an executor."""

    def __init__(self, gm: torch.fx.GraphModule, config: DynaflowConfig, strategy: Strategy, label: str = "graph0"):
        self.gm = gm
        self.config = config
        self.strategy = strategy
        self.label = label
        self.segmented: SegmentedModule | None = None
        self.plans: dict[int, Plan] = {}
        """The latest plan per batch size (the input bucket)."""
        self._by_split: dict[SplitConfig, Plan] = {}
        self._splits: dict[tuple[Any, ...], tuple[InputInfo, SplitConfig]] = {}
        self.last_plan: Plan | None = None
        self.last_timeline: Timeline | None = None
        self.calls = 0
        self.last_call_seq = -1
        """Global call counter value of this graph's latest run (the most recent graph wins in inspection)."""
        self._batch_source: tuple[int, int] | None = None
        self.batch_hint: Callable[[], int] | None = None
        """For a static capture: where the caller learnt the batch size (Dynamo inputs start with weights)."""
        self._executors: dict[str, Any] = {}
        self.distributed: DistributedPlanner | None = None
        """Split agreement, collective ordering and lane communicators (set by ``prepare``)."""

    def prepare(self, example_inputs: Sequence[Any] | None = None, *, from_fx: bool = False) -> "CompiledGraph":
        """Partition the graph (for a plain GraphModule, first make its batch dim symbolic)."""
        if self.segmented is not None:
            return self
        gm = self.gm
        if from_fx:
            gm = torch.fx.GraphModule(gm, copy.deepcopy(gm.graph))
            symbolize(gm, list(example_inputs or ()), self.config.batch_dim)
        src = find_batch_source(gm, self.config.batch_dim)
        self._batch_source = (src[1], src[2]) if src else None
        rules = self.config.rules if self.config.rules is not None else self.strategy.rules()
        self.segmented = partition(gm, batch_dim=self.config.batch_dim, rules=rules, strict=self.config.strict)
        self.distributed = DistributedPlanner(self.segmented.segments, self.config.distributed_agree,
                                              self.config.lane_communicators, getattr(self.strategy, "name", "?"))
        if knobs.debug_level() >= 2:
            log.info("%s: %s\n%s", self.label, self.segmented, self.segments_table())
        return self

    # -- planning -------------------------------------------------------------------------------------
    def batch_size(self, inputs: Sequence[Any]) -> int:
        if self._batch_source is not None:
            i, d = self._batch_source
            return int(inputs[i].shape[d])
        if self.batch_hint is not None:
            return self.batch_hint()
        return batch_size_of(inputs, self.config.batch_dim)

    def plan_for(self, inputs: Sequence[Any]) -> Plan:
        """The plan for these inputs: the split comes from the strategy (once per batch size and request
        layout), the schedule and program once per distinct split."""
        batch = self.batch_size(inputs)
        layout = current_requests()
        key = (batch, layout)
        cached = self._splits.get(key)
        if cached is None:
            info = self.input_info(batch, inputs, layout)
            cached = self._splits[key] = (info, self._split(info))
        info, split = cached
        if self.distributed is not None and self.distributed.agreeing:  # every rank, every call
            split = self.distributed.agree(split, lambda n: self.strategy.split_config(
                dataclasses.replace(info, requested_nano_batches=n)))
        plan = self._by_split.get(split)
        if plan is None:
            plan = self._by_split[split] = self._plan(info, split)
        self.plans[batch] = plan
        return plan

    def input_info(self, batch: int, inputs: Sequence[Any], layout: RequestLayout | None = None) -> InputInfo:
        first = next((t for t in inputs if isinstance(t, torch.Tensor)), None)
        try:
            return InputInfo(
                batch, str(first.device) if first is not None else "cpu",
                str(first.dtype).replace("torch.", "") if first is not None else "float32",
                request_lengths=layout.lengths if layout else None,
                requested_nano_batches=self.config.nano_batches,
                request_phases=layout.phases if layout else None,
            )
        except ConfigError as exc:
            raise ConfigError(f"{self.label}: dynaflow.requests(...) does not match this call's batch: {exc}") from None

    def _split(self, info: InputInfo) -> SplitConfig:
        name = getattr(self.strategy, "name", type(self.strategy).__name__)
        batch = info.batch_size
        split = self.strategy.split_config(info)
        if not isinstance(split, SplitConfig) or split.batch_size != batch:
            raise StrategyError(
                f"Strategy {name!r}.split_config({info}) returned {split!r}; it must return a SplitConfig whose "
                f"sizes sum to the batch size {batch}."
            )
        if self.segmented is not None and self.segmented.batch_symbol is None and split.num > 1:
            raise CaptureError(
                f"{self.label}: the captured graph has a static batch dim, so it cannot be split into {split.num} "
                "nano-batches. Use dynaflow.compile (it marks the batch dynamic), or torch.compile(..., dynamic=True), "
                "or call torch._dynamo.mark_dynamic(x, batch_dim) on the inputs; a batch of 1 cannot be split."
            )
        return split

    def _plan(self, info: InputInfo, split: SplitConfig) -> Plan:
        assert self.segmented is not None
        name = getattr(self.strategy, "name", type(self.strategy).__name__)
        batch = info.batch_size
        graph = NanoGraph(self.segmented.segments, self.segmented.segment_deps(), split)
        if self.config.verify or knobs.verify():
            verify_graph(graph)
        try:
            try:
                schedule = self.strategy.plan(graph, split)
            except DynaflowError:
                raise
            except Exception as exc:
                raise StrategyError(f"Strategy {name!r}.plan() raised {type(exc).__name__}: {exc}") from exc
            if not isinstance(schedule, Schedule):
                raise StrategyError(f"Strategy {name!r}.plan() returned {type(schedule).__name__}; it must return a Schedule.")
            verify_schedule(schedule, graph)
            program = lower(self.segmented, graph, schedule)
        except DynaflowError as exc:
            if self.distributed is not None:
                self.distributed.abort(exc)  # the other ranks wait in the order check: fail them too
            raise
        if self.distributed is not None:
            program = self.distributed.finish(schedule, graph, program)
        if knobs.debug_level() >= 1:
            log.info("%s: batch %d -> %s", self.label, batch, split)
        if knobs.debug_level() >= 3:
            log.info("%s\n%s", schedule.table(graph), program.listing())
        return Plan(info, split, graph, schedule, program)

    # -- running --------------------------------------------------------------------------------------
    def executor_for(self, plan: Plan, inputs: Sequence[Any]) -> Any:
        name = knobs.forced_executor() or self.config.executor
        if name == "auto":
            on_cuda = any(isinstance(t, torch.Tensor) and t.is_cuda for t in inputs)
            name = "cuda" if on_cuda else ("thread" if len(plan.program.lanes) > 1 else "serial")
        ex = self._executors.get(name)
        if ex is None:
            if name not in executors.available():
                raise BackendError(
                    f"executor={name!r} is not available in this build (available: {', '.join(executors.available())}). "
                    "The CUDA and simulator executors are separate work items; use 'serial' or 'thread' on CPU."
                )
            ex = executors.resolve(name, **({"wait_timeout": self.config.wait_timeout} if name == "thread" else {}))
            self._executors[name] = ex
        return ex

    def __call__(self, *inputs: Any) -> Any:
        plan = self.plan_for(inputs)
        ex = self.executor_for(plan, inputs)
        out = ex.run(plan.program, inputs)
        self.last_plan = plan
        self.last_timeline = ex.last_timeline
        self.calls += 1
        self.last_call_seq = next(_CALL_SEQ)
        return out

    # -- inspection -----------------------------------------------------------------------------------
    def segments_table(self) -> str:
        assert self.segmented is not None
        rows = [("#", "segment", "kind", "resource", "hints", "nodes", "why")]
        for s in self.segmented.segments:
            rows.append((str(s.index), s.name, s.kind.value, s.resource.value, ",".join(sorted(s.hints)) or "-",
                         str(s.num_nodes), s.reason if s.whole else s.rule))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
        return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1] for r in rows)

    def explain(self) -> str:
        out = [f"{self.label}: {self.segmented} (batch symbol {self.segmented.batch_symbol if self.segmented else '?'})"]
        if self.segmented is not None:
            out.append(self.segments_table())
        if self.distributed is not None and self.distributed.groups:
            out.append(self.distributed.describe())
        for split, plan in sorted(self._by_split.items(), key=lambda kv: (kv[0].batch_size, kv[0].sizes)):
            out.append(f"\nbucket batch={split.batch_size}: {plan.split} -> {plan.graph}")
            out.append(plan.schedule.table(plan.graph))
            out.append(repr(plan.program))
        return "\n".join(out)


class Compiled:
    """A model compiled by dynaflow: call it like the model; inspect it with ``explain()``."""

    def __init__(self, model: Callable[..., Any], config: DynaflowConfig):
        self.model = model
        self.config = config
        self.strategy: Strategy = get_strategy(config.strategy, **dict(config.strategy_options))
        self.graphs: list[CompiledGraph] = []
        self._checked = False
        self._batch = 0
        self._fx = isinstance(model, torch.fx.GraphModule)
        if self._fx:
            self._flatten, self._unflatten = flat_io(model)
        else:
            self._compiled = torch.compile(model, backend=self._backend, dynamic=None)
        try:
            functools.update_wrapper(self, model, updated=())
        except (AttributeError, TypeError):
            pass

    def _backend(self, gm: torch.fx.GraphModule, example_inputs: list[Any]) -> CompiledGraph:
        graph = CompiledGraph(gm, self.config, self.strategy, label=f"graph{len(self.graphs)}").prepare()
        graph.batch_hint = lambda: self._batch
        self.graphs.append(graph)
        return graph

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self._fx:
            return self._call_fx(args, kwargs)
        self._batch = mark_batch_dynamic(args, kwargs, self.config.batch_dim)
        before = sum(g.calls for g in self.graphs)
        try:
            out = self._compiled(*args, **kwargs)
        except torch._dynamo.exc.BackendCompilerFailed as exc:
            inner = getattr(exc, "inner_exception", None) or exc.__cause__
            if isinstance(inner, DynaflowError):
                raise inner.with_traceback(None) from None
            raise
        if not self._checked:
            check_outputs(out)
            self._checked = True
        if sum(g.calls for g in self.graphs) == before:
            raise CaptureError(
                "torch.compile ran the model without handing any graph to dynaflow (Dynamo fell back to eager, e.g. "
                "its recompile limit was hit after many compiles of the same model class). Call "
                "torch._dynamo.reset() between compiles or raise torch._dynamo.config.recompile_limit."
            )
        return out

    def _call_fx(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if kwargs and type(self.model.graph._codegen) is torch.fx.graph.CodeGen:
            raise CaptureError(f"This GraphModule takes positional inputs only; got keyword arguments {sorted(kwargs)}.")
        flat = list(self._flatten(*args, **kwargs)) if kwargs else list(self._flatten(*args))
        if not self.graphs:
            graph = CompiledGraph(self.model, self.config, self.strategy).prepare(flat, from_fx=True)
            self.graphs.append(graph)
        out = self.graphs[0](*flat)
        out = self._unflatten(out)
        if not self._checked:
            check_outputs(out)
            self._checked = True
        return out

    # -- inspection -----------------------------------------------------------------------------------
    @property
    def last_graph(self) -> CompiledGraph | None:
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

    def explain(self, file: TextIO | None = None) -> str:
        """Segments, tags, split config and schedule table of every captured graph; printed to ``file``."""
        head = f"dynaflow: strategy {self.strategy.name!r} ({self.strategy.describe()}), executor {self.config.executor!r}"
        body = [g.explain() for g in self.graphs] or ["(not captured yet: call the model once)"]
        text = "\n\n".join([head] + body)
        if file is not None:
            file.write(text + "\n")
        return text

    def __repr__(self) -> str:
        return f"dynaflow.Compiled({type(self.model).__name__}, strategy={self.strategy.name!r}, graphs={len(self.graphs)})"


def _config(config: DynaflowConfig | dict[str, Any] | None, **options: Any) -> DynaflowConfig:
    if isinstance(config, dict):
        config = DynaflowConfig.from_dict(config)
    base = config or DynaflowConfig()
    changed = {k: v for k, v in options.items() if v is not _UNSET}
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
) -> Compiled:
    """Compile ``model`` (an ``nn.Module``, a function, or a ``torch.fx.GraphModule``) for nano-batch overlap.

    The result is called like the model and returns outputs equal to eager execution.
    """
    cfg = _config(config, strategy=strategy, nano_batches=nano_batches, rules=rules, executor=executor,
                  batch_dim=batch_dim, strict=strict, verify=verify)
    return Compiled(model, cfg)


def parallelize(obj: Any = None, **options: Any) -> Any:
    """Decorator form of :func:`compile` for a function or an ``nn.Module`` subclass.

    ``@dynaflow.parallelize`` or ``@dynaflow.parallelize(strategy="round_robin", nano_batches=2)``; on a class,
    each instance is compiled on its first call and exposes the :class:`Compiled` as ``instance.dynaflow``.
    """
    def deco(target: Any) -> Any:
        if isinstance(target, type) and issubclass(target, torch.nn.Module):
            return _parallelize_class(target, options)
        if callable(target):
            return compile(target, **options)
        raise CaptureError(f"@dynaflow.parallelize decorates a function or an nn.Module subclass; got {target!r}.")

    return deco(obj) if obj is not None else deco


def _parallelize_class(cls: type[torch.nn.Module], options: dict[str, Any]) -> type[torch.nn.Module]:
    module_call = torch.nn.Module.__call__

    def __call__(self: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        compiled = self.__dict__.get("_dynaflow_compiled")
        if compiled is None:
            def run(*a: Any, **k: Any) -> Any:
                return module_call(self, *a, **k)

            compiled = compile(run, **options)
            self.__dict__["_dynaflow_compiled"] = compiled
        return compiled(*args, **kwargs)

    cls.__call__ = __call__  # type: ignore[method-assign]
    cls.dynaflow = property(lambda self: self.__dict__.get("_dynaflow_compiled"))  # type: ignore[attr-defined]
    return cls


def dynaflow_backend(gm: torch.fx.GraphModule, example_inputs: list[Any], options: dict[str, Any] | None = None) -> CompiledGraph:
    """The ``torch.compile(model, backend="dynaflow", options={...})`` backend."""
    cfg = DynaflowConfig.from_dict(options or {})
    return CompiledGraph(gm, cfg, get_strategy(cfg.strategy, **dict(cfg.strategy_options))).prepare()


def _register() -> None:
    from torch._dynamo.backends.registry import _BACKENDS, register_backend

    if "dynaflow" not in _BACKENDS or _BACKENDS.get("dynaflow") is None:
        register_backend(dynaflow_backend, name="dynaflow")


_register()
