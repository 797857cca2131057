"""Host-independent parts of ``dynaflow.integrations`` (core tier: no vLLM / SGLang needed)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import dynaflow
from dynaflow.errors import ConfigError
from dynaflow.integrations._common import (IntegrationError, RequestAligned, matching_rules, parse_options,
                                           request_aligned_split, thread_mutations, HOST_STATE_META)
from dynaflow.ir import InputInfo, SplitConfig


@pytest.mark.parametrize("sizes,lengths,min_rows,expected", [
    ((4, 4, 4), (5, 3, 4), 1, (5, 3, 4)),       # cuts 4, 8 snap to 5, 8
    ((6, 6), (5, 3, 4), 1, (5, 7)),             # cut 6: 5 is nearer than 8
    ((3, 3, 2), (1, 1, 6), 1, (2, 6)),          # cuts 3 and 6 both snap to 2: merged
    ((6, 6), (12,), 1, (12,)),                  # one request: the fast path
    ((2, 2), (1, 1, 1, 1), 3, (4,)),            # below 2 * min_rows: the fast path
    ((5, 5), (1, 8, 1), 2, (10,)),              # the nearest cut (1) would leave < 2 rows: dropped
    ((10,), (3, 7), 1, (10,)),                  # one nano-batch stays one
])
def test_request_aligned_split(sizes, lengths, min_rows, expected):
    assert request_aligned_split(SplitConfig(sizes), lengths, min_rows).sizes == expected


def test_an_aligned_split_keeps_its_phase_labels():
    """A split already on request boundaries (``prefill_decode``'s, one nano-batch per run of one phase) keeps
    its labels, which put each nano-batch on its phase's lane; a moved cut drops them."""
    labelled = SplitConfig((5, 3), labels=("prefill", "decode"))
    assert request_aligned_split(labelled, (5, 1, 1, 1)).labels == ("prefill", "decode")
    assert request_aligned_split(labelled, (4, 2, 2)).labels is None


def test_a_per_resource_stage_is_aligned_and_capped_too():
    """nanoflow's ``stage_nano_batches`` re-splits the memory segments (vLLM's attention, which needs request
    boundaries): the stage is aligned like the main split, capped like it, and dropped once it equals it."""
    from dynaflow.strategies.splits import at_most

    staged = SplitConfig((6, 6), stages=(("memory", (3, 3, 3, 3)),))
    aligned = request_aligned_split(staged, (2, 2, 3, 1, 4))
    assert aligned.sizes == (7, 5) and aligned.stages == (("memory", (2, 5, 1, 4)),)  # cuts 3, 6, 9 -> 2, 7, 8
    assert at_most(aligned, 3).stages == (("memory", (2, 5, 5)),) and at_most(aligned, 3).sizes == (7, 5)
    assert at_most(aligned, 1) == SplitConfig((12,))
    assert request_aligned_split(staged, (6, 6)).stages == ()  # aligns to the main split: no re-split left
    strategy = RequestAligned(dynaflow.strategies.get("nanoflow", nano_batches=2,
                                                      stage_nano_batches={"memory": 4}), max_nano=3)
    split = strategy.split_config(InputInfo(12, request_lengths=(2, 2, 3, 1, 4)))
    assert split.max_num <= 3 and split.stages, split


def test_request_aligned_split_rejects_a_mismatched_layout():
    with pytest.raises(ConfigError, match=r"request lengths \(5, 3\) sum to 8 rows but the split covers 12"):
        request_aligned_split(SplitConfig((6, 6)), (5, 3))


def test_request_aligned_wrapper_follows_dynaflow_requests():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 4)).eval()
    strategy = RequestAligned(dynaflow.strategies.get("round_robin", nano_batches=3))
    assert strategy.name == "round_robin" and "request boundaries" in strategy.describe()
    info = InputInfo(12, request_lengths=(5, 3, 4))
    assert strategy.split_config(info).sizes == (5, 3, 4)
    assert strategy.split_config(InputInfo(12)).sizes == (4, 4, 4)  # no layout declared: unchanged
    fast = dynaflow.compile(model, strategy=strategy, executor="thread")
    x = torch.randn(12, 4)
    with torch.no_grad(), dynaflow.requests([2, 10]):
        out = fast(x)
    torch.testing.assert_close(out, model(x))
    assert fast.last_graph.last_plan.split.sizes == (2, 10)


@torch.library.custom_op("dftest_int::fill_out", mutates_args=("out",))
def fill_out(x: torch.Tensor, out: torch.Tensor) -> None:
    out.copy_(x * 2)


