"""Disjoint SM partitions (issue 13) on the CPU: the partition planner, and the driver call sequence of
``make_lane_streams`` against a fake of cuda-python's ``cuda.bindings.driver`` (one split per lane set, the
remainder for the last partitioned lane, the granted count from the driver, plain-stream fallback + WARNING
on any refusal). The GPU side is tests/cuda/test_sm_partitions_gpu.py."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dynaflow.backend.sm_partitions import SmPart, SmPlan, plan_sm_partitions, sm_granularity
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

