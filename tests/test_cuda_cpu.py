"""The CPU-side logic of the CUDA executor: clear errors without CUDA, config options, SM rounding."""

from __future__ import annotations

import types

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


def test_lane_streams_green_context_granted_rounded(fake_device, monkeypatch):
    from dynaflow.ir import Lane

    calls = []
    monkeypatch.setattr(fake_device, "green_context_support", lambda: "torch")
    monkeypatch.setattr(fake_device, "_torch_green", lambda lane, n, dev: calls.append(n) or ("ctx", f"green{n}", None))
    out = fake_device.make_lane_streams((Lane("compute", sm_count=100), Lane("memory", sm_count=30), Lane("other")))
    assert calls == [104, 32]
    assert [(ls.requested_sms, ls.granted_sms, ls.mechanism) for ls in out] == [
        (100, 104, "torch-green-context"), (30, 32, "torch-green-context"), (None, None, "stream")]
    assert out[0].stream == "green104" and "sm 100->104" in repr(out[0])


def test_lane_streams_fall_back_to_plain_streams_with_a_warning(fake_device, monkeypatch, caplog):
    from dynaflow.ir import Lane

    def boom(lane, n, dev):
        raise RuntimeError("green contexts not supported by this driver")

    monkeypatch.setattr(fake_device, "green_context_support", lambda: "torch")
    monkeypatch.setattr(fake_device, "_torch_green", boom)
    monkeypatch.setattr(fake_device, "_driver_green", boom)
    with caplog.at_level("WARNING"):
        (ls,) = fake_device.make_lane_streams((Lane("compute", sm_count=64),))
    assert ls.mechanism == "fallback" and ls.granted_sms is None and ls.stream.startswith("stream")
    assert "asked for 64 SMs but green contexts are unavailable" in caplog.text



# -- the two green-context makers against fakes shaped like the real APIs -----------------------------------
class _Enum:
    def __init__(self, **members):
        self.__dict__.update(members)


class _FakeDriver:
    """cuda-bindings 13's driver module as far as ``_driver_green`` uses it: each call returns
    ``(CUresult, *outputs)``; ``cuDevSmResourceSplitByCount`` returns (err, groups, nbGroups, remainder)."""

    CUdevResourceType = _Enum(CU_DEV_RESOURCE_TYPE_SM=1)
    CUgreenCtxCreate_flags = _Enum(CU_GREEN_CTX_DEFAULT_STREAM=1)
    CUstream_flags = _Enum(CU_STREAM_NON_BLOCKING=1)

    def __init__(self, fail_at: str | None = None, granted: int = 16) -> None:
        self.calls: list = []
        self.fail_at = fail_at
        self.granted = granted

    def _ret(self, name, *out):
        self.calls.append(name)
        err = 800 if name == self.fail_at else 0  # CUDA_ERROR_NOT_PERMITTED-ish
        return (err, *out)

    def cuInit(self, flags):
        return self._ret("cuInit")

    def cuDeviceGet(self, ordinal):
        return self._ret("cuDeviceGet", f"dev{ordinal}")

    def cuDeviceGetDevResource(self, dev, kind):
        return self._ret("cuDeviceGetDevResource", ("sm-resource", dev))

    def cuDevSmResourceSplitByCount(self, nb, res, flags, min_count):
        group = types.SimpleNamespace(sm=types.SimpleNamespace(smCount=self.granted))
        self.min_count = min_count
        return self._ret("cuDevSmResourceSplitByCount", [group], 1, "remainder")

    def cuDevResourceGenerateDesc(self, groups, n):
        return self._ret("cuDevResourceGenerateDesc", ("desc", n))

    def cuGreenCtxCreate(self, desc, dev, flags):
        return self._ret("cuGreenCtxCreate", "gctx")

    def cuGreenCtxStreamCreate(self, ctx, flags, priority):
        return self._ret("cuGreenCtxStreamCreate", 0xBEEF)


def test_driver_green_context_call_sequence_and_granted_count(monkeypatch):
    from dynaflow.backend import streams as st
    from dynaflow.ir import Lane

    drv = _FakeDriver(granted=24)
    monkeypatch.setattr(st, "_driver", lambda: drv)
    monkeypatch.setattr(torch.cuda, "ExternalStream", lambda ptr, device=None: ("external", ptr, str(device)))
    ctx, stream, granted = st._driver_green(Lane("compute", sm_count=20), 24, 0)
    assert drv.calls == ["cuInit", "cuDeviceGet", "cuDeviceGetDevResource", "cuDevSmResourceSplitByCount",
                         "cuDevResourceGenerateDesc", "cuGreenCtxCreate", "cuGreenCtxStreamCreate"]
    assert drv.min_count == 24 and granted == 24 and ctx == "gctx"
    assert stream == ("external", 0xBEEF, "cuda:0")


def test_driver_green_context_error_falls_back_and_names_the_lane(fake_device, monkeypatch, caplog):
    from dynaflow.ir import Lane

    drv = _FakeDriver(fail_at="cuGreenCtxCreate")
    monkeypatch.setattr(fake_device, "_driver", lambda: drv)
    monkeypatch.setattr(fake_device, "green_context_support", lambda: "cuda-python")
    with caplog.at_level("WARNING"):
        (ls,) = fake_device.make_lane_streams((Lane("attn", sm_count=40),))
    assert ls.mechanism == "fallback" and drv.calls[-1] == "cuGreenCtxCreate"
    assert "lane 'attn': green context via cuda-python failed" in caplog.text and "CUDA driver error 800" in caplog.text


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
