"""Disjoint SM partitions (issue 13) on the CPU: the partition planner, and the driver call sequence of
``make_lane_streams`` against a fake of cuda-python's ``cuda.bindings.driver`` (one split per lane set, the
remainder for the last partitioned lane, the granted count from the driver, plain-stream fallback + WARNING
on any refusal). The GPU side is tests/cuda/test_sm_partitions_gpu.py."""

from __future__ import annotations

import math
import types

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dynaflow.backend import streams
from dynaflow.backend.sm_partitions import (SmPart, SmPlan, available_sms, launch_carveouts, plan_sm_partitions,
                                            planned_sms, sm_carveout, sm_granularity)
from dynaflow.errors import BackendError
from dynaflow.ir import Lane

H100 = 132


def _lanes(**sms):
    return tuple(Lane(name, sm_count=n) for name, n in sms.items())


# -- the planner ----------------------------------------------------------------------------------------------
def test_two_lanes_are_one_group_and_the_remainder_as_measured_on_the_h100():
    plan = plan_sm_partitions(_lanes(compute=80, memory=52), H100, 9)
    assert repr(plan) == "SmPlan(compute: 80 SMs [group 0], memory: 52 SMs [remainder] of 132)"
    assert (plan.nb_groups, plan.min_count, plan.planned_sms, plan.scaled) == (1, 80, 132, False)
    assert plan.part("memory") == SmPart("memory", 52, 52, (), remainder=True)


def test_a_group_rounds_down_when_rounding_up_would_eat_the_remainder_lanes_request():
    plan = plan_sm_partitions(_lanes(compute=100, memory=30), H100, 9)  # 104 would leave memory 28 < 30
    assert repr(plan) == "SmPlan(compute: 96 SMs [group 0], memory: 36 SMs [remainder] of 132)"
    plan = plan_sm_partitions(_lanes(compute=60, memory=30), H100, 9)  # rounded up: the remainder still fits
    assert repr(plan) == "SmPlan(compute: 64 SMs [group 0], memory: 68 SMs [remainder] of 132)"


def test_three_equal_lanes_are_k_minus_1_groups_of_one_split():
    plan = plan_sm_partitions(_lanes(a=40, b=40, c=52), H100, 9)
    assert repr(plan) == "SmPlan(a: 40 SMs [group 0], b: 40 SMs [group 1], c: 52 SMs [remainder] of 132)"
    assert (plan.nb_groups, plan.min_count) == (2, 40)


def test_unequal_lanes_take_several_equal_groups_of_the_same_split():
    plan = plan_sm_partitions(_lanes(a=48, b=32, c=52), H100, 9)
    assert repr(plan) == "SmPlan(a: 48 SMs [groups 0-2], b: 32 SMs [groups 3-4], c: 52 SMs [remainder] of 132)"
    assert (plan.nb_groups, plan.min_count) == (5, 16)


def test_lanes_without_sm_count_are_shared_and_not_partitioned():
    lanes = (Lane("other"), Lane("compute", sm_count=64), Lane("net"))
    plan = plan_sm_partitions(lanes, H100, 9)
    assert repr(plan) == "SmPlan(compute: 64 SMs [group 0] of 132; shared: other, net)"
    assert plan.shared == ("other", "net") and plan.part("other") is None and plan.nb_groups == 1
    assert plan_sm_partitions((Lane("x"),), H100, 9) == SmPlan(H100, shared=("x",))


def test_one_lane_asking_for_more_than_the_device_is_scaled_and_capped(caplog):
    with caplog.at_level("WARNING"):
        plan = plan_sm_partitions(_lanes(compute=200), H100, 9)
    assert repr(plan) == "SmPlan(compute: 128 SMs [group 0] of 132)" and plan.scaled
    assert "lanes compute=200 ask for 200 SMs but the device has 132" in caplog.text


def test_oversubscribed_requests_are_scaled_keeping_their_ratio_with_a_warning(caplog):
    with caplog.at_level("WARNING"):  # a config written for an H100, run on an A100 (108 SMs, 8.0)
        plan = plan_sm_partitions(_lanes(compute=96, memory=32), 108, 8)
    assert "lanes compute=96, memory=32 ask for 128 SMs but the device has 108" in caplog.text
    assert "scaled to compute=81, memory=27, keeping their ratio" in caplog.text
    assert repr(plan) == "SmPlan(compute: 80 SMs [group 0], memory: 28 SMs [remainder] of 108)" and plan.scaled


