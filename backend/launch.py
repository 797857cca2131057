"""The one seam every executor shares: the :class:`Executor` base, the per-step :class:`StepContext`, the
launch body :func:`run_launch` and the step loop :func:`step_loop`.

Every way dynaflow runs a lowered :class:`Program` goes through here — the serial, thread and sim executors,
the CUDA executor (eager steps, the first-step probe, CUDA-graph captures and eager pieces between graphs),
the arena's slot-size probe and the Inductor warm-up — so what one launch means cannot drift between them:

* :meth:`Executor.begin_step` makes the step's context once, on the calling thread: the value slots
  (``env``), the batch and split, and the engine's per-nano-batch context provider
  (:mod:`dynaflow.nanocontext`), which lanes on other threads or streams then share;
* :func:`run_launch` fetches a launch's arguments, calls the segment (inside the engine context for a
  ``nano-context`` segment), stores its outputs and writes merged outputs into their full-batch buffers;
* :func:`step_loop` walks an instruction list (launches and waits): host events set and waited on, values
  freed, and the executor's hooks for what surrounds a launch (a CUDA stream) and what follows it (a reader
  countdown), all made once per step: the per-launch path makes no closures, and allocates only the
  argument list (and the timeline event when recording).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, ContextManager, Iterable, Mapping, Sequence

import torch

from dynaflow import knobs
from dynaflow.errors import BackendError
from dynaflow.ir import SplitConfig
from dynaflow.nanocontext import NanoContext, current_nano_context, launch_context
from dynaflow.segmented import OutRef
from dynaflow.timeline import Timeline, TimelineEvent
from dynaflow.backend.program import Launch, Program, Wait, empty_laid_out, fetch

__all__ = ["Executor", "ExecutorContext", "StepContext", "run_launch", "raised_by_a_launch", "step_loop", "run_serial",
           "NOLOCK", "records_autograd"]

log = logging.getLogger(__name__)


class _NoLock:
    """For launches issued from one host thread: the merge-buffer allocation needs no lock."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        return None


NOLOCK: Any = _NoLock()


@dataclass(slots=True)
class StepContext:
    """What one step of a program shares between its launches, made once by :meth:`Executor.begin_step`."""

    program: Program
    env: list[Any]
    """The step's value slots: graph inputs first, then one slot per (value, nano-batch), then merge buffers."""
    nano_ctx: NanoContext | None = None
    """The engine's per-nano-batch context provider, read on the calling thread when the step began."""
    lock: Any = field(default_factory=threading.Lock)
    """Taken by the first nano-batch that allocates a merge buffer (lanes on threads race for it)."""
    timeline: list[TimelineEvent] | None = None
    """Wall-clock events of the launches, when the timeline is recorded."""
    t_start: float = 0.0
    failed: BaseException | None = None
    """Set by a lane that failed: the other lanes stop at their next instruction."""
    trace: bool = False
    """``DYNAFLOW_DEBUG>=4``: every launch is logged as it finishes."""

    @property
    def batch(self) -> int:
        return self.program.batch_size

    @property
    def split(self) -> SplitConfig:
        return self.program.split

    def with_env(self, env: list[Any]) -> "StepContext":
        """The same step on other value slots (a CUDA-graph replay's scratch copy)."""
        return replace(self, env=env, timeline=None)


LAUNCH_NOTE = "dynaflow: raised by"
"""How the note that :func:`run_launch` adds to a segment's own exception starts."""

_RAISED_BY_A_LAUNCH = "_dynaflow_raised_by_a_launch"
"""The attribute :func:`run_launch` sets on a segment's own exception (a marker, so no message is parsed)."""


def raised_by_a_launch(exc: BaseException) -> bool:
    """Whether ``exc`` is a segment's own exception (the model's code or a kernel it calls), which every executor
    lets through unchanged but for a note saying where; anything else a lane raises is dynaflow's failure."""
    return getattr(exc, _RAISED_BY_A_LAUNCH, False) is True


