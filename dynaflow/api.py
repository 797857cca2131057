"""The public entry points: ``compile``, ``parallelize`` and the ``"dynaflow"`` torch.compile backend.

``Compiled`` wraps a model: Dynamo captures it (batch dim marked dynamic), each captured graph becomes a
:class:`CompiledGraph` that is partitioned once, planned once per input bucket (batch size) by the
strategy, lowered to a Program, and run by an executor on every call.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import itertools
import logging
import os
import threading
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Sequence, TextIO

import torch
import torch.fx
from torch.fx.experimental.symbolic_shapes import ConstraintViolationError

from dynaflow import knobs
from dynaflow.backend import ExecutorContext, Program, check_executor_name, executors, lower, make_executor
from dynaflow.backend.buckets import (BucketChoice, Mode, barrier_names, choose_bucket, input_specs, pad_inputs,
                                      unpad_outputs)
from dynaflow.backend.checks import check_program
from dynaflow.backend.compiled_segments import InductorSegments
from dynaflow.backend.comm import DistributedPlanner
from dynaflow.config import DynaflowConfig
from dynaflow.errors import BackendError, CaptureError, ConfigError, DynaflowError, PartitionError, StrategyError
from dynaflow.frontend.batching import find_batch_source
from dynaflow.frontend.effects import is_inplace
from dynaflow.frontend.capture import batch_size_of, check_outputs, flat_io, mark_batch_dynamic, symbolize
from dynaflow.frontend.differential import check_split_equals_whole, mutated_inputs, overlapping_writes
from dynaflow.frontend.partition import partition
from dynaflow.ir import InputInfo, NanoGraph, Schedule, SplitConfig
from dynaflow.requests import RequestLayout, current_requests
from dynaflow.segmented import SegmentedModule
from dynaflow.cost import CombinedCost, CostModel, DeviceSpec, MeasuredCost, RooflineCost, device_spec
from dynaflow import distributed as dist_state
from dynaflow.flops import count_segments
from dynaflow.profiles import Profile, load_profiles, model_hash
from dynaflow.backend.sim import simulate
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
        check_executor_name(config.executor)
        self.config = config
        self.strategy = strategy
        self.label = label
        self.segmented: SegmentedModule | None = None
        self.plans: dict[int, Plan] = {}
        """The latest plan per batch size (the input bucket)."""
        self._by_split: dict[SplitConfig, Plan] = {}
        self._strategy_for: dict[SplitConfig, Strategy] = {}
        """The autotuner's winner per split (``strategy="auto"``); other strategies plan every split themselves."""
        self.tuned: dict[str, Any] = {}
        """``TuneResult`` per bucket key when the strategy is ``auto``."""
        self._winners: dict[str, Strategy] = {}
        """The autotuner's winning strategy per bucket key: later batches of a bucket reuse it untuned."""
        self._counts: dict[str, Any] | None = None
        self._record: dict[int, Sequence[Any]] | None = None
        """Set by ``dynaflow.profile``: the next call stores its flat inputs here."""
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
        self._inductor: InductorSegments | None = None
        self.last_bucket: BucketChoice | None = None
        """With ``cuda_graphs=True``: how the latest call was bucketed (capture size, graph or eager)."""
        self.distributed: DistributedPlanner | None = None
        """Split agreement, collective ordering and lane communicators (set by ``prepare``)."""
        self._written_inputs: tuple[int, ...] = ()
        """Inputs the graph writes in place: overlapping views of them run the graph unsplit."""
        self._differential_done = False
        self._warned_static = False
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
        src = find_batch_source(gm, self.config.batch_dim)
        self._batch_source = (src[1], src[2]) if src else None
        rules = self.config.rules if self.config.rules is not None else self.strategy.rules()
        self._written_inputs = mutated_inputs(gm)
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
        with self._lock:
            return self._plan_for(inputs)

    def _plan_for(self, inputs: Sequence[Any]) -> Plan:
        batch = self.batch_size(inputs)
        if not self._differential_done and batch >= 2 and (self.config.verify or knobs.verify_splits()):
            assert self.segmented is not None
            check_split_equals_whole(self.segmented, inputs, batch)
            self._differential_done = True
        layout = current_requests()
        tuned = self._lockstep_tune(batch, inputs, layout)
        key = (batch, layout, id(tuned) if tuned is not None else None)
        cached = self._splits.get(key)
        if cached is None:
            info = self.input_info(batch, inputs, layout)
            cached = self._splits[key] = (info, self._split(info, inputs, tuned))
        info, split = cached
        if self.distributed is not None and self.distributed.agreeing:  # every rank, every call
            chooser = self._strategy_for.get(split, self.strategy)
            split = self.distributed.agree(split, lambda n: chooser.split_config(
                dataclasses.replace(info, requested_nano_batches=n)))
            if chooser is not self.strategy:
                self._strategy_for.setdefault(split, chooser)
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

    def _split(self, info: InputInfo, inputs: Sequence[Any] = (), tuned: Strategy | None = None) -> SplitConfig:
        strategy = tuned or self.strategy
        if tuned is None and getattr(strategy, "autotune", False):
            strategy = self._tune(info, inputs)
        split = self._split_with(strategy, info)
        if strategy is not self.strategy:
            self._strategy_for[split] = strategy
        return split

    def _split_with(self, strategy: Strategy, info: InputInfo) -> SplitConfig:
        name = getattr(strategy, "name", type(strategy).__name__)
        batch = info.batch_size
        try:
            split = strategy.split_config(info)
        except DynaflowError:
            raise
        except Exception as exc:
            raise StrategyError(
                f"Strategy {name!r}.split_config({info}) raised {type(exc).__name__}: {exc}. A strategy's "
                "split_config must return a SplitConfig for every batch size (or raise a DynaflowError)."
            ) from exc
        if not isinstance(split, SplitConfig) or split.batch_size != batch:
            raise StrategyError(
                f"Strategy {name!r}.split_config({info}) returned {split!r}; it must return a SplitConfig whose "
                f"sizes sum to the batch size {batch}."
            )
        if self.segmented is not None and self.segmented.batch_symbol is None and split.num > 1 and not self.config.strict:
            if not self._warned_static:
                self._warned_static = True
                log.warning(
                    "%s: the captured graph has a static batch dim (size %d), so it runs whole instead of in %d "
                    "nano-batches. Use dynaflow.compile (it marks the batch dynamic) or torch.compile(..., "
                    "dynamic=True) to split it; strict=True makes this an error.", self.label, batch, split.num)
            return SplitConfig.whole(batch)
        if self.segmented is not None and self.segmented.batch_symbol is None and split.num > 1:
            raise CaptureError(
                f"{self.label}: the captured graph has a static batch dim, so it cannot be split into {split.num} "
                "nano-batches. Use dynaflow.compile (it marks the batch dynamic), or torch.compile(..., dynamic=True), "
                "or call torch._dynamo.mark_dynamic(x, batch_dim) on the inputs; a batch of 1 cannot be split."
            )
        return split

    def _plan(self, info: InputInfo, split: SplitConfig, strategy: Strategy | None = None) -> Plan:
        assert self.segmented is not None
        strategy = strategy or self._strategy_for.get(split, self.strategy)
        name = getattr(strategy, "name", type(strategy).__name__)
        batch = info.batch_size
        graph = NanoGraph(self.segmented.segments, self.segmented.segment_deps(), split)
        if self.config.verify or knobs.verify():
            verify_graph(graph)
        try:
            try:
                schedule = strategy.plan(graph, split)
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
        if self.config.verify or knobs.verify():
            check_program(program)  # every cross-lane read ordered by an event wait
        if knobs.debug_level() >= 1:
            log.info("%s: batch %d -> %s", self.label, batch, split)
        if knobs.debug_level() >= 3:
            log.info("%s\n%s", schedule.table(graph), program.listing())
        return Plan(info, split, graph, schedule, program)

    # -- costs and autotuning ---------------------------------------------------------------------------
    def cost_model(self, inputs: Sequence[Any]) -> CostModel:
        """Measured timings from ``config.profile`` where they match this graph, else the roofline from
        FLOP/byte counts (counted once per graph with fake tensors)."""
        assert self.segmented is not None
        first = next((t for t in inputs if isinstance(t, torch.Tensor)), None)
        device = device_spec(self.config.cost_device or (str(first.device) if first is not None else "cpu"))
        dtype = str(first.dtype).replace("torch.", "") if first is not None else "float32"
        if self._counts is None:
            self._counts = count_segments(self.segmented, inputs, self.batch_size(inputs))
        models: list[CostModel] = [self.config.cost] if self.config.cost is not None else []
        profile = self._matching_profile(device.name, dtype)
        if profile is not None:
            models.append(MeasuredCost(profile.timings, device))
        world = 1
        if any(seg.collectives for seg in self.segmented.segments) and dist_state.initialized():
            world = dist_state.world_size()
        models.append(RooflineCost(self._counts, device, dtype, world=world, link=self.config.cost_link))
        return CombinedCost(*models)

    def _matching_profile(self, device: str, dtype: str) -> Profile | None:
        source = self.config.profile
        if source is None:
            return None
        profiles = load_profiles(source) if isinstance(source, (str, os.PathLike)) else list(
            source if isinstance(source, (list, tuple)) else [source])
        assert self.segmented is not None
        h = model_hash(self.segmented)
        for p in profiles:
            if p.model == h and p.dtype == dtype:
                return p
        log.info("%s: no profile for model %s (%s); using the roofline", self.label, h, dtype)
        return None

    def device(self, inputs: Sequence[Any]) -> DeviceSpec:
        first = next((t for t in inputs if isinstance(t, torch.Tensor)), None)
        return device_spec(self.config.cost_device or (str(first.device) if first is not None else "cpu"))

    def num_sms(self, inputs: Sequence[Any]) -> int | None:
        spec = self.device(inputs)
        return spec.num_sms if spec.num_sms > 1 else None

    def simulate(self, program: Program, inputs: Sequence[Any], cost: CostModel | None = None) -> Timeline:
        """The predicted timeline of ``program`` on this graph's cost model and device."""
        spec = self.device(inputs)
        return simulate(program, cost or self.cost_model(inputs), num_sms=self.num_sms(inputs),
                        wait_latency=spec.wait_latency)

    def predict(self, plan: Plan, inputs: Sequence[Any]) -> Timeline:
        """The simulated timeline of ``plan`` on this graph's cost model."""
        return self.simulate(plan.program, inputs)

    def _bucket_winner(self, info: InputInfo) -> tuple[str, Strategy | None, bool]:
        """(tuning bucket of ``info``, its winner so far, whether that winner can split this batch)."""
        from dynaflow.tune import bucket_key

        bucket = bucket_key(info, getattr(self.strategy, "buckets", "exact"))
        won = self._winners.get(bucket)
        if won is None:
            return bucket, None, True
        try:
            self._split_with(won, info)
            return bucket, won, True
        except DynaflowError as exc:
            log.info("%s: %s's winner %s does not apply to batch %d (%s)", self.label, bucket, won.describe(),
                     info.batch_size, str(exc).splitlines()[0])
            return bucket, won, False

    def _tune(self, info: InputInfo, inputs: Sequence[Any]) -> Strategy:
        from dynaflow.tune import bucket_key

        bucket, won, usable = self._bucket_winner(info)
        if won is not None and usable:
            return won
        if won is not None:  # the bucket's winner cannot split this batch: tune it on its own
            bucket = bucket_key(info, "exact")
        won = self._winners[bucket] = self._search(info, inputs, bucket)
        return won

    def _lockstep_tune(self, batch: int, inputs: Sequence[Any], layout: RequestLayout | None) -> Strategy | None:
        """``strategy="auto"`` with ranks agreeing on the split: the strategy for this call, decided with the
        other ranks (``None`` in every other case: the ordinary per-batch path decides).

        Every call, the ranks compare their tuning buckets (one tiny all_reduce). A bucket that every rank
        holds and that has no winner yet is searched by all ranks together, in the same order, so that the
        search's own collectives (planning checks, measured steps) pair up; predicted and measured times
        are the maximum over ranks. While the ranks' buckets differ, this call runs sequentially (one
        nano-batch, agreed) rather than tuning alone. Winners therefore stay the same on every rank."""
        auto = self.strategy
        if not getattr(auto, "autotune", False) or self.distributed is None or not self.distributed.agreeing:
            return None
        info = self.input_info(batch, inputs, layout)
        bucket, won, usable = self._bucket_winner(info)  # the same winners on every rank: set only in lockstep
        same, smallest = self.distributed.agree_key(f"{bucket}|{'usable' if usable else 'not usable'}", batch)
        if not same or not usable:
            log.info("%s: ranks differ in tuning bucket or in whether its winner applies (this rank: %s); "
                     "running this step sequentially", self.label, bucket)
            return auto._fallback  # type: ignore[attr-defined]
        if won is None:
            with self.distributed.lockstep():
                won = self._winners[bucket] = self._search(info, inputs, bucket, lockstep_batch=smallest)
        return won

    def _search(self, info: InputInfo, inputs: Sequence[Any], bucket: str, lockstep_batch: int | None = None) -> Strategy:
        """Run (or read from the disk cache) the autotuner's search for ``bucket`` on this batch.

        ``lockstep_batch``: the ranks search together (see :meth:`_lockstep_tune`); candidates come from the
        smallest batch among them so every rank tries the same list, times are the maximum over ranks, and
        the disk cache is not used (ranks could disagree about what it holds)."""
        from dynaflow.tune import TuneCache, TuneResult, autotune, median_seconds

        assert self.segmented is not None
        auto = self.strategy
        cost = self.cost_model(inputs)
        num_sms = self.num_sms(inputs)
        spec = device_spec(self.config.cost_device or info.device)
        key = f"{model_hash(self.segmented)}|{bucket}|{spec.name}|{info.dtype}|{self.config.executor}|{auto!r}"
        lockstep = lockstep_batch is not None and self.distributed is not None
        cache = TuneCache() if getattr(auto, "cache", False) and not lockstep else None
        hit = cache.get(key) if cache is not None else None
        cached = cache.build(key, hit[0]) if cache is not None and hit is not None else None
        if hit is not None and cached is not None:
            cand, reason = hit
            from dynaflow.tune import Trial

            trial = Trial(cand, None, None, note="cached")
            self.tuned[bucket] = TuneResult(bucket, (trial,), trial, reason, from_cache=True, tuned_on=info.batch_size)
            return cached
        resources = {s.resource for s in self.segmented.segments}
        space = _canonical_info(info, lockstep_batch) if lockstep else info
        cands = auto.candidates(space, resources, num_sms, spec.sm_granularity)  # type: ignore[attr-defined]
        plans: dict[Any, Plan] = {}

        def build(cand: Any) -> Plan:
            if cand not in plans:
                strategy = cand.build()
                split = self._split_with(strategy, info)
                if lockstep:
                    assert self.distributed is not None
                    split = self.distributed.agree(split, lambda n: strategy.split_config(
                        dataclasses.replace(info, requested_nano_batches=n)))
                plans[cand] = self._plan(info, split, strategy)
            return plans[cand]

        def predict(cand: Any) -> tuple[SplitConfig, float]:
            plan = build(cand)
            return plan.split, self.simulate(plan.program, inputs, cost).makespan

        if lockstep:  # predict everything here, then take each candidate's slowest rank
            assert self.distributed is not None
            local: dict[Any, tuple[SplitConfig, float] | DynaflowError] = {}
            for cand in cands:
                try:
                    local[cand] = predict(cand)
                except DynaflowError as exc:
                    local[cand] = exc
            slowest = self.distributed.max_over_ranks(
                [r[1] if isinstance(r, tuple) else float("inf") for r in local.values()])
            agreed = dict(zip(local, slowest))

            def predict(cand: Any) -> tuple[SplitConfig, float]:  # noqa: F811 - the agreed version
                mine = local[cand]
                if isinstance(mine, DynaflowError):
                    raise mine
                if agreed[cand] == float("inf"):
                    raise StrategyError(f"candidate {cand!r} could not be planned on another rank")
                return mine[0], agreed[cand]

        sync = torch.cuda.synchronize if any(isinstance(t, torch.Tensor) and t.is_cuda for t in inputs) else None

        def measure(cand: Any) -> float:
            plan = build(cand)
            ex = self.executor_for(plan, inputs)
            program = self.program_for(plan, inputs)
            seconds = median_seconds(lambda: ex.run(program, inputs), auto.repeats, sync)  # type: ignore[attr-defined]
            return self.distributed.max_over_ranks([seconds])[0] if lockstep and self.distributed else seconds

        measuring = auto.measure_top_k > 0  # type: ignore[attr-defined]
        if measuring and _mutates_inputs(self.segmented):
            log.info("%s: the graph writes into its inputs in place; autotune predicts only (no measuring)", self.label)
            measuring = False
        result = autotune(cands, bucket, predict, measure if measuring else None, auto.measure_top_k)  # type: ignore[attr-defined]
        result = dataclasses.replace(result, tuned_on=info.batch_size)
        self.tuned[bucket] = result
        if cache is not None:
            cache.put(key, result)
        if knobs.debug_level() >= 1:
            log.info("%s\n%s", self.label, result.table())
        return result.winner.candidate.build()

    # -- running --------------------------------------------------------------------------------------
    def executor_for(self, plan: Plan, inputs: Sequence[Any]) -> Any:
        with self._lock:
            return self._executor_for(plan, inputs)

    def release(self) -> None:
        """Close this graph's executors and forget its plans (its model was dropped; Dynamo may keep the graph
        itself alive until ``torch._dynamo.reset()``, but not its lane threads or programs)."""
        with self._lock:
            for ex in self._executors.values():
                try:
                    ex.close()
                except Exception as exc:  # noqa: BLE001 - releasing must not raise from a finalizer
                    log.debug("closing executor %r failed: %s", ex, exc)
            self._executors.clear()
            self.plans.clear()
            self._by_split.clear()
            self._splits.clear()
            self.last_plan = None

    def _executor_for(self, plan: Plan, inputs: Sequence[Any]) -> Any:
        name = knobs.forced_executor() or self.config.executor
        if name == "auto":
            on_cuda = any(isinstance(t, torch.Tensor) and t.is_cuda for t in inputs)
            name = "cuda" if on_cuda else ("thread" if len(plan.program.lanes) > 1 else "serial")
        ex = self._executors.get(name)
        if ex is None:
            if name not in executors.available():
                raise BackendError(
                    f"executor={name!r} is not available in this build (available: {', '.join(executors.available())}). "
                    "The CUDA executor needs a CUDA build of torch and a GPU; use 'serial', 'thread' or 'sim' on CPU."
                )
            ex = make_executor(name, ExecutorContext(self.config, lambda: self.cost_model(inputs),
                                                     lambda: self.device(inputs)))
            self._executors[name] = ex
        return ex

    def program_for(self, plan: Plan, inputs: Sequence[Any]) -> Program:
        """The program to run: the planned one, or (``inductor=True``) its copy with every segment compiled by
        Inductor for its nano-batch shapes and warmed on these inputs."""
        if not self.config.inductor:
            return plan.program
        if self._inductor is None:
            self._inductor = InductorSegments()
        return self._inductor.program_for(plan.program, inputs)

    def bucket_for(self, batch: int) -> BucketChoice:
        """Which capture size a batch runs at (``cuda_graphs=True``), padding up when that is safe."""
        assert self.segmented is not None
        unsafe = [f"barrier segment {n!r} sees the whole batch" for n in barrier_names(self.segmented)]
        if self._batch_source is None:
            unsafe.append("the batch size is not read from an input tensor")
        if current_requests() is not None:
            unsafe.append("a dynaflow.requests(...) layout is active")
        return choose_bucket(batch, self.config.capture_sizes, self.config.over_capture, unsafe)

    def run_bucketed(self, inputs: Sequence[Any], executor: Any = None) -> Any:
        """One call under ``cuda_graphs=True``: pad to the bucket, plan and run at the bucket size (captured
        on the cuda executor), and narrow the outputs back. ``executor`` overrides the resolved one (tests)."""
        assert self.segmented is not None
        batch = self.batch_size(inputs)
        choice = self.bucket_for(batch)
        padded = pad_inputs(inputs, input_specs(self.segmented), batch, choice.size) if choice.padded else list(inputs)
        plan = self.plan_for(padded)
        ex = executor if executor is not None else self.executor_for(plan, padded)
        if executor is None and getattr(ex, "name", "") != "cuda":
            raise BackendError(
                f"{self.label}: cuda_graphs=True needs the cuda executor (inputs on a CUDA device), but the "
                f"{getattr(ex, 'name', ex)!r} executor was chosen. Set cuda_graphs=False for CPU runs."
            )
        program = self.program_for(plan, padded)
        out = ex.run(program, padded, capture=choice.mode is Mode.GRAPH)
        self.last_bucket = choice
        self._ran(plan, ex)
        return unpad_outputs(out, self.segmented, batch, choice.size)

    def _unsplit_plan(self, inputs: Sequence[Any]) -> Plan:
        """One nano-batch for a call whose inputs overlap a view the graph writes (``a = t[0:6]; b = t[3:9]``):
        split, a write through one view would land in rows of the other at the wrong time."""
        batch = self.batch_size(inputs)
        split = SplitConfig.even(batch, 1)
        with self._lock:
            plan = self._by_split.get(split)
            if plan is None:
                plan = self._by_split[split] = self._plan(self.input_info(batch, inputs), split,
                                                          get_strategy("sequential"))
        log.info("%s: inputs %s overlap in memory and one is written in place: running unsplit", self.label,
                 overlapping_writes(inputs, self._written_inputs))
        return plan

    def _ran(self, plan: Plan, ex: Any) -> None:
        self.last_plan = plan
        self.last_timeline = ex.last_timeline
        self.calls += 1
        self.last_call_seq = next(_CALL_SEQ)

    def __call__(self, *inputs: Any) -> Any:
        if self._record is not None:
            self._record[id(self)] = inputs
        if self.config.cuda_graphs:
            return self.run_bucketed(inputs)
        plan = self._unsplit_plan(inputs) if self._written_inputs and overlapping_writes(
            inputs, self._written_inputs) else self.plan_for(inputs)
        ex = self.executor_for(plan, inputs)
        out = ex.run(self.program_for(plan, inputs), inputs)
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
        for bucket, result in self.tuned.items():
            out.append("\n" + result.table())
        if self.distributed is not None and self.distributed.groups:
            out.append(self.distributed.describe())
        for split, plan in sorted(self._by_split.items(), key=lambda kv: (kv[0].batch_size, kv[0].sizes)):
            out.append(f"\nbucket batch={split.batch_size}: {plan.split} -> {plan.graph}")
            out.append(plan.schedule.table(plan.graph))
            out.append(repr(plan.program))
        return "\n".join(out)


