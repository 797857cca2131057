"""A transfer lane: segments that copy between host and device are their own resource (``transfer``), found by
default (a copy whose input and output live on different device types) or tagged by the user; ``nanoflow``
gives them their own lane, so nano-batch i+1's KV fetch overlaps nano-batch i's compute; the cost model prices
them at the host link's bandwidth on the copy engines. CPU tests: the detection, the schedule, equality with
eager, and the simulated overlap (measuring it is ``benchmarks/`` on a GPU)."""

from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.fx
from torch import nn

import dynaflow
from dynaflow.backend import simulate
from dynaflow.cost import RooflineCost, TableCost, device_spec
from dynaflow.frontend.rules import Where, default_rules, host_device_copy, op_name
from dynaflow.ir import Resource
from dynaflow.strategies.nanoflow import NanoFlow


def _traced(fn, in_device: str, out_device: str) -> torch.fx.Node:
    gm = torch.fx.symbolic_trace(fn)
    nodes = list(gm.graph.nodes)
    nodes[0].meta["example_value"] = SimpleNamespace(device=torch.device(in_device))
    nodes[1].meta["example_value"] = SimpleNamespace(device=torch.device(out_device))
    return nodes[1]


def test_host_device_copies_are_detected_from_the_values_devices():
    assert host_device_copy(_traced(lambda x: x.to("cuda", non_blocking=True), "cpu", "cuda"))
    assert host_device_copy(_traced(lambda x: x.cpu(), "cuda", "cpu"))
    assert not host_device_copy(_traced(lambda x: x.to(torch.float16), "cuda", "cuda"))  # a cast, not a copy
    assert not host_device_copy(_traced(lambda x: x.relu(), "cpu", "cuda"))  # not a copy op
    assert "transfer" in [r.name for r in default_rules()]


class Offloaded(nn.Module):
    """Decode with the KV cache kept in host memory: fetch each request's KV, attend, project."""

    def __init__(self, d: int = 16) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.q = nn.Linear(d, d)
        self.o = nn.Linear(d, d)

    def forward(self, x: torch.Tensor, kv_host: torch.Tensor) -> torch.Tensor:
        kv = kv_host.clone()  # stands in for kv_host.to("cuda", non_blocking=True) on a CPU machine
        w = torch.softmax((self.q(x).unsqueeze(1) * kv).sum(-1), dim=-1)
        return self.o((w.unsqueeze(-1) * kv).sum(1))


RULES = [Where(lambda n: op_name(n).endswith("clone"), name="fetch", tags=("transfer",))]


def test_nanoflow_puts_transfers_on_their_own_lane_and_equals_eager():
    model = Offloaded().eval()
    x, kv = torch.randn(8, 16), torch.randn(8, 12, 16)
    c = dynaflow.compile(model, strategy=NanoFlow(nano_batches=4), rules=RULES, executor="thread", verify=True)
    with torch.no_grad():
        torch.testing.assert_close(c(x, kv), model(x, kv), atol=1e-5, rtol=1e-5)
    g = c.graphs[0]
    fetch = [s for s in g.segmented.segments if s.resource is Resource.TRANSFER]
    assert fetch and all(not s.whole for s in fetch)  # split per nano-batch: each fetches its own rows
    lanes = {lane.name: ops for lane, ops in zip(g.last_plan.schedule.lanes, g.last_plan.schedule.order)}
    assert {op.segment for op in lanes["transfer"]} == {s.name for s in fetch}


def test_roofline_prices_a_transfer_at_the_host_link_on_the_copy_engines():
    from dynaflow.cost import LinearCount
    from dynaflow.ir import Segment, SegmentKind

    seg = Segment("fetch_0", 0, Resource.TRANSFER, SegmentKind.SPLIT)
    h100 = device_spec("h100")
    est = RooflineCost({"fetch_0": LinearCount(0, 0, 0, 2e6)}, h100, "bfloat16").estimate(seg, 100)
    assert est is not None and est.bound == "transfer" and dict(est.demand) == {"copy": 1.0}
    assert abs(est.seconds - (100 * 2e6 / 2 / h100.host_bandwidth + h100.launch_overhead)) < 1e-12


def test_fetching_the_next_nano_batch_overlaps_this_ones_compute_on_the_simulator():
    model = Offloaded().eval()
    x, kv = torch.randn(8, 16), torch.randn(8, 12, 16)
    spans = {}
    for n in (1, 4):
        torch._dynamo.reset()
        c = dynaflow.compile(model, strategy=NanoFlow(nano_batches=n), rules=RULES, executor="serial")
        with torch.no_grad():
            c(x, kv)
        g = c.graphs[0]
        # 1 ms of fetch for the whole batch, a third of that for each other segment
        table = {s.name: (lambda r, t=(1e-3 if s.resource is Resource.TRANSFER else 1e-3 / 3): t * r / 8)
                 for s in g.segmented.segments}
        spans[n] = simulate(g.last_plan.program, TableCost(table, default=0.0)).makespan
    compute = spans[1] - 1e-3  # sequential: all of the fetch, then all of the compute
    assert spans[4] <= 1e-3 + compute / 4 + 1e-9, spans  # pipelined: only the last nano-batch's compute shows