def run_launch(launch: Launch, step: StepContext) -> None:
    """Fetch arguments, call the segment, store outputs, and write merged outputs into their buffers.

    A segment with the ``nano-context`` hint runs inside the step's engine context
    (see :mod:`dynaflow.nanocontext`)."""
    env = step.env
    slots = launch.slot_args
    args = [env[s] for s in slots] if slots is not None else [fetch(a, env) for a in launch.args]
    try:
        if step.nano_ctx is not None:
            with launch_context(step.nano_ctx, launch.segment, launch.op.nano, step.program.split):
                out = launch.fn(*args)
        else:
            out = launch.fn(*args)
    except Exception as exc:  # the model's own error, kept as is, with where in the split step it was raised
        exc.add_note(f"{LAUNCH_NOTE} {launch.op} (segment {launch.segment.name!r}, {launch.segment.kind.value}) "
                     f"in a step split {step.program.split}. If eager runs this model, the split is at fault: tag "
                     "that segment 'barrier' and please report it")
        setattr(exc, _RAISED_BY_A_LAUNCH, True)  # every exception has a __dict__ (BaseException's)
        raise
    outs = out if launch.returns_tuple else (out,)
    for slot, value in zip(launch.out_slots, outs):
        env[slot] = value
    for j, buf_slot, dim, start, stop in launch.merges:
        value = outs[j]
        k = value.size(dim) // (stop - start)
        buf = env[buf_slot]
        if buf is None:
            with step.lock:  # the first nano-batch to finish allocates the full-batch buffer once
                buf = env[buf_slot]
                if buf is None:
                    shape = list(value.shape)
                    shape[dim] = k * step.program.batch_size
                    buf = env[buf_slot] = empty_laid_out(shape, step.program.buffer_layouts.get(buf_slot), value)
        buf.narrow(dim, start * k, (stop - start) * k).copy_(value)


def step_loop(step: StepContext, instructions: Iterable[Launch | Wait], *,
              frees: Sequence[Sequence[int]] | None = None,
              events: Sequence[Any] | None = None,
              wait_timeout: float = 60.0,
              lane: str = "",
              around: Callable[[Launch], ContextManager[Any]] | None = None,
              after: Callable[[Launch], None] | None = None,
              timeline: list[TimelineEvent] | None = None) -> None:
    """The step loop: run ``instructions`` in order through :func:`run_launch`.

    ``frees[i]``: slots to drop after the i-th instruction (the serial order's free-at-last-use);
    ``events``: host events of the step (``threading.Event``): a launch that records one sets it, a
    :class:`Wait` blocks on it for at most ``wait_timeout`` seconds (``lane`` names the waiting lane in the
    error); ``around``: a context entered around each launch (a CUDA stream); ``after``: called after each
    launch (a bound method, e.g. a reader countdown); ``timeline``: wall-clock events are appended here. A
    lane stops early once ``step.failed`` is set. The per-launch path makes no closures: the hooks are made
    once per step, and the timeline's op and resource names once per launch object."""
    if around is None and after is None and events is None and not step.trace and frees is not None:
        _serial_walk(step, instructions, frees, timeline)  # serial and sim executors, probes
        return
    env = step.env
    trace = step.trace
    clock = time.perf_counter
    t_start = step.t_start
    t0 = 0.0
    for i, ins in enumerate(instructions):
        if step.failed is not None:
            return
        if ins.__class__ is Wait:
            if events is not None and not events[ins.event].wait(wait_timeout):
                raise BackendError(
                    f"Lane {lane!r} waited {wait_timeout:.1f}s for {ins.op} (event e{ins.event}) and it never "
                    "finished: the program deadlocked or a producer hung. Raise DYNAFLOW_WAIT_TIMEOUT if the op is "
                    "legitimately slow."
                )
            continue
        if timeline is not None:
            t0 = clock()
        if around is None:
            run_launch(ins, step)  # type: ignore[arg-type]
        else:
            with around(ins):  # type: ignore[arg-type]
                run_launch(ins, step)  # type: ignore[arg-type]
        if timeline is not None:
            timeline.append(TimelineEvent(ins.lane, ins.timeline_op, t0 - t_start, clock() - t_start,  # type: ignore[union-attr]
                                          ins.resource_name))  # type: ignore[union-attr]
        if trace:
            log.info("launch %s on %s (%.1f ms into the step)", ins.op, ins.lane, (clock() - t_start) * 1e3)  # type: ignore[union-attr]
        if events is not None and ins.event is not None:  # type: ignore[union-attr]
            events[ins.event].set()  # type: ignore[union-attr]
        if after is not None:
            after(ins)  # type: ignore[arg-type]
        if frees is not None:
            for slot in frees[i]:
                env[slot] = None


