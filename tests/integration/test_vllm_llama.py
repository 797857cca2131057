"""The real vLLM Llama, compiled with dynaflow as vLLM's whole-graph backend, equals the eager model.

Each case runs a prefill step (three requests of different lengths) and then a mixed step (two decodes and a
new prefill) on the same KV caches, so nano-batch i's attention must write and read only its own requests'
cache slots. Reference: HF transformers on each request's full history (and vLLM eager, which matches it).
"""

from __future__ import annotations

import pytest
import torch

from integ_util import require

pytestmark = pytest.mark.integration

TOL = dict(atol=2e-5, rtol=1e-5)
PREFILL = {0: 5, 1: 3, 2: 4}
MIXED = {0: 1, 1: 1, 3: 6}


@pytest.fixture(scope="module")
def hv():
    require("vllm")
    import vllm_harness

    hf, path = vllm_harness.hf_llama()
    return vllm_harness, hf, path


def _run_two_steps(h, hf, engine):
    conv = h.Conversation(seed=1)
    outs = []
    for new in (PREFILL, MIXED):
        ids, pos, meta = conv.step_inputs(new)
        outs.append((engine.step(ids, pos, meta), conv.reference(hf, new)))
    return outs


def test_eager_vllm_llama_with_the_fake_attention_matches_transformers(hv):
    h, hf, path = hv
    for got, ref in _run_two_steps(h, hf, h.build(hf, path, None)):
        torch.testing.assert_close(got, ref, **TOL)


def _strategies():
    import dynaflow

    return dynaflow.strategies.available()


@pytest.mark.parametrize("executor", ["serial", "thread"])
@pytest.mark.parametrize("nano", [2, 3])
@pytest.mark.parametrize("strategy", ["sequential", "round_robin", "nanoflow", "two_batch_overlap"])
def test_dynaflow_backend_matches_eager(hv, strategy, nano, executor):
    h, hf, path = hv
    import dynaflow.integrations.vllm as dv
    from dynaflow.integrations.vllm import _vllm

    assert strategy in _strategies()
    cc = dv.compilation_config(nano_batches=nano, strategy=strategy, executor=executor)
    engine = h.build(hf, path, cc)
    before = len(_vllm.STEPS)
    outs = _run_two_steps(h, hf, engine)
    for got, ref in outs:
        torch.testing.assert_close(got, ref, **TOL)
    assert len(_vllm.STEPS) == before + 1  # one whole graph, token dim dynamic: no recompile for step 2
    graph = _vllm.STEPS[-1].graph
    attention = [s for s in graph.segmented.segments if "nano-context" in s.hints]
    assert len(attention) == 2 and not any(s.whole for s in attention)  # one per layer, split per nano-batch
    splits = {p.split.sizes for p in graph._by_split.values()}
    # prefill 12 tokens [5|3|4] and mixed 8 tokens [1|1|6]: cuts only at request boundaries
    # with the request layout known, the split is token-balanced over request boundaries: 3 requests of the
    # mixed step make 3 nano-batches
    expected = {2: {(5, 7), (2, 6)}, 3: {(5, 3, 4), (1, 1, 6)}}[nano]
    assert splits == expected


@pytest.mark.parametrize("strategy", ["auto", "prefill_decode"])
def test_strategies_that_choose_their_own_split_match_eager(hv, strategy):
    """auto and prefill_decode pick their own nano-batch count; outputs still equal eager and every cut
    falls on a request boundary (prefill step: requests of 5, 3, 4 tokens; mixed step: 1, 1, 6)."""
    h, hf, path = hv
    import dynaflow.integrations.vllm as dv
    from dynaflow.integrations.vllm import _vllm

    engine = h.build(hf, path, dv.compilation_config(nano_batches=2, strategy=strategy, executor="thread"))
    for got, ref in _run_two_steps(h, hf, engine):
        torch.testing.assert_close(got, ref, **TOL)
    graph = _vllm.STEPS[-1].graph
    for split in graph._by_split:
        cuts = {b for _, b in split.boundaries}
        assert cuts <= {5, 8, 12} or cuts <= {1, 2, 8}, split
    if strategy == "auto":  # the autotuner planned each step (prediction only: the step writes the KV cache)
        assert graph.tuned and all(r.winner.measured is None for r in graph.tuned.values())


