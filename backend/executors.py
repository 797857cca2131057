"""The CPU executors of a lowered :class:`Program`: ``serial`` and ``thread``.

``serial`` runs the program's global launch order on the calling thread (the deterministic reference).
``thread`` runs each lane on its own worker thread; cross-lane dependencies are real
``threading.Event`` waits with a timeout, so a scheduling bug shows up as a wrong answer or a
:class:`BackendError`, never a hang. Both go through the shared step loop of
:mod:`dynaflow.backend.launch` and record a :class:`Timeline`. The registry of every executor is
``dynaflow.backend.executors`` (in ``backend/__init__.py``).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch

from dynaflow import knobs
from dynaflow.errors import BackendError
from dynaflow.timeline import Timeline, TimelineEvent
from dynaflow.backend.launch import (Executor, ExecutorContext, StepContext, raised_by_a_launch, records_autograd,
                                     run_launch, run_serial, step_loop)
from dynaflow.backend.program import CONST, Launch, Program

__all__ = ["Executor", "SerialExecutor", "ThreadExecutor", "run_launch", "reader_counts"]

log = logging.getLogger(__name__)


class SerialExecutor(Executor):
    """Every launch on the calling thread, in the program's global order: the reference executor."""

    name = "serial"

    def run(self, program: Program, inputs: Sequence[Any], *, capture: bool = False) -> Any:
        return _run_in_order(self, program, inputs)


def _run_in_order(executor: Executor, program: Program, inputs: Sequence[Any]) -> Any:
    """One step of ``program`` in its serial order on the calling thread."""
    step = executor.begin_step(program, inputs)
    run_serial(step)
    executor.last_timeline = Timeline(tuple(step.timeline), executor.name) if step.timeline is not None else None
    return executor.outputs(program, step.env)


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
    """What a threaded step adds to its :class:`StepContext`: one ``threading.Event`` per program event, the
    wait timeout, and the reader countdown that frees each intermediate once its last reader (on whichever
    lane) has run."""

    def __init__(self, ctx: StepContext, timeout: float,
                 readers: tuple[dict[int, int], dict[int, tuple[tuple[int, ...], tuple[int, ...]]]] | None = None):
        self.ctx = ctx
        self.env = ctx.env
        self.events = [threading.Event() for _ in range(ctx.program.num_events)]
        self.lock = ctx.lock
        self.timeout = timeout
        self.left = dict(readers[0]) if readers else {}
        self.touched = readers[1] if readers else {}

    @property
    def failed(self) -> BaseException | None:
        return self.ctx.failed

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
            if self.ctx.failed is None:
                self.ctx.failed = exc
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


@dataclass(frozen=True)
class _CallerModes:
    """The caller's thread-local modes that a worker lane runs under: autograd, inference mode and autocast
    (per device type), all per thread in torch, so a worker would otherwise run without them."""

    grad: bool
    inference: bool
    autocast: tuple[tuple[str, torch.dtype], ...]
    """(device type, dtype) of each autocast the caller is in."""

    @classmethod
    def now(cls) -> "_CallerModes":
        casts = tuple((dev, torch.get_autocast_dtype(dev)) for dev in _AUTOCAST_DEVICES if torch.is_autocast_enabled(dev))
        return cls(torch.is_grad_enabled(), torch.is_inference_mode_enabled(), casts)

    @contextlib.contextmanager
    def entered(self) -> Iterator[None]:
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.set_grad_enabled(self.grad))
            if self.inference:  # inference_mode(False) would re-enable grad: entered only when the caller is in it
                stack.enter_context(torch.inference_mode())
            for dev, dtype in self.autocast:
                stack.enter_context(torch.autocast(dev, dtype=dtype))
            yield


_AUTOCAST_DEVICES = ("cpu", "cuda")


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
        self._warned_autograd = False

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

    @classmethod
    def from_context(cls, ctx: ExecutorContext) -> "ThreadExecutor":
        return cls(wait_timeout=getattr(ctx.config, "wait_timeout", None))

    def run(self, program: Program, inputs: Sequence[Any], *, capture: bool = False) -> Any:
        if len(program.lanes) > 1 and records_autograd(inputs):
            return self._run_on_caller(program, inputs)
        if not program.lanes:  # nothing to launch (a graph that held only a marker): no lane to run on
            return _run_in_order(self, program, inputs)
        ctx = self.begin_step(program, inputs)
        timeout = self.wait_timeout if self.wait_timeout is not None else knobs.wait_timeout()
        timeout = min(timeout, threading.TIMEOUT_MAX)  # inf (wait forever) and huge values: the OS's longest wait
        cached = self._readers.get(id(program))
        if cached is None or cached[0] is not program:
            cached = self._readers[id(program)] = (program, reader_counts(program))
        step = _Step(ctx, timeout, cached[1])
        per_lane: list[list[TimelineEvent] | None] = [[] if ctx.timeline is not None else None for _ in program.lanes]
        futures = []
        modes = _CallerModes.now()
        crew = self._checkout(len(program.lanes) - 1) if len(program.lanes) > 1 else None
        try:
            if crew is not None:
                for li in range(1, len(program.lanes)):
                    futures.append(crew.pool.submit(self._lane, program, li, step, per_lane[li], modes))
            self._lane(program, 0, step, per_lane[0], modes)
            for f in futures:
                f.result(timeout=min(timeout * max(1, program.num_launches), threading.TIMEOUT_MAX))
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
            # one policy on every executor: a segment's own exception as is (with its note), ours a BackendError
            if isinstance(step.failed, BackendError) or raised_by_a_launch(step.failed):
                raise step.failed
            raise BackendError(f"A lane failed while running the program: {step.failed!r}") from step.failed
        if ctx.timeline is not None:
            events = tuple(sorted((e for lane in per_lane for e in lane or ()), key=lambda e: e.start))
            self.last_timeline = Timeline(events, self.name)
        return self.outputs(program, ctx.env)

    def _run_on_caller(self, program: Program, inputs: Sequence[Any]) -> Any:
        """A step autograd records, in the program's serial order on the calling thread: autograd's history of
        a tensor that two lanes write in place (their rows of a merge buffer) is not thread-safe, so one
        lane's ``CopySlices`` could replace the other's and drop its gradient."""
        if not self._warned_autograd:
            self._warned_autograd = True
            log.info("thread executor: a step that records autograd runs its lanes in serial order on the calling "
                     "thread (autograd's in-place history is not thread-safe)")
        return _run_in_order(self, program, inputs)

    def _lane(self, program: Program, li: int, step: _Step, out: list[TimelineEvent] | None,
              modes: "_CallerModes") -> None:
        try:
            with modes.entered():
                step_loop(step.ctx, program.streams[li], events=step.events, wait_timeout=step.timeout,
                          lane=program.lanes[li].name, after=step.release, timeline=out)
        except BaseException as exc:  # noqa: BLE001 - every failure must wake the other lanes
            step.fail(exc)

    def forget(self, program: Program) -> None:
        self._readers.pop(id(program), None)

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
