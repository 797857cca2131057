"""Graph-replayed steps without input copies: which inputs a captured step reads in place, and when to copy.

A CUDA graph reads its inputs at the addresses it was captured with. Copying every input into static
buffers before each replay is always correct but can cost more than the step (a serving engine's KV cache
is gigabytes). So each input is *bound* one of two ways when a step is captured:

* **in place** — the graph reads the caller's own tensor: parameters and buffers, inputs the caller declared
  persistent (``static_inputs``), and inputs whose storage (data pointer, shape, strides, dtype, device)
  stayed the same for the last few calls (an engine's KV cache, a static-cache decode's buffers). A replay
  checks the storage is still the captured one; an observed-stable input or a parameter that moved makes the
  step be captured again (the input is then copied until it is stable again); a declared input that moved
  is an error (:class:`StaticInputError`), never a silent copy.
* **copied** — the graph reads a private buffer: the caller's tensor is copied in before a replay, and, if
  the graph writes that input in place, copied back after it. A copied input that becomes stable is moved
  in place by capturing again; recaptures per signature are bounded (:attr:`GraphSteps.max_captures`).

Each signature (shapes, dtypes, devices, non-tensor values) first runs ``warmups`` real eager steps — they
warm kernels and show which inputs keep their storage — and is captured on the next call, which then replays.
:class:`GraphSteps` holds that policy; the executor supplies the mechanism (:class:`Capturer`), so the same
logic runs with CUDA graphs on a GPU and with a fake capturer in the CPU tests.
"""

from __future__ import annotations

import itertools
import logging
import operator
import threading
from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence

import torch

from dynaflow.errors import BackendError
from dynaflow.segmented import InputRoles
from dynaflow.backend.program import Program

__all__ = ["Capturer", "CaptureFailed", "GraphSteps", "InputFingerprints", "InputPlan", "StaticInputError", "fingerprint",
           "plan_inputs", "signature", "is_persistent", "in_ranges", "storage_range"]

log = logging.getLogger(__name__)

Fingerprint = tuple[int, tuple[int, ...], tuple[int, ...], torch.dtype, torch.device]


class CaptureFailed(BackendError):
    """A step could not be recorded as a graph (a segment synchronises with the host, copies from pageable host
    memory, or allocates outside the graph's pool). :class:`GraphSteps` then runs that signature uncaptured."""


class StaticInputError(BackendError):
    """A declared static input (``static_inputs``) was passed with storage other than the captured one."""


def fingerprint(x: Any) -> Fingerprint | None:
    """The storage a captured graph would read: (data pointer, shape, strides, dtype, device); ``None`` for
    a non-tensor."""
    if not isinstance(x, torch.Tensor):
        return None
    return (x.data_ptr(), x.shape, x.stride(), x.dtype, x.device)


class InputFingerprints:
    """:func:`fingerprint` of every input of one graph, call after call, cheaply for its parameters. The list
    returned is never mutated; a call whose fingerprints all equal the last call's gets the last list itself.

    With ``guarded`` (a graph Dynamo captured, whose guards check each lifted parameter's shape, strides,
    dtype and device), a persistent input (:func:`is_persistent`) that is the same tensor object at the same
    data pointer as in the last call keeps its last fingerprint: a model's weights cost one pointer read each.
    A weight swapped for new storage (``param.data = new``) has a new pointer and is fingerprinted anew."""

    def __init__(self, guarded: bool) -> None:
        self.guarded = guarded
        self._ptrs_equal = getattr(torch._C, "_tensors_data_ptrs_at_indices_equal", None)
        """torch's one-call check that tensors still have given data pointers (CUDA builds; cudagraph trees use
        it for the same purpose): one C++ loop instead of a Python call per weight."""
        self._last: tuple[tuple[int, ...], tuple[int, ...], list[Any], list[int], list[Fingerprint | None],
                          list[int]] | None = None
        """(persistent positions, the other positions, the persistent tensors, their data pointers, every input's
        fingerprint, the indices ``0..n-1`` of the persistent tensors) of the last call, replaced as one tuple so a
        concurrent caller never pairs one call's pointers with another's."""

    def __call__(self, inputs: Sequence[Any]) -> list[Fingerprint | None]:
        last = self._last
        if last is not None and len(last[4]) == len(inputs):
            positions, others, tensors, ptrs, fps, every = last
            equal = self._ptrs_equal
            if (all(map(operator.is_, map(inputs.__getitem__, positions), tensors))
                    and (equal(tensors, ptrs, every) if equal is not None
                         else list(map(torch.Tensor.data_ptr, tensors)) == ptrs)):
                fresh = None
                for i in others:
                    fp = fingerprint(inputs[i])
                    if fp != fps[i]:
                        if fresh is None:
                            fresh = list(fps)
                        fresh[i] = fp
                if fresh is None:  # nothing moved: the last list itself, which callers compare by identity first
                    return fps
                self._last = (positions, others, tensors, ptrs, fresh, every)
                return fresh
        fresh = [fingerprint(x) for x in inputs]
        if self.guarded:
            persistent = [is_persistent(x) for x in inputs]
            positions = tuple(i for i, p in enumerate(persistent) if p)
            others = tuple(i for i, p in enumerate(persistent) if not p)
            tensors = [inputs[i] for i in positions]
            self._last = (positions, others, tensors, [t.data_ptr() for t in tensors], fresh,
                          list(range(len(tensors))))
        return fresh


