"""Collectives as operators, single process: capture helpers, batch coupling, the ordering rule, lane
communicators, config and the guarded torch.distributed glue (the multi-process tier is test_distributed.py)."""

from __future__ import annotations

import pytest
import torch
import torch.fx

import dynaflow
from dynaflow import distributed
from dynaflow.backend.comm import (DistributedPlanner, _rebind, check_collective_order, groups_of, lane_assignment)
from dynaflow.collective_ops import collective_name, group_name_of, is_wait, set_group_name
from dynaflow.errors import ConfigError, ScheduleError
from dynaflow.frontend.capture import symbolize
from dynaflow.frontend.collectives import describe, functionalize_inplace, hoist_waits
from dynaflow.frontend.partition import partition
from dynaflow.frontend.batching import analyze, find_batch_symbol
from dynaflow.ir import ALL, Lane, NanoGraph, NanoOp, Resource, Schedule, Segment, SegmentKind, SplitConfig

c10d = torch.ops._c10d_functional


def _late_wait(x):
    t = c10d.all_reduce(x, "sum", "0")
    y = x * 2
    w = c10d.wait_tensor(t)
    return w + y


def _inplace(x):
    y = x * 2
    w = c10d.wait_tensor(c10d.all_reduce(y, "sum", "0"))
    y.copy_(w)
    return y + 1


def _names(gm):
    return [n.name for n in gm.graph.nodes if n.op == "call_function" or n.op == "call_method"]


def test_collective_nodes_and_group_names():
    gm = torch.fx.symbolic_trace(_late_wait)
    ar, wait = [n for n in gm.graph.nodes if n.op == "call_function"][:3:2]
    assert collective_name(ar) == "all_reduce" and group_name_of(ar) == "0"
    assert is_wait(wait) and collective_name(wait) is None
    set_group_name(ar, "5")
    assert ar.args == (ar.args[0], "sum", "5") and describe(gm.graph.nodes) == ("all_reduce@5",)


def test_hoist_waits_moves_the_wait_next_to_its_collective():
    gm = torch.fx.symbolic_trace(_late_wait)
    x = torch.randn(3, 4)
    assert _names(gm) == ["all_reduce", "mul", "wait_tensor", "add"]
    assert hoist_waits(gm) == 1
    assert _names(gm) == ["all_reduce", "wait_tensor", "mul", "add"]
    assert hoist_waits(gm) == 0


def test_functionalize_inplace_rewires_later_readers():
    gm = torch.fx.symbolic_trace(_inplace)
    assert functionalize_inplace(gm) == 1
    add = next(n for n in gm.graph.nodes if n.name == "add")
    assert is_wait(add.args[0])
    assert not any(n.target == "copy_" for n in gm.graph.nodes)  # an intermediate: the copy is dropped


def test_functionalize_inplace_keeps_the_write_into_a_graph_input():
    def f(x):
        x.copy_(c10d.wait_tensor(c10d.all_reduce(x, "sum", "0")))
        return x + 1

    gm = torch.fx.symbolic_trace(f)
    assert functionalize_inplace(gm) == 1
    assert any(n.target == "copy_" for n in gm.graph.nodes)
    assert is_wait(next(n for n in gm.graph.nodes if n.name == "add").args[0])


def test_functionalize_inplace_keeps_the_write_into_a_view():
    def f(x):
        y = x * 2
        v = y[:, :2]
        v.copy_(c10d.wait_tensor(c10d.all_reduce(v, "sum", "0")))
        return y + 1

    gm = torch.fx.symbolic_trace(f)
    assert functionalize_inplace(gm) == 1
    assert any(n.target == "copy_" for n in gm.graph.nodes)  # readers of y must still see the write


def test_default_rules_make_one_network_segment_per_collective_and_wait():
    gm = torch.fx.symbolic_trace(_late_wait)
    seg = partition(gm)
    net = [s for s in seg.segments if s.resource is Resource.NETWORK]
    assert len(net) == 1 and net[0].num_nodes == 2 and net[0].collectives == ("all_reduce@0",)
    assert "collectives=[all_reduce@0]" in repr(net[0])
    assert all(not s.collectives for s in seg.segments if s is not net[0])


def _coupling(fn, shape):
    gm = torch.fx.symbolic_trace(fn)
    symbolize(gm, [torch.randn(*shape)], 0)
    ba = analyze(gm, find_batch_symbol(gm, 0))
    return {n.name: why for n, why in ba.coupling.items()}


def test_all_gather_along_the_batch_dim_couples_all_reduce_does_not():
    coupled = _coupling(lambda x: c10d.wait_tensor(c10d.all_gather_into_tensor(x, 2, "0")), (4, 3))
    assert "exchanges rows of the batch dim (dim 0) between ranks (all_gather_into_tensor)" in \
        coupled["all_gather_into_tensor"]
    assert _coupling(lambda x: c10d.wait_tensor(c10d.all_reduce(x, "sum", "0")), (4, 3)) == {}
    # the batch in dim 1 of a [world, batch, ...] buffer: all_to_all exchanges whole blocks, row-separable
    assert _coupling(lambda x: c10d.wait_tensor(c10d.all_to_all_single(x.unsqueeze(0).expand(2, -1, -1).contiguous(),
                                                                      [1, 1], [1, 1], "0")), (4, 3)) == {}


