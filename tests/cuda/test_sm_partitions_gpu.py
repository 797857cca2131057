"""Disjoint SM partitions on a GPU (issue 13): two lanes with ``sm_count`` get groups of ONE driver split whose
green contexts really hold the SMs reported (``cuGreenCtxGetDevResource``), and their kernels run at the same
time. Needs cuda-python (``cuda.bindings.driver``); skipped without CUDA (see conftest.py) or without it.
The CPU side (planner, call sequence against a fake driver) is tests/test_sm_partitions.py."""

from __future__ import annotations

import pytest
import torch

from dynaflow.backend import streams
from dynaflow.backend.sm_partitions import sm_granularity
from dynaflow.ir import Lane

pytestmark = pytest.mark.cuda

SLEEP_MS = 50.0
"""Target length of one spin kernel: long enough that launch gaps are noise next to it."""


def _needs_driver() -> None:
    if streams._driver() is None:
        pytest.skip("needs cuda-python (pip install cuda-python): disjoint SM partitions use its driver API")


def _two_lanes() -> tuple[int, tuple[Lane, Lane]]:
    """Device SMs and two lanes splitting them ~60/40, the first rounded to the granularity (80/52 on 132)."""
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    total, (minimum, step) = props.multi_processor_count, sm_granularity(props.major)
    compute = max(minimum, round(total * 0.6 / step) * step)
    return total, (Lane("compute", sm_count=compute), Lane("memory", sm_count=total - compute))


def test_two_lanes_get_disjoint_groups_whose_green_contexts_hold_the_granted_sms():
    _needs_driver()
    total, lanes = _two_lanes()
    compute, memory = streams.make_lane_streams(lanes)
    print("SM partitions:", compute, memory)
    assert compute.mechanism == memory.mechanism == "cuda-python-green-context"
    # two outputs of one split are disjoint by construction: same split, no shared group, one remainder
    assert compute.split == memory.split is not None
    assert not set(compute.part.groups) & set(memory.part.groups)
    assert memory.part.remainder and not compute.part.remainder
    held = streams.lane_resources((compute, memory))
    assert held == {"compute": compute.granted_sms, "memory": memory.granted_sms}
    assert compute.granted_sms == compute.part.sms  # the H100 granted exactly what was asked
    assert memory.granted_sms >= 1 and compute.granted_sms + memory.granted_sms <= total


def _spin_cycles() -> int:
    """``torch.cuda._sleep`` cycles for about SLEEP_MS (from the clock rate, calibrated once)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    cycles = 10_000_000
    start.record()
    torch.cuda._sleep(cycles)
    end.record()
    torch.cuda.synchronize()
    return max(cycles, int(cycles * SLEEP_MS / max(start.elapsed_time(end), 1e-3)))


def _timed(lane_streams, cycles: int) -> float:
    """Milliseconds, on the caller's stream, for one spin kernel on each of ``lane_streams`` at once."""
    caller = torch.cuda.current_stream()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record(caller)
    for ls in lane_streams:
        ls.stream.wait_event(start)
        with torch.cuda.stream(ls.stream):
            torch.cuda._sleep(cycles)
        caller.wait_stream(ls.stream)
    end.record(caller)
    torch.cuda.synchronize()
    return start.elapsed_time(end)


def test_two_partitioned_lanes_run_kernels_at_the_same_time():
    _needs_driver()
    _, lanes = _two_lanes()
    compute, memory = streams.make_lane_streams(lanes)
    assert compute.mechanism == memory.mechanism == "cuda-python-green-context"
    cycles = _spin_cycles()
    _timed((compute, memory), cycles)  # warm-up
    alone = min(_timed((compute,), cycles) for _ in range(3))
    both = min(_timed((compute, memory), cycles) for _ in range(3))
    print(f"one spin kernel {alone:.1f} ms, one on each lane {both:.1f} ms")
    assert alone > SLEEP_MS / 4
    assert both < 1.5 * alone, f"the lanes' kernels did not overlap: {both:.1f} ms vs {alone:.1f} ms alone"


def test_released_lanes_free_their_green_contexts_and_new_ones_can_be_made():
    """``release_lane_streams`` destroys the driver streams and green contexts after their work; making the
    same lane set again afterwards works (nothing leaked into the next split)."""
    _needs_driver()
    _, lanes = _two_lanes()
    for _ in range(3):
        made = streams.make_lane_streams(lanes)
        assert all(ls.mechanism == "cuda-python-green-context" for ls in made)
        with torch.cuda.stream(made[0].stream):
            torch.ones(1024, device="cuda").sum()
        torch.cuda.synchronize()
        torch.cuda.empty_cache()  # no cached block of the lanes' streams outlives them
        streams.release_lane_streams(made)
    torch.cuda.synchronize()
