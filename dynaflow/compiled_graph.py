"""One captured fx graph, from partition to run: :class:`CompiledGraph`.

It keeps what a captured graph is — ``prepare`` (partition once), ``plan_for`` (the plan passes of
:mod:`dynaflow.planning`, once per batch size and split; the autotuner of :mod:`dynaflow.tune` when the
strategy asks for a search), ``__call__`` (an executor of :mod:`dynaflow.backend` runs the Program) and
``explain``. The autotuner reaches it through :class:`~dynaflow.tuning_planner.GraphPlanner`.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import logging
import threading
from typing import Any, Callable, Sequence

import torch
import torch.fx

from dynaflow import knobs
from dynaflow.backend import ExecutorContext, Program, check_executor_name, executors, make_executor
from dynaflow.backend.launch import records_autograd
from dynaflow.backend.capture_sizes import (CaptureChoice, Mode, barrier_names, choose_capture_size, copy_back_written,
                                      input_specs, pad_inputs, unpad_outputs)
from dynaflow.backend.comm import DistributedPlanner, collective_blocker
from dynaflow.backend.graph_steps import InputFingerprints
from dynaflow.backend.inductor import InductorSegments
from dynaflow.config import DynaflowConfig
from dynaflow.cost import CostModel
from dynaflow.errors import BackendError, BatchCouplingError, DynaflowError
from dynaflow.frontend.batching import find_batch_source
from dynaflow.frontend.capture import batch_size_of, symbolize
from dynaflow.frontend.differential import check_split_equals_whole, overlapping_writes
from dynaflow.frontend.graph_inputs import input_roles
from dynaflow.segment_timing import halving_sizes, replay_blocker, replayable, time_segments
from dynaflow.frontend.partition import dense_order, fetch_attr, partition
from dynaflow.ir import InputInfo, SplitConfig
from dynaflow.planning import CostContext, Plan, describe_inputs, make_plan, split_with, strategy_name
from dynaflow.requests import RequestLayout, current_requests
from dynaflow.segmented import SegmentedModule, ValueKind
from dynaflow.strategies import Strategy, get as get_strategy
from dynaflow.timeline import Timeline
from dynaflow.tune import Tuner
from dynaflow.tuning_planner import GraphPlanner

__all__ = ["CompiledGraph", "Plan"]

log = logging.getLogger(__name__)
_CALL_SEQ = itertools.count()
_UNSPLIT_BUCKET = "(a rank that runs this call unsplit)"
"""The tuning bucket a rank without rows, or recording autograd, compares with its peers': none holds it."""


_MISS = object()
"""What :meth:`CompiledGraph._run_repeat` returns for a call that does not repeat the last graphed one."""


@dataclasses.dataclass(frozen=True)
class _Repeat:
    """What :meth:`CompiledGraph.run_captured` decided for one call, kept for the next call that repeats it: the
    same input fingerprints (so the same overlaps and layouts) and batch size, under ``no_grad``, with no request
    layout and the same forced executor. Every decision below is a function of those, so a repeat skips making
    them."""

    fps: list[Any]
    batch: int
    config: DynaflowConfig
    forced: str | None
    choice: CaptureChoice
    plan: "Plan"
    executor: Any
    program: Program

    def __repr__(self) -> str:
        return f"_Repeat({self.plan.split!r}, {self.choice.mode.name.lower()} on {getattr(self.executor, 'name', '?')})"


