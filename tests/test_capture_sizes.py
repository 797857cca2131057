"""Capture sizes, padding a batch up to a capture size and back (backend/capture_sizes.py), and the captured call path."""

from __future__ import annotations

import pytest
import torch

import dynaflow
from dynaflow.backend import SerialExecutor
from dynaflow.backend.capture_sizes import (InputSpec, Mode, choose_capture_size, copy_into_static, input_specs, pad_inputs,
                                      unpad_outputs)
from dynaflow.errors import BackendError, DynaflowError
from dynaflow.segmented import ValueKind
from models import make_coupled, make_transformer, mlp_input, transformer_input


def test_no_capture_sizes_captures_each_batch_exactly():
    c = choose_capture_size(5, None)
    assert (c.size, c.mode, c.padded) == (5, Mode.GRAPH, False)


@pytest.mark.parametrize("batch,size", [(1, 2), (2, 2), (3, 4), (4, 4), (5, 8), (8, 8)])
def test_batch_pads_up_to_next_capture_size(batch, size):
    c = choose_capture_size(batch, (8, 2, 4))
    assert c.size == size and c.mode is Mode.GRAPH and c.padded == (batch != size)
    assert repr(c).startswith(f"Capture({size}")


def test_over_largest_is_a_clear_error_by_default():
    with pytest.raises(BackendError) as e:
        choose_capture_size(9, (2, 4, 8))
    msg = str(e.value)
    assert "batch size 9" in msg and "largest CUDA-graph capture size 8" in msg
    assert "capture_sizes" in msg and "over_capture='eager'" in msg
    assert isinstance(e.value, DynaflowError)


def test_over_largest_runs_eager_when_configured():
    c = choose_capture_size(9, (2, 4, 8), "eager")
    assert c.mode is Mode.EAGER and c.size == 9 and "largest" in c.reason


def test_unsafe_padding_errors_or_goes_eager_but_exact_sizes_still_capture():
    why = ["barrier segment 'glue_1' sees the whole batch"]
    with pytest.raises(BackendError, match=r"padded to capture size 4.*glue_1.*Add 3 to capture_sizes"):
        choose_capture_size(3, (4, 8), "error", why)
    assert choose_capture_size(3, (4, 8), "eager", why).mode is Mode.EAGER
    assert choose_capture_size(4, (4, 8), "error", why).mode is Mode.GRAPH


def test_zero_batch_is_rejected():
    with pytest.raises(BackendError, match="at least one row"):
        choose_capture_size(0, (4,))


def test_pad_repeats_last_item_and_handles_flattened_batch_dims_and_batch_size_ints():
    x = torch.arange(3 * 2, dtype=torch.float32).reshape(3 * 2, 1)  # batch 3, k=2 rows per item (flattened)
    w = torch.ones(4)
    specs = (InputSpec(ValueKind.BATCH, 0), InputSpec(ValueKind.FREE), InputSpec(ValueKind.BATCH_SIZE))
    px, pw, pb = pad_inputs([x, w, 3], specs, 3, 5)
    assert px.shape == (10, 1) and pw is w and pb == 5
    assert torch.equal(px[:6], x)
    assert torch.equal(px[6:], x[4:6].repeat(2, 1))  # the last item (2 rows) repeated for 2 padding items


def test_pad_along_a_non_zero_batch_dim():
    x = torch.randn(4, 3, 2)
    (px,) = pad_inputs([x], (InputSpec(ValueKind.BATCH, 1),), 3, 4)
    assert px.shape == (4, 4, 2) and torch.equal(px[:, :3], x) and torch.equal(px[:, 3], x[:, 2])


def test_pad_rejects_a_size_that_is_not_a_multiple_of_the_batch():
    with pytest.raises(BackendError, match=r"shape \(5, 2\).*not a multiple of the batch size 2"):
        pad_inputs([torch.zeros(5, 2)], (InputSpec(ValueKind.BATCH, 0),), 2, 4)


def test_copy_into_static_reuses_the_buffer():
    static = torch.full((4, 2), -1.0)
    x = torch.randn(2, 2)
    copy_into_static(static, x, InputSpec(ValueKind.BATCH, 0), 2, 4)
    assert torch.equal(static[:2], x) and torch.equal(static[2], x[1]) and torch.equal(static[3], x[1])


def _fx_graph(model, x, **config):
    c = dynaflow.compile(torch.fx.symbolic_trace(model), strategy="nanoflow", nano_batches=2, executor="serial",
                         config=config or None)
    with torch.no_grad():
        c(x)
    return c, c.graphs[0]


def test_captured_call_pads_plans_at_the_capture_size_and_narrows_outputs_on_cpu():
    model = make_transformer()
    c, g = _fx_graph(model, transformer_input(4))
    assert input_specs(g.segmented)[0] == InputSpec(ValueKind.BATCH, 0)
    g.config = g.config.replace(capture_sizes=(4, 8))
    x = transformer_input(5, seed=7)
    with torch.no_grad():
        out = g.run_captured([x], executor=SerialExecutor())
        ref = model(x)
    (out,) = out if isinstance(out, tuple) else (out,)
    assert g.last_capture.size == 8 and g.last_capture.padded
    assert g.last_plan.program.batch_size == 8
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_captured_call_refuses_to_pad_through_a_barrier():
    model = make_coupled()
    c, g = _fx_graph(model, mlp_input(4))
    g.config = g.config.replace(capture_sizes=(4, 8))
    with pytest.raises(BackendError, match="barrier segment"):
        g.run_captured([mlp_input(5)], executor=SerialExecutor())
    g.config = g.config.replace(over_capture="eager")
    with torch.no_grad():
        out = g.run_captured([mlp_input(5)], executor=SerialExecutor())
        ref = model(mlp_input(5))
    (out,) = out if isinstance(out, tuple) else (out,)
    assert g.last_capture.mode is Mode.EAGER and g.last_capture.size == 5
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_cuda_graphs_on_cpu_inputs_is_a_clear_error():
    model = make_transformer()
    c = dynaflow.compile(model, config={"cuda_graphs": True, "capture_sizes": (4,)})
    with pytest.raises(BackendError, match=r"cuda_graphs=True needs the cuda executor.*cuda_graphs=False"):
        with torch.no_grad():
            c(transformer_input(4))


def test_unpad_narrows_batch_outputs_only():
    model = make_transformer()
    c, g = _fx_graph(model, transformer_input(4))
    full = torch.zeros(8, 6, 16)
    out = (full,) if isinstance(g.segmented.output_tree, tuple) else full
    o = unpad_outputs(out, g.segmented, 5, 8)
    (o,) = o if isinstance(o, tuple) else (o,)
    assert o.shape == (5, 6, 16) and o.data_ptr() == full.data_ptr()
    assert unpad_outputs(out, g.segmented, 8, 8) is out
