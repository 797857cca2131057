"""Planning as a pipeline of passes: from a partitioned graph and one call's inputs to a lowered Program.

The inputs of a call are described once, into a frozen :class:`InputFacts` (batch, device, dtype, CUDA or
not, request layout); everything below reads that record, never the tensors again. One plan is made by
:func:`make_plan`, a list of stages, each timed and logged at ``DYNAFLOW_DEBUG`` level 2 or more:

1. ``nanograph`` — the segments × the split's nano-batches (:class:`~dynaflow.ir.NanoGraph`);
2. ``verify_graph`` — under ``verify`` / ``DYNAFLOW_VERIFY``;
3. ``strategy.plan`` — the strategy places every op on a lane (errors name the strategy);
4. ``verify_schedule`` — each op once, no deadlock (always);
5. ``lower`` — the Schedule becomes a straight-line Program;
6. ``communicators`` — lane communicators bound (torch.distributed graphs only);
7. ``check_program`` — every cross-lane read ordered by an event (under ``verify``).

:class:`CostContext` sits beside it: the cost model (a measured profile when one matches, else the roofline
from FLOP/byte counts), the device spec and the simulator, for the autotuner and the ``sim`` executor.
``CompiledGraph`` (``dynaflow.api``) and ``dynaflow.profile`` both plan through here.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from dynaflow import distributed as dist_state
from dynaflow import knobs
from dynaflow.backend import Program, lower, simulate
from dynaflow.backend.checks import check_program
from dynaflow.config import DynaflowConfig
from dynaflow.cost import CombinedCost, CostModel, DeviceSpec, MeasuredCost, RooflineCost, TableCost, device_spec
from dynaflow.errors import CaptureError, ConfigError, DynaflowError, StrategyError
from dynaflow.flops import count_segments
from dynaflow.ir import InputInfo, NanoGraph, Schedule, SplitConfig
from dynaflow.profiles import Profile, load_profiles, model_hash
from dynaflow.requests import RequestLayout
from dynaflow.segmented import SegmentedModule
from dynaflow.strategies import Strategy
from dynaflow.timeline import Timeline
from dynaflow.verify import verify_graph, verify_schedule

__all__ = ["InputFacts", "describe_inputs", "Plan", "make_plan", "split_with", "CostContext", "strategy_name"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class InputFacts:
    """What planning needs to know about one call's inputs, read once."""

    batch: int
    device: str
    dtype: str
    on_cuda: bool
    layout: RequestLayout | None = None

    def info(self, nano_batches: int | None, label: str = "graph") -> InputInfo:
        """The strategies' view of these facts."""
        layout = self.layout
        try:
            return InputInfo(self.batch, self.device, self.dtype,
                             request_lengths=layout.lengths if layout else None,
                             requested_nano_batches=nano_batches,
                             request_phases=layout.phases if layout else None)
        except ConfigError as exc:
            raise ConfigError(f"{label}: dynaflow.requests(...) does not match this call's batch: {exc}") from None


def describe_inputs(inputs: Sequence[Any], batch: int, layout: RequestLayout | None = None) -> InputFacts:
    """The first tensor gives device and dtype; any tensor on CUDA makes the call a CUDA call."""
    first = next((t for t in inputs if isinstance(t, torch.Tensor)), None)
    return InputFacts(batch, str(first.device) if first is not None else "cpu",
                      str(first.dtype).replace("torch.", "") if first is not None else "float32",
                      any(isinstance(t, torch.Tensor) and t.is_cuda for t in inputs), layout)


@dataclass(frozen=True)
class Plan:
    """Everything decided for one split of one batch size."""

    info: InputInfo
    split: SplitConfig
    graph: NanoGraph
    schedule: Schedule
    program: Program


def strategy_name(strategy: Any) -> str:
    return getattr(strategy, "name", type(strategy).__name__)


class _Stages:
    """Runs and times the stages of one plan; logs them at debug level 2."""

    def __init__(self, label: str):
        self.label = label
        self.times: list[tuple[str, float]] = []

    def __call__(self, name: str, fn: Callable[[], Any]) -> Any:
        t0 = time.perf_counter()
        out = fn()
        self.times.append((name, time.perf_counter() - t0))
        return out

    def log(self) -> None:
        if knobs.debug_level() >= 2:
            log.info("%s: planned in %s", self.label, ", ".join(f"{n} {t * 1e3:.2f} ms" for n, t in self.times))


def _strategy_plan(strategy: Strategy, graph: NanoGraph, split: SplitConfig) -> Schedule:
    name = strategy_name(strategy)
    try:
        schedule = strategy.plan(graph, split)
    except DynaflowError:
        raise
    except Exception as exc:
        raise StrategyError(f"Strategy {name!r}.plan() raised {type(exc).__name__}: {exc}") from exc
    if not isinstance(schedule, Schedule):
        raise StrategyError(f"Strategy {name!r}.plan() returned {type(schedule).__name__}; it must return a Schedule.")
    return schedule