def _canonical_info(info: InputInfo, batch: int | None) -> InputInfo:
    """What the autotuner's candidate list depends on, the same on every rank of a lockstep search: the
    smallest batch among the ranks and whether prefill and decode requests are mixed."""
    assert batch is not None
    mixed = info.request_phases is not None and len(set(info.request_phases)) > 1 and batch >= 2
    return InputInfo(batch, info.device.split(":")[0], info.dtype, requested_nano_batches=info.requested_nano_batches,
                     request_lengths=(batch - 1, 1) if mixed else None,
                     request_phases=("prefill", "decode") if mixed else None)


class Compiled:
    """A model compiled by dynaflow: call it like the model; inspect it with ``explain()``."""

    def __init__(self, model: Callable[..., Any], config: DynaflowConfig):
        check_executor_name(config.executor)
        self.model = model
        self.config = config
        self.strategy: Strategy = get_strategy(config.strategy, **dict(config.strategy_options))
        self.graphs: list[CompiledGraph] = []
        self._checked = False
        self._lock = threading.Lock()
        self._by_entry: dict[_GraphEntry, CompiledGraph] = {}
        self._local = threading.local()
        """The batch size of the call in flight on each Python thread (read by static captures)."""
        weakref.finalize(self, _release_graphs, self.graphs)
        self._fx = isinstance(model, torch.fx.GraphModule)
        if self._fx:
            self._flatten, self._unflatten = flat_io(model)
        else:
            self._compiled = torch.compile(model, backend=_BACKEND, dynamic=None)
        try:
            functools.update_wrapper(self, model, updated=())
        except (AttributeError, TypeError):
            pass

    def _graph_for(self, entry: "_GraphEntry") -> CompiledGraph:
        """This model's CompiledGraph for a graph Dynamo captured (made on first use, from a private copy of
        the captured graph: partitioning rewrites it, and other Compiled objects may share the capture)."""
        with self._lock:
            graph = self._by_entry.get(entry)
            if graph is None:
                gm = torch.fx.GraphModule(entry.gm, copy.deepcopy(entry.gm.graph))
                label = f"graph{len(self.graphs)}"
                try:
                    graph = CompiledGraph(gm, self.config, self.strategy, label=label).prepare()
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
                self._by_entry[entry] = graph
                self.graphs.append(graph)
            return graph

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self._fx:
            return self._call_fx(args, kwargs)
        self._local.batch = mark_batch_dynamic(args, kwargs, self.config.batch_dim)
        if self._local.batch == 0:  # no rows: nothing to split or overlap
            return self.model(*args, **kwargs)
        before = sum(g.calls for g in self.graphs)
        _OWNERS.stack = stack = getattr(_OWNERS, "stack", [])
        stack.append(self)
        try:
            out = self._compiled(*args, **kwargs)
        except torch._dynamo.exc.BackendCompilerFailed as exc:
            inner = getattr(exc, "inner_exception", None) or exc.__cause__
            if isinstance(inner, DynaflowError):
                raise inner.with_traceback(None) from None
            raise CaptureError(f"torch.compile failed while dynaflow compiled the captured graph: {exc}") from exc
        except ConstraintViolationError as exc:
            raise CaptureError(
                f"{type(self.model).__name__} fixes the batch size: Dynamo proved that dim {self.config.batch_dim} of "
                f"the inputs (size {self._local.batch}) must be a constant, so the batch cannot be split "
                f"({str(exc).splitlines()[0]}). Typical cause: a literal batch in .view(6, 8), .reshape(6, -1), "
                ".expand(6, 8) or torch.zeros(6, ...). Use -1 or x.shape[0] for the batch dim instead "
                "(x.view(-1, 8), x.expand(x.shape[0], 8))."
            ) from None
        except torch._dynamo.exc.TorchDynamoException as exc:
            raise CaptureError(f"Dynamo could not capture {type(self.model).__name__} for dynaflow: "
                               f"{type(exc).__name__}: {exc}") from exc
        finally:
            stack.pop()
        if not self._checked:
            check_outputs(out)
            self._checked = True
        if sum(g.calls for g in self.graphs) == before:
            rnns = _rnn_modules(self.model)
            if rnns:
                raise CaptureError(
                    f"{type(self.model).__name__} contains {', '.join(rnns)}: Dynamo does not trace nn.LSTM / nn.GRU / "
                    "nn.RNN modules (it runs them eagerly), so there was no graph for dynaflow to split. Compile the "
                    "layers around the RNN instead (dynaflow.compile on the submodules before and after it), or write "
                    "the recurrence with nn.LSTMCell / nn.GRUCell in a Python loop."
                )
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
        if batch_size_of(flat, self.config.batch_dim) == 0:  # no rows: nothing to split or overlap
            return self.model(*args, **kwargs)
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