def test_oversubscribed_requests_with_overflow_error_name_lanes_counts_and_device():
    with pytest.raises(BackendError) as e:
        plan_sm_partitions(_lanes(compute=96, memory=64), H100, 9, overflow="error")
    msg = str(e.value)
    assert "lanes compute=96, memory=64 ask for 160 SMs but the device has 132" in msg and "sm_counts" in msg
    with pytest.raises(ValueError, match="overflow='clip' must be one of"):
        plan_sm_partitions(_lanes(compute=8), H100, 9, overflow="clip")


def test_more_partitions_than_the_device_can_hold_is_a_clear_error():
    with pytest.raises(BackendError, match=r"lanes a=4, b=4, c=4 cannot get disjoint partitions on a device with "
                                           r"16 SMs: 3 partitions need at least 24 SMs"):
        plan_sm_partitions(_lanes(a=4, b=4, c=4), 16, 9)


def test_ampere_groups_of_several_lanes_are_multiples_of_the_minimum():
    """8.x: partitions of at least 4 SMs in steps of 2; two group lanes of 4 and 6 would need minCount 2 < 4,
    so their counts are multiples of 4 and minCount their gcd."""
    plan = plan_sm_partitions(_lanes(a=4, b=6, c=50), 108, 8)
    assert repr(plan) == "SmPlan(a: 4 SMs [group 0], b: 8 SMs [groups 1-2], c: 96 SMs [remainder] of 108)"
    assert plan.min_count == 4
    assert repr(plan_sm_partitions(_lanes(a=6, b=50), 108, 8)) == \
        "SmPlan(a: 6 SMs [group 0], b: 102 SMs [remainder] of 108)"  # one group lane: steps of 2