# -- the ordering rule on a synthetic graph ---------------------------------------------------------------

def _graph(n=2):
    segs = [Segment("a", 0, Resource.COMPUTE), Segment("comm", 1, Resource.NETWORK, collectives=("all_reduce@0",)),
            Segment("b", 2, Resource.COMPUTE)]
    return NanoGraph(segs, [("a", "comm"), ("comm", "b")], SplitConfig.even(4, n))


def _round_robin(graph):
    lanes = [Lane("lane0"), Lane("lane1")]
    order = {l: [] for l in lanes}
    for op in sorted(graph.ops, key=lambda op: (graph.index(op.segment), op.nano)):
        order[lanes[op.nano % 2]].append(op)
    return Schedule.from_lanes("rr", graph.split, order)


def test_concurrent_collectives_on_one_communicator_are_rejected_with_both_named():
    g = _graph()
    s = _round_robin(g)
    with pytest.raises(ScheduleError) as err:
        check_collective_order(s, g, lane_communicators=False)
    msg = str(err.value)
    assert "Strategy 'rr' lets collectives on process group '0' run concurrently" in msg
    assert "comm[nb0] (all_reduce@0) on lane 'lane0'" in msg and "comm[nb1] (all_reduce@0) on lane 'lane1'" in msg
    assert "Fix:" in msg and "lane_communicators=True" in msg
    check_collective_order(s, g, lane_communicators=True)  # each lane its own communicator: fine


def test_collectives_on_two_lanes_ordered_by_lane_order_share_a_communicator():
    g = _graph()
    lanes = [Lane("main"), Lane("net")]
    net = [NanoOp("comm", 0), NanoOp("comm", 1)]
    s = Schedule.from_lanes("ok", g.split, {lanes[0]: [op for op in g.ops if op not in net], lanes[1]: net})
    check_collective_order(s, g, lane_communicators=False)
    # collectives on both lanes with nothing ordering comm[nb1] after comm[nb0]: rejected
    s = Schedule.from_lanes("loose", g.split, {
        lanes[0]: [NanoOp("a", 0), NanoOp("a", 1), NanoOp("comm", 0), NanoOp("b", 0)],
        lanes[1]: [NanoOp("comm", 1), NanoOp("b", 1)]})
    with pytest.raises(ScheduleError, match="run concurrently"):
        check_collective_order(s, g, lane_communicators=False)


def test_lane_assignment_first_lane_keeps_the_group_others_get_clones():
    g = _graph(3)
    assert lane_assignment(_round_robin(g), g) == {("0", "lane0"): None, ("0", "lane1"): "clone"}
    assert lane_assignment(_round_robin(g), g, lane_communicators=False) == {("0", "lane0"): None, ("0", "lane1"): None}
    assert groups_of(("all_reduce@0", "all_to_all_single@3", "all_reduce@0")) == ["0", "3"]


def test_rebind_rewrites_the_group_name_in_a_copy():
    gm = torch.fx.symbolic_trace(_late_wait)
    new = _rebind(gm.forward, {"0": "9"})
    names = [group_name_of(n) for n in new.__self__.graph.nodes if collective_name(n)]
    assert names == ["9"] and [group_name_of(n) for n in gm.graph.nodes if collective_name(n)] == ["0"]
    with pytest.raises(dynaflow.BackendError, match="lane_communicators=False"):
        _rebind(lambda x: x, {"0": "9"})


# -- guarded glue without an initialized process group --------------------------------------------------

def test_without_torch_distributed_initialized_everything_is_local():
    assert not distributed.initialized() and distributed.world_size() == 1
    split = SplitConfig((3, 1))
    assert distributed.agree_split(split) is split
    distributed.check_same_order("anything")
    planner = DistributedPlanner([Segment("c", 0, Resource.NETWORK, collectives=("all_reduce@0",))])
    assert planner.groups == ["0"] and not planner.agreeing and planner.agree(split) is split
    with pytest.raises(ConfigError, match=r"process group '0'.*not initialized.*init_process_group"):
        distributed.resolve_group("0")


def test_config_options_are_validated():
    with pytest.raises(ConfigError, match="distributed_agree='yes' must be True, False or None"):
        dynaflow.DynaflowConfig(distributed_agree="yes")
    with pytest.raises(ConfigError, match="lane_communicators=1 must be True or False"):
        dynaflow.DynaflowConfig(lane_communicators=1)
    cfg = dynaflow.DynaflowConfig.from_dict({"distributed_agree": True, "lane_communicators": False})
    assert cfg.distributed_agree is True and cfg.lane_communicators is False


def test_a_rule_cutting_between_a_collective_and_its_wait_is_rejected():
    gm = torch.fx.symbolic_trace(_late_wait)
    with pytest.raises(dynaflow.PartitionError) as err:
        partition(gm, rules=[dynaflow.Op(r"\.all_reduce", tags="network")])
    msg = str(err.value)
    assert "Collective 'all_reduce' (all_reduce) is in segment 'all_reduce_0' but its wait_tensor 'wait_tensor'" in msg
    assert "Fix: keep both in one segment" in msg