def storage_range(t: torch.Tensor) -> tuple[int, int]:
    """The ``[start, end)`` addresses of a tensor's whole storage."""
    storage = t.untyped_storage()
    return storage.data_ptr(), storage.data_ptr() + storage.nbytes()


def in_ranges(ptr: int, ranges: Sequence[tuple[int, int]]) -> bool:
    """Whether address ``ptr`` lies in one of the ``[start, end)`` ranges."""
    return any(lo <= ptr < hi for lo, hi in ranges)


def signature(inputs: Sequence[Any], fps: Sequence[Fingerprint | None] | None = None) -> tuple[Any, ...]:
    """What one capture is valid for: every tensor's shape, dtype and device, every other value itself (from the
    inputs' fingerprints when the caller has them)."""
    if fps is None:
        fps = [fingerprint(x) for x in inputs]
    return tuple(_part(fp, x) for fp, x in zip(fps, inputs))


def _part(fp: Fingerprint | None, x: Any) -> Any:
    """One input's share of a :func:`signature`."""
    return (fp[1], fp[3], fp[4]) if fp is not None else ("V", repr(x))


def _non_tensors(fps: Sequence[Fingerprint | None]) -> tuple[int, ...]:
    """The positions of the non-tensor inputs (those without a fingerprint)."""
    return tuple(i for i, fp in enumerate(fps) if fp is None)


def _same_values(inputs: Sequence[Any], positions: Sequence[int], sig: tuple[Any, ...]) -> bool:
    """Whether each non-tensor input (at ``positions``) has the value ``sig`` holds for it (:func:`_part`)."""
    return all(_part(None, inputs[i]) == sig[i] for i in positions)


def is_persistent(x: Any) -> bool:
    """Parameters and buffers keep their storage across calls: captured in place, never copied."""
    return isinstance(x, torch.nn.Parameter) or getattr(x, "_dynamo_static_input_type", None) is not None


@dataclass(frozen=True)
class InputPlan:
    """How a capture binds each tensor input: read ``in_place`` (and why) or ``copied`` (and copied back after
    the replay when the graph writes it)."""

    in_place: dict[int, str]
    """Input index -> why: ``parameter``, ``declared`` or ``stable``."""
    copied: frozenset[int]
    copied_back: frozenset[int]
    roles: InputRoles = InputRoles()

    def __repr__(self) -> str:
        def names(idx: Any) -> str:
            return ", ".join(self.roles.name(i) for i in sorted(idx)) or "none"

        kinds = {k: [i for i, why in self.in_place.items() if why == k] for k in ("parameter", "declared", "stable")}
        placed = "; ".join(f"{k} {names(v)}" for k, v in kinds.items() if v) or "none"
        back = f" (copied back: {names(self.copied_back)})" if self.copied_back else ""
        return f"InputPlan(in place: {placed}; copied: {names(self.copied)}{back})"


def plan_inputs(inputs: Sequence[Any], stable: frozenset[int] | set[int], roles: InputRoles) -> InputPlan:
    """Bind each tensor input for a capture of ``inputs``: in place if it is a parameter, declared, or in
    ``stable`` (its storage was the same for the last few calls), else copied."""
    in_place: dict[int, str] = {}
    copied: set[int] = set()
    for i, x in enumerate(inputs):
        if not isinstance(x, torch.Tensor):
            continue
        if i in roles.declared:
            in_place[i] = "declared"
        elif is_persistent(x):
            in_place[i] = "parameter"
        elif i in stable:
            in_place[i] = "stable"
        else:
            copied.add(i)
    return InputPlan(in_place, frozenset(copied), frozenset(copied & roles.written), roles)