def _unit(k: int, major: int) -> int:
    """Smallest group-lane count the planner can give with ``k`` partitioned lanes."""
    minimum, step = sm_granularity(major)
    q = step if k == 2 else math.lcm(minimum, step)
    return -(-minimum // q) * q


@settings(max_examples=400, deadline=None)
@given(sms=st.integers(16, 160), major=st.sampled_from([7, 8, 9]),
       counts=st.lists(st.one_of(st.none(), st.integers(1, 200)), min_size=1, max_size=4))
def test_plan_properties(sms, major, counts):
    lanes = tuple(Lane(f"l{i}", sm_count=n) for i, n in enumerate(counts))
    asked = [l for l in lanes if l.sm_count]
    k, (minimum, step) = len(asked), sm_granularity(major)
    try:
        plan = plan_sm_partitions(lanes, sms, major)
    except BackendError:
        assert k >= 2 and (k - 1) * _unit(k, major) + minimum > sms  # refused only when it cannot fit
        return
    assert plan.shared == tuple(l.name for l in lanes if not l.sm_count)
    assert [p.lane for p in plan.parts] == [l.name for l in asked]
    assert plan.planned_sms <= sms and plan.scaled == (sum(l.sm_count for l in asked) > sms)
    if not asked:
        assert plan.nb_groups == 0 and not plan.parts
        return
    groups = [p for p in plan.parts if not p.remainder]
    assert plan.min_count >= minimum and plan.min_count % step == 0
    used = [i for p in groups for i in p.groups]
    assert sorted(used) == list(range(plan.nb_groups))  # each group to exactly one lane: disjoint
    for p in groups:
        assert p.sms == len(p.groups) * plan.min_count and p.sms >= minimum and p.sms % step == 0
    rest = [p for p in plan.parts if p.remainder]
    if k == 1:
        assert not rest
        return
    assert rest == [plan.parts[-1]] and rest[0].sms >= minimum and plan.planned_sms == sms
    if not plan.scaled and rest[0].requested >= minimum and all(p.requested >= _unit(k, major) for p in groups):
        q = step if k == 2 else math.lcm(minimum, step)
        assert rest[0].sms >= rest[0].requested
        assert all(abs(p.sms - p.requested) < q for p in groups)


# -- the driver sequence, against a fake cuda-python ----------------------------------------------------------
class _Enum:
    def __init__(self, **members):
        self.__dict__.update(members)


def _resource(kind, sms, index=None):
    """A ``CUdevResource`` as far as streams.py reads it: ``.sm.smCount``."""
    return types.SimpleNamespace(kind=kind, index=index, sm=types.SimpleNamespace(smCount=sms))


class FakeDriver:
    """cuda-bindings' driver module as far as streams.py uses it: each call returns ``(CUresult, *outputs)``;
    ``cuDevSmResourceSplitByCount(nbGroups, input, useFlags, minCount)`` returns ``(err, groups, nbGroups,
    remaining)``. ``group_sms`` makes the driver grant other counts than asked; ``made`` fewer groups."""

    CUdevResourceType = _Enum(CU_DEV_RESOURCE_TYPE_SM=1)
    CUgreenCtxCreate_flags = _Enum(CU_GREEN_CTX_DEFAULT_STREAM=1)
    CUstream_flags = _Enum(CU_STREAM_NON_BLOCKING=1)

    def __init__(self, sms=H100, fail_at=None, group_sms=None, made=None):
        self.sms, self.fail_at, self.group_sms, self.made = sms, fail_at, group_sms, made
        self.calls, self.splits, self.descs, self.ctx_sms, self.destroyed = [], [], [], {}, []

    def _ret(self, name, *out):
        self.calls.append(name)
        fail = self.fail_at == name or self.fail_at == f"{name}#{self.calls.count(name)}"
        return (915 if fail else 0, *out)  # 915: CUDA_ERROR_INVALID_RESOURCE_CONFIGURATION

    def cuInit(self, flags):
        return self._ret("cuInit")

    def cuDeviceGet(self, ordinal):
        return self._ret("cuDeviceGet", f"dev{ordinal}")

    def cuDeviceGetDevResource(self, dev, kind):
        assert kind == 1
        return self._ret("cuDeviceGetDevResource", _resource("device", self.sms))

    def cuDevSmResourceSplitByCount(self, nb, res, flags, min_count):
        self.splits.append((nb, res.kind, flags, min_count))
        size, n = self.group_sms or min_count, nb if self.made is None else self.made
        groups = [_resource("group", size, i) for i in range(n)]
        return self._ret("cuDevSmResourceSplitByCount", groups, n, _resource("remainder", res.sm.smCount - n * size))

    def cuDevResourceGenerateDesc(self, resources, n):
        assert n == len(resources)
        self.descs.append(list(resources))
        return self._ret("cuDevResourceGenerateDesc", ("desc", len(self.descs) - 1))

    def cuGreenCtxCreate(self, desc, dev, flags):
        ctx = f"gctx{desc[1]}"
        self.ctx_sms[ctx] = sum(r.sm.smCount for r in self.descs[desc[1]])
        return self._ret("cuGreenCtxCreate", ctx)

    def cuGreenCtxStreamCreate(self, ctx, flags, priority):
        return self._ret("cuGreenCtxStreamCreate", 0xBEEF00 + self.calls.count("cuGreenCtxCreate"))

    def cuGreenCtxGetDevResource(self, ctx, kind):
        return self._ret("cuGreenCtxGetDevResource", _resource("ctx", self.ctx_sms[ctx]))

    def cuStreamDestroy(self, raw):
        self.destroyed.append(("stream", raw))
        return (0,)

    def cuGreenCtxDestroy(self, ctx):
        self.destroyed.append(("ctx", ctx))
        return (0,)


class _Props:
    multi_processor_count, major, minor = H100, 9, 0


@pytest.fixture
def fake(monkeypatch):
    """A fake H100 with cuda-python: ``fake.use(driver)`` installs the driver; plain streams are strings."""
    plain = []
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: _Props())
    monkeypatch.setattr(torch.cuda, "Stream", lambda device=None, priority=0: plain.append(1) or f"stream{len(plain)}")
    monkeypatch.setattr(torch.cuda, "ExternalStream", lambda ptr, device=None: ("external", ptr, str(device)))

    def use(drv):
        monkeypatch.setattr(streams, "_driver", lambda: drv)
        return drv

    return types.SimpleNamespace(use=use)


