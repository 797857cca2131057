"""Buffer plan (backend/arena.py): happens-before, serial peak, concurrency-safe arena offsets, and the
memory of a split program against sequential execution."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, strategies as st

from dynaflow.backend.arena import ALIGN, happens_before, plan_arena, probe_slot_sizes, serial_peak
from dynaflow.backend.launch import run_launch
from dynaflow.backend.program import Wait
from dynaflow.errors import BackendError
from models import make_transformer, transformer_input
from programs import program_of

_CACHE: dict = {}


def _prog(strategy: str, nano: int, batch: int = 8):
    key = (strategy, nano, batch)
    if key not in _CACHE:
        torch._dynamo.reset()
        p, inputs, _ = program_of(make_transformer(), transformer_input(batch, seq=32), strategy, nano)
        with torch.no_grad():
            sizes = {s: v.nbytes for s, v in probe_slot_sizes(p, inputs).items()}
        _CACHE[key] = (p, sizes)
    return _CACHE[key]


def _assert_valid(p, plan):
    """No two slots share bytes unless one is dead (all its uses happen before) when the other is produced."""
    hb = happens_before(p)
    n = len(p.serial_order)
    producer, uses = {}, {}
    for i, l in enumerate(p.serial_order):
        for s in l.out_slots:
            producer.setdefault(s, i)
        for a in l.args:
            if a.kind != 2:
                uses.setdefault(a.slot, set()).add(i)
        for _, b, *_ in l.merges:
            producer.setdefault(b, i)
            uses.setdefault(b, set()).add(i)
    keep = set(p.output_slots.values()) | set(p.buffers)

    def dead_before(a, b):
        if a in keep:
            return False
        return all((hb[producer[b]] >> u) & 1 for u in uses.get(a, set()) | {producer[a]})

    slots = [s for s in plan.offsets if plan.sizes[s] > 0]
    for s in slots:
        assert plan.offsets[s] % ALIGN == 0
        assert plan.offsets[s] + plan.sizes[s] <= plan.total_bytes
    for i, a in enumerate(slots):
        for b in slots[i + 1:]:
            oa, ob = plan.offsets[a], plan.offsets[b]
            if oa < ob + plan.sizes[b] and ob < oa + plan.sizes[a]:
                assert dead_before(a, b) or dead_before(b, a), f"slots {a} and {b} overlap while both live"


def test_happens_before_follows_lanes_and_waits():
    p, _ = _prog("nanoflow", 2)
    hb = happens_before(p)
    index = {id(l): i for i, l in enumerate(p.serial_order)}
    producer = {l.event: index[id(l)] for l in p.serial_order if l.event is not None}
    for instrs in p.streams:
        launches = [index[id(i)] for i in instrs if not isinstance(i, Wait)]
        for a, b in zip(launches, launches[1:]):
            assert (hb[b] >> a) & 1
        pending = []
        for ins in instrs:
            if isinstance(ins, Wait):
                pending.append(producer[ins.event])
            else:
                assert all((hb[index[id(ins)]] >> q) & 1 for q in pending)
                pending = []
    for i in range(len(hb)):
        assert not (hb[i] >> i) & 1


def test_round_robin_lanes_do_not_order_each_other():
    p, _ = _prog("round_robin", 2)
    hb = happens_before(p)
    lanes = [l.lane for l in p.serial_order]
    a = next(i for i, x in enumerate(lanes) if x == lanes[0])
    b = next(i for i, x in enumerate(lanes) if x != lanes[0])
    assert not (hb[b] >> a) & 1 and not (hb[a] >> b) & 1


@pytest.mark.parametrize("strategy,nano", [("sequential", 1), ("nanoflow", 2), ("nanoflow", 4), ("round_robin", 2)])
def test_arena_offsets_are_safe_under_concurrency(strategy, nano):
    p, sizes = _prog(strategy, nano)
    plan = plan_arena(p, sizes)
    _assert_valid(p, plan)
    assert plan.total_bytes >= plan.serial_peak > 0
    assert "ArenaPlan(" in repr(plan)


@pytest.mark.parametrize("strategy,nano", [("nanoflow", 2), ("nanoflow", 4), ("round_robin", 2)])
def test_split_program_memory_within_1_2x_of_sequential(strategy, nano):
    """The acceptance bound: the concurrency-safe arena of a split program needs at most 1.2x the peak of
    sequential execution (same model, same batch) with free-at-last-use."""
    seq, seq_sizes = _prog("sequential", 1)
    p, sizes = _prog(strategy, nano)
    baseline = serial_peak(seq, seq_sizes)
    ratio = plan_arena(p, sizes).ratio(baseline)
    assert ratio <= 1.2, f"{strategy}/{nano}: arena is {ratio:.2f}x sequential"


@given(st.lists(st.integers(0, 5000), min_size=80, max_size=80))
def test_arena_valid_for_any_sizes(raw):
    p, sizes = _prog("nanoflow", 2)
    fake = {s: raw[i % len(raw)] for i, s in enumerate(sorted(sizes))}
    plan = plan_arena(p, fake)
    _assert_valid(p, plan)
    assert plan.total_bytes >= plan.serial_peak


def test_serial_peak_by_hand():
    p, sizes = _prog("sequential", 1)
    fake = {s: 1 for s in sizes}
    # with 1 byte per value the peak is the largest number of values alive at once
    peak = serial_peak(p, fake)
    assert 1 <= peak <= len(sizes)
    assert serial_peak(p, {s: 0 for s in sizes}) == 0


def test_negative_sizes_are_rejected():
    p, sizes = _prog("sequential", 1)
    with pytest.raises(BackendError, match="sizes must be >= 0"):
        plan_arena(p, {next(iter(sizes)): -1})


def test_probe_measures_every_tensor_slot():
    """Exactly the slots that end up holding a tensor are measured; shapes and ints (torch 2.11's Dynamo
    graphs carry ``size()`` and its items as values) are not, and nothing is measured twice."""
    torch._dynamo.reset()
    p, inputs, _ = program_of(make_transformer(), transformer_input(8, seq=32), "nanoflow", 2)
    seen: dict = {}

    def spy(launch, step):
        run_launch(launch, step)
        env = step.env
        for s in [*launch.out_slots, *p.buffers]:
            if env[s] is not None:
                seen[s] = env[s]

    with torch.no_grad():
        sizes = probe_slot_sizes(p, inputs, run_launch=spy)
    tensors = {s for s, v in seen.items() if isinstance(v, torch.Tensor)}
    assert set(sizes) == tensors and tensors
    for s in tensors:
        assert sizes[s].shape == tuple(seen[s].shape) and sizes[s].nbytes == seen[s].nbytes