"""Program-level checks and rewrites: is every cross-lane read ordered by an event? (and tools to break it).

:func:`check_program` proves, from the lowered instructions alone, that every value a launch reads was
produced by a launch that *happens before* it (same lane earlier, or reached through event waits), and
that every nano write into a merge buffer happens before a launch that reads those rows of the buffer. A missing
``Wait`` shows up here as a :class:`BackendError` naming the reader, the value and the producer — before
any executor runs the program. :func:`map_launches` and :func:`drop_wait` rewrite programs (tests use
``drop_wait`` to build the deliberately broken program that the executors must expose).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

from dynaflow.errors import BackendError
from dynaflow.backend.arena import happens_before
from dynaflow.backend.program import CONST, VIEW, Launch, Program, Wait, _last_uses, _serial_order

__all__ = ["check_program", "map_launches", "drop_wait"]


def check_program(program: Program) -> None:
    """Raise :class:`BackendError` if some launch may read a value before its producer ran."""
    hb = happens_before(program)
    producer: dict[int, int] = {}
    writers: dict[int, list[tuple[int, int, int]]] = {}
    """Merge buffer -> (launch, first row, end row) of each nano write into it."""
    for i, launch in enumerate(program.serial_order):
        for s in launch.out_slots:
            producer.setdefault(s, i)
        for _, buf, _dim, start, stop in launch.merges:
            writers.setdefault(buf, []).append((i, start, stop))
    order = program.serial_order
    for i, launch in enumerate(order):
        for a in launch.args:
            if a.kind == CONST or a.slot < program.num_inputs:
                continue
            if a.slot in writers:  # a merge buffer: the writes of the rows it reads (all of them for a whole read)
                sources = [p for p, start, stop in writers[a.slot]
                           if a.kind != VIEW or (start < a.stop and a.start < stop)]
            else:
                sources = [producer[a.slot]] if a.slot in producer else []
            for p in sources:
                if p != i and not (hb[i] >> p) & 1:
                    raise BackendError(
                        f"{launch.op} on lane {launch.lane!r} reads %{a.slot}, written by {order[p].op} on lane "
                        f"{order[p].lane!r}, but nothing orders the write before the read (no event wait on that "
                        "lane covers it). The program would race; it was not produced by lower(), or lowering has "
                        "a bug: please report it."
                    )


def map_launches(program: Program, fn: Callable[[Launch], Launch]) -> Program:
    """A copy of ``program`` with every launch replaced by ``fn(launch)`` (lanes, waits and order kept)."""
    new = {id(l): fn(l) for l in program.serial_order}
    streams = tuple(tuple(new.get(id(i), i) if isinstance(i, Launch) else i for i in instrs) for instrs in program.streams)
    return dataclasses.replace(program, streams=streams, serial_order=tuple(new[id(l)] for l in program.serial_order))


def drop_wait(program: Program, event: int | None = None) -> tuple[Program, Wait]:
    """A copy of ``program`` without one ``Wait`` (the first one, or the first on ``event``): a deliberately
    broken program for tests. Returns it and the removed wait. ``serial_order`` is recomputed."""
    for li, instrs in enumerate(program.streams):
        for k, ins in enumerate(instrs):
            if isinstance(ins, Wait) and (event is None or ins.event == event):
                streams = list(program.streams)
                streams[li] = instrs[:k] + instrs[k + 1:]
                streams_t = tuple(streams)
                order = _serial_order(streams_t)
                frees = _last_uses(order, program.num_inputs, set(program.output_slots.values()))
                return dataclasses.replace(program, streams=streams_t, serial_order=order, serial_frees=frees), ins
    raise BackendError(f"drop_wait: {program!r} has no wait" + (f" on event e{event}" if event is not None else "") + ".")