def test_two_lanes_one_split_group_and_remainder_granted_by_the_driver(fake):
    drv = fake.use(FakeDriver(group_sms=88))  # the driver grants 88 where 80 was asked: its count is reported
    out = streams.make_lane_streams((Lane("compute", sm_count=80), Lane("memory", sm_count=52), Lane("other")))
    assert drv.splits == [(1, "device", 0, 80)]  # ONE split of the whole device: nbGroups 1, useFlags 0, minCount 80
    assert drv.calls.count("cuDevSmResourceSplitByCount") == 1
    assert [[(r.kind, r.index) for r in d] for d in drv.descs] == [[("group", 0)], [("remainder", None)]]
    compute, memory, other = out
    assert (compute.mechanism, compute.requested_sms, compute.granted_sms) == ("cuda-python-green-context", 80, 88)
    assert (memory.mechanism, memory.requested_sms, memory.granted_sms) == ("cuda-python-green-context", 52, 44)
    assert memory.part.remainder and compute.part.groups == (0,) and compute.split == memory.split is not None
    assert compute.stream[:2] == ("external", 0xBEEF01) and compute.stream[2] == "cuda:0"
    assert (other.mechanism, other.stream, other.part) == ("stream", "stream1", None)
    assert repr(compute) == ("LaneStream('compute', cuda-python-green-context, sm 80->88 "
                             f"[group 0 of split {compute.split}])")
    assert streams.lane_resources(out) == {"compute": 88, "memory": 44, "other": None}


def test_three_lanes_one_split_each_descriptor_holds_its_groups(fake):
    drv = fake.use(FakeDriver())
    out = streams.make_lane_streams(_lanes(a=48, b=32, c=52))
    assert drv.splits == [(5, "device", 0, 16)]
    assert [[(r.kind, r.index) for r in d] for d in drv.descs] == [
        [("group", 0), ("group", 1), ("group", 2)], [("group", 3), ("group", 4)], [("remainder", None)]]
    assert [ls.granted_sms for ls in out] == [48, 32, 52] and len({ls.split for ls in out}) == 1
    assert streams.lane_resources(out) == {"a": 48, "b": 32, "c": 52}


def test_each_lane_set_gets_its_own_split(fake):
    drv = fake.use(FakeDriver())
    first = streams.make_lane_streams(_lanes(compute=80, memory=52))
    second = streams.make_lane_streams(_lanes(compute=64, memory=68))
    assert drv.splits == [(1, "device", 0, 80), (1, "device", 0, 64)]
    assert first[0].split != second[0].split


@pytest.mark.parametrize("call", ["cuInit", "cuDeviceGet", "cuDeviceGetDevResource", "cuDevSmResourceSplitByCount",
                                  "cuDevResourceGenerateDesc#2", "cuGreenCtxCreate#2", "cuGreenCtxStreamCreate#1"])
def test_a_refused_driver_call_falls_back_to_plain_streams_with_a_warning(fake, caplog, call):
    drv = fake.use(FakeDriver(fail_at=call))
    with caplog.at_level("WARNING"):
        out = streams.make_lane_streams(_lanes(compute=80, memory=52))
    assert [(ls.mechanism, ls.granted_sms, ls.stream) for ls in out] == [("fallback", None, "stream1"),
                                                                         ("fallback", None, "stream2")]
    name = call.split("#")[0]
    assert f"{name}: CUDA driver error 915" in caplog.text  # the refusing call is named
    assert "lanes 'compute' (80 SMs), 'memory' (52 SMs) asked for SM partitions but got none" in caplog.text
    assert "they run on plain streams sharing all 132 SMs" in caplog.text
    created = [c for c in drv.calls[:-1] if c == "cuGreenCtxCreate"]  # contexts made before the refusal
    assert sum(kind == "ctx" for kind, _ in drv.destroyed) == len(created)


def test_fewer_groups_than_planned_fall_back(fake, caplog):
    fake.use(FakeDriver(made=3))
    with caplog.at_level("WARNING"):
        out = streams.make_lane_streams(_lanes(a=48, b=32, c=52))
    assert {ls.mechanism for ls in out} == {"fallback"}
    assert "cuDevSmResourceSplitByCount made 3 groups of 16 SMs, the plan needs 5" in caplog.text


