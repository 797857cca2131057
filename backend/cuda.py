"""The CUDA executor: the same lowered Program on CUDA streams, with events, SM partitions and CUDA Graphs.

**Streams and events.** Each lane is a CUDA stream (:mod:`dynaflow.backend.streams`; a lane with
``sm_count`` runs on a green-context stream). A step forks from the caller's current stream (every lane
stream waits on it), issues launches from the host in the program's ``serial_order`` — so every event
is recorded (enqueued) before any lane waits on it; waiting on a never-recorded event would silently
wait for nothing — and joins back (the caller's stream waits on every lane). Cross-lane dependencies are
``torch.cuda.Event`` record / ``Stream.wait_event``; the host never synchronises inside a step, so the
compiled callable is stream-correct for its caller like any torch op. Every launch on a lane whose partition
is smaller than the device runs with torch's SM carveout set to the SMs the lane lacks, so kernels that size
their grid from the device (cuBLAS's persistent GEMMs; ``available_sms`` readers such as
``dynaflow::decode_attention``) fit the partition.

**Memory.** Nano-batch inputs are views (``narrow``). Merge buffers (full-batch values written slice by
slice by nano launches) are carved out of one preallocated byte arena per program (batch size). The
first step of a program is a *probe*: it runs every launch on the caller's stream alone (correct, not
overlapped), which measures the merge buffers without any lane writing into memory freshly taken from
another stream's pool; from the second step on the lanes run concurrently and no merge buffer is
allocated, in steady-state steps or in CUDA-graph captures. Intermediates are freed at their last use; a value read on a lane other than the one
that made it is first ``record_stream``-ed on the reading lanes, so the caching allocator cannot hand
its memory to a new tensor while another lane still reads it.

**CUDA Graphs** (``cuda_graphs=True``). The whole step — all lanes, segments and nano-batches — is
captured as one graph per program and input signature: the capture stream forks into the lanes after
capture begins and joins before it ends, so the lane streams and events become graph edges. Segments
tagged ``no-cudagraph`` cut the step into pieces (:mod:`dynaflow.backend.graphs`) that run eagerly
between graphs. Which inputs a capture reads in place and which it copies — and when a step is captured
again — is :class:`~dynaflow.backend.graph_steps.GraphSteps`' policy: parameters, declared
``static_inputs`` and inputs whose storage stayed the same during the warm-up steps are read in place (no
copy per step); the others are copied in, and copied back when the graph writes them. Each new signature
first runs two real eager steps (Inductor compiles happen even earlier, in
:class:`~dynaflow.backend.inductor.InductorSegments`). Outputs are returned as clones
(``copy_outputs=True``, the default: safe to keep across steps) or as the static output tensors that the
next replay overwrites (``copy_outputs=False``: no copy, for a caller that consumes each step's outputs
before the next; one passed back as an input is copied in, never read from the memory the step writes).
In eager mode only outputs living in the merge-buffer arena are cloned (other outputs are fresh tensors
anyway). Padding batches up to capture sizes happens above the executor
(:mod:`dynaflow.backend.capture_sizes`); a padded input is a fresh tensor each step, so it is copied.

**Timeline** (``gpu_timeline=True``): a pair of timing events around every launch; the executor
synchronises once at the end of the step to read them (so it is off by default). Under CUDA Graphs
each piece is timed as one event on the caller's lane.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import torch

from dynaflow import knobs
from dynaflow.config import DynaflowConfig
from dynaflow.errors import BackendError
from dynaflow.ir import Lane
from dynaflow.nanocontext import current_nano_context
from dynaflow.timeline import Timeline, TimelineEvent
from dynaflow.backend.arena import ALIGN
from dynaflow.backend.launch import NOLOCK, Executor, ExecutorContext, StepContext, records_autograd, step_loop
from dynaflow.backend.graph_steps import CaptureFailed, GraphSteps, in_ranges, storage_range
from dynaflow.backend.graphs import CapturePlan, Piece, capture_plan, waits_before
from dynaflow.backend.program import CONST, Program, Wait
from dynaflow.backend.streams import LaneStream, make_lane_streams
from dynaflow.backend.sm_partitions import launch_carveouts

__all__ = ["CudaExecutor", "cuda_unavailable_reason"]

log = logging.getLogger(__name__)

WARMUP_STEPS = 2


def cuda_unavailable_reason() -> str | None:
    """Why the cuda executor cannot run here (``None`` when it can)."""
    if not torch.cuda.is_available():
        built = torch.version.cuda or "none (a CPU-only build)"
        return (f"torch.cuda.is_available() is False (torch {torch.__version__}, CUDA runtime {built}, "
                f"{torch.cuda.device_count() if torch.version.cuda else 0} devices)")
    return None


@dataclass
class _Graphed:
    """One captured step for one input signature: its pieces, their graphs and the captured value slots."""

    plan: CapturePlan
    graphs: dict[int, Any]
    env: list[Any]


@dataclass
class _State:
    """Per-program state: lane streams, events, issue-time tables, the merge-buffer arena, graphs."""

    program: Program
    lanes: tuple[LaneStream, ...]
    events: list[Any]
    lane_of: dict[int, int]
    waits: dict[int, tuple[Wait, ...]]
    cross_readers: dict[int, tuple[int, ...]]
    """Slot → lanes that read it other than its producer's lane (record_stream before freeing)."""
    eager_piece: Piece
    """The whole program as one eager piece (every wait kept)."""
    free_at: dict[int, tuple[int, ...]]
    """Launch id → slots to drop after it (free at last use)."""
    carveout_of: dict[int, int] = field(default_factory=dict)
    """Launch id → SMs torch's carveout holds back while it runs: launches on a lane with an SM partition."""
    buffers: dict[int, torch.Tensor] | None = None
    arena: torch.Tensor | None = None
    static: list[tuple[int, int]] | None = None
    """Address ranges of the arena and the live captures' outputs (:meth:`CudaExecutor._static_ranges`);
    ``None``: to be computed (after the arena is made or a step is captured)."""
    steps: int = 0
    turn: Any = field(default_factory=threading.RLock)
    """Held while a step is issued (a step's eager warm-ups run inside it)."""
    done: Any = None
    """Recorded on the caller's stream at the end of every step: the next step starts after it."""
    done_on: Any = None
    """The stream ``done`` was last recorded on (a step called on that stream needs no wait)."""