def _serial_walk(step: StepContext, order: Iterable[Launch | Wait], frees: Sequence[Sequence[int]],
                 timeline: list[TimelineEvent] | None) -> None:
    """The plain serial walk: a serial order (launches only), each value dropped after its last use; one loop
    with the timeline and one without, so neither tests for it per launch."""
    env = step.env
    if timeline is None:
        for ins, free in zip(order, frees):
            run_launch(ins, step)  # type: ignore[arg-type]
            for slot in free:
                env[slot] = None
        return
    clock = time.perf_counter
    t_start = step.t_start
    append = timeline.append
    for ins, free in zip(order, frees):
        t0 = clock()
        run_launch(ins, step)  # type: ignore[arg-type]
        append(TimelineEvent(ins.lane, ins.timeline_op, t0 - t_start, clock() - t_start,  # type: ignore[union-attr]
                             ins.resource_name))  # type: ignore[union-attr]
        for slot in free:
            env[slot] = None


@dataclass(frozen=True)
class ExecutorContext:
    """What an executor may need from the compiled graph that asks for it: the config, a lazy cost model
    and the device's spec (both computed only when an executor asks, e.g. the simulator)."""

    config: Any = None
    cost_model: Callable[[], Any] | None = None
    device: Callable[[], Any] | None = None


class Executor:
    """Runs a Program on a list of flat inputs and returns the graph's outputs.

    A new executor subclasses this, implements :meth:`run` with :meth:`begin_step` and :func:`step_loop`, and
    is registered with one line: ``dynaflow.backend.executors.register("name", MyExecutor)``."""

    name = "base"
    captures_graphs = False
    """Whether ``run(..., capture=True)`` replays a CUDA graph (``cuda_graphs=True`` needs such an executor)."""

    def __init__(self) -> None:
        self.last_timeline: Timeline | None = None

    @classmethod
    def from_context(cls, ctx: ExecutorContext) -> "Executor":
        """The executor for a compiled graph (override to read the config, cost model or device)."""
        return cls()

    def run(self, program: Program, inputs: Sequence[Any], *, capture: bool = False) -> Any:  # pragma: no cover
        """One step; ``capture``: replay it as a CUDA graph (executors without graphs ignore it)."""
        raise NotImplementedError

    def close(self) -> None:
        """Release threads/streams; the executor may not be used afterwards."""

    def forget(self, program: Program) -> None:
        """Drop what the executor keeps for ``program`` (tables, arenas, CUDA graphs): it will not run again
        (the autotuner's measured candidates)."""

    def begin_step(self, program: Program, inputs: Sequence[Any], *, lock: Any = None,
                   record: bool | None = None) -> StepContext:
        """The step's context, made on the calling thread: fresh value slots holding the inputs, the engine's
        nano-batch context provider, and a timeline list when ``record`` (default: the timeline knob)."""
        record = knobs.record_timeline() if record is None else record
        return StepContext(program, self.new_env(program, inputs), current_nano_context(),
                           threading.Lock() if lock is None else lock, [] if record else None, time.perf_counter(),
                           trace=knobs.debug_level() >= 4)

    @staticmethod
    def new_env(program: Program, inputs: Sequence[Any]) -> list[Any]:
        if len(inputs) != program.num_inputs:
            raise BackendError(f"Program expects {program.num_inputs} inputs, got {len(inputs)}.")
        env: list[Any] = list(inputs)
        env.extend([None] * (program.num_slots - len(env)))
        return env

    @staticmethod
    def outputs(program: Program, env: Sequence[Any] | Mapping[int, Any]) -> Any:
        flat = program.flat_output_slots
        if flat is not None:
            return tuple([env[s] for s in flat])

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


def run_serial(step: StepContext, *, keep: frozenset[int] | set[int] = frozenset()) -> None:
    """The program's global serial order through :func:`step_loop`, freeing each value at its last use
    (except the slots in ``keep``): the serial and sim executors, the CUDA probe, the Inductor warm-up."""
    program = step.program
    frees = program.serial_frees if not keep else [[s for s in f if s not in keep] for f in program.serial_frees]
    step_loop(step, program.serial_order, frees=frees, timeline=step.timeline)


def records_autograd(inputs: Sequence[Any]) -> bool:
    """Whether ops on ``inputs`` record autograd history now (grad mode on, outside inference mode, and some
    input requires grad: a parameter in training, or an activation)."""
    if not torch.is_grad_enabled() or torch.is_inference_mode_enabled():
        return False
    return any(isinstance(x, torch.Tensor) and x.requires_grad for x in inputs)
