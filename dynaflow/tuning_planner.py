"""The autotuner's view of one compiled graph: :class:`GraphPlanner`, the :class:`~dynaflow.tune.Planner`
that :class:`~dynaflow.tune.Tuner` plans, predicts and measures candidates through.

It lives apart from :class:`~dynaflow.compiled_graph.CompiledGraph` so the graph keeps prepare, plan, call
and explain, and the tuner's needs (the cost simulation, timed runs, the disk cache's key facts) sit here.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from dynaflow.frontend.effects import is_inplace
from dynaflow.ir import InputInfo, SplitConfig
from dynaflow.planning import Plan, describe_inputs
from dynaflow.profiles import model_hash
from dynaflow.segmented import SegmentedModule
from dynaflow.strategies import Strategy
from dynaflow.tune import TuneSetup, median_seconds

__all__ = ["GraphPlanner"]


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

    def measure(self, plan: Plan, inputs: Sequence[Any], repeats: int) -> float:
        """The median wall time of ``repeats`` runs of ``plan`` on the graph's executor."""
        graph = self.graph
        ex, program = graph.executor_for(plan, inputs), graph.program_for(plan, inputs)
        sync = torch.cuda.synchronize if describe_inputs(inputs, 0).on_cuda else None
        return median_seconds(lambda: ex.run(program, inputs), repeats, sync)

    def setup(self, inputs: Sequence[Any]) -> TuneSetup:
        """The graph-side facts of a search (model hash, resources, SMs, disk-cache key, distributed planner)."""
        graph = self.graph
        assert graph.segmented is not None and graph.costs is not None
        facts = describe_inputs(inputs, graph.batch_size(inputs))
        spec = graph.costs.device(facts)
        return TuneSetup(model_hash(graph.segmented), frozenset(s.resource for s in graph.segmented.segments),
                         graph.costs.num_sms(facts), spec.sm_granularity, spec.name, graph.config.executor,
                         _mutates_inputs(graph.segmented), graph.distributed)


def _mutates_inputs(seg: SegmentedModule) -> bool:
    """Whether any segment writes in place (measuring would replay the write on the caller's real inputs);
    a segment without an fx graph counts as writing, to be safe."""
    return any(getattr(call.module, "graph", None) is None or any(is_inplace(n) for n in call.module.graph.nodes)
               for call in seg.calls)
