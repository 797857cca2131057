"""CPU executors of a lowered :class:`Program`, behind one interface.

``serial`` runs the program's global launch order on the calling thread (the deterministic reference).
``thread`` runs each lane on its own worker thread; cross-lane dependencies are real
``threading.Event`` waits with a timeout, so a scheduling bug shows up as a wrong answer or a
:class:`BackendError`, never a hang. Both record a :class:`Timeline`. The CUDA executor (streams, events,
green contexts, CUDA Graphs) implements the same :class:`Executor` interface.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, Sequence

import torch

from dynaflow import knobs
from dynaflow.errors import BackendError
from dynaflow.nanocontext import NanoContext, current_nano_context, launch_context
from dynaflow.registry import Registry
from dynaflow.segmented import OutRef
from dynaflow.timeline import Timeline, TimelineEvent
from dynaflow.backend.program import CONST, Launch, Program, Wait, fetch

__all__ = ["Executor", "SerialExecutor", "ThreadExecutor", "executors", "run_launch", "reader_counts"]

log = logging.getLogger(__name__)


class Executor:
    """Runs a Program on a list of flat inputs and returns the graph's outputs."""

    name = "base"

    def __init__(self) -> None:
        self.last_timeline: Timeline | None = None

    def run(self, program: Program, inputs: Sequence[Any]) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    def close(self) -> None:
        """Release threads/streams; the executor may not be used afterwards."""

    @staticmethod
    def new_env(program: Program, inputs: Sequence[Any]) -> list[Any]:
        if len(inputs) != program.num_inputs:
            raise BackendError(f"Program expects {program.num_inputs} inputs, got {len(inputs)}.")
        env: list[Any] = list(inputs)
        env.extend([None] * (program.num_slots - len(env)))
        return env

    @staticmethod
    def outputs(program: Program, env: list[Any]) -> Any:
        def build(t: Any) -> Any:
            if isinstance(t, OutRef):
                return env[program.output_slots[t.name]]
            if isinstance(t, tuple):
                return tuple(build(x) for x in t)
            if isinstance(t, list):
                return [build(x) for x in t]
            if isinstance(t, dict):
                return {k: build(v) for k, v in t.items()}
            return t

        return build(program.output_tree)


def run_launch(launch: Launch, env: list[Any], lock: threading.Lock, batch: int,
               nano_ctx: NanoContext | None = None, split: Any = None) -> None:
    """Fetch arguments, call the segment, store outputs, and write merged outputs into their buffers.

    A segment with the ``nano-context`` hint runs inside ``nano_ctx`` (see :mod:`dynaflow.nanocontext`)."""
    if nano_ctx is not None and split is not None:
        with launch_context(nano_ctx, launch.segment, launch.op.nano, split):
            out = launch.fn(*[fetch(a, env) for a in launch.args])
    else:
        out = launch.fn(*[fetch(a, env) for a in launch.args])
    outs = out if launch.returns_tuple else (out,)
    for slot, value in zip(launch.out_slots, outs):
        env[slot] = value
    for j, buf_slot, dim, start, stop in launch.merges:
        value = outs[j]
        k = value.size(dim) // (stop - start)
        buf = env[buf_slot]
        if buf is None:
            with lock:  # the first nano-batch to finish allocates the full-batch buffer once
                buf = env[buf_slot]
                if buf is None:
                    shape = list(value.shape)
                    shape[dim] = k * batch
                    buf = env[buf_slot] = torch.empty(shape, dtype=value.dtype, device=value.device)
        buf.narrow(dim, start * k, (stop - start) * k).copy_(value)


class SerialExecutor(Executor):
    """Every launch on the calling thread, in the program's global order: the reference executor."""

    name = "serial"

    def run(self, program: Program, inputs: Sequence[Any]) -> Any:
        env = self.new_env(program, inputs)
        lock = threading.Lock()
        record = knobs.record_timeline()
        events: list[TimelineEvent] = []
        clock = time.perf_counter
        t_start = clock()
        B = program.batch_size
        nano_ctx = current_nano_context()
        for launch, frees in zip(program.serial_order, program.serial_frees):
            t0 = clock()
            run_launch(launch, env, lock, B, nano_ctx, program.split)
            for slot in frees:
                env[slot] = None
            if record:
                events.append(TimelineEvent(launch.lane, repr(launch.op), t0 - t_start, clock() - t_start,
                                            launch.segment.resource.value))
        self.last_timeline = Timeline(tuple(events), self.name) if record else None
        return self.outputs(program, env)