class CudaExecutor(Executor):
    """Runs a Program on CUDA streams (see the module docstring)."""

    name = "cuda"
    captures_graphs = True

    def __init__(self, config: DynaflowConfig | None = None, **options: Any) -> None:
        why = cuda_unavailable_reason()
        if why is not None:
            raise BackendError(
                f"executor='cuda' needs a CUDA device, but {why}. Use executor='auto' (it picks 'thread' or 'serial' "
                "for CPU inputs), or install a CUDA build of torch and put the model and inputs on a GPU."
            )
        super().__init__()
        self.config = config.replace(**options) if config is not None else DynaflowConfig(**options)
        self._states: dict[int, _State] = {}
        self._lane_streams: dict[tuple[Lane, ...], tuple[LaneStream, ...]] = {}
        self._capture_stream: Any = None
        self._lock = threading.Lock()
        self.graphs = GraphSteps(self, warmups=WARMUP_STEPS)
        """Captures per program and input signature, bound to the inputs without needless copies."""

    @classmethod
    def from_context(cls, ctx: ExecutorContext) -> "CudaExecutor":
        return cls(config=ctx.config)

    # -- public ---------------------------------------------------------------------------------------
    def lane_streams(self, program: Program) -> tuple[LaneStream, ...]:
        """The streams (and granted SM partitions) the program's lanes run on."""
        return self._state(program).lanes

    def run(self, program: Program, inputs: Sequence[Any], *, capture: bool | None = None,
            fingerprints: Sequence[Any] | None = None) -> Any:
        """One step. ``capture`` overrides ``config.cuda_graphs`` for this call (``False``: eager);
        ``fingerprints``: the inputs' fingerprints (:func:`~dynaflow.backend.graph_steps.fingerprint`), when the caller
        has them.

        Steps of one program take turns: the host issues one at a time, and each step's work waits on the
        device for the previous step's (its ``done`` event), whichever stream called it: they share the
        merge-buffer arena and the captures' fixed buffers."""
        state = self._state(program)
        with state.turn:
            caller = torch.cuda.current_stream()
            # inside a caller's own CUDA-graph capture (an engine's decode graph) its graph orders the steps,
            # and an event recorded outside the capture may not be waited on inside it
            outer = _capturing()
            if state.done is not None and not outer and caller != state.done_on:
                caller.wait_event(state.done)  # on the same stream as the last step, stream order already holds
            graphs = self.config.cuda_graphs if capture is None else capture
            static = () if self.config.copy_outputs else self._static_ranges(state)
            if static:  # the caller may hold (and pass back) tensors of the buffers this step writes
                inputs = self._off_static_buffers(program, inputs, static, copy=not graphs)
            out = (self.graphs.run(program, inputs, fingerprints, avoid=static) if graphs
                   else self._eager_step(state, inputs))
            if not outer:
                if state.done is None:
                    state.done = torch.cuda.Event()
                state.done.record(caller)
                state.done_on = caller
            return out

    def _static_ranges(self, state: _State) -> list[tuple[int, int]]:
        """Address ranges of the buffers a step of this program writes its outputs into and returns uncloned
        under ``copy_outputs=False``: the merge-buffer arena and each live capture's output tensors (outputs
        that view an input excepted: those are the caller's own)."""
        if state.static is None:
            ranges = [storage_range(state.arena)] if state.arena is not None else []
            program = state.program
            for g in self.graphs.captured(program):
                inputs = {storage_range(t) for t in g.env[:program.num_inputs] if isinstance(t, torch.Tensor)}
                for slot in set(program.output_slots.values()):
                    t = g.env[slot]
                    if isinstance(t, torch.Tensor) and storage_range(t) not in inputs:
                        ranges.append(storage_range(t))
            state.static = ranges
        return state.static

    def _off_static_buffers(self, program: Program, inputs: Sequence[Any], static: Sequence[tuple[int, int]],
                            copy: bool) -> Sequence[Any]:
        """Inputs in a static output buffer (``static``: a decode loop passing back what the last step returned
        uncloned) are copied for an eager step (a capture copies them in: ``GraphSteps.run(avoid=)``); one the step
        writes is refused: its write and the step's new outputs would land in the same memory."""
        hit = [i for i, x in enumerate(inputs) if isinstance(x, torch.Tensor) and in_ranges(x.data_ptr(), static)]
        if not hit:
            return inputs
        written = [i for i in hit if i in program.inputs.written]
        if written:
            i = written[0]
            raise BackendError(
                f"Input {program.inputs.name(i)!r} (graph input {i}, shape {tuple(inputs[i].shape)}) is an output "
                "this executor returned uncloned (copy_outputs=False), and the step writes it in place: the write "
                "and the step's new outputs would share that memory. Pass a copy (x.clone()), or set "
                "copy_outputs=True.")
        if not copy:
            return inputs
        return [x.clone() if i in hit else x for i, x in enumerate(inputs)]

    def _eager_step(self, state: _State, inputs: Sequence[Any]) -> Any:
        program = state.program
        step = self.begin_step(program, inputs, lock=NOLOCK, record=False)
        timing: list[tuple[str, str, str, Any, Any]] | None = [] if self.config.gpu_timeline else None
        caller = torch.cuda.current_stream()
        start = _timing_event(caller) if timing is not None else None
        if records_autograd(inputs):
            # Training: the arena's buffers would carry one step's autograd history into the next, so the
            # step runs on the caller's stream alone with fresh merge buffers, as the first step does.
            self._probe(state, step, timing)
            state.steps += 1
            self._finish_timeline(start, timing)
            return self.outputs(program, step.env)
        if state.buffers is None:
            # First step of this program: run it on the caller's stream alone. It measures the merge
            # buffers (allocated here on one stream, so no lane can race with the allocator's earlier
            # users of that memory) and warms every kernel; then the arena replaces them.
            self._probe(state, step, timing)
            self._make_arena(state, step.env)
        else:
            self._prefill_buffers(state, step.env)
            self._issue(state, state.eager_piece, step, caller, frees=True, timing=timing)
        state.steps += 1
        self._finish_timeline(start, timing)
        return self._outputs(program, step.env, set(state.buffers or ()))

    def _probe(self, state: _State, step: StepContext, timing: list[tuple[str, str, str, Any, Any]] | None) -> None:
        caller = torch.cuda.current_stream()

        @contextlib.contextmanager
        def timed(launch: Any) -> Iterator[None]:
            t0 = _timing_event(caller)
            yield
            timing.append((launch.lane, repr(launch.op), launch.segment.resource.value, t0,  # type: ignore[union-attr]
                           _timing_event(caller)))

        buffers = set(state.program.buffers)  # merge buffers are measured after the step: never freed here
        frees = [[s for s in f if s not in buffers] for f in state.program.serial_frees]
        step_loop(step, state.program.serial_order, frees=frees, around=timed if timing is not None else None)

    def forget(self, program: Program) -> None:
        self.graphs.forget(program)
        self._states.pop(id(program), None)

    def close(self) -> None:
        """Drop every capture and program state and the lane streams. Green contexts are not destroyed here:
        torch's caching allocator records an event on a stream when a tensor used there (``record_stream``) is
        freed, and such tensors (outputs, cached blocks) may outlive the executor; destroying the stream under
        them would fail in a later free. :func:`~dynaflow.backend.streams.release_lane_streams` does it for a
        caller that knows none is left."""
        self.graphs.clear()
        self._states.clear()
        self._lane_streams.clear()

    # -- setup ----------------------------------------------------------------------------------------
    def _state(self, program: Program) -> _State:
        st = self._states.get(id(program))
        if st is not None and st.program is program:
            return st
        with self._lock:
            lanes = self._lane_streams.get(program.lanes)
            if lanes is None:
                lanes = self._lane_streams[program.lanes] = make_lane_streams(program.lanes)
                granted = [repr(l) for l in lanes if l.requested_sms is not None]
                if granted:
                    log.info("SM partitions: %s", ", ".join(granted))
            lane_index = {lane.name: i for i, lane in enumerate(program.lanes)}
            lane_of = {id(l): lane_index[l.lane] for l in program.serial_order}
            producer_lane: dict[int, int] = {}
            readers: dict[int, set[int]] = {}
            for launch in program.serial_order:
                li = lane_of[id(launch)]
                for s in launch.out_slots:
                    producer_lane.setdefault(s, li)
                for a in launch.args:
                    if a.kind != CONST:
                        readers.setdefault(a.slot, set()).add(li)
            cross = {s: tuple(sorted(r - {producer_lane[s]})) for s, r in readers.items()
                     if s in producer_lane and r - {producer_lane[s]}}
            st = _State(program, lanes, [torch.cuda.Event() for _ in range(program.num_events)], lane_of,
                        waits_before(program), cross, capture_plan(program, graphs=False).pieces[0],
                        _free_table(program), lane_carveouts(program, lanes))
            self._states[id(program)] = st
        return st

    def _prefill_buffers(self, state: _State, env: list[Any]) -> None:
        if state.buffers:
            for slot, buf in state.buffers.items():
                env[slot] = buf

    def _make_arena(self, state: _State, env: list[Any]) -> None:
        """After the first step: one byte arena on the caller's stream holding every merge buffer."""
        specs = {s: env[s] for s in state.program.buffers if isinstance(env[s], torch.Tensor)}
        if not specs:
            state.buffers = {}
            return
        offsets, total = {}, 0
        for s, t in specs.items():
            offsets[s] = total
            total += (t.numel() * t.element_size() + ALIGN - 1) // ALIGN * ALIGN
        device = next(iter(specs.values())).device
        arena = torch.empty(total, dtype=torch.uint8, device=device)
        state.arena, state.static = arena, None
        state.buffers = {
            s: arena.narrow(0, offsets[s], t.numel() * t.element_size()).view(t.dtype).as_strided(t.shape, t.stride())
            for s, t in specs.items()
        }
        log.debug("merge-buffer arena: %d buffers, %d bytes", len(specs), total)

    # -- issuing --------------------------------------------------------------------------------------
    def _issue(self, state: _State, piece: Piece, step: StepContext, caller: Any, *, frees: bool,
               timing: list[tuple[str, str, str, Any, Any]] | None = None, only: set[int] | None = None) -> None:
        """Fork ``caller`` into the lanes, issue the piece's launches in serial order through the step loop,
        join back.

        ``frees``: drop each value after its last use; ``only``: drop only these slots (inside a capture,
        the values the piece itself allocated from the graph's pool — never a tensor allocated outside the
        capture, whose memory the allocator could hand out again while replays still read it)."""
        streams = [ls.stream for ls in state.lanes]
        used = sorted({state.lane_of[id(l)] for l in piece.order})
        for li in used:
            streams[li].wait_stream(caller)
        issue = _LaneIssue(state, streams, step.env, caller, timing, only,
                           {l.event for l in piece.order if l.event is not None})
        try:
            step_loop(step, piece.order, around=issue, after=issue.free if frees and state.free_at else None)
        finally:
            issue.restore()
        for li in used:
            caller.wait_stream(streams[li])

    # -- CUDA graphs (the Capturer of GraphSteps) ----------------------------------------------------
    def eager(self, program: Program, inputs: Sequence[Any]) -> Any:
        """A real uncaptured step (a signature's warm-up before capture)."""
        return self.run(program, inputs, capture=False)

    def capture(self, program: Program, inputs: Sequence[Any]) -> _Graphed:
        """Record one step over the bound ``inputs`` as CUDA graphs (pieces around ``no-cudagraph`` segments)."""
        state = self._state(program)
        plan = capture_plan(program, graphs=True)
        if self._capture_stream is None:
            self._capture_stream = torch.cuda.Stream()
        cap = self._capture_stream
        step = self.begin_step(program, inputs, lock=NOLOCK, record=False)
        env = step.env
        self._prefill_buffers(state, env)
        graphs: dict[int, Any] = {}
        caller = torch.cuda.current_stream()
        cap.wait_stream(caller)
        # pieces that cannot be captured run for real during capture; what they write into inputs is undone
        # after it, so the step's writes happen once, on replay
        saved = [(env[i], env[i].clone()) for i in sorted(program.inputs.written)
                 if not plan.whole and isinstance(env[i], torch.Tensor)]
        try:
            for piece in plan.pieces:
                if piece.graph:
                    graphs[piece.index] = self._capture_piece(state, piece, step, cap)
                else:
                    with torch.cuda.stream(cap):
                        self._issue(state, piece, step, cap, frees=False)
        finally:  # a failed capture too: the step then runs eagerly (GraphSteps), on inputs as they were
            caller.wait_stream(cap)
            for t, before in saved:
                t.copy_(before)
        state.static = None  # this capture's outputs are static buffers now, an earlier one's no longer
        log.info("captured %s for %r", plan, program)
        return _Graphed(plan, graphs, env)

    def _capture_piece(self, state: _State, piece: Piece, step: StepContext, cap: Any) -> Any:
        graph = torch.cuda.CUDAGraph()
        own = {s for launch in piece.order for s in launch.out_slots}
        try:
            with torch.cuda.graph(graph, stream=cap):
                self._issue(state, piece, step, cap, frees=True, only=own)
        except Exception as exc:
            segs = sorted({launch.segment.name for launch in piece.order})
            raise CaptureFailed(
                f"CUDA-graph capture of {piece!r} (segments {', '.join(segs[:6])}{' ...' if len(segs) > 6 else ''}) "
                f"failed: {type(exc).__name__}: {exc}. A segment that synchronises with the host or allocates "
                "outside the graph pool cannot be captured: tag it 'no-cudagraph' (it then runs eagerly "
                "between graph pieces), or set cuda_graphs=False to silence this."
            ) from exc
        return graph

    def replay(self, program: Program, g: _Graphed) -> None:
        """Replay every piece in order (uncapturable pieces run eagerly into the captured tensors)."""
        if not self.config.gpu_timeline and all(p.graph for p in g.plan.pieces):  # the steady step: launches only
            for piece in g.plan.pieces:
                g.graphs[piece.index].replay()
            return
        state = self._state(program)
        caller = torch.cuda.current_stream()
        step = StepContext(program, g.env, current_nano_context(), NOLOCK)
        timing: list[tuple[str, str, str, Any, Any]] | None = [] if self.config.gpu_timeline else None
        start = _timing_event(caller) if timing is not None else None
        for piece in g.plan.pieces:
            t0 = _timing_event(caller) if timing is not None else None
            if piece.graph:
                g.graphs[piece.index].replay()
            else:
                self._replay_eager(state, piece, step, caller)
            if timing is not None:
                timing.append(("graph", f"piece{piece.index}" + ("" if piece.graph else " (eager)"), "", t0,
                               _timing_event(caller)))
        self._finish_timeline(start, timing)

    def results(self, program: Program, g: _Graphed, inputs: Sequence[Any], bound: Sequence[Any]) -> Any:
        if not program.inputs.aliased:
            return self._outputs(program, g.env)
        aliased = [(bound[i], inputs[i]) for i in sorted(program.inputs.aliased)
                   if isinstance(bound[i], torch.Tensor) and isinstance(inputs[i], torch.Tensor)]
        return self._outputs(program, g.env, rebase=aliased)

    def _replay_eager(self, state: _State, piece: Piece, step: StepContext, caller: Any) -> None:
        """Run an uncapturable piece and copy its outputs into the tensors later graphs read (fixed addresses)."""
        env = step.env
        scratch = list(env)
        self._issue(state, piece, step.with_env(scratch), caller, frees=False)
        for launch in piece.order:
            for slot in launch.out_slots:
                old, new = env[slot], scratch[slot]
                if isinstance(old, torch.Tensor) and isinstance(new, torch.Tensor) and old is not new:
                    old.copy_(new)

    # -- outputs and timeline -------------------------------------------------------------------------
    def _outputs(self, program: Program, env: list[Any], static: set[int] | None = None,
                 rebase: Sequence[tuple[torch.Tensor, torch.Tensor]] = ()) -> Any:
        """The step's outputs; with ``copy_outputs`` a clone of every output living in a static buffer
        (``static``: those slots; ``None``: all of them, as under CUDA graphs). Fresh tensors pass as is.
        ``rebase``: (bound, caller) input pairs; an output sharing a bound input's storage becomes the same
        view of the caller's tensor (never cloned: eager's output aliases the caller's input)."""
        viewed: set[int] = set()
        if rebase:  # only graph replays of programs whose outputs view inputs pay for this
            env = list(env)
            for s in program.distinct_output_slots:
                t = env[s]
                hit = next(((b, x) for b, x in rebase if isinstance(t, torch.Tensor) and _overlaps(t, b)), None)
                if hit is not None:
                    b, x = hit
                    env[s] = t if b is x else x.as_strided(t.shape, t.stride(),
                                                           x.storage_offset() + t.storage_offset() - b.storage_offset())
                    viewed.add(s)
        if not self.config.copy_outputs:
            return self.outputs(program, env)
        slots = program.distinct_output_slots
        keep = slots if static is None and not viewed else [s for s in slots if s not in viewed and
                                                              (static is None or s in static)]
        copied = clone_keeping_aliases({s: env[s] for s in keep if isinstance(env[s], torch.Tensor)})
        return self.outputs(program, copied if len(copied) == len(slots) else
                            {s: copied.get(s, env[s]) for s in slots})

    def _finish_timeline(self, start: Any, timing: list[tuple[str, str, str, Any, Any]] | None) -> None:
        if timing is None:
            self.last_timeline = None
            return
        if timing:
            timing[-1][4].synchronize()
        events = []
        for lane, op, res, t0, t1 in timing:
            t1.synchronize()
            events.append(TimelineEvent(lane, op, start.elapsed_time(t0) / 1e3, start.elapsed_time(t1) / 1e3, res))
        self.last_timeline = Timeline(tuple(sorted(events, key=lambda e: e.start)), self.name)