def test_overflow_through_make_lane_streams(fake, caplog):
    drv = fake.use(FakeDriver())
    with pytest.raises(BackendError, match="ask for 160 SMs but the device has 132"):
        streams.make_lane_streams(_lanes(compute=96, memory=64), overflow="error")
    assert drv.splits == []
    with caplog.at_level("WARNING"):
        out = streams.make_lane_streams(_lanes(compute=96, memory=64))
    assert [ls.granted_sms for ls in out] == [80, 52] and "scaled to compute=79, memory=52" in caplog.text


def test_an_impossible_plan_falls_back_without_a_crash(fake, monkeypatch, caplog):
    class Small(_Props):
        multi_processor_count = 16

    fake.use(FakeDriver(sms=16))
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: Small())
    with caplog.at_level("WARNING"):
        out = streams.make_lane_streams(_lanes(a=4, b=4, c=4))
    assert {ls.mechanism for ls in out} == {"fallback"} and "cannot get disjoint partitions" in caplog.text


def test_without_any_green_context_mechanism_the_lanes_fall_back(fake, monkeypatch, caplog):
    fake.use(None)
    monkeypatch.setattr(streams, "_torch_green_supported", lambda: False)
    assert streams.green_context_support() is None
    with caplog.at_level("WARNING"):
        (ls,) = streams.make_lane_streams(_lanes(compute=64))
    assert ls.mechanism == "fallback" and "green contexts are unavailable here" in caplog.text
    assert streams.lane_resources((ls,)) == {"compute": None}


def test_cuda_python_is_preferred_over_torch(fake, monkeypatch):
    fake.use(FakeDriver())
    monkeypatch.setattr(streams, "_torch_green_supported", lambda: True)
    assert streams.green_context_support() == "cuda-python"


def test_planned_sms_are_the_plans_partitions_and_empty_when_none_fit():
    lanes = [Lane("compute", sm_count=96), Lane("memory", sm_count=36), Lane("network")]
    assert planned_sms(lanes, 132, 9) == {"compute": 96, "memory": 36}
    assert planned_sms([Lane("a"), Lane("b")], 132, 9) == {}
    assert planned_sms([Lane(str(i), sm_count=8) for i in range(20)], 132, 9) == {}  # cannot be partitioned


def test_launch_carveouts_hold_back_what_each_partitioned_lane_lacks():
    launches = [types.SimpleNamespace(lane=name) for name in ("compute", "memory", "network", "compute")]
    out = launch_carveouts(launches, {"compute": 96, "memory": 36, "network": None}, 132)
    assert out == {id(launches[0]): 36, id(launches[1]): 96, id(launches[3]): 36}
    assert launch_carveouts(launches, {"compute": 132}, 132) == {}  # the whole device: nothing held back


def test_sm_carveout_is_scoped_and_available_sms_reads_it(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d=None: types.SimpleNamespace(
        multi_processor_count=132))
    before = torch._C._get_sm_carveout_experimental()
    assert available_sms(0) == 132 - (before or 0)
    with sm_carveout(100):
        assert torch._C._get_sm_carveout_experimental() == 100 and available_sms(0) == 32
        with sm_carveout(None):
            assert available_sms(0) == 32
    assert torch._C._get_sm_carveout_experimental() == before
    with pytest.raises(RuntimeError):
        with sm_carveout(96):
            raise RuntimeError("a failing launch")
    assert torch._C._get_sm_carveout_experimental() == before


def test_releasing_lane_streams_destroys_each_stream_then_its_green_context(fake):
    drv = fake.use(FakeDriver())
    out = streams.make_lane_streams((Lane("compute", sm_count=80), Lane("memory", sm_count=52), Lane("other")))
    assert drv.destroyed == []
    streams.release_lane_streams(out)
    assert drv.destroyed == [("stream", 0xBEEF02), ("ctx", "gctx1"), ("stream", 0xBEEF01), ("ctx", "gctx0")]
    streams.release_lane_streams([out[2]])  # a plain stream: torch frees it, nothing to destroy
    assert len(drv.destroyed) == 4