def reader_counts(program: Program) -> tuple[dict[int, int], dict[int, tuple[tuple[int, ...], tuple[int, ...]]]]:
    """For freeing at last use when lanes run concurrently: how many launches read each intermediate slot,
    and per launch the freeable slots it reads and the ones it only writes. Inputs and graph outputs are
    never freed. Computed once per program, so a step only counts down."""
    keep = set(range(program.num_inputs)) | set(program.output_slots.values())
    counts: dict[int, int] = {}
    touched: dict[int, tuple[tuple[int, ...], tuple[int, ...]]] = {}
    for launch in program.serial_order:
        reads = {a.slot for a in launch.args if a.kind != CONST and a.slot not in keep}
        for slot in reads:
            counts[slot] = counts.get(slot, 0) + 1
        written = {slot for slot in launch.out_slots if slot not in keep} - reads
        for slot in written:
            counts.setdefault(slot, 0)
        touched[id(launch)] = (tuple(sorted(reads)), tuple(sorted(written)))
    return counts, touched


class _Step:
    """Shared state of one threaded step: values, events, the failure flag, and the reader countdown that
    frees each intermediate once its last reader (on whichever lane) has run."""

    def __init__(self, program: Program, env: list[Any], timeout: float,
                 readers: tuple[dict[int, int], dict[int, tuple[tuple[int, ...], tuple[int, ...]]]] | None = None):
        self.env = env
        self.events = [threading.Event() for _ in range(program.num_events)]
        self.lock = threading.Lock()
        self.failed: BaseException | None = None
        self.timeout = timeout
        self.nano_ctx = current_nano_context()  # read on the caller's thread; lanes use this one
        self.left = dict(readers[0]) if readers else {}
        self.touched = readers[1] if readers else {}

    def release(self, launch: Launch) -> None:
        """After ``launch`` ran: count down its reads; drop values nobody will read any more."""
        reads, written = self.touched.get(id(launch), ((), ()))
        if not reads and not written:
            return
        with self.lock:
            for slot in reads:
                self.left[slot] -= 1
                if self.left[slot] <= 0:
                    self.env[slot] = None
            for slot in written:
                if self.left[slot] <= 0:  # produced but read by nobody
                    self.env[slot] = None

    def fail(self, exc: BaseException) -> None:
        with self.lock:
            if self.failed is None:
                self.failed = exc
        for ev in self.events:  # wake every waiting lane so it can abort
            ev.set()


class _Crew:
    """Worker threads checked out by one run at a time: every lane of a run gets its own thread, so lanes that
    wait on each other never queue behind another caller's lanes (which would deadlock concurrent calls)."""

    def __init__(self, size: int):
        self.size = size
        self.pool = ThreadPoolExecutor(max_workers=size, thread_name_prefix="dynaflow-lane")

    def close(self) -> None:
        self.pool.shutdown(wait=False)