class _LaneIssue:
    """The step loop's hooks for one piece on CUDA streams, made once per step: ``around`` puts a launch on its
    lane's stream (its waits first, its event after); ``free`` drops values at their last use. The current
    stream changes only when the lane does (``torch.cuda.set_stream``), and goes back to the caller's after."""

    __slots__ = ("state", "streams", "env", "caller", "timing", "only", "recorded", "current", "launch", "t0",
                 "carveout", "carved")

    def __init__(self, state: _State, streams: list[Any], env: list[Any], caller: Any,
                 timing: list[tuple[str, str, str, Any, Any]] | None, only: set[int] | None, recorded: set[int]):
        self.state, self.streams, self.env, self.caller = state, streams, env, caller
        self.timing, self.only, self.recorded = timing, only, recorded
        self.current, self.launch, self.t0, self.carveout, self.carved = caller, None, None, None, False

    def __call__(self, launch: Any) -> "_LaneIssue":
        self.launch = launch
        return self

    def __enter__(self) -> None:
        launch, state = self.launch, self.state
        s = self.streams[state.lane_of[id(launch)]]
        for w in state.waits[id(launch)]:
            if w.event in self.recorded:  # events of earlier pieces are covered by their join
                s.wait_event(state.events[w.event])
        if s is not self.current:
            torch.cuda.set_stream(s)
            self.current = s
        carveout = state.carveout_of.get(id(launch))
        if carveout is not None:  # grids sized for the lane's SMs, not the whole device
            self.carveout, self.carved = torch._C._get_sm_carveout_experimental(), True
            torch._C._set_sm_carveout_experimental(carveout)
        if self.timing is not None:
            self.t0 = _timing_event(s)

    def __exit__(self, exc_type: Any, *_: Any) -> bool:
        if self.carved:  # the caller's setting back
            torch._C._set_sm_carveout_experimental(self.carveout)
            self.carved = False
        if exc_type is None:
            launch, s = self.launch, self.current
            if self.timing is not None:
                self.timing.append((launch.lane, launch.timeline_op, launch.resource_name, self.t0, _timing_event(s)))
            if launch.event is not None:
                self.state.events[launch.event].record(s)
        return False

    def free(self, launch: Any) -> None:
        env, only, state = self.env, self.only, self.state
        for slot in state.free_at.get(id(launch), ()):
            if only is not None and slot not in only:
                continue
            v = env[slot]
            if isinstance(v, torch.Tensor):
                for r in state.cross_readers.get(slot, ()):
                    v.record_stream(self.streams[r])
            env[slot] = None

    def restore(self) -> None:
        if self.current is not self.caller:
            torch.cuda.set_stream(self.caller)
            self.current = self.caller


