"""Cross-layer software pipelining (``nanoflow``'s default): each lane runs a stretch of same-lane segments
nano-batch-major, so nano-batch 0's next attention is ready while nano-batch 1's current one still runs. The
order is checked on a Llama-shaped stack, outputs equal eager with and without it, and the simulator shows it
hides the attention that segment-major order leaves exposed."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import dynaflow
from dynaflow.backend import simulate
from dynaflow.cost import TableCost
from dynaflow.ir import ALL, Resource
from dynaflow.strategies.nanoflow import NanoFlow

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import overlap_gpu  # noqa: E402


def _decode_stack(layers: int = 3):
    shape = overlap_gpu.Shape(hidden=32, heads=4, kv_heads=2, head_dim=8, intermediate=64, layers=layers, decode=8,
                              kv_len=6, prefill=0)
    return overlap_gpu.build(shape, "cpu", torch.float32)


def _compiled(model, inputs, **options):
    torch._dynamo.reset()
    c = dynaflow.compile(model, strategy=NanoFlow(nano_batches=2, **options), executor="serial", verify=True)
    with torch.no_grad():
        out = c(*inputs)
    return c, out


def test_compute_stretches_between_attentions_run_nano_batch_major():
    model, inputs = _decode_stack()
    c, _ = _compiled(model, inputs)
    plan = c.graphs[0].last_plan
    lanes = {lane.resource: ops for lane, ops in zip(plan.schedule.lanes, plan.schedule.order)}
    compute = [op for op in lanes[Resource.COMPUTE] if op.nano != ALL]
    # stretches: consecutive split compute segments, cut by attention (memory) and by whole segments
    stretches, cur = [], []
    for seg in plan.graph.segments:
        if seg.resource is Resource.COMPUTE and not seg.whole:
            cur.append(seg.name)
        elif cur:
            stretches, cur = stretches + [cur], []
    stretches += [cur] if cur else []
    assert max(len(st) for st in stretches) >= 2, "the test model must have several compute segments per layer"
    for stretch in stretches:  # inside a stretch, every segment of nano-batch 0 before any of nano-batch 1
        nanos = [op.nano for op in compute if op.segment in stretch]
        assert nanos == sorted(nanos), f"not nano-batch-major: {[op for op in compute if op.segment in stretch]}"
    assert "software-pipelined across layers" in plan.schedule.notes
    c2, _ = _compiled(model, inputs, pipeline=False)
    order2 = [op for lane, ops in zip(c2.graphs[0].last_plan.schedule.lanes, c2.graphs[0].last_plan.schedule.order)
              if lane.resource is Resource.COMPUTE for op in ops if op.nano != ALL]
    assert order2 != compute  # segment-major is a different order


@pytest.mark.parametrize("pipeline", [True, False])
@pytest.mark.parametrize("layers", [1, 3])
def test_pipelined_and_segment_major_equal_eager(pipeline, layers):
    model, inputs = _decode_stack(layers)
    with torch.no_grad():
        ref = model(*inputs)
    _, out = _compiled(model, inputs, pipeline=pipeline)
    for o, r in zip(out, ref):
        torch.testing.assert_close(o, r, atol=1e-5, rtol=1e-5)


def test_pipelining_hides_the_attention_that_segment_major_leaves_exposed():
    """Equal compute and memory time per layer: the pipelined makespan is shorter on the simulator."""
    model, inputs = _decode_stack(4)
    spans = {}
    for pipeline in (True, False):
        c, _ = _compiled(model, inputs, pipeline=pipeline)
        program = c.graphs[0].last_plan.program
        segs = c.graphs[0].segmented.segments
        compute = [s for s in segs if s.resource is Resource.COMPUTE]
        per_compute = 1e-3 / max(1, len(compute) // 4)  # ~1 ms of compute per layer, ~1 ms of attention
        table = {s.name: (lambda r, t=(per_compute if s.resource is Resource.COMPUTE else 1e-3): t * r / 8)
                 for s in segs}
        spans[pipeline] = simulate(program, TableCost(table, default=0.0)).makespan
    assert spans[True] < spans[False] * 0.97, spans


def test_pipeline_option_is_checked():
    with pytest.raises(dynaflow.DynaflowError, match="pipeline='yes' must be True"):
        NanoFlow(pipeline="yes")