def _rnn_modules(model: Any) -> list[str]:
    """``"name (LSTM)"`` for every RNN module in ``model`` (Dynamo skips them; the reason to name in an error)."""
    if not isinstance(model, torch.nn.Module):
        return []
    return [f"{name or 'the model'} ({type(m).__name__})" for name, m in model.named_modules()
            if isinstance(m, torch.nn.RNNBase)]


def _release_graphs(graphs: list[CompiledGraph]) -> None:
    for g in graphs:
        g.release()


_OWNERS = threading.local()
"""``stack``: the Compiled objects whose call is in flight on this Python thread (innermost last)."""


class _GraphEntry:
    """What Dynamo caches for one captured graph. One backend object serves every :class:`Compiled`, so models
    of one class share Dynamo's cache entries (no recompile limit after many compiles, and the cache holds
    no model); each call runs the calling Compiled's own :class:`CompiledGraph` for this capture."""

    def __init__(self, gm: torch.fx.GraphModule):
        self.gm = gm

    def __call__(self, *inputs: Any) -> Any:
        stack = getattr(_OWNERS, "stack", None)
        if not stack:
            raise CaptureError(
                "A graph captured for dynaflow.compile ran outside a dynaflow.Compiled call (Dynamo reused its cache "
                "entry for another torch.compile wrapper). Call the model through the object dynaflow.compile returns."
            )
        return stack[-1]._graph_for(self)(*inputs)


class _SharedBackend:
    """The Dynamo backend of every :class:`Compiled`: wraps each captured graph in a :class:`_GraphEntry`."""

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list[Any]) -> _GraphEntry:
        return _GraphEntry(gm)


_BACKEND = _SharedBackend()


def _mutates_inputs(seg: SegmentedModule) -> bool:
    """Whether any segment writes in place (measuring would replay the write on the caller's real inputs);
    a segment without an fx graph counts as writing, to be safe."""
    return any(getattr(call.module, "graph", None) is None or any(is_inplace(n) for n in call.module.graph.nodes)
               for call in seg.calls)


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
