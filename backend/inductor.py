"""TorchInductor per segment: compile every (segment, nano-batch shape) once and warm it before use.

``InductorSegments.program_for(program, inputs)`` returns a copy of ``program`` whose launches call
compiled segments. On the first call for a program and its inputs' shapes (a program serves every length of a
dynamic dim other than the batch, such as the sequence) it runs the step once in serial order on the real
inputs; each launch's arguments give the example shapes, so a segment is compiled once per distinct
argument signature (in practice once per nano-batch size) and that compiled callable is shared by every
launch with the same signature. The compile and the first (warm-up) call both happen in this run, so by
the time an executor runs the program — and before any CUDA-graph capture — nothing compiles anymore.

Before compiling, each run of launches that follow one another on a lane with no wait between becomes one launch
(:func:`~dynaflow.backend.fuse.fuse_runs`): one Dynamo entry per run instead of one per segment, and Inductor
fuses across the segments' edges; a step of one nano-batch in program order is one compile.

Why one ``torch.compile(copy_of_segment, dynamic=False)`` per signature: each copy of an fx
GraphModule has its own code object, so Dynamo's per-code-object recompile limit is never hit however
many nano sizes there are, and a static-shape compile generates the best kernels for that size.
Inductor's own CUDA graphs stay off (the executor captures the whole step itself). Segments tagged
``no-inductor`` run as captured.

**Per lane SM budget.** A launch on a lane with an SM partition is compiled (and warmed) with torch's SM
carveout set to the SMs its lane will lack (:func:`~dynaflow.backend.sm_partitions.planned_sms`, the same plan
the cuda executor's green contexts follow): Inductor sizes its persistent templates' grids (``NUM_SMS``) and
benchmarks its GEMM choices for the lane's partition, not the whole device. The SM budget is part of the compile
key, so the same segment on two lanes compiles twice.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from typing import Any, Callable, Sequence

import torch
import torch.fx

from dynaflow import knobs
from dynaflow.errors import BackendError
from dynaflow.nanocontext import current_nano_context
from dynaflow.sandbox import sandboxed
from dynaflow.backend.fuse import fuse_runs
from dynaflow.backend.program import Launch, Program, fetch
from dynaflow.backend.sm_partitions import launch_carveouts, planned_sms, sm_carveout

__all__ = ["InductorSegments", "FusedRunError", "signature", "replace_fns", "NO_INDUCTOR"]

log = logging.getLogger(__name__)

NO_INDUCTOR = "no-inductor"


def signature(args: Sequence[Any]) -> tuple[Any, ...]:
    """What a static-shape compile specialises on: shape, stride, dtype and device of tensors; the value of
    everything else (ints such as a nano-batch size)."""
    out: list[Any] = []
    for a in args:
        if isinstance(a, torch.Tensor):
            out.append(("T", tuple(a.shape), tuple(a.stride()), a.dtype, str(a.device), a.requires_grad))
        else:
            out.append(("V", type(a).__name__, repr(a)))
    return tuple(out)


def replace_fns(program: Program, fns: dict[int, Callable[..., Any]]) -> Program:
    """A copy of ``program`` in which the launch with ``id(launch) == k`` calls ``fns[k]``."""
    new: dict[int, Launch] = {}
    for launch in program.serial_order:
        fn = fns.get(id(launch))
        new[id(launch)] = dataclasses.replace(launch, fn=fn) if fn is not None else launch
    streams = tuple(tuple(new.get(id(i), i) for i in instrs) for instrs in program.streams)
    order = tuple(new[id(l)] for l in program.serial_order)
    return dataclasses.replace(program, streams=streams, serial_order=order)


def eager_faithful_options() -> dict[str, Any]:
    """Inductor options that keep a segment's answer eager's: ``fallback_random`` draws random numbers from the
    eager generators in eager order (dropout in training); ``emulate_precision_casts`` rounds at every dtype
    cast as eager does (``x.half().float()``, a bf16 model's intermediates), where Inductor would otherwise keep
    the wider value; ``triton.cudagraphs`` off, since the executor owns graph capture."""
    import torch._inductor.config as inductor_config

    options: dict[str, Any] = {"triton.cudagraphs": False, "fallback_random": True}
    if hasattr(inductor_config, "emulate_precision_casts"):
        options["emulate_precision_casts"] = True
    return options


class FusedRunError(BackendError):
    """Inductor failed on a run of launches compiled as one (:mod:`dynaflow.backend.fuse`); ``what`` names the
    run and the failure in a line."""

    def __init__(self, message: str, what: str = "") -> None:
        super().__init__(message)
        self.what = what


class InductorSegments:
    """Compiles a Program's segments with Inductor (see the module docstring); caches per program."""

    def __init__(self, options: dict[str, Any] | None = None, fuse: bool = True) -> None:
        self.options = {**eager_faithful_options(), **(options or {})}
        self.fuse = fuse
        """Compile each run of consecutive launches on a lane as one unit (:func:`~dynaflow.backend.fuse.fuse_runs`)."""
        self._compiled: dict[tuple[str, tuple[Any, ...], int | None, Any], Callable[..., Any]] = {}
        self._programs: dict[tuple[int, tuple[Any, ...]], tuple[Program, Program]] = {}
        """(program id, its inputs' shapes) → (program, compiled copy)."""
        self._lock = threading.Lock()

    @property
    def num_compiled(self) -> int:
        """Distinct (segment, signature) compiles so far."""
        return len(self._compiled)

    def compiled(self, program: Program, inputs: Sequence[Any]) -> Program | None:
        """The compiled version of ``program`` for inputs shaped as these, if there is one already."""
        hit = self._programs.get(_key(program, inputs))
        return hit[1] if hit is not None and hit[0] is program else None

    def compiled_versions(self, program: Program) -> list[Program]:
        """Every compiled version of ``program`` so far (one per input shapes), for ``explain()``: with fusion on,
        what really runs (one launch per run) differs from the planned program."""
        return [compiled for planned, compiled in list(self._programs.values()) if planned is program]

    def program_for(self, program: Program, inputs: Sequence[Any]) -> Program:
        """The compiled (and warmed) version of ``program`` for these inputs' shapes; compiles on the first call
        for them."""
        hit = self.compiled(program, inputs)
        if hit is not None:
            return hit
        with self._lock:
            compiled = self._compile(program, inputs)
            self._programs[_key(program, inputs)] = (program, compiled)
        return compiled

    def run_compiling(self, program: Program, inputs: Sequence[Any]) -> Any:
        """The real step of ``program``, compiling each launch as the step reaches it (in serial order, on the
        calling thread), and its outputs; later calls get the compiled program from :meth:`program_for`. For a
        step that may not run twice (:func:`~dynaflow.segment_timing.replayable`: an op that writes state no
        argument shows, such as an engine's step counter), where the warm-up of :meth:`program_for` would repeat
        the effect."""
        from dynaflow.backend.launch import Executor

        with self._lock:
            compiled, env = self._compile_warm(program, inputs)
            self._programs[_key(program, inputs)] = (program, compiled)
        return Executor.outputs(program, env)

    def _compile(self, program: Program, inputs: Sequence[Any]) -> Program:
        """Compile every launch and warm it in one step that leaves no trace (:mod:`dynaflow.sandbox`): the
        executor runs the real step right after, so the inputs' writes and random draws must happen once."""
        try:
            with sandboxed(inputs, program.inputs.written) as box:
                return self._compile_warm(program, box.inputs)[0]
        except FusedRunError as exc:  # fusion is an optimisation: this program's segments compile one by one
            log.warning("%s; compiling this program's segments one by one instead", exc.what)
        with sandboxed(inputs, program.inputs.written) as box:
            return self._compile_warm(program, box.inputs, fuse=False)[0]

    def _compile_warm(self, program: Program, inputs: Sequence[Any],
                      fuse: bool | None = None) -> tuple[Program, list[Any]]:
        """Run the step once in serial order, compiling each launch on its arguments there; the compiled program
        and the step's value slots (holding its outputs). ``fuse``: fuse runs of launches (default
        :attr:`fuse`); a fused run that fails raises :class:`FusedRunError`."""
        from dynaflow.backend.launch import Executor, StepContext, run_launch

        if self.fuse if fuse is None else fuse:
            program = fuse_runs(program)
        step = StepContext(program, Executor.new_env(program, inputs), current_nano_context())
        env = step.env
        carveouts = compile_carveouts(program, inputs)
        fns: dict[int, Callable[..., Any]] = {}
        for launch, frees in zip(program.serial_order, program.serial_frees):
            if NO_INDUCTOR in launch.segment.hints:
                run_launch(launch, step)
            else:
                args = [fetch(a, env) for a in launch.args]
                carveout = carveouts.get(id(launch))
                key = (launch.segment.name, signature(args), carveout, getattr(launch.fn, "fuse_key", None))
                fn = self._compiled.get(key)
                if fn is None:
                    fn = self._compiled[key] = self._compile_one(launch, args)
                fns[id(launch)] = fn
                try:
                    with sm_carveout(carveout):  # the first call compiles: for the lane's SMs
                        run_launch(dataclasses.replace(launch, fn=fn), step)  # compiles + warms
                except Exception as exc:
                    shapes = [tuple(a.shape) if isinstance(a, torch.Tensor) else a for a in args]
                    names = list(dict.fromkeys(launch.segment.name.split("+")))  # a run may hold nano-batches of one
                    what = (f"segment {names[0]!r}" if len(names) == 1 else
                            f"the run of segments {', '.join(map(repr, names))} (compiled as one)")
                    failure = (f"Inductor failed on {what} ({launch.op}) with argument shapes {shapes}: "
                               f"{type(exc).__name__}: {exc}")
                    message = (f"{failure}. Tag the failing segment 'no-inductor' (e.g. a marker or rule with "
                               "tags={'no-inductor'}) to run it uncompiled, or set inductor=False"
                               + (" (DYNAFLOW_INDUCTOR_FUSE=0 compiles the run segment by segment, which says which "
                                  "one fails)." if len(names) > 1 else "."))
                    if getattr(launch.fn, "fuse_key", None) is None:
                        raise BackendError(message) from exc
                    self._compiled.pop(key, None)  # not kept for another program's run like this one
                    raise FusedRunError(message, failure) from exc
            for slot in frees:
                env[slot] = None
        log.info("inductor: %d segment compiles for %r", len(self._compiled), program)
        return replace_fns(program, fns), env

    def _compile_one(self, launch: Launch, args: Sequence[Any]) -> Callable[..., Any]:
        fn = launch.fn
        gm = getattr(fn, "__self__", fn)  # segment calls hold ``submodule.forward``
        if isinstance(gm, torch.fx.GraphModule):
            fn = torch.fx.GraphModule(gm, gm.graph)  # own code object: no shared recompile budget
        try:
            return torch.compile(fn, backend="inductor", dynamic=False, options=self.options)
        except Exception as exc:  # pragma: no cover - torch.compile is lazy; errors surface on the first call
            raise BackendError(
                f"Inductor could not compile segment {launch.segment.name!r} for argument shapes "
                f"{[tuple(a.shape) if isinstance(a, torch.Tensor) else a for a in args]}: {exc}. Tag the segment "
                "'no-inductor' to run it uncompiled."
            ) from exc


def _key(program: Program, inputs: Sequence[Any]) -> tuple[int, tuple[Any, ...]]:
    """What a compiled program is kept under: the program and its inputs' shapes (a dynamic dim other than the
    batch, which the program's split fixes, gives each of its sizes static-shape compiles of its own)."""
    return id(program), tuple([x.shape for x in inputs if isinstance(x, torch.Tensor)])


def compile_carveouts(program: Program, inputs: Sequence[Any]) -> dict[int, int]:
    """Launch id → torch's SM carveout to compile it under: launches on lanes the device's SM plan partitions
    (``{}`` off CUDA or without partitioned lanes)."""
    if not any(lane.sm_count for lane in program.lanes) or not knobs.sm_carveout():
        return {}
    device = next((x.device for x in inputs if isinstance(x, torch.Tensor) and x.is_cuda), None)
    if device is None or not hasattr(torch._C, "_set_sm_carveout_experimental"):
        return {}
    props = torch.cuda.get_device_properties(device)
    granted = planned_sms(program.lanes, props.multi_processor_count, props.major)
    return launch_carveouts(program.serial_order, granted, props.multi_processor_count)