def lane_carveouts(program: Program, lanes: Sequence[LaneStream]) -> dict[int, int]:
    """Launch id → torch's SM carveout for every launch on a lane whose partition is smaller than the device
    (:func:`~dynaflow.backend.sm_partitions.launch_carveouts`). Empty where torch lacks the knob or no lane is
    partitioned, or ``DYNAFLOW_SM_CARVEOUT=0``."""
    sms = {l.lane: partition_sms(l) for l in lanes}
    if not hasattr(torch._C, "_set_sm_carveout_experimental") or not any(sms.values()) or not knobs.sm_carveout():
        return {}
    total = torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
    return launch_carveouts(program.serial_order, sms, total)


def partition_sms(lane: LaneStream) -> int | None:
    """The SMs a lane's green context holds: the driver's count, else (torch's green context does not report
    it) the planned partition's; ``None`` for a lane on a plain stream."""
    if lane.granted_sms:
        return lane.granted_sms
    if lane.part is not None and lane.mechanism.endswith("green-context"):
        return lane.part.sms
    return None


def _capturing() -> bool:
    """Whether the caller's stream is being captured into a CUDA graph (not by this executor)."""
    # before CUDA is initialised nothing can be capturing (and is_initialized, unlike is_available, asks no driver)
    return torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing()