@pytest.mark.parametrize("strategy", ["round_robin", "nanoflow"])
def test_piecewise_mode_compiles_the_dense_pieces_with_dynaflow(hv, strategy, monkeypatch):
    h, hf, path = hv
    import vllm.compilation.backends as backends

    import dynaflow.integrations.vllm as dv
    from dynaflow.integrations.vllm import _piecewise

    monkeypatch.setattr(backends, "make_compiler", backends.make_compiler)  # undo the wrapper afterwards
    monkeypatch.setattr(dv._settings, "_OPTIONS", None)
    dv.enable({"nano_batches": 2, "strategy": strategy, "executor": "thread", "piecewise": True})
    assert getattr(backends.make_compiler, "_dynaflow", False)
    before = len(_piecewise.PIECES)
    engine = h.build(hf, path, {"mode": 2}, piecewise=True)
    for got, ref in _run_two_steps(h, hf, engine):
        torch.testing.assert_close(got, ref, **TOL)
    pieces = _piecewise.PIECES[before:]
    assert len(pieces) == 3  # 2 layers: the dense code before, between and after the attention ops
    assert all(not any("nano-context" in s.hints for s in p.segmented.segments) for p in pieces)
    assert any(plan.split.num == 2 for p in pieces for plan in p._by_split.values())


def test_a_single_request_takes_the_one_nano_batch_fast_path(hv):
    h, hf, path = hv
    import dynaflow.integrations.vllm as dv
    from dynaflow.integrations.vllm import _vllm

    engine = h.build(hf, path, dv.compilation_config(nano_batches=3, strategy="round_robin", executor="thread"))
    conv = h.Conversation(seed=2)
    ids, pos, meta = conv.step_inputs({0: 9})
    torch.testing.assert_close(engine.step(ids, pos, meta), conv.reference(hf, {0: 9}), **TOL)
    assert _vllm.STEPS[-1].graph.last_plan.split.num == 1


def test_min_rows_keeps_small_batches_whole(hv):
    h, hf, path = hv
    import dynaflow.integrations.vllm as dv
    from dynaflow.integrations.vllm import _vllm

    engine = h.build(hf, path, dv.compilation_config(nano_batches=2, strategy="nanoflow", min_rows=8))
    conv = h.Conversation(seed=3)
    ids, pos, meta = conv.step_inputs({0: 3, 1: 4})  # 7 tokens < 2 * min_rows
    torch.testing.assert_close(engine.step(ids, pos, meta), conv.reference(hf, {0: 3, 1: 4}), **TOL)
    assert _vllm.STEPS[-1].graph.last_plan.split.num == 1


def test_unknown_metadata_type_is_an_integration_error_naming_the_fix(hv):
    h, hf, path = hv
    import dynaflow.integrations.vllm as dv
    from dynaflow.integrations._common import IntegrationError
    from dynaflow.integrations.vllm._vllm import StepState

    class OpaqueMeta:
        query_start_loc_cpu = torch.tensor([0, 2, 4])

    ctx = type("Ctx", (), {"attn_metadata": {"l0": OpaqueMeta()}, "slot_mapping": {}})()
    state = StepState.from_context(ctx, 4)
    assert state.lengths == (2, 2)
    with pytest.raises(IntegrationError, match=r"OpaqueMeta.*layer 'l0'.*register_metadata_slicer"):
        state.enter(0, (0, 2))
    with pytest.raises(IntegrationError, match=r"rows 1:3 cut a request"):
        state.enter(0, (1, 3))
    with pytest.raises(IntegrationError, match=r"covers 4 tokens but the model got 3"):
        StepState.from_context(ctx, 3)