class Capturer(Protocol):
    """The mechanism behind :class:`GraphSteps`: eager steps, capture, replay, and the step's outputs."""

    def eager(self, program: Program, inputs: Sequence[Any]) -> Any:
        """One real, uncaptured step."""

    def capture(self, program: Program, inputs: Sequence[Any]) -> Any:
        """Record a step reading ``inputs`` (the bound tensors) without running it; returns the capture."""

    def replay(self, program: Program, captured: Any) -> None:
        """Run the captured step once."""

    def results(self, program: Program, captured: Any, inputs: Sequence[Any], bound: Sequence[Any]) -> Any:
        """The outputs of the latest replay (cloned or not, as the executor's ``copy_outputs`` says); an output
        that shares storage with a bound input (``program.inputs.aliased``) is the caller's tensor in
        ``inputs``, or a view of it, as in eager."""


@dataclass
class _Entry:
    """One (program, signature): each input's latest fingerprint and the call at which it last changed (how
    many calls in a row it kept its storage), the calls run so far, and the capture with its bound inputs.

    Work per call is one identity comparison per input (C speed) plus Python only for the inputs whose
    fingerprint object changed: a graph's weights keep the same fingerprint object call after call
    (:class:`InputFingerprints`)."""

    last: list[Fingerprint | None] = field(default_factory=list)
    since: list[int] = field(default_factory=list)
    """Per input, the call (1-based) from which it has had its latest fingerprint."""
    moved: set[int] = field(default_factory=set)
    """Inputs whose fingerprint changed since the latest capture (only these can have left their bound one)."""
    calls: int = 0
    plan: InputPlan | None = None
    bound: list[Any] = field(default_factory=list)
    bound_fp: list[Fingerprint | None] = field(default_factory=list)
    captured: Any = None
    captures: int = 0
    failed: str | None = None
    """Why capturing this signature failed (:class:`CaptureFailed`): its steps then run uncaptured."""

    def observe(self, fps: Sequence[Fingerprint | None]) -> None:
        self.calls += 1
        if len(self.last) != len(fps):
            self.last, self.since = list(fps), [self.calls] * len(fps)
            self.moved.update(range(len(fps)))
            return
        last = self.last
        for i in itertools.compress(range(len(fps)), map(operator.is_not, fps, last)):
            fp = fps[i]
            if fp is None or fp != last[i]:
                self.since[i] = self.calls
                self.moved.add(i)
            last[i] = fp

    def streak(self, i: int) -> int:
        """Calls in a row, up to the latest, in which input ``i`` kept its fingerprint (non-tensors: any)."""
        return self.calls - self.since[i] + 1