def _timing_event(stream: Any) -> Any:
    ev = torch.cuda.Event(enable_timing=True)
    ev.record(stream)
    return ev


def _free_table(program: Program) -> dict[int, tuple[int, ...]]:
    return {id(l): f for l, f in zip(program.serial_order, program.serial_frees) if f}


def clone_keeping_aliases(tensors: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
    """A clone of each tensor, where tensors whose bytes overlap (an output and its view) stay views of one
    clone of the bytes they span, as eager's outputs share storage. Disjoint ones (merge buffers of one arena)
    are cloned on their own."""
    if len(tensors) == 1:  # the common step (logits): nothing to keep aliased
        return {k: t.clone() for k, t in tensors.items()}
    spans = sorted((_byte_span(t), k) for k, t in tensors.items())
    out: dict[int, torch.Tensor] = {}
    group: list[int] = []
    end = None
    for (key, lo, hi), k in spans + [((None, 0, 0), None)]:
        if group and (k is None or key != _byte_span(tensors[group[0]])[0] or lo >= end):
            _clone_group(tensors, group, out)
            group, end = [], None
        if k is not None:
            group.append(k)
            end = hi if end is None else max(end, hi)
    return out


def _overlaps(a: torch.Tensor, b: torch.Tensor) -> bool:
    (ka, lo_a, hi_a), (kb, lo_b, hi_b) = _byte_span(a), _byte_span(b)
    return ka == kb and lo_a < hi_b and lo_b < hi_a


def _byte_span(t: torch.Tensor) -> tuple[tuple[int, str], int, int]:
    """(storage, first byte, one past the last byte) that ``t`` can read."""
    size = t.element_size()
    start = t.storage_offset() * size
    extent = 1 + sum((n - 1) * st for n, st in zip(t.shape, t.stride()) if n > 0) if t.numel() else 0
    return (t.untyped_storage().data_ptr(), str(t.device)), start, start + extent * size


def _clone_group(tensors: dict[int, torch.Tensor], group: list[int], out: dict[int, torch.Tensor]) -> None:
    if len(group) == 1:
        out[group[0]] = tensors[group[0]].clone()
        return
    first = tensors[group[0]]
    lo = min(_byte_span(tensors[k])[1] for k in group) // 16 * 16  # aligned for every dtype
    hi = max(_byte_span(tensors[k])[2] for k in group)
    raw = torch.empty(0, dtype=torch.uint8, device=first.device).set_(first.untyped_storage())
    region = raw[lo:hi].clone()
    for k in group:
        t = tensors[k]
        offset = (t.storage_offset() * t.element_size() - lo) // t.element_size()
        out[k] = torch.empty(0, dtype=t.dtype, device=t.device).set_(region.untyped_storage(), offset, t.shape,
                                                                      t.stride())
