"""The CPU-side logic of the CUDA executor: clear errors without CUDA, config options, SM rounding."""

from __future__ import annotations


import pytest
import torch

import dynaflow
from dynaflow.backend import executors
from dynaflow.backend.streams import green_context_support, round_sms, sm_granularity
from dynaflow.config import DynaflowConfig
from dynaflow.errors import BackendError, ConfigError
from models import make_mlp, mlp_input

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised on a machine without CUDA")


def test_cuda_is_a_registered_executor():
    assert "cuda" in executors.available()


@no_cuda
def test_cuda_executor_without_cuda_names_the_option_and_the_fix():
    with pytest.raises(BackendError) as e:
        executors.resolve("cuda")
    msg = str(e.value)
    assert "executor='cuda' needs a CUDA device" in msg and "torch.cuda.is_available() is False" in msg
    assert "executor='auto'" in msg


@no_cuda
def test_compile_with_cuda_executor_on_cpu_raises_backend_error_not_a_crash():
    c = dynaflow.compile(make_mlp(), executor="cuda")
    with pytest.raises(BackendError, match="executor='cuda' needs a CUDA device"):
        with torch.no_grad():
            c(mlp_input(4))


def test_auto_executor_stays_on_cpu_for_cpu_inputs():
    c = dynaflow.compile(make_mlp(), strategy="round_robin", nano_batches=2)
    with torch.no_grad():
        c(mlp_input(4))
    assert set(c.graphs[0]._executors) <= {"thread", "serial"}


@pytest.mark.parametrize("option,value,match", [
    ("over_capture", "eagr", r"over_capture='eagr' is not one of .* Did you mean 'eager'\?"),
    ("capture_sizes", (4, 0), r"capture_sizes=\(4, 0\): 0 is not a batch size"),
    ("capture_sizes", (), r"capture_sizes=\(\) must be a non-empty sequence"),
    ("capture_sizes", "8", r"must be a non-empty sequence of batch sizes"),
    ("cuda_graphs", "yes", r"cuda_graphs='yes' must be True or False"),
    ("inductor", 1, r"inductor=1 must be True or False"),
])
def test_bad_cuda_options_are_config_errors(option, value, match):
    with pytest.raises(ConfigError, match=match):
        DynaflowConfig(**{option: value})


def test_cuda_options_defaults_and_normalisation():
    cfg = DynaflowConfig(capture_sizes=[8, 2, 4, 4])
    assert cfg.capture_sizes == (2, 4, 8)
    assert (cfg.inductor, cfg.cuda_graphs, cfg.over_capture, cfg.gpu_timeline, cfg.copy_outputs) == \
        (False, False, "error", False, True)
    with pytest.raises(ConfigError, match="Did you mean 'cuda_graphs'"):
        DynaflowConfig.from_dict({"cuda_graph": True})


def test_compile_accepts_the_options_through_config():
    c = dynaflow.compile(make_mlp(), config={"inductor": False, "capture_sizes": (2, 4), "over_capture": "eager"})
    assert c.config.capture_sizes == (2, 4) and c.config.over_capture == "eager"


@pytest.mark.parametrize("major,expected", [(9, (8, 8)), (10, (8, 8)), (8, (4, 2)), (7, (2, 2)), (6, (1, 1))])
def test_sm_granularity(major, expected):
    assert sm_granularity(major) == expected


@pytest.mark.parametrize("requested,granted", [(1, 8), (8, 8), (9, 16), (60, 64), (66, 72), (200, 128)])
def test_round_sms_on_hopper_h200(requested, granted):
    assert round_sms(requested, 132, 9) == granted  # H200: 132 SMs, partitions in multiples of 8


def test_round_sms_on_ampere_and_bad_input():
    assert round_sms(3, 108, 8) == 4 and round_sms(5, 108, 8) == 6
    with pytest.raises(ValueError):
        round_sms(0, 132, 9)


def test_green_context_detection_never_crashes():
    assert green_context_support() in (None, "torch", "cuda-python")


# -- lane streams with fake devices: green-context success, failure → plain-stream fallback ------------------
class _Props:
    multi_processor_count = 132
    major, minor = 9, 0