class ThreadExecutor(Executor):
    """One worker thread per lane (lane 0 on the calling thread); events are real synchronisation.

    Concurrent calls from several Python threads each check out their own crew of lane workers; idle crews
    are kept for reuse (at most :attr:`max_idle_crews`) and shut down by :meth:`close`."""

    name = "thread"
    max_idle_crews = 2

    def __init__(self, wait_timeout: float | None = None) -> None:
        super().__init__()
        self.wait_timeout = wait_timeout
        self._idle: list[_Crew] = []
        self._crew_lock = threading.Lock()
        self._closed = False
        self._readers: dict[int, tuple[Program, Any]] = {}

    def _checkout(self, n: int) -> _Crew:
        with self._crew_lock:
            for i, crew in enumerate(self._idle):
                if crew.size >= n:
                    return self._idle.pop(i)
        return _Crew(n)

    def _checkin(self, crew: _Crew) -> None:
        with self._crew_lock:
            if not self._closed and len(self._idle) < self.max_idle_crews:
                self._idle.append(crew)
                return
        crew.close()

    def run(self, program: Program, inputs: Sequence[Any]) -> Any:
        env = self.new_env(program, inputs)
        timeout = self.wait_timeout if self.wait_timeout is not None else knobs.wait_timeout()
        cached = self._readers.get(id(program))
        if cached is None or cached[0] is not program:
            cached = self._readers[id(program)] = (program, reader_counts(program))
        step = _Step(program, env, timeout, cached[1])
        record = knobs.record_timeline()
        per_lane: list[list[TimelineEvent]] = [[] for _ in program.lanes]
        t_start = time.perf_counter()
        futures = []
        grad = (torch.is_grad_enabled(), torch.is_inference_mode_enabled())
        crew = self._checkout(len(program.lanes) - 1) if len(program.lanes) > 1 else None
        try:
            if crew is not None:
                for li in range(1, len(program.lanes)):
                    futures.append(crew.pool.submit(self._lane, program, li, step, per_lane[li], t_start, record, grad))
            self._lane(program, 0, step, per_lane[0], t_start, record, grad)
            for f in futures:
                f.result(timeout=timeout * max(1, program.num_launches))
        except FutureTimeout:
            step.fail(BackendError(f"A lane of the thread executor did not finish within {timeout:.1f}s per launch; "
                                   "the program deadlocked or an op hung. Raise DYNAFLOW_WAIT_TIMEOUT if an op is "
                                   "legitimately slow."))
            if crew is not None:  # a worker may still be busy: never hand this crew to another call
                crew.close()
                crew = None
        finally:
            if crew is not None:
                self._checkin(crew)
        if step.failed is not None:
            if isinstance(step.failed, BackendError):
                raise step.failed
            raise BackendError(f"A lane failed while running the program: {step.failed!r}") from step.failed
        if record:
            events = tuple(sorted((e for lane in per_lane for e in lane), key=lambda e: e.start))
            self.last_timeline = Timeline(events, self.name)
        return self.outputs(program, env)

    def _lane(self, program: Program, li: int, step: _Step, out: list[TimelineEvent], t_start: float,
              record: bool, grad: tuple[bool, bool]) -> None:
        lane = program.lanes[li].name
        clock = time.perf_counter
        B = program.batch_size
        try:
            # autograd and inference modes are thread-local: workers take the caller's
            # (inference_mode(False) would re-enable grad, so it is only entered when the caller is in it)
            with torch.set_grad_enabled(grad[0]), (torch.inference_mode() if grad[1] else contextlib.nullcontext()):
                for ins in program.streams[li]:
                    if step.failed is not None:
                        return
                    if isinstance(ins, Wait):
                        if not step.events[ins.event].wait(step.timeout):
                            raise BackendError(
                                f"Lane {lane!r} waited {step.timeout:.1f}s for {ins.op} (event e{ins.event}) and it "
                                "never finished: the program deadlocked or a producer hung. Raise "
                                "DYNAFLOW_WAIT_TIMEOUT if the op is legitimately slow."
                            )
                        continue
                    t0 = clock()
                    run_launch(ins, step.env, step.lock, B, step.nano_ctx, program.split)
                    if record:
                        out.append(TimelineEvent(lane, repr(ins.op), t0 - t_start, clock() - t_start,
                                                 ins.segment.resource.value))
                    if ins.event is not None:
                        step.events[ins.event].set()
                    step.release(ins)
        except BaseException as exc:  # noqa: BLE001 - every failure must wake the other lanes
            step.fail(exc)

    def close(self) -> None:
        with self._crew_lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for crew in idle:
            crew.close()

    def __del__(self) -> None:  # pragma: no cover - best effort
        try:
            self.close()
        except Exception:
            pass


executors: Registry[Executor] = Registry("executor", Executor, BackendError, entry_point_group="dynaflow.executors")
executors.register("serial", SerialExecutor)
executors.register("thread", ThreadExecutor)


def _cuda_executor(**options: Any) -> Executor:
    """Factory of the ``cuda`` executor, imported on first use (it raises BackendError without CUDA)."""
    from dynaflow.backend.cuda import CudaExecutor

    return CudaExecutor(**options)


executors.register("cuda", _cuda_executor)