def test_thread_mutations_makes_an_in_place_write_a_data_dependency():
    def f(x):
        out = torch.empty_like(x)
        torch.ops.dftest_int.fill_out(x, out)
        return out + 1

    gm = torch.fx.symbolic_trace(f)
    n = thread_mutations(gm, lambda node: "fill_out" in str(node.target))
    assert n == 1
    nodes = list(gm.graph.nodes)
    fill = next(x for x in nodes if "fill_out" in str(x.target))
    alias = fill.next
    assert alias.target is torch.ops.aten.alias.default and alias.meta[HOST_STATE_META] and fill.meta[HOST_STATE_META]
    add = next(x for x in nodes if "add" in str(x.target))
    assert alias in add.all_input_nodes
    x = torch.randn(3)
    torch.testing.assert_close(gm(x), x * 2 + 1)


def test_matching_rules_drops_rules_that_match_nothing_left():
    gm = torch.fx.symbolic_trace(lambda x: torch.relu(x) + 1)
    rules = matching_rules(gm, [dynaflow.Op("relu", name="a"), dynaflow.Op("relu", name="b"), dynaflow.Op("all_reduce")])
    assert [r.name for r in rules] == ["a"]


def test_parse_options():
    assert parse_options('{"nano_batches": 2, "min_rows": 8}', "X") == {"nano_batches": 2, "min_rows": 8}
    assert parse_options(None, "X") == {} and parse_options("", "X") == {}
    with pytest.raises(IntegrationError, match=r"ENV: options must be a JSON object"):
        parse_options("{nano", "ENV")
    with pytest.raises(IntegrationError, match=r"ENV: min_rows=0 must be an int >= 1"):
        parse_options({"min_rows": 0}, "ENV")
    assert parse_options({"piecewise": True}, "X") == {"piecewise": True, "min_rows": 1}
    with pytest.raises(IntegrationError, match=r"ENV: piecewise='yes' must be true or false"):
        parse_options({"piecewise": "yes"}, "ENV")
    with pytest.raises(IntegrationError, match=r"ENV: Unknown dynaflow option 'strategi'.*Did you mean 'strategy'"):
        parse_options({"strategi": "nanoflow"}, "ENV")
    assert issubclass(IntegrationError, dynaflow.DynaflowError)