@pytest.fixture
def fake_device(monkeypatch):
    from dynaflow.backend import streams as st

    made = []
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: _Props())
    monkeypatch.setattr(torch.cuda, "Stream", lambda device=None, priority=0: made.append(priority) or f"stream{len(made)}")
    return st


def test_lane_streams_torch_green_context_for_one_partitioned_lane(fake_device, monkeypatch):
    """torch's API splits the whole device per call: fine for ONE partitioned lane (the others share the
    device on plain streams); it does not report the granted count."""
    from dynaflow.ir import Lane

    calls = []
    monkeypatch.setattr(fake_device, "green_context_support", lambda: "torch")
    monkeypatch.setattr(fake_device, "_torch_green", lambda lane, n, dev: calls.append(n) or ("ctx", f"green{n}", None))
    out = fake_device.make_lane_streams((Lane("compute", sm_count=100), Lane("other")))
    assert calls == [104]
    assert [(ls.requested_sms, ls.granted_sms, ls.mechanism) for ls in out] == [
        (100, None, "torch-green-context"), (None, None, "stream")]
    assert out[0].stream == "green104" and out[0].part.sms == 104 and "sm 100->?" in repr(out[0])


def test_lane_streams_torch_only_never_makes_overlapping_partitions(fake_device, monkeypatch, caplog):
    """Two partitioned lanes with torch's API alone would overlap (pytorch #195378): plain streams + WARNING."""
    from dynaflow.ir import Lane

    monkeypatch.setattr(fake_device, "green_context_support", lambda: "torch")
    monkeypatch.setattr(fake_device, "_torch_green", lambda *a: pytest.fail("overlapping torch green contexts"))
    with caplog.at_level("WARNING"):
        out = fake_device.make_lane_streams((Lane("compute", sm_count=100), Lane("memory", sm_count=30)))
    assert [ls.mechanism for ls in out] == ["fallback", "fallback"]
    assert "the partitions would overlap" in caplog.text and "need cuda-python" in caplog.text


def test_lane_streams_fall_back_to_plain_streams_with_a_warning(fake_device, monkeypatch, caplog):
    from dynaflow.ir import Lane

    def boom(lane, n, dev):
        raise RuntimeError("green contexts not supported by this driver")

    monkeypatch.setattr(fake_device, "green_context_support", lambda: "torch")
    monkeypatch.setattr(fake_device, "_torch_green", boom)
    with caplog.at_level("WARNING"):
        (ls,) = fake_device.make_lane_streams((Lane("compute", sm_count=64),))
    assert ls.mechanism == "fallback" and ls.granted_sms is None and ls.stream.startswith("stream")
    assert "lane 'compute' asked for 64 SMs but got no SM partition" in caplog.text
    assert "green contexts not supported by this driver" in caplog.text


# The cuda-python driver sequence (one split per lane set, the granted count, failures) is tested with a fake
# driver in tests/test_sm_partitions.py.


@pytest.mark.parametrize("api", ["2.11", "2.13"])
def test_torch_green_context_signatures_of_both_torch_versions(monkeypatch, api):
    """torch 2.11's ``GreenContext.create(num_sms, device_id=0)`` and 2.13's keyword-only
    ``create(*, num_sms=None, ..., device_id=None)`` are both called correctly; ``Stream()`` is kept."""
    import torch.cuda.green_contexts as gc
    from dynaflow.backend import streams as st
    from dynaflow.ir import Lane

    seen = {}

    class Ctx:
        def Stream(self):
            return "green-stream"

    if api == "2.11":
        def create(num_sms, device_id=0):
            seen.update(num_sms=num_sms, device_id=device_id)
            return Ctx()
    else:
        def create(*, num_sms=None, workqueue_scope=None, workqueue_concurrency_limit=None, device_id=None):
            seen.update(num_sms=num_sms, device_id=device_id)
            return Ctx()

    monkeypatch.setattr(gc.GreenContext, "create", staticmethod(create))
    ctx, stream, granted = st._torch_green(Lane("compute", sm_count=60), 64, 0)
    assert seen == {"num_sms": 64, "device_id": 0} and stream == "green-stream" and granted is None