def make_plan(segmented: SegmentedModule, strategy: Strategy, info: InputInfo, split: SplitConfig, *,
              distributed: Any = None, checks: bool = False, label: str = "graph") -> Plan:
    """The plan pipeline (see the module docstring); ``checks`` runs the optional checkers between stages."""
    stage = _Stages(label)
    graph = stage("nanograph", lambda: NanoGraph(segmented.segments, segmented.segment_deps(), split))
    if checks:
        stage("verify_graph", lambda: verify_graph(graph))
    try:
        schedule = stage("strategy.plan", lambda: _strategy_plan(strategy, graph, split))
        stage("verify_schedule", lambda: verify_schedule(schedule, graph))
        program = stage("lower", lambda: lower(segmented, graph, schedule))
    except DynaflowError as exc:
        if distributed is not None:
            distributed.abort(exc)  # the other ranks wait in the order check: fail them too
        raise
    if distributed is not None:
        program = stage("communicators", lambda: distributed.finish(schedule, graph, program))
    if checks:
        stage("check_program", lambda: check_program(program))  # every cross-lane read ordered by an event wait
    stage.log()
    if knobs.debug_level() >= 1:
        log.info("%s: batch %d -> %s", label, info.batch_size, split)
    if knobs.debug_level() >= 3:
        log.info("%s\n%s", schedule.table(graph), program.listing())
    return Plan(info, split, graph, schedule, program)


def split_with(strategy: Strategy, info: InputInfo, segmented: SegmentedModule | None, *, strict: bool,
               label: str, warn_static: Callable[[int, int], None],
               specialised: Callable[[SplitConfig], SplitConfig] | None = None) -> SplitConfig:
    """``strategy.split_config(info)``, checked; a static-batch capture runs whole (or raises under strict).

    ``specialised``: what to do when the batch was marked dynamic and Dynamo specialised it anyway (code that
    fixes the batch size or couples its rows, e.g. a loss over ``labels``): run the graph as a barrier."""
    name = strategy_name(strategy)
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
    if segmented is not None and segmented.batch_symbol is None and split.max_num > 1:  # a stage splits too
        if specialised is not None:
            return specialised(split)
        if not strict:
            warn_static(batch, split.max_num)
            return SplitConfig.whole(batch)
        raise CaptureError(
            f"{label}: the captured graph has a static batch dim, so it cannot be split into {split.max_num} "
            "nano-batches. Use dynaflow.compile (it marks the batch dynamic), or torch.compile(..., dynamic=True), "
            "or call torch._dynamo.mark_dynamic(x, batch_dim) on the inputs; a batch of 1 cannot be split."
        )
    return split


class CostContext:
    """Cost model, device and simulator of one partitioned graph."""

    def __init__(self, segmented: SegmentedModule, config: DynaflowConfig, label: str = "graph"):
        self.segmented = segmented
        self.config = config
        self.label = label
        self.counts: dict[str, Any] | None = None
        """FLOP/byte counts per segment, counted once with fake tensors."""
        self.measured: dict[int, dict[str, dict[int, float]]] = {}
        """Per batch size: timings of the segments no other cost model could price."""

    def cost_model(self, inputs: Sequence[Any], batch: int,
                   measure: Callable[[list[str]], dict[str, dict[int, float]]] | None = None) -> CostModel:
        """Measured timings from ``config.profile`` where they match this graph, else the roofline from
        FLOP/byte counts; a segment neither covers is timed by ``measure(names)`` (``{name: {rows: s}}``),
        once per batch size, so the simulator never meets a segment it cannot price."""
        facts = describe_inputs(inputs, batch)
        device = self.device(facts)
        if self.counts is None:
            self.counts = count_segments(self.segmented, inputs, batch)
        models: list[CostModel] = [self.config.cost] if self.config.cost is not None else []
        profile = self.matching_profile(device.name, facts.dtype)
        if profile is not None:
            models.append(MeasuredCost(profile.timings, device))
        world = 1
        if any(seg.collectives for seg in self.segmented.segments) and dist_state.initialized():
            world = dist_state.world_size()
        models.append(RooflineCost(self.counts, device, facts.dtype, world=world, link=self.config.cost_link))
        known = CombinedCost(*models)
        missing = [s.name for s in self.segmented.segments if known.estimate(s, batch) is None]
        if missing and measure is not None:
            if batch not in self.measured:
                log.info("%s: no cost estimate for %d segments (%s); timing them on the device", self.label,
                         len(missing), ", ".join(missing[:6]) + (" ..." if len(missing) > 6 else ""))
                self.measured[batch] = measure(missing)
            models.insert(0, MeasuredCost(self.measured[batch], device))
        unpriced = [n for n in missing if not self.measured.get(batch, {}).get(n)]
        if unpriced:  # neither counted nor timed (the step may not be run again): the same for every plan
            log.warning("%s: segments %s have no cost estimate and could not be timed; the cost model prices them "
                        "at zero, so plans are compared on the other segments", self.label, ", ".join(unpriced[:6]))
            models.append(TableCost({n: 0.0 for n in unpriced}))
        return CombinedCost(*models)

    def matching_profile(self, device: str, dtype: str) -> Profile | None:
        source = self.config.profile
        if source is None:
            return None
        profiles = load_profiles(source) if isinstance(source, (str, os.PathLike)) else list(
            source if isinstance(source, (list, tuple)) else [source])
        h = model_hash(self.segmented)
        for p in profiles:
            if p.model == h and p.dtype == dtype:
                return p
        log.info("%s: no profile for model %s (%s); using the roofline", self.label, h, dtype)
        return None

    def device(self, facts: InputFacts) -> DeviceSpec:
        return device_spec(self.config.cost_device or facts.device)

    def num_sms(self, facts: InputFacts) -> int | None:
        spec = self.device(facts)
        return spec.num_sms if spec.num_sms > 1 else None

    def simulate(self, program: Program, facts: InputFacts, cost: CostModel) -> Timeline:
        """The predicted timeline of ``program`` on ``cost`` and this graph's device."""
        spec = self.device(facts)
        return simulate(program, cost, num_sms=self.num_sms(facts), wait_latency=spec.wait_latency)
