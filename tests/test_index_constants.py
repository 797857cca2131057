"""Index lists as device constants (``frontend/index_constants.py``): ``x[..., [-2], :]`` built a CPU index
tensor and copied it to the device on every call, which a CUDA-graph capture refuses (Falcon's fused QKV split
failed to capture on an H200). The list becomes a constant on the indexed tensor's device; answers equal eager."""

from __future__ import annotations

import operator

import pytest
import torch
import torch.fx
from torch import nn

import dynaflow
from dynaflow.frontend.index_constants import lift_index_lists


class ListIndexed(nn.Module):
    """Falcon's shape: a fused projection split by list indices on a non-batch dim, plus a mask list."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.qkv = nn.Linear(8, 24)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.qkv(x).view(x.shape[0], 6, 4)
        k = f[..., [-2], :]
        v = f[:, [True, False, True, False, True, False], :]
        return (f[..., :-2, :].sum(1, keepdim=True) * k + v.sum(1, keepdim=True)).flatten(1)


@pytest.mark.parametrize("strategy,nano", [("sequential", 1), ("nanoflow", 2), ("round_robin", 3)])
@pytest.mark.parametrize("batch", [3, 6])
def test_list_indexed_models_equal_eager_and_index_with_constants(strategy, nano, batch):
    model = ListIndexed().eval()
    x = torch.randn(batch, 8)
    c = dynaflow.compile(model, strategy=strategy, nano_batches=nano, executor="serial")
    with torch.no_grad():
        torch.testing.assert_close(c(x), model(x), atol=0, rtol=0)
    code = "\n".join(call.fn.__self__.code for call in c.graphs[0].segmented.calls)
    assert "_dynaflow_index_" in code and "[-2]" not in code and "True, False" not in code


def _graph_indexing(base_val: torch.Tensor, index: object) -> torch.fx.GraphModule:
    g = torch.fx.Graph()
    x = g.placeholder("x")
    x.meta["example_value"] = base_val
    g.output(g.call_function(operator.getitem, (x, index)))
    return torch.fx.GraphModule(nn.Module(), g)


def test_the_constant_is_made_on_the_indexed_tensors_device_once():
    gm = _graph_indexing(torch.empty(2, 5, 3, device="meta"), (Ellipsis, [0, -1], slice(None)))
    assert lift_index_lists(gm) == 1
    consts = [b for n, b in gm.named_buffers() if n.startswith("_dynaflow_index_")]
    assert len(consts) == 1 and consts[0].device.type == "meta" and consts[0].dtype == torch.int64
    assert lift_index_lists(gm) == 0  # nothing left to lift


def test_lists_that_are_not_plain_ints_or_bools_are_left_alone():
    for index in ([], [1, True], [[0, 1]], (Ellipsis, [0.5])):
        gm = _graph_indexing(torch.empty(4, 4), index)
        assert lift_index_lists(gm) == 0, index
    gm = _graph_indexing(torch.empty(4, 4), [0, 2])
    gm.graph.find_nodes(op="placeholder")[0].meta.clear()  # no recorded device: nothing to place it on
    assert lift_index_lists(gm) == 0
    gm = _graph_indexing(torch.empty(4, 4), [0, 2])
    assert lift_index_lists(gm) == 1
    x = torch.randn(4, 4)
    torch.testing.assert_close(gm(x), x[[0, 2]], atol=0, rtol=0)