class GraphSteps:
    """Captured steps per (program, signature), bound to their inputs without needless copies (module docstring).

    An input is *stable* once it kept its storage for ``warmups + 1`` calls in a row: the capture (after the
    warm-ups) reads stable inputs in place, a copied input that becomes stable is moved in place by capturing
    again, and an in-place input that moves is copied by capturing again. After ``max_captures`` captures of
    one signature its plan is frozen with every input that ever moved copied, so a caller whose inputs keep
    alternating costs copies, not captures. ``copies`` counts the input copies (in and back) of the latest step,
    ``last_plan`` is its input plan; ``recaptures`` counts captures redone."""

    max_captures = 6

    def __init__(self, capturer: Capturer, warmups: int = 1) -> None:
        self.capturer = capturer
        self.warmups = max(1, warmups)
        self._entries: dict[tuple[int, tuple[Any, ...]], tuple[Program, _Entry]] = {}
        self.copies = 0
        self.recaptures = 0
        self.last_plan: InputPlan | None = None
        """The input plan of the latest replayed step (``None`` while the latest step was a warm-up)."""
        self._lock = threading.RLock()
        """One step at a time: a replay reads and writes the capture's fixed buffers (callers on several
        threads take turns, as they would for any CUDA graph)."""
        self._last: tuple[Program, Sequence[Fingerprint | None], tuple[Any, ...], Any, tuple[int, ...]] | None = None
        """(program, fingerprints, signature, entry, the non-tensor positions) of the latest call, so a call like
        it skips the lookup."""
        self._avoid: Sequence[tuple[int, int]] = ()
        """The current call's ``avoid`` ranges (see :meth:`run`)."""

    def captured(self, program: Program) -> list[Any]:
        """The captures of ``program``, one per input signature captured so far."""
        return [e.captured for p, e in self._entries.values() if p is program and e.captured is not None]

    def failure(self, program: Program) -> str | None:
        """Why capturing ``program`` failed for some input signature (:class:`CaptureFailed`), or ``None``."""
        return next((e.failed for p, e in self._entries.values() if p is program and e.failed is not None), None)

    def forget(self, program: Program) -> None:
        """Drop every capture of ``program``."""
        for key in [k for k, (p, _) in self._entries.items() if p is program]:
            del self._entries[key]
        self._last = None

    def clear(self) -> None:
        self._entries.clear()
        self._last = None

    def _same_as_last(self, program: Program, inputs: Sequence[Any], fps: Sequence[Fingerprint | None]) -> Any:
        """The latest call's entry when this call has its program and signature, else ``None``: only the inputs
        whose fingerprint object changed, and the non-tensors, are compared (no signature built or hashed)."""
        last = self._last
        if last is None or last[0] is not program or len(last[1]) != len(fps):
            return None
        _, last_fps, sig, hit, values = last
        for i in itertools.compress(range(len(fps)), map(operator.is_not, fps, last_fps)):
            fp = fps[i]
            if fp is None or (fp != last_fps[i] and _part(fp, inputs[i]) != sig[i]):  # equal storage: equal part
                return None
        return hit if _same_values(inputs, values, sig) else None  # the non-tensors sit where they sat last

    def run(self, program: Program, inputs: Sequence[Any], fps: Sequence[Fingerprint | None] | None = None,
            avoid: Sequence[tuple[int, int]] = ()) -> Any:
        """One step: an eager warm-up while the signature is new, else a (captured, then) replayed step.
        ``fps``: the inputs' fingerprints, when the caller computed them already. ``avoid``: address ranges no
        input is read in place from, however stable (the capturer's static output buffers, which a caller given
        them uncloned may pass back: a replay writes there); such inputs are copied in."""
        with self._lock:
            self._avoid = avoid
            return self._run(program, inputs, fps)

    def _steady(self, program: Program, inputs: Sequence[Any], fps: Sequence[Fingerprint | None]) -> _Entry | None:
        """The latest call's entry when this call changes nothing :meth:`_run` acts on: the same program, every
        input at the same storage with the same non-tensor values, and a capture that reads every input in place
        with no input moved since. The full path would then count the call, find nothing to bind, copy or
        capture, and replay; this does the same with one list comparison."""
        last = self._last
        if last is None or last[0] is not program or (last[1] is not fps and last[1] != fps):
            return None
        entry = last[3][1]
        plan = entry.plan
        if entry.captured is None or entry.failed is not None or plan is None or plan.copied or entry.moved:
            return None
        return entry if _same_values(inputs, last[4], last[2]) else None

    def _may_stay(self, entry: _Entry, i: int) -> bool:
        """Whether input ``i`` may be read in place as far as :meth:`run`'s ``avoid`` goes."""
        fp = entry.last[i]
        return not (self._avoid and fp is not None and in_ranges(fp[0], self._avoid))

    def _run(self, program: Program, inputs: Sequence[Any], fps: Sequence[Fingerprint | None] | None) -> Any:
        if fps is None:
            fps = [fingerprint(x) for x in inputs]
        steady = self._steady(program, inputs, fps)
        if steady is not None:  # the decode loop's step: what the path below would do, minus its bookkeeping
            steady.calls += 1
            self.copies = 0
            self.capturer.replay(program, steady.captured)
            self.last_plan = steady.plan
            return self.capturer.results(program, steady.captured, inputs, steady.bound)
        hit = self._same_as_last(program, inputs, fps)
        if hit is None:
            sig = signature(inputs, fps)
            hit = self._entries.get((id(program), sig))
            if hit is None or hit[0] is not program:
                hit = self._entries[(id(program), sig)] = (program, _Entry())
            self._last = (program, fps, sig, hit, _non_tensors(fps))
        else:
            self._last = (program, fps, self._last[2], hit, self._last[4])  # type: ignore[index]
        entry = hit[1]
        self.copies = 0
        self.last_plan = None
        entry.observe(fps)
        if entry.failed is not None or (entry.captured is None and entry.calls <= self.warmups):
            return self.capturer.eager(program, inputs)
        if entry.captured is None or not self._bind(program, entry, inputs):
            try:
                self._capture(program, entry, inputs)
            except CaptureFailed as exc:
                # the answer does not need the graph: this signature runs as eager steps from now on (a warning
                # once, and :meth:`failure` for explain()), rather than failing a call eager would have run
                entry.captured, entry.failed = None, str(exc)
                log.warning("%r: runs without CUDA graphs for this input signature: %s", program, exc)
                return self.capturer.eager(program, inputs)
        self.capturer.replay(program, entry.captured)
        self._copy_back(entry, inputs)
        self.last_plan = entry.plan
        return self.capturer.results(program, entry.captured, inputs, entry.bound)

    def _stable(self, entry: _Entry) -> frozenset[int]:
        streaks = [entry.streak(i) for i in range(len(entry.last))]
        least = entry.calls if entry.captures >= self.max_captures - 1 else self.warmups + 1
        # the last capture: only what never moved stays in place
        return frozenset(i for i, n in enumerate(streaks) if n >= least and self._may_stay(entry, i))

    def _capture(self, program: Program, entry: _Entry, inputs: Sequence[Any]) -> None:
        plan = plan_inputs(inputs, self._stable(entry), program.inputs)
        bound = [x.clone() if i in plan.copied else x for i, x in enumerate(inputs)]
        entry.captured = None  # drop the old capture (and its hold on moved inputs) before recording anew
        entry.captured = self.capturer.capture(program, bound)
        entry.plan, entry.bound = plan, bound
        entry.bound_fp = [fingerprint(x) for x in bound]
        entry.moved = set()
        entry.captures += 1
        if entry.captures > 1:
            self.recaptures += 1
        if entry.captures == self.max_captures:
            log.warning("%r: captured %d times for one input signature because inputs keep changing storage; its "
                        "input plan is now fixed: %r", program, entry.captures, plan)
        else:
            log.info("captured %r with %r", program, plan)

    def _bind(self, program: Program, entry: _Entry, inputs: Sequence[Any]) -> bool:
        """Point the capture at this call's inputs, copying into the copied ones; ``False`` when the step must be
        captured again (an in-place input moved, or a copied one became stable)."""
        plan = entry.plan
        assert plan is not None
        moved = []
        for i in sorted(entry.moved.intersection(plan.in_place)):  # the others kept their bound fingerprint
            if entry.last[i] == entry.bound_fp[i]:
                continue
            if plan.in_place[i] == "declared":
                raise StaticInputError(_moved_message(program.inputs, i, entry.bound[i], inputs[i]))
            moved.append(program.inputs.name(i))
        settled = [program.inputs.name(i) for i in plan.copied if entry.streak(i) > self.warmups and
                   self._may_stay(entry, i)]
        if moved or (settled and entry.captures < self.max_captures):
            log.info("%r: capturing again (%s)", program, "; ".join(
                ([f"moved: {', '.join(moved)}"] if moved else []) + ([f"now stable: {', '.join(settled)}"] if settled else [])))
            return False
        copies = 0
        for i in plan.copied:
            x, buf = inputs[i], entry.bound[i]
            if x is not buf:
                buf.copy_(x)
                copies += 1
        self.copies = copies
        return True

    def _copy_back(self, entry: _Entry, inputs: Sequence[Any]) -> None:
        plan = entry.plan
        assert plan is not None
        for i in plan.copied_back:
            x, buf = inputs[i], entry.bound[i]
            if x is not buf:
                x.copy_(buf)
                self.copies += 1


def _moved_message(roles: InputRoles, i: int, captured: torch.Tensor, now: Any) -> str:
    got = (f"a tensor at {now.data_ptr():#x} with strides {tuple(now.stride())}" if isinstance(now, torch.Tensor)
           else f"{type(now).__name__} {now!r:.60}")
    return (f"static_inputs: {roles.name(i)!r} (graph input {i}, shape {tuple(captured.shape)}, {captured.dtype}) was "
            f"captured at {captured.data_ptr():#x} with strides {tuple(captured.stride())}, but this call passes {got}. "
            "A declared static input is read in place by the captured graph, so it must keep its storage: write new "
            "contents into the same tensor (x.copy_(new)), or drop it from static_inputs to have it copied each step.")