def test_integrations_import_and_plugins_are_no_ops_without_the_engines():
    code = textwrap.dedent("""
        import sys, importlib.abc
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split('.')[0] in ('vllm', 'sglang'):
                    raise ImportError('blocked: ' + name)
        sys.meta_path.insert(0, Block())
        import importlib.util
        importlib.util.find_spec = (lambda orig: (lambda name, *a: None if name.split('.')[0] in ('vllm', 'sglang') else orig(name, *a)))(importlib.util.find_spec)
        import dynaflow, dynaflow.integrations, dynaflow.integrations.vllm as v, dynaflow.integrations.sglang as s
        assert not v.is_available() and not s.is_available()
        v.register(); s.register()            # DYNAFLOW_VLLM / DYNAFLOW_SGLANG unset: nothing happens
        assert v.compilation_config() == {"mode": 2, "backend": "dynaflow.integrations.vllm.backend"}
        try:
            v.enable()
        except dynaflow.DynaflowError as e:
            assert "vLLM is not installed" in str(e), e
        else:
            raise AssertionError("enable() without vLLM must raise")
        assert not any(m.split('.')[0] in ('vllm', 'sglang') for m in sys.modules)
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-2000:]


def test_integration_knobs():
    from dynaflow import knobs

    with knobs.scope(DYNAFLOW_VLLM=0, DYNAFLOW_SGLANG=1, DYNAFLOW_VLLM_OPTIONS='{"nano_batches": 3}'):
        assert not knobs.integration_enabled("vllm") and knobs.integration_enabled("sglang")
        assert knobs.integration_options("vllm") == '{"nano_batches": 3}'
        import dynaflow.integrations.vllm as dv

        saved, dv._settings._OPTIONS = dv._settings._OPTIONS, None
        try:
            assert dv.options() == {"nano_batches": 3, "min_rows": 1}
        finally:
            dv._settings._OPTIONS = saved


def test_integration_tier_fails_instead_of_skipping_when_required(monkeypatch):
    import os

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "integration"))
    from integ_util import require

    monkeypatch.delenv("DYNAFLOW_REQUIRE_INTEGRATION", raising=False)
    with pytest.raises(pytest.skip.Exception, match="dynaflow_no_such_host is not importable"):
        require("dynaflow_no_such_host")
    monkeypatch.setenv("DYNAFLOW_REQUIRE_INTEGRATION", "1")
    with pytest.raises(pytest.fail.Exception, match=r"not importable.*DYNAFLOW_REQUIRE_INTEGRATION=1"):
        require("dynaflow_no_such_host")


def test_a_static_graph_takes_its_rows_from_the_declared_request_layout():
    """A graph Dynamo specialised to one size (an engine's 1-token step) has no batch symbol; its rows are the
    engine's declared tokens, not the first input's rows (a 128-row weight lifted ahead of the tokens)."""
    import dynaflow
    from dynaflow.compiled_graph import CompiledGraph
    from dynaflow.config import DynaflowConfig

    seen = []

    def step(w, x):
        return x @ w.t()

    torch._dynamo.reset()
    w, x = torch.randn(128, 8), torch.randn(1, 8)
    torch.compile(step, backend=lambda gm, _: seen.append(gm) or gm.forward, dynamic=False)(w, x)
    graph = CompiledGraph(seen[0], DynaflowConfig(nano_batches=2), dynaflow.strategies.get("round_robin")).prepare()
    assert graph.segmented.batch_symbol is None
    with dynaflow.requests([1]):
        assert graph.batch_size([w, x]) == 1
        torch.testing.assert_close(graph(w, x)[0], step(w, x))


def test_a_split_with_more_nano_batches_than_the_engine_holds_merges_its_smallest_neighbours():
    """``prefill_decode`` cuts one nano-batch per run of one phase; vLLM has metadata builders for only so many
    (the helper found ``32 -> 1/30/1`` with builders for 2): the smallest neighbours merge, cuts stay put."""
    from dynaflow.strategies import get as get_strategy
    from dynaflow.strategies.splits import at_most as merge_to

    assert merge_to(SplitConfig((1, 30, 1)), 2).sizes == (31, 1)
    assert merge_to(SplitConfig((5, 37, 2, 16, 4)), 4).sizes == (5, 37, 18, 4)  # 2 + 16 is the smallest pair
    assert merge_to(SplitConfig((5, 37, 2, 16, 4)), 1).sizes == (64,)
    strategy = RequestAligned(get_strategy("prefill_decode"), max_nano=2)
    info = InputInfo(32, request_lengths=(1, 30, 1), request_phases=("decode", "prefill", "decode"))
    assert RequestAligned(get_strategy("prefill_decode")).split_config(info).num == 3  # uncapped: one per run
    assert strategy.split_config(info).sizes == (31, 1)


def test_auto_under_an_engine_cap_never_splits_past_it(tmp_path, monkeypatch):
    """``auto`` through an integration: every candidate, and a winner read back from the disk cache, is wrapped
    to keep request boundaries and the engine's nano-batch cap (vLLM's metadata builders). The cap is in the
    tuning key, so a winner cached for a larger engine is not reused here."""
    import json

    from dynaflow.integrations._common import make_strategy

    monkeypatch.setenv("DYNAFLOW_CACHE_DIR", str(tmp_path))
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 4)).eval()
    four = {"strategy": "round_robin", "options": {"nano_batches": 4}}
    opts = {"strategy": "auto", "strategy_options": {"candidates": [four], "measure_top_k": 0}}
    x = torch.randn(16, 4)

    def run(cap):
        _, strategy = make_strategy(opts, max_nano=cap)
        assert f"max_nano={cap}" in repr(strategy)
        fast = dynaflow.compile(model, strategy=strategy, executor="serial")
        with torch.no_grad(), dynaflow.requests([3, 1, 5, 2, 4, 1]):
            torch.testing.assert_close(fast(x), model(x))
        (result,) = fast.last_graph.tuned.values()
        return result, fast.last_graph.last_plan.split.sizes

    for cap, split in ((2, "11/5"), (4, "4/5/2/5")):  # the candidate as the search planned it, under each cap
        result, _ = run(cap)
        (row,) = [t for t in result.trials if t.candidate.strategy == "round_robin"]
        assert "/".join(map(str, row.split.sizes)) == split, result.table()
    cache = tmp_path / "autotune.json"
    entries = json.loads(cache.read_text())
    assert len(entries) == 2  # one key per cap
    for entry in entries.values():  # make round_robin(4) the cached winner under both keys
        entry["candidate"] = four
    cache.write_text(json.dumps(entries))
    for cap in (2, 4):
        result, sizes = run(cap)
        assert result.from_cache and result.winner.candidate.strategy == "round_robin"
        assert len(sizes) == cap and sum(sizes) == 16, sizes
