"""Graph breaks: every graph Dynamo hands over is planned on its own and the model equals eager;
``explain()`` lists the breaks and Dynamo's reasons."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import dynaflow


def _break(h):
    torch._dynamo.graph_break()
    return h


def _item(h):
    return h * (h.sum().item() > 0)


def _branch(h):
    return h + 1 if h.sum() > 0 else h - 1


def _nonzero(h):
    return h + h.nonzero().shape[0]


def _masked_select(h):
    return h + h.masked_select(h > 0).sum()


class Breaking(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.a, self.b, self.fn = nn.Linear(8, 8), nn.Linear(8, 8), fn

    def forward(self, x):
        return self.b(self.fn(self.a(x)).relu())


@pytest.mark.parametrize("fn, reason", [(_break, "graph_break"), (_item, "item"), (_branch, "data-dependent"),
                                        (_nonzero, "nonzero"), (_masked_select, "masked_select")],
                         ids=["graph_break", "item", "branch", "nonzero", "masked_select"])
def test_each_graph_is_planned_on_its_own_and_explain_lists_the_breaks(fn, reason):
    torch.manual_seed(0)
    model = Breaking(fn).eval()
    compiled = dynaflow.compile(model, strategy="round_robin", nano_batches=2)
    with torch.no_grad():
        for batch in (6, 5, 7):
            x = torch.randn(batch, 8)
            torch.testing.assert_close(compiled(x), model(x), atol=1e-5, rtol=1e-5)
    assert len(compiled.graphs) >= 2
    text = compiled.explain()
    assert "graph breaks" in text and reason.lower() in text.lower(), text
    assert any(s.kind.value == "split" for g in compiled.graphs if g.segmented for s in g.segmented.segments)


class _BreaksInALoopFirst(torch.nn.Module):
    def forward(self, x):
        for _ in range(2):
            torch._dynamo.graph_break()  # before any op, inside a loop: Dynamo runs the frame eagerly
            x = x * 1.5
        return x


def test_a_model_dynamo_captures_nothing_of_names_the_graph_break():
    compiled = dynaflow.compile(_BreaksInALoopFirst(), strategy="round_robin", nano_batches=2, executor="serial")
    with pytest.raises(dynaflow.CaptureError, match=r"broke the graph before it captured any op(.|\n)*graph_break\(\)"
                       r"(.|\n)*out of the loop"):
        compiled(torch.randn(4, 8))


class _UniqueOnly(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.unique(x)


def test_a_model_whose_first_op_has_a_value_dependent_shape_is_told_so_not_about_loops():
    """Dynamo breaks the graph on ``torch.unique`` and captures nothing; the error named only a graph break inside
    a loop (there is none here)."""
    compiled = dynaflow.compile(_UniqueOnly(), strategy="round_robin", nano_batches=2, executor="serial")
    with pytest.raises(dynaflow.CaptureError, match=r"(?s)Dynamic shape operator.*output shape depends on the values"):
        compiled(torch.randn(4, 8))