class CompiledGraph:
    """One captured fx graph: partitioned once, planned per batch size, run by an executor."""

    def __init__(self, gm: torch.fx.GraphModule, config: DynaflowConfig, strategy: Strategy, label: str = "graph0"):
        check_executor_name(config.executor)
        self.gm, self.config, self.strategy, self.label = gm, config, strategy, label
        self.segmented: SegmentedModule | None = None
        self.plans: dict[int, Plan] = {}
        """The latest plan per batch size."""
        self._by_split: dict[SplitConfig, Plan] = {}
        self._strategy_for: dict[SplitConfig, Strategy] = {}
        """The autotuner's winner per split (``strategy="auto"``); other strategies plan every split themselves."""
        self._splits: dict[tuple[Any, ...], tuple[InputInfo, SplitConfig]] = {}
        self._tuner: tuple[Strategy, Tuner] | None = None
        self._planner = GraphPlanner(self)
        """What the autotuner plans, predicts and measures through (``dynaflow.tune.Planner``)."""
        self.costs: CostContext | None = None
        self._record: dict[int, Sequence[Any]] | None = None
        """Set by ``dynaflow.profile``: the next call stores its flat inputs here."""
        self.last_plan: Plan | None = None
        self.last_timeline: Timeline | None = None
        self._capture_choices: dict[tuple[int, bool], CaptureChoice] = {}
        self.calls = 0
        self.ran_as_is = False
        """The last call ran the captured graph as is (the ``eager`` strategy won its bucket)."""
        self.last_call_seq = -1
        """Global call counter value of this graph's latest run (the most recent graph wins in inspection)."""
        self._batch_source: tuple[int, int] | None = None
        self.batch_hint: Callable[[], int] | None = None
        """For a static capture: where the caller learnt the batch size (Dynamo inputs start with weights)."""
        self._executors: dict[str, Any] = {}
        self._inductor: InductorSegments | None = None
        self.last_capture: CaptureChoice | None = None
        """With ``cuda_graphs=True``: how the latest call was padded to a capture size (graph or eager)."""
        self.distributed: DistributedPlanner | None = None
        """Split agreement, collective ordering and lane communicators (set by ``prepare``)."""
        self._original: torch.fx.GraphModule | None = None
        """The captured graph before partitioning: what the ``eager`` strategy runs."""
        self._written_inputs: tuple[int, ...] = ()
        """Inputs the graph writes in place: overlapping views of them run the graph unsplit."""
        self.fx_batch = 0
        """For a GraphModule compiled directly: the batch of the call it was prepared on."""
        self._replay_blocker: str | None = None
        """What makes a step unable to run twice without a trace (:func:`replay_blocker`; a collective, which a
        rank running it again would issue alone), or None."""
        self._overlap_memo: tuple[list[Any], tuple[int, int] | None] | None = None
        """(input fingerprints, :func:`overlapping_writes` verdict) of the last call that checked."""
        self._input_specs: tuple[Any, ...] = ()
        """:func:`input_specs` of the partitioned graph (fixed once prepared)."""
        self._fingerprints = InputFingerprints(guarded=False)
        """The inputs' fingerprints per call; a graph Dynamo captured trusts its guards for the parameters."""
        self._repeat: _Repeat | None = None
        """The decisions of the latest ``cuda_graphs`` call, for a call that repeats it (see :class:`_Repeat`)."""
        self._unsplit_logged: set[str] = set()
        self._weights: list[torch.Tensor] = []
        """Tensors the graph reads as attributes (an fx-traced module's weights; Dynamo passes them as inputs)."""
        self._differential_done = False
        self.static_found: dict[str, tuple[int, ...]] = {}
        """Per ``static_inputs`` name of a forward argument, the inputs found inside it in the first call (set
        by ``Compiled`` before :meth:`prepare`)."""
        self._warned_static = False
        self.batch_marked = False
        """Set by ``dynaflow.compile``: the batch was marked dynamic, so a static batch here means Dynamo
        specialised it (code that couples the batch, e.g. a loss over ``labels``): the graph is a barrier."""
        self.whole_batch = False
        """Whether this graph runs once on the whole batch because its batch dim was specialised."""
        self._lock = threading.RLock()
        """Planning and executor creation are serialised; running is not (concurrent callers run in parallel)."""

    def prepare(self, example_inputs: Sequence[Any] | None = None, *, from_fx: bool = False) -> "CompiledGraph":
        """Partition the graph (for a plain GraphModule, first make its batch dim symbolic)."""
        if self.segmented is not None:
            return self
        gm = self.gm
        if from_fx:
            gm = torch.fx.GraphModule(gm, copy.deepcopy(gm.graph))
            symbolize(gm, list(example_inputs or ()), self.config.batch_dim)
        self._fingerprints = InputFingerprints(guarded=not from_fx)
        src = find_batch_source(gm, self.config.batch_dim)
        self._batch_source = (src[1], src[2]) if src else None
        rules = self.config.rules if self.config.rules is not None else self.strategy.rules()
        self._original = torch.fx.GraphModule(gm, copy.deepcopy(gm.graph))  # partitioning rewrites gm
        self._weights = [w for n in gm.graph.find_nodes(op="get_attr")
                         if isinstance(w := fetch_attr(gm, str(n.target)), torch.Tensor)]
        roles = input_roles(gm, self.config.static_inputs, self.static_found)
        self._written_inputs = tuple(sorted(roles.written))
        self.segmented = dataclasses.replace(
            partition(gm, batch_dim=self.config.batch_dim, rules=rules, strict=self.config.strict), inputs=roles)
        self._input_specs = input_specs(self.segmented)
        self._replay_blocker = replay_blocker(self.segmented) or collective_blocker(self.segmented.segments)
        self.costs = CostContext(self.segmented, self.config, self.label)
        self.distributed = DistributedPlanner(self.segmented.segments, self.config.distributed_agree,
                                              self.config.lane_communicators, strategy_name(self.strategy))
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
        layout = current_requests()  # a graph with a static batch has no symbol to find its rows by: an
        if layout is not None:       # engine's declared layout says how many there are (not a weight's rows)
            return sum(layout.lengths)
        return batch_size_of(inputs, self.config.batch_dim)

    def plan_for(self, inputs: Sequence[Any], unsplit: str | None = None) -> Plan:
        """The plan for these inputs: the split comes from the strategy (once per batch size and request
        layout), the schedule and program once per distinct split. ``unsplit``: why this call runs as one
        nano-batch (:meth:`unsplit_reason`); the strategy still splits (its errors surface), but the plan is
        the whole batch's, agreed with the other ranks when they agree on splits."""
        with self._lock:
            plan = self._plan_for(inputs, unsplit)
        return plan if unsplit is None else self._unsplit_plan(inputs, unsplit, plan)

    def _plan_for(self, inputs: Sequence[Any], unsplit: str | None = None) -> Plan:
        batch = self.batch_size(inputs)
        if batch == 0:
            return self._empty_plan(inputs)
        if not self._differential_done and batch >= 2:  # the knob is read on the graph's first split call only
            if (self.config.verify or knobs.verify_splits()) and self._replayable:
                assert self.segmented is not None
                check_split_equals_whole(self.segmented, inputs, batch)
            elif self.config.verify or knobs.verify_splits():  # it runs segments twice: effects no argument shows too
                # verify=True asked for this check on this model: say loudly that it did not run (the knob is on in
                # whole test suites, where an INFO line will do)
                log.log(logging.WARNING if self.config.verify else logging.INFO,
                        "%s: the split check (verify) is skipped: %s, and running the segments again would repeat "
                        "that. Tag that segment 'pure' if running it again changes nothing, and the check runs",
                        self.label, self._replay_blocker)
            self._differential_done = True
        layout = current_requests()
        tuned = self._lockstep_tune(batch, inputs, layout, alone=unsplit is not None)
        key = (batch, layout, id(tuned) if tuned is not None else None)
        cached = self._splits.get(key)
        agreeing = self.distributed is not None and self.distributed.agreeing
        if cached is None:
            info = self.input_info(batch, inputs, layout)
            try:
                cached = self._splits[key] = (info, self._split(info, inputs, tuned))
            except DynaflowError:
                if agreeing:  # the other ranks wait in the agreement: they raise too
                    self.distributed.fail()  # type: ignore[union-attr]
                raise
            self._repeat = None  # a new split may have a new winner (auto): no call repeats an older decision
        info, split = cached
        if unsplit is not None and agreeing:  # every rank runs this call as one nano-batch, with its own strategy
            split = SplitConfig.whole(batch)
            if tuned is not None:
                self._strategy_for.setdefault(split, tuned)
        if agreeing:  # every rank, every call
            assert self.distributed is not None
            chooser = self._strategy_for.get(split, self.strategy)
            split = self.distributed.agree(split, lambda n: chooser.split_config(
                dataclasses.replace(info, requested_nano_batches=n)))
            if chooser is not self.strategy:
                self._strategy_for.setdefault(split, chooser)
        plan = self._by_split.get(split)
        if plan is None:
            plan = self._by_split[split] = self.plan_split(info, split)
        elif agreeing:
            self.distributed.check(plan.program)  # type: ignore[union-attr]
        self.plans[batch] = plan
        return plan

    def input_info(self, batch: int, inputs: Sequence[Any], layout: RequestLayout | None = None) -> InputInfo:
        n = self.config.nano_batches
        if n is not None and batch < n and self.batch_hint is not None and self.batch_hint() not in (0, batch):
            n = batch  # a graph after a graph break holds fewer rows than the call the count was asked for
        return describe_inputs(inputs, batch, layout).info(n, self.label)

    def _split(self, info: InputInfo, inputs: Sequence[Any] = (), tuned: Strategy | None = None) -> SplitConfig:
        strategy = tuned or self.strategy
        tuner = self.tuner
        if tuned is None and tuner is not None:
            strategy = tuner.tune(info, inputs, lambda: self._planner.setup(inputs))
        split = self.split_with(strategy, info)
        if strategy is not self.strategy:
            self._strategy_for[split] = strategy
        return split

    def plan_split(self, info: InputInfo, split: SplitConfig, strategy: Strategy | None = None) -> Plan:
        """The plan of ``split`` by ``strategy`` (default: the autotuner's winner for it, else the graph's)."""
        assert self.segmented is not None
        return make_plan(self.segmented, strategy or self._strategy_for.get(split, self.strategy), info, split,
                         distributed=self.distributed, checks=self.config.verify or knobs.verify(), label=self.label)

    # -- autotuning (the Tuner plans through a GraphPlanner of this graph) -------------------------------
    @property
    def tuner(self) -> Tuner | None:
        """The autotuner of a strategy that asks for a search (``auto``), else ``None``."""
        spec = self.strategy.search()
        if spec is None:
            return None
        if self._tuner is None or self._tuner[0] is not self.strategy:
            self._tuner = (self.strategy, Tuner(self._planner, spec, self.strategy))
        return self._tuner[1]

    @property
    def tuned(self) -> dict[str, Any]:
        """``TuneResult`` per tuning bucket when the strategy is ``auto``."""
        return self._tuner[1].results if self._tuner is not None else {}

    def split_with(self, strategy: Strategy, info: InputInfo) -> SplitConfig:
        """The split ``strategy`` picks for ``info`` here (a batch Dynamo specialised runs whole)."""
        return split_with(strategy, info, self.segmented, strict=self.config.strict, label=self.label,
                          warn_static=self._warn_static, specialised=self._whole_batch if self.batch_marked else None)

    def _lockstep_tune(self, batch: int, inputs: Sequence[Any], layout: RequestLayout | None,
                       alone: bool = False) -> Strategy | None:
        """``strategy="auto"`` with ranks agreeing on the split: the strategy for this call, decided with the
        other ranks (``None`` in every other case: the ordinary per-batch path decides). ``alone``: this rank
        runs the call unsplit (autograd, or no rows); it takes part in the bucket comparison with a bucket no
        rank tunes, so every rank runs the search's fallback this call."""
        if self.distributed is None or not self.distributed.agreeing:
            return None
        tuner = self.tuner
        if tuner is None:
            return None
        if alone:
            self.distributed.agree_key(_UNSPLIT_BUCKET, batch)
            return tuner.spec.fallback
        return tuner.lockstep(self.input_info(batch, inputs, layout), inputs, lambda: self._planner.setup(inputs),
                              self.distributed)

    def _empty_plan(self, inputs: Sequence[Any]) -> Plan:
        """A call with no rows on this rank while other ranks have some (a data-parallel rank left idle): it runs
        one nano-batch of no rows, so its collectives still pair with theirs, and it takes part in what they
        agree on first (the tuning bucket, the split: one nano-batch for every rank this call)."""
        split = SplitConfig.whole(0)
        tuned = self._lockstep_tune(0, inputs, None, alone=True)
        if self.distributed is not None and self.distributed.agreeing:
            split = self.distributed.agree(split)
        chooser = tuned or self._strategy_for.get(split, self.strategy)
        plan = self._by_split.get(split)
        if plan is None:
            plan = self._by_split[split] = self.plan_split(self.input_info(0, inputs), split, chooser)
        elif self.distributed is not None and self.distributed.agreeing:
            self.distributed.check(plan.program)
        self.plans[0] = plan
        return plan

    def _whole_batch(self, split: SplitConfig) -> SplitConfig:
        """A graph whose batch Dynamo specialised runs as a barrier: once, on the whole batch (``strict``: an error)."""
        if self.config.strict:
            raise BatchCouplingError(
                f"{self.label}: Dynamo specialised the batch dim of this graph to size {split.batch_size} (its code "
                "fixes the batch size, e.g. .view(6, 8) or expand(6, 8), or couples the rows of the batch, e.g. a "
                "loss that is a mean over rows), and strict=True forbids running it as a barrier. Fix: write -1 or "
                "x.shape[0] instead of a fixed batch size, compute the loss outside the compiled model, or drop "
                "strict=True."
            )
        if not self.whole_batch:
            self.whole_batch = True
            log.info("%s: Dynamo specialised the batch dim (the graph couples the batch, e.g. a loss over rows, or "
                     "follows a graph break); it runs once on the whole batch, as a barrier", self.label)
        return SplitConfig((split.batch_size,))

    def _warn_static(self, batch: int, num: int) -> None:
        if not self._warned_static:
            self._warned_static = True
            log.warning(
                "%s: the captured graph has a static batch dim (size %d), so it runs whole instead of in %d "
                "nano-batches. Use dynaflow.compile (it marks the batch dynamic) or torch.compile(..., "
                "dynamic=True) to split it; strict=True makes this an error.", self.label, batch, num)

    def cost_model(self, inputs: Sequence[Any]) -> CostModel:
        """Measured timings from ``config.profile`` where they match this graph, else the roofline; segments
        neither can price are timed here, on these inputs."""
        assert self.costs is not None and self.segmented is not None
        seg, batch = self.segmented, self.batch_size(inputs)

        def measure(names: list[str]) -> dict[str, dict[int, float]]:
            if not replayable(seg):  # running it again would repeat effects dynaflow cannot see
                return {}
            sizes = halving_sizes(batch, batch // 8) if seg.batch_symbol is not None else [batch]
            executor = "cuda" if describe_inputs(inputs, batch).on_cuda else "serial"
            timings = time_segments(seg, inputs, batch, sizes, 3, executor, self.label)
            return {n: timings[n] for n in names if timings.get(n)}

        return self.costs.cost_model(inputs, batch, measure)

    @property
    def _counts(self) -> dict[str, Any] | None:
        return self.costs.counts if self.costs is not None else None

    # -- running --------------------------------------------------------------------------------------
    def executor_for(self, plan: Plan, inputs: Sequence[Any]) -> Any:
        with self._lock:
            name = (knobs.forced_executor() or self.config.executor).lower()  # names are case-insensitive
            if name == "auto":
                on_cuda = describe_inputs(inputs, 0).on_cuda
                name = "cuda" if on_cuda else ("thread" if len(plan.program.lanes) > 1 else "serial")
            ex = self._executors.get(name)
            if ex is None:
                if name not in executors.available():
                    raise BackendError(
                        f"executor={name!r} is not available in this build (available: "
                        f"{', '.join(executors.available())}). The CUDA executor needs a CUDA build of torch and a "
                        "GPU; use 'serial', 'thread' or 'sim' on CPU.")
                assert self.costs is not None
                facts = describe_inputs(inputs, self.batch_size(inputs))
                ex = self._executors[name] = make_executor(name, ExecutorContext(
                    self.config, lambda: self.cost_model(inputs), lambda: self.costs.device(facts)))  # type: ignore[union-attr]
            return ex

    def release(self) -> None:
        """Close this graph's executors and forget its plans (its model was dropped; Dynamo may keep the graph
        itself alive until ``torch._dynamo.reset()``, but not its lane threads or programs)."""
        with self._lock:
            for ex in self._executors.values():
                try:
                    ex.close()
                except Exception as exc:  # noqa: BLE001 - releasing must not raise from a finalizer
                    log.debug("closing executor %r failed: %s", ex, exc)
            self._repeat = None
            self._executors.clear()
            self.plans.clear()
            self._by_split.clear()
            self._splits.clear()
            self.last_plan = None

    def program_for(self, plan: Plan, inputs: Sequence[Any], aliased: bool = False) -> Program:
        """The program to run: the planned one, or (``inductor=True``) its copy with every segment compiled by
        Inductor for its nano-batch shapes and warmed on these inputs. ``aliased``: the inputs overlap in memory
        while one is written (:meth:`unsplit_reason`); such a call runs the planned program, since Inductor
        compiles a segment for inputs that do not alias and its guards do not tell views of one tensor apart."""
        if not self.config.inductor or aliased:
            return plan.program
        return self._inductor_segments().program_for(plan.program, inputs)

    def _inductor_segments(self) -> InductorSegments:
        """The graph's Inductor compiles; runs of launches are fused (``DYNAFLOW_INDUCTOR_FUSE``) except for the
        ``sim`` executor, which predicts each segment's time from its cost model by name."""
        if self._inductor is None:
            self._inductor = InductorSegments(fuse=knobs.inductor_fuse() and "sim" not in (
                self.config.executor, knobs.forced_executor()))
        return self._inductor

    @property
    def _replayable(self) -> bool:
        """Whether a step may run twice without a trace (:func:`replayable`): what an Inductor warm-up needs."""
        return self._replay_blocker is None

    def _compiles_in_step(self, plan: Plan, inputs: Sequence[Any], aliased: bool) -> bool:
        """Whether this call's step compiles its segments as it runs them (:meth:`InductorSegments.run_compiling`):
        the first call of a program under ``inductor=True`` whose step may not run twice (not
        :func:`replayable`), so that no warm-up repeats an effect dynaflow cannot see."""
        if not self.config.inductor or aliased or self._replayable:
            return False
        return self._inductor_segments().compiled(plan.program, inputs) is None

    def _aliased(self, inputs: Sequence[Any], fps: Sequence[Any] | None = None) -> bool:
        """Whether inputs overlap in memory while one is written (what Inductor must not see); checked only under
        ``inductor=True``."""
        return bool(self.config.inductor and self._written_inputs and self._overlap(inputs, fps) is not None)

    def capture_for(self, batch: int) -> CaptureChoice:
        """Which capture size a batch runs at (``cuda_graphs=True``), padding up when that is safe."""
        assert self.segmented is not None
        key = (batch, current_requests() is not None)
        hit = self._capture_choices.get(key)
        if hit is not None:  # depends on nothing else that can change after partitioning
            return hit
        unsafe = [f"barrier segment {n!r} sees the whole batch" for n in barrier_names(self.segmented)]
        if self._batch_source is None:
            unsafe.append("this graph's batch size is static: PyTorch captures a batch of 1 as a graph of its own"
                          if batch == 1 else "the batch size is static in this graph (not read from an input tensor)")
        roles, specs = self.segmented.inputs, self._input_specs
        unsafe += [f"static input {roles.name(i)!r} has the batch dim, and a padded copy of it would not be the "
                   "declared tensor" for i in sorted(roles.declared) if specs[i].kind is ValueKind.BATCH]
        unsafe += [f"an output views input {roles.name(i)!r}, and would view its padded copy" for i in
                   sorted(roles.aliased) if specs[i].kind is ValueKind.BATCH]
        if key[1]:
            unsafe.append("a dynaflow.requests(...) layout is active")
        choice = choose_capture_size(batch, self.config.capture_sizes, self.config.over_capture, unsafe)
        self._capture_choices[key] = choice
        return choice

    def run_captured(self, inputs: Sequence[Any], executor: Any = None) -> Any:
        """One call under ``cuda_graphs=True``: pad to the capture size, plan and run at that size (captured
        on the cuda executor), and narrow the outputs back. ``executor`` overrides the resolved one (tests)."""
        assert self.segmented is not None
        fps = self._fingerprints(inputs)  # once per call: the overlap check and the capture's binding
        if executor is None:
            out = self._run_repeat(inputs, fps)
            if out is not _MISS:
                return out
        batch = self.batch_size(inputs)
        unsplit = self.unsplit_reason(inputs, fps)
        if unsplit is not None:
            # overlapping inputs: a graph's input copies would break the aliasing eager sees; autograd: a replay
            # records no autograd history, so the backward would miss it
            choice = CaptureChoice(batch, batch, Mode.EAGER, unsplit)
        elif any(not _dense(inputs[i]) for i in self.segmented.inputs.aliased):
            # an output views this input: a replay's view of a private copy is re-based onto the caller's tensor,
            # which needs the copy laid out as it is (a clone of a strided view is not)
            choice = CaptureChoice(batch, batch, Mode.EAGER, "an output views an input that is not dense")
        else:
            choice = self.capture_for(batch)
        specs = self._input_specs
        padded = pad_inputs(inputs, specs, batch, choice.size) if choice.padded else list(inputs)
        plan = self.plan_for(padded, unsplit)
        ex = executor if executor is not None else self.executor_for(plan, padded)
        if executor is None and not getattr(ex, "captures_graphs", False):
            raise BackendError(
                f"{self.label}: cuda_graphs=True needs the cuda executor (inputs on a CUDA device), but the "
                f"{getattr(ex, 'name', ex)!r} executor was chosen. Set cuda_graphs=False for CPU runs."
            )
        known = {"fingerprints": fps} if not choice.padded and getattr(ex, "captures_graphs", False) else {}
        aliased = unsplit is not None and self._aliased(inputs, fps)  # (a padded call's inputs overlap none)
        self._repeat = None
        out, ex, program = self._execute(plan, padded, ex, aliased, capture=choice.mode is Mode.GRAPH, **known)
        if program is not None and known and executor is None and unsplit is None and self._repeatable():
            self._repeat = _Repeat(fps, batch, self.config, knobs.forced_executor(), choice, plan, ex, program)
        if choice.padded:
            copy_back_written(inputs, padded, self._written_inputs, specs, batch)
        self.last_capture = choice
        self._ran(plan, ex)
        return unpad_outputs(out, self.segmented, batch, choice.size)

    def _execute(self, plan: Plan, inputs: Sequence[Any], ex: Any, aliased: bool,
                 **run: Any) -> tuple[Any, Any, Program | None]:
        """Run ``plan`` on ``inputs``: on ``ex`` (its program from :meth:`program_for`), or compiled as it runs
        when its step may not run twice (:meth:`_compiles_in_step`). Returns the outputs, the executor that ran
        them and the program it ran (both ``None`` for a step compiled as it ran)."""
        if self._compiles_in_step(plan, inputs, aliased):
            return self._inductor.run_compiling(plan.program, inputs), None, None  # type: ignore[union-attr]
        program = self.program_for(plan, inputs, aliased)
        return ex.run(program, inputs, **run), ex, program

    def _run_repeat(self, inputs: Sequence[Any], fps: list[Any]) -> Any:
        """Run a call that repeats the last graphed one (see :class:`_Repeat`) as that one was decided; ``_MISS``
        for any other call."""
        repeat = self._repeat
        if (repeat is None or not (repeat.fps is fps or repeat.fps == fps) or torch.is_grad_enabled()
                or current_requests() is not None or repeat.config is not self.config
                or knobs.forced_executor() != repeat.forced
                or (self._batch_source is None and self.batch_size(inputs) != repeat.batch)):
            return _MISS  # (a static batch is the caller's: asked again)
        out = repeat.executor.run(repeat.program, inputs, capture=repeat.choice.mode is Mode.GRAPH, fingerprints=fps)
        self.last_capture = repeat.choice
        self._ran(repeat.plan, repeat.executor)
        return out

    def _repeatable(self) -> bool:
        """Whether this call's decisions follow from its fingerprints and batch size alone (see :class:`_Repeat`):
        no request layout or distributed agreement enters the plan, and autograd is off (so whether it records
        does not hang on ``requires_grad``, which a fingerprint does not hold)."""
        return (current_requests() is None and not torch.is_grad_enabled()
                and (self.distributed is None or not self.distributed.agreeing))

    def unsplit_reason(self, inputs: Sequence[Any], fps: Sequence[Any] | None = None) -> str | None:
        """Why this call must run as one nano-batch in program order, or ``None``:

        * its inputs overlap a view the graph writes (``a = t[0:6]; b = t[3:9]``): split, a write through one
          view would land in rows of the other at the wrong time;
        * autograd records it (training): no executor overlaps lanes then, and split, a nano-batch's in-place
          write would bump the version of a tensor another nano-batch saved for backward.

        ``fps``: the inputs' fingerprints (:func:`~dynaflow.backend.graph_steps.fingerprint`), when the caller has
        them. The overlap verdict is kept for the last fingerprints seen: equal fingerprints mean the same byte
        spans, so the same verdict."""
        if self._written_inputs:
            overlap = self._overlap(inputs, fps)
            if overlap is not None:
                return f"inputs {overlap[0]} and {overlap[1]} overlap in memory and one is written in place"
        if records_autograd(inputs) or records_autograd(self._weights):
            return ("autograd records this step (for inference, call the model under torch.no_grad() or "
                    "torch.inference_mode() to keep the split)")
        return None

    def _overlap(self, inputs: Sequence[Any], fps: Sequence[Any] | None) -> tuple[int, int] | None:
        """:func:`overlapping_writes` of the inputs, kept for the last fingerprints seen. After a call without
        overlap, only the inputs whose fingerprints changed are checked (a decode step's new token ids, not its
        weights and caches): equal fingerprints mean equal byte spans."""
        key = list(fps) if fps is not None else self._fingerprints(inputs)  # never mutated: compared as is
        memo = self._overlap_memo
        among = None
        if memo is not None:
            last, verdict = memo
            if last == key:
                return verdict
            if verdict is None and len(last) == len(key):
                among = [k for k, (now, was) in enumerate(zip(key, last)) if now is not was and now != was]
        overlap = overlapping_writes(inputs, self._written_inputs, among)
        self._overlap_memo = (key, overlap)
        return overlap

    def _unsplit_plan(self, inputs: Sequence[Any], reason: str, agreed: Plan) -> Plan:
        """One nano-batch, program order (see :meth:`unsplit_reason`). With ranks agreeing on splits, ``agreed``
        (the whole batch's plan, which every rank runs this call: its collectives pair with theirs)."""
        if self.distributed is not None and self.distributed.agreeing:
            plan = agreed
        else:
            batch = self.batch_size(inputs)
            split = SplitConfig.even(batch, 1)
            with self._lock:
                plan = self._by_split.get(split)
                if plan is None:
                    plan = self._by_split[split] = self.plan_split(self.input_info(batch, inputs), split,
                                                              get_strategy("sequential"))
        if reason not in self._unsplit_logged:
            self._unsplit_logged.add(reason)
            (log.warning if "autograd" in reason else log.info)("%s: %s: running unsplit", self.label, reason)
        return plan

    def run_passthrough(self, inputs: Sequence[Any], plan: Plan | None = None) -> Any:
        """The captured graph run as Dynamo gave it: no segments, no executor (the ``eager`` strategy)."""
        out = self._original(*inputs)
        if plan is not None:
            self._ran(plan, None, as_is=True)
        return out

    def _ran(self, plan: Plan, ex: Any, as_is: bool = False) -> None:
        self.ran_as_is = as_is
        self.last_plan = plan
        self.last_timeline = ex.last_timeline if ex is not None else None
        self.calls += 1
        self.last_call_seq = next(_CALL_SEQ)

    def __call__(self, *inputs: Any) -> Any:
        if self._record is not None:
            self._record[id(self)] = inputs
        if self.config.cuda_graphs:
            return self.run_captured(inputs)
        fps = None
        if self._repeat is not None:  # auto measured this bucket fastest as a graph, and this call may repeat it
            fps = self._fingerprints(inputs)
            out = self._run_repeat(inputs, fps)
            if out is not _MISS:
                return out
        plan = self.plan_for(inputs, self.unsplit_reason(inputs, fps))
        strategy = self._strategy_for.get(plan.split, self.strategy)
        if strategy.passthrough:  # the captured graph as is (auto's floor won this bucket)
            return self.run_passthrough(inputs, plan)
        if strategy.graphs:  # auto measured this bucket faster as a graph
            return self.run_captured(inputs)
        out, ex, _ = self._execute(plan, inputs, self.executor_for(plan, inputs), self._aliased(inputs, fps))
        self._ran(plan, ex)
        return out

    # -- inspection -----------------------------------------------------------------------------------
    def segments_table(self) -> str:
        assert self.segmented is not None
        rows = [("#", "segment", "kind", "resource", "hints", "nodes", "why")]
        for s in self.segmented.segments:
            rows.append((str(s.index), s.name, s.kind.value, s.resource.value, ",".join(sorted(s.hints)) or "-",
                         str(s.num_nodes), s.reason if s.whole else s.rule + (
                             " (main split: shares a tensor written in place with a segment of another resource)"
                             if s.main_split else "")))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
        return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1] for r in rows)

    def explain(self) -> str:
        out = [f"{self.label}: {self.segmented} (batch symbol {self.segmented.batch_symbol if self.segmented else '?'})"]
        if self.whole_batch:
            out.append("  batch specialised by Dynamo: the whole graph is a barrier (runs once on the whole batch)")
        if self.segmented is not None:
            out.append(self.segments_table())
        for result in self.tuned.values():
            out.append("\n" + result.table())
        if self.distributed is not None and self.distributed.groups:
            out.append(self.distributed.describe())
        for split, plan in sorted(self._by_split.items(), key=lambda kv: (kv[0].batch_size, kv[0].sizes)):
            out.append(f"\nbatch={split.batch_size}: {plan.split} -> {plan.graph}")
            out.append(plan.schedule.table(plan.graph))
            out.append(repr(plan.program))
            for compiled in self._inductor.compiled_versions(plan.program) if self._inductor is not None else ():
                if compiled.num_launches != plan.program.num_launches:
                    n = compiled.num_launches
                    out.append(f"  compiled by Inductor as {n} launch{'es' if n != 1 else ''} (runs of launches on "
                               f"a lane fused; DYNAFLOW_INDUCTOR_FUSE=0 keeps one per segment): {compiled!r}")
                    runs = [str(launch.op) for launch in compiled.serial_order if "+" in launch.segment.name]
                    out.append("  fused runs: " + ", ".join(runs))
            for ex in self._executors.values():
                steps = getattr(ex, "graphs", None)
                failed = steps.failure(plan.program) if hasattr(steps, "failure") else None
                if failed:
                    out.append(f"  runs without CUDA graphs (its capture failed): {failed.splitlines()[0][:300]}")
        return "\n".join(out)


def _dense(x: Any) -> bool:
    """A tensor a clone lays out as it is (its elements fill a block of memory in some dim order), or not a tensor."""
    return not isinstance(x, torch.Tensor) or x.numel() == 0 or dense_order(x.shape, x.stride()) is not None
