"""In-code markers (``dynaflow.mark``) and split rules (``Op``, ``Mod``, ``Seq``, ``Where``, bare callables)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import dynaflow
from dynaflow import Mod, Op, Resource, SegmentKind, Seq, Where
from dynaflow.frontend.rules import default_rules
from models import FeedForward, grad_off, make_transformer, mlp_input, transformer_input

TOL = dict(atol=1e-5, rtol=1e-5)


def _segments(compiled):
    return compiled.last_graph.segmented.segments


def _names(compiled):
    return [s.name for s in _segments(compiled)]


def _run(model, x, **options):
    compiled = dynaflow.compile(model, **options)
    with grad_off():
        out = compiled(x)
        ref = model(x)
    torch.testing.assert_close(out, ref, **TOL)
    return compiled


# -- markers ------------------------------------------------------------------------------------------
class Marked(nn.Module):
    def __init__(self, marks: bool = True):
        super().__init__()
        self.marks = marks
        self.a = nn.Linear(16, 16)
        self.b = nn.Linear(16, 16)
        self.c = nn.Linear(16, 8)

    def forward(self, x):
        if self.marks:
            dynaflow.mark("front", tags=("compute",))
        h = self.a(x).relu()
        if self.marks:
            dynaflow.mark("middle", tags="memory,no-inductor")
        h = self.b(h).sigmoid()
        if self.marks:
            dynaflow.mark("back")
        return self.c(h)


def _marked_pair():
    torch.manual_seed(3)
    marked = Marked(True).eval()
    plain = Marked(False).eval()
    plain.load_state_dict(marked.state_dict())
    return marked, plain


def test_mark_is_a_noop_in_eager_mode():
    marked, plain = _marked_pair()
    x = mlp_input(5)
    with grad_off():
        assert torch.equal(marked(x), plain(x))
    assert dynaflow.mark("anything", tags=("memory", "barrier")) is None
    assert dynaflow.mark("anything") is None


def test_mark_survives_dynamo_capture_as_a_graph_node():
    seen = []

    def backend(gm, example_inputs):
        seen.append([n for n in gm.graph.nodes if n.op == "call_function" and "dynaflow" in str(n.target)])
        return gm.forward

    marked, _ = _marked_pair()
    torch.compile(marked, backend=backend, dynamic=True)(mlp_input(5))
    assert len(seen) == 1 and len(seen[0]) == 3  # one node per marker, none dead-code-eliminated
    assert [n.args[0] for n in seen[0]] == ["front", "middle", "back"]


@pytest.mark.parametrize("nano", [1, 2])
def test_markers_create_segments_named_after_them(nano):
    marked, _ = _marked_pair()
    compiled = _run(marked, mlp_input(5), nano_batches=nano, strategy="nanoflow")
    assert _names(compiled) == ["front_0", "middle_0", "back_0"]
    assert all(s.rule == "mark" for s in _segments(compiled))


def test_marker_tags_set_resource_and_hints():
    marked, _ = _marked_pair()
    compiled = _run(marked, mlp_input(5), nano_batches=2, strategy="nanoflow", executor="serial")
    front, middle, back = _segments(compiled)
    assert front.resource is Resource.COMPUTE and front.hints == frozenset()
    assert middle.resource is Resource.MEMORY and middle.hints == frozenset({"no-inductor"})
    assert back.resource is Resource.COMPUTE  # untagged: inferred from its linear
    # nanoflow puts the memory-bound marker segment on its own lane
    assert {lane.name for lane in compiled.schedule.lanes} == {"compute", "memory"}


def test_single_marker_in_a_function():
    def f(x):
        dynaflow.mark("scale")
        y = x * 2
        dynaflow.mark("shift")
        return y + 1

    x = torch.randn(4, 3)
    compiled = dynaflow.compile(f, nano_batches=2)
    assert torch.equal(compiled(x), f(x))
    assert _names(compiled) == ["scale_0", "shift_0"]


# -- rule objects -------------------------------------------------------------------------------------
def test_rule_reprs_read_like_code():
    assert repr(Op("linear")) == "Op('linear', name='linear')"
    assert repr(Op("mm|bmm", name="gemm", tags=("compute",))) == "Op('mm|bmm', name='gemm', tags=('compute',))"
    assert repr(Mod(FeedForward)) == "Mod(FeedForward, name='feedforward')"
    assert repr(Mod("blocks.*.attn")) == "Mod('blocks.*.attn', name='blocks_attn')"

    def is_act(node):
        return False

    assert repr(Where(is_act)) == "Where(is_act, name='is_act')"
    assert Where(lambda n: False).name == "where"
    assert repr(Seq(Op("layer_norm"), Op("linear"))) == (
        "Seq(Op('layer_norm', name='layer_norm'), Op('linear', name='linear'), name='layer_norm_linear')")


def test_rule_tags_give_resource_and_hints():
    r = Op("x", tags=("memory", "no-cudagraph", "barrier"))
    assert r.resource is Resource.MEMORY and r.hints == frozenset({"no-cudagraph", "barrier"})
    single = Op("x", tags="network")  # a single tag may be a plain string
    assert single.tags == ("network",) and single.resource is Resource.NETWORK
    assert Op("x").resource is None and Op("x").hints == frozenset()


def test_default_rules():
    names = [r.name for r in default_rules()]
    assert names == ["comm", "transfer", "attention", "mlp"]
    res = {r.name: r.resource for r in default_rules()}
    assert res == {"comm": Resource.NETWORK, "transfer": Resource.TRANSFER, "attention": Resource.MEMORY,
                   "mlp": Resource.COMPUTE}


# -- rules on a real model ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tf():
    return make_transformer(), transformer_input(4)


def test_default_rules_cut_attention_and_mlp(tf):
    model, x = tf
    compiled = _run(model, x, nano_batches=2)
    names = _names(compiled)
    assert [n for n in names if not n.startswith("glue_")] == ["attention_0", "mlp_0", "attention_1", "mlp_1"]
    segs = {s.name: s for s in _segments(compiled)}
    assert segs["attention_0"].resource is Resource.MEMORY and segs["attention_0"].num_nodes == 1
    assert segs["mlp_1"].resource is Resource.COMPUTE and segs["mlp_1"].num_nodes == 3  # up, silu, down
    assert all(s.kind is SegmentKind.SPLIT for s in segs.values())


def test_op_rule(tf):
    model, x = tf
    compiled = _run(model, x, nano_batches=2, rules=[Op("linear")])
    names = _names(compiled)
    linears = [n for n in names if n.startswith("linear_")]
    assert linears == [f"linear_{i}" for i in range(8)]  # qkv, out, up, down per block
    assert all(n.startswith(("linear_", "glue_")) for n in names)
    segs = {s.name: s for s in _segments(compiled)}
    assert segs["linear_0"].resource is Resource.COMPUTE  # inferred: it holds a linear
    assert segs["linear_0"].rule == "Op('linear', name='linear')"


@pytest.mark.parametrize("rule", [Mod(FeedForward), Mod("FeedForward"), FeedForward],
                         ids=["class", "class-name", "bare-class"])
def test_mod_rule_by_class(tf, rule):
    model, x = tf
    compiled = _run(model, x, nano_batches=2, rules=[rule])
    assert [n for n in _names(compiled) if not n.startswith("glue_")] == ["feedforward_0", "feedforward_1"]


def test_mod_rule_by_qualname_glob(tf):
    model, x = tf
    compiled = _run(model, x, nano_batches=2, rules=[Mod("blocks.*.attn", name="attn")])
    segs = {s.name: s for s in _segments(compiled)}
    assert [n for n in segs if not n.startswith("glue_")] == ["attn_0", "attn_1"]  # one per module instance
    assert segs["attn_0"].num_nodes > 5  # the whole attention module: projections, sdpa, output


def test_seq_rule(tf):
    model, x = tf
    compiled = _run(model, x, nano_batches=2, rules=[Seq(Op("layer_norm"), Op("linear"), name="norm_proj")])
    segs = {s.name: s for s in _segments(compiled)}
    assert [n for n in segs if not n.startswith("glue_")] == [f"norm_proj_{i}" for i in range(4)]
    assert all(segs[f"norm_proj_{i}"].num_nodes == 2 for i in range(4))


def test_bare_callable_rule(tf):
    model, x = tf

    def silu_nodes(node):
        return "silu" in str(node.target)

    compiled = _run(model, x, nano_batches=2, rules=[silu_nodes])
    segs = {s.name: s for s in _segments(compiled)}
    assert [n for n in segs if not n.startswith("glue_")] == ["silu_nodes_0", "silu_nodes_1"]
    assert segs["silu_nodes_0"].rule == "Where(silu_nodes, name='silu_nodes')"
    assert segs["silu_nodes_0"].resource is Resource.MEMORY  # no linear inside


def test_where_rule_with_tags(tf):
    model, x = tf
    rule = Where(lambda n: "silu" in str(n.target), name="act", tags=("compute", "no-cudagraph"))
    compiled = _run(model, x, nano_batches=2, rules=[rule])
    segs = {s.name: s for s in _segments(compiled)}
    assert segs["act_0"].resource is Resource.COMPUTE  # the tag overrides the inferred resource
    assert segs["act_0"].hints == frozenset({"no-cudagraph"})


def test_barrier_tag_makes_a_whole_batch_segment(tf):
    model, x = tf
    compiled = _run(model, x, nano_batches=2, strategy="round_robin",
                    rules=[Op("scaled_dot_product", name="sdpa", tags=("memory", "barrier"))])
    segs = {s.name: s for s in _segments(compiled)}
    for name in ("sdpa_0", "sdpa_1"):
        assert segs[name].kind is SegmentKind.BARRIER and segs[name].reason == "tagged 'barrier'"
    graph = compiled.last_graph.last_plan.graph
    assert [op for op in graph.ops if op.segment == "sdpa_0"] == [dynaflow.NanoOp("sdpa_0", dynaflow.ALL)]


def test_first_matching_rule_wins_and_rules_combine(tf):
    model, x = tf
    rules = [Op("scaled_dot", name="attn", tags=("memory",)), Op("linear|scaled_dot", name="gemm", tags=("compute",))]
    compiled = _run(model, x, nano_batches=2, rules=rules)
    names = _names(compiled)
    assert names.count("attn_0") == 1 and "attn_1" in names and "attn_2" not in names
    assert sum(n.startswith("gemm_") for n in names) == 8


def test_empty_rules_give_one_glue_segment(tf):
    model, x = tf
    compiled = _run(model, x, nano_batches=2, rules=[])
    assert _names(compiled) == ["glue_0"]


def test_strategy_rules_are_used_unless_rules_given(tf):
    model, x = tf

    class GemmSplitter(dynaflow.Strategy):
        name = "gemm_splitter"

        def rules(self):
            return [Op("linear", name="gemm")]

    compiled = _run(model, x, nano_batches=2, strategy=GemmSplitter)
    assert sum(n.startswith("gemm_") for n in _names(compiled)) == 8
    torch._dynamo.reset()
    compiled = _run(model, x, nano_batches=2, strategy=GemmSplitter, rules=[Mod(FeedForward)])
    assert not any(n.startswith("gemm_") for n in _names(compiled))
    assert "feedforward_0" in _names(compiled)
