"""Buffer plan: liveness of a Program's values and their offsets in one arena per program (batch size).

Two questions, both answered from a Program and the byte size of each slot (measured by one probe run,
or made up in tests):

* **How much memory does a step need?** :func:`serial_peak` walks ``serial_order`` freeing each value at
  its last use (what the serial executor does); run on a sequential program it is the estimate for
  sequential execution, the baseline that the ≤ 1.2× memory target is measured against.
* **Where can each value live in a preallocated arena when lanes run concurrently?** Two values may
  share bytes only if the second one's producer *happens after* every reader of the first in the
  program's happens-before order (lane order plus event waits). Then the reuse needs no extra event, on
  any executor. :func:`plan_arena` places values first-fit under that rule; its ``total_bytes`` is the
  concurrency-safe footprint. Merge buffers and graph outputs live for the whole step.

Pure logic: no allocation happens here (the CUDA executor carves views out of one byte tensor).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch

from dynaflow.errors import BackendError
from dynaflow.backend.program import CONST, Program, Wait

__all__ = ["SlotSize", "ArenaPlan", "happens_before", "serial_peak", "plan_arena", "probe_slot_sizes", "ALIGN"]

ALIGN = 256
"""Byte alignment of every arena offset (what the CUDA caching allocator guarantees for its blocks)."""


@dataclass(frozen=True)
class SlotSize:
    """The measured shape, dtype and byte size of one slot's value."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    nbytes: int

    def __repr__(self) -> str:
        return f"{str(self.dtype).replace('torch.', '')}{list(self.shape)}={self.nbytes}B"


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def happens_before(program: Program) -> list[int]:
    """For each launch (by index in ``serial_order``), a bitmask of the launches that happen before it."""
    index = {id(l): i for i, l in enumerate(program.serial_order)}
    producer_of_event = {l.event: index[id(l)] for l in program.serial_order if l.event is not None}
    preds: list[set[int]] = [set() for _ in program.serial_order]
    for instrs in program.streams:
        prev: int | None = None
        pending: list[int] = []
        for ins in instrs:
            if isinstance(ins, Wait):
                pending.append(producer_of_event[ins.event])
                continue
            i = index[id(ins)]
            if prev is not None:
                preds[i].add(prev)
            preds[i].update(pending)
            pending, prev = [], i
    hb = [0] * len(preds)
    for i in range(len(preds)):  # serial_order is topological, so predecessors are final
        mask = 0
        for p in preds[i]:
            mask |= hb[p] | (1 << p)
        hb[i] = mask
    return hb


def _uses(program: Program) -> tuple[dict[int, int], dict[int, list[int]]]:
    """Producer launch index and reader launch indices of every intermediate slot."""
    producer: dict[int, int] = {}
    readers: dict[int, list[int]] = {}
    for i, launch in enumerate(program.serial_order):
        for a in launch.args:
            if a.kind != CONST and a.slot >= program.num_inputs:
                readers.setdefault(a.slot, []).append(i)
        for s in launch.out_slots:
            producer.setdefault(s, i)
        for _, buf, *_ in launch.merges:
            producer.setdefault(buf, i)
            readers.setdefault(buf, []).append(i)  # every nano write must finish before reuse
    return producer, readers


def serial_peak(program: Program, sizes: Mapping[int, int]) -> int:
    """Peak live bytes running ``serial_order`` with every intermediate freed right after its last use
    (merge buffers and outputs live to the end). Inputs are not counted."""
    producer, readers = _uses(program)
    keep = set(program.output_slots.values()) | set(program.buffers)
    last = {s: max(readers.get(s, [p])) for s, p in producer.items()}
    live = peak = 0
    born: dict[int, list[int]] = {}
    dies: dict[int, list[int]] = {}
    for s, p in producer.items():
        born.setdefault(p, []).append(s)
        if s not in keep:
            dies.setdefault(last[s], []).append(s)
    for i in range(len(program.serial_order)):
        live += sum(sizes.get(s, 0) for s in born.get(i, ()))
        peak = max(peak, live)
        live -= sum(sizes.get(s, 0) for s in dies.get(i, ()))
    return peak


@dataclass(frozen=True)
class ArenaPlan:
    """Offsets of every intermediate slot in one arena, safe under concurrent lanes."""

    offsets: dict[int, int]
    sizes: dict[int, int]
    total_bytes: int
    """Arena size: the concurrency-safe footprint of the step's intermediates."""
    serial_peak: int
    """Peak live bytes in serial order with free-at-last-use (a lower bound on any schedule's need)."""
    persistent: tuple[int, ...]
    """Slots live for the whole step (merge buffers, outputs)."""

    def ratio(self, baseline: int) -> float:
        """Arena size over a baseline (e.g. the sequential program's ``serial_peak``)."""
        return self.total_bytes / baseline if baseline else float("inf")

    def __repr__(self) -> str:
        return (f"ArenaPlan({len(self.offsets)} slots, arena {self.total_bytes} B, serial peak {self.serial_peak} B, "
                f"{len(self.persistent)} persistent)")


def plan_arena(program: Program, sizes: Mapping[int, int]) -> ArenaPlan:
    """Place every intermediate slot of ``program`` first-fit in one arena (see the module docstring)."""
    producer, readers = _uses(program)
    if any(v < 0 for v in sizes.values()):
        raise BackendError(f"plan_arena: slot sizes must be >= 0 bytes; got {dict(sizes)}.")
    hb = happens_before(program)
    n = len(program.serial_order)
    keep = set(program.output_slots.values()) | set(program.buffers)
    done_by: dict[int, list[int]] = {}
    for s, p in producer.items():
        done_by[s] = [n] if s in keep else sorted(set(readers.get(s, [])) | {p})
    placed: list[tuple[int, int, int]] = []  # (offset, end, slot)
    offsets: dict[int, int] = {}
    for s in sorted(producer, key=lambda s: (producer[s], s)):
        size = _align(sizes.get(s, 0))  # slots without a size hold no tensor (ints, None)
        p = producer[s]

        def dead(other: int) -> bool:  # every use of ``other`` happens before ``s`` is produced
            return all(u < n and (hb[p] >> u) & 1 for u in done_by[other])

        conflicts = sorted((o, e) for o, e, t in placed if not dead(t))
        off = 0
        for o, e in conflicts:
            if off + size <= o:
                break
            off = max(off, e)
        offsets[s] = off
        if size:
            placed.append((off, off + size, s))
    total = max((e for _, e, _ in placed), default=0)
    return ArenaPlan(offsets, {s: sizes.get(s, 0) for s in producer}, total, serial_peak(program, sizes),
                     tuple(sorted(keep & set(producer))))


def probe_slot_sizes(program: Program, inputs: Sequence[Any], run_launch: Any = None) -> dict[int, SlotSize]:
    """Run ``program`` once in serial order on real inputs and record every produced slot's size.

    The run keeps every value (it is a measurement, not a step), so use small or real-size inputs.
    ``run_launch(launch, step)`` replaces the launch body (tests spy on it)."""
    from dynaflow.backend.launch import Executor, StepContext, step_loop

    step = StepContext(program, Executor.new_env(program, inputs))
    if run_launch is None:
        step_loop(step, program.serial_order)
    else:
        for launch in program.serial_order:
            run_launch(launch, step)
    out: dict[int, SlotSize] = {}
    for s in range(program.num_inputs, program.num_slots):
        v = step.env[s]
        if isinstance(v, torch.Tensor):
            out[s] = SlotSize(tuple(v.shape), v.dtype, v.numel() * v.element_size())
    return out
