"""The autotuner's view of one compiled graph: :class:`GraphPlanner`, the :class:`~dynaflow.tune.Planner`
that :class:`~dynaflow.tune.Tuner` plans, predicts and measures candidates through.

It lives apart from :class:`~dynaflow.compiled_graph.CompiledGraph` so the graph keeps prepare, plan, call
and explain, and the tuner's needs (the cost simulation, timed runs, the disk cache's key facts) sit here.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from dynaflow import knobs
from dynaflow.backend import executors
from dynaflow.ir import InputInfo, SplitConfig
from dynaflow.planning import Plan, describe_inputs
from dynaflow.profiles import model_hash
from dynaflow.sandbox import sandboxed
from dynaflow.segment_timing import replayable
from dynaflow.strategies import Strategy
from dynaflow.timeline import Timeline
from dynaflow.tune import TuneSetup, median_seconds

__all__ = ["GraphPlanner"]

WARMUP_CALLS = 3
"""Calls before a CUDA-graph candidate is timed: the executor's two eager warm-ups and the capture."""


class GraphPlanner:
    """Plans, predicts and measures strategies on one :class:`CompiledGraph` for its :class:`Tuner`."""

    def __init__(self, graph: Any):
        self.graph = graph
        """The :class:`~dynaflow.compiled_graph.CompiledGraph` (not imported here: it imports this module)."""

    @property
    def label(self) -> str:
        return self.graph.label

    def split_with(self, strategy: Strategy, info: InputInfo) -> SplitConfig:
        """The split ``strategy`` picks for ``info`` on this graph (specialised or static batches included)."""
        return self.graph.split_with(strategy, info)

    def plan_split(self, info: InputInfo, split: SplitConfig, strategy: Strategy) -> Plan:
        """``strategy``'s plan of ``split``, through the graph's planning passes."""
        return self.graph.plan_split(info, split, strategy)

    def predictor(self, inputs: Sequence[Any]) -> Callable[[Plan], float]:
        """A plan's simulated makespan on the graph's cost model for these inputs."""
        graph = self.graph
        assert graph.costs is not None
        costs, facts = graph.costs, describe_inputs(inputs, graph.batch_size(inputs))
        cost = graph.cost_model(inputs)
        return lambda plan: costs.simulate(plan.program, facts, cost).makespan

    def measure(self, plan: Plan, inputs: Sequence[Any], repeats: int, graphs: bool = False,
                passthrough: bool = False) -> float:
        """The median wall time of ``repeats`` runs of ``plan`` on the graph's executor (``graphs``: replayed as
        a CUDA graph, after its warm-up and capture). Measuring leaves no trace (:mod:`dynaflow.sandbox`: inputs
        the graph writes are private copies, the random generators are put back); the measured program's executor
        state is dropped afterwards."""
        graph = self.graph
        sync = torch.cuda.synchronize if describe_inputs(inputs, 0).on_cuda else None
        with sandboxed(inputs, graph.segmented.inputs.written) as box:
            flat = box.inputs  # each run starts from the caller's values (box.reset): a cache's fill level too
            if passthrough:  # the captured graph as is: the eager floor
                return median_seconds(lambda: graph.run_passthrough(flat), repeats, sync, box.reset)
            ex, program = graph.executor_for(plan, inputs), graph.program_for(plan, flat)
            capture = True if graphs else None
            try:
                if capture:
                    for _ in range(WARMUP_CALLS):  # eager warm-ups and the capture, not timed
                        box.reset()
                        ex.run(program, flat, capture=True)
                return median_seconds(lambda: ex.run(program, flat, capture=capture), repeats, sync, box.reset)
            finally:
                ex.forget(program)

    def timelines(self, plan: Plan, inputs: Sequence[Any], repeats: int) -> list[Timeline]:
        """The timelines of ``repeats`` runs of ``plan`` (after one warm-up) on an executor of the graph's kind
        that records them (on the cuda executor, CUDA events around every launch), on private copies of the
        inputs the graph writes, with the random generators put back."""
        graph = self.graph
        name = graph.executor_for(plan, inputs).name
        ex = executors.resolve(name, **({"gpu_timeline": True} if name == "cuda" else {}))
        out: list[Timeline] = []
        try:
            with knobs.scope(DYNAFLOW_TIMELINE=1), sandboxed(inputs, graph.segmented.inputs.written) as box:
                program = graph.program_for(plan, box.inputs)
                for i in range(repeats + 1):
                    box.reset()
                    ex.run(program, box.inputs)
                    if i and ex.last_timeline is not None:
                        out.append(ex.last_timeline)
        finally:
            ex.close()
        return out

    def setup(self, inputs: Sequence[Any]) -> TuneSetup:
        """The graph-side facts of a search (model hash, resources, SMs, disk-cache key, distributed planner)."""
        graph = self.graph
        assert graph.segmented is not None and graph.costs is not None
        facts = describe_inputs(inputs, graph.batch_size(inputs))
        spec = graph.costs.device(facts)
        name = knobs.forced_executor() or graph.config.executor
        name = ("cuda" if facts.on_cuda else "serial") if name == "auto" else name
        graphs = bool(getattr(executors.factory(name), "captures_graphs", False)) and not graph.config.cuda_graphs
        return TuneSetup(model_hash(graph.segmented), frozenset(s.resource for s in graph.segmented.segments),
                         graph.costs.num_sms(facts), spec.sm_granularity, spec.name, graph.config.executor,
                         graphs, not graph.config.cuda_graphs, replayable(graph.segmented), graph.distributed,
                         cost=repr(graph.config.cost))

