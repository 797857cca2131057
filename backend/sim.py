"""Discrete-event simulation of a :class:`Program` on a cost model: the ``sim`` executor and the autotuner's
predictor.

Every lane walks its instruction list in order, as the real executors do: a launch starts when its lane is
free and every event it waits on has fired. Running launches share the device as a fluid: each uses a
fraction of the SM throughput, the memory bandwidth and the link (its :class:`~dynaflow.cost.Estimate`
demand); when the launches running together ask for more than 100% of a resource, each one using it
progresses at ``1 / load`` of its solo speed, and memory-bound launches sharing bandwidth pay an extra
``contention`` penalty per additional one (cache and DRAM-page interference). Two lanes whose launches use
different resources therefore overlap perfectly (makespan = the longer lane), and one lane is the plain sum.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Sequence

from dynaflow.cost import CostModel, Estimate
from dynaflow.errors import BackendError
from dynaflow.ir import ALL
from dynaflow.timeline import Timeline, TimelineEvent
from dynaflow.backend.program import Launch, Program, Wait
from dynaflow.backend.launch import Executor, ExecutorContext, run_serial

__all__ = ["simulate", "SimExecutor", "launch_rows", "lane_shares"]

log = logging.getLogger(__name__)

_EPS = 1e-15


def launch_rows(program: Program, launch: Launch) -> int:
    """Rows a launch processes: its nano-batch's size, or the whole batch for a whole op."""
    if launch.op.nano == ALL:
        return program.batch_size
    return program.split.for_segment(launch.segment).sizes[launch.op.nano]


def lane_shares(program: Program, num_sms: int | None) -> list[float]:
    """Each lane's SM share: ``sm_count / num_sms`` for a partitioned lane, else the whole device."""
    shares = []
    for lane in program.lanes:
        if lane.sm_count and num_sms:
            shares.append(min(1.0, lane.sm_count / num_sms))
        else:
            shares.append(1.0)
    return shares


@dataclass
class _Running:
    lane: int
    launch: Launch | None  # None: a lane paying a wait hand-off
    start: float
    remaining: float  # seconds of solo work left
    demand: dict[str, float]


def simulate(program: Program, cost: CostModel, *, num_sms: int | None = None, contention: float = 0.1,
             launch_overhead: float = 0.0, wait_latency: float = 0.0) -> Timeline:
    """Predict the program's timeline on ``cost``; ``num_sms`` turns lanes' ``sm_count`` into shares.
    ``wait_latency`` is what a lane that blocked on another lane's event pays before it resumes (an OS
    thread hand-off on the CPU executor, tens of µs; about a microsecond for a CUDA event inside a graph).

    Worked example (synthetic costs): two lanes, lane A runs a 3 ms compute op, lane B a 2 ms memory op,
    no waits between them → makespan 3 ms; the same two ops on one lane → 5 ms.
    """
    shares = lane_shares(program, num_sms)
    pc = [0] * len(program.streams)
    fired: dict[int, float] = {}
    busy: list[_Running | None] = [None] * len(program.streams)
    events: list[TimelineEvent] = []
    now = 0.0
    total = sum(len(s) for s in program.streams)
    done = 0

    def start_ready() -> int:
        started = 0
        for li, instrs in enumerate(program.streams):
            while busy[li] is None and pc[li] < len(instrs):
                ins = instrs[pc[li]]
                if isinstance(ins, Wait):
                    if ins.event not in fired:
                        break
                    pc[li] += 1
                    started += 1
                    resume = fired[ins.event] + wait_latency
                    if wait_latency > 0 and resume > now:  # the lane blocked: pay the hand-off
                        busy[li] = _Running(li, None, now, resume - now, {})
                    continue
                busy[li] = _start(program, cost, ins, li, now, shares[li], launch_overhead)
                pc[li] += 1
                started += 1
        return started

    done += start_ready()
    while done < total or any(busy):
        running = [r for r in busy if r is not None]
        if not running:
            raise BackendError("Simulated program deadlocks: every lane waits on an event no lane can fire. "
                               "The schedule should have been rejected by verify(); please report this.")
        rates = _rates(running, contention)
        dt = min(r.remaining / rates[id(r)] if rates[id(r)] > 0 else float("inf") for r in running)
        now += dt
        for r in running:
            r.remaining -= dt * rates[id(r)]
        for r in running:
            if r.remaining <= _EPS * max(1.0, now):
                busy[r.lane] = None
                if r.launch is None:
                    continue  # a hand-off delay, not a launch
                events.append(TimelineEvent(program.lanes[r.lane].name, repr(r.launch.op), r.start, now,
                                            r.launch.segment.resource.value))
                if r.launch.event is not None:
                    fired[r.launch.event] = now
        done += start_ready()
    events.sort(key=lambda e: (e.start, e.lane))
    return Timeline(tuple(events), "sim")


def _start(program: Program, cost: CostModel, ins: Launch, li: int, now: float, share: float,
           launch_overhead: float) -> _Running:
    """A launch starting on lane ``li`` at ``now``: its solo time and resource demand from the cost model."""
    est = cost.estimate(ins.segment, launch_rows(program, ins), share)
    if est is None:
        raise BackendError(
            f"The cost model {cost!r} has no estimate for segment {ins.segment.name!r} "
            f"({launch_rows(program, ins)} rows); profile the model with dynaflow.profile(...) or use a "
            "cost model that covers every segment."
        )
    return _Running(li, ins, now, max(est.seconds + launch_overhead, 0.0), _demand(est))


def _demand(est: Estimate) -> dict[str, float]:
    out: dict[str, float] = {}
    for r, d in est.demand:
        out[r] = out.get(r, 0.0) + max(d, 0.0)
    return out


def _rates(running: Sequence[_Running], contention: float) -> dict[int, float]:
    """Each running launch's speed relative to running alone (fluid sharing of SMs, bandwidth, link)."""
    load: dict[str, float] = {}
    for r in running:
        for res, d in r.demand.items():
            load[res] = load.get(res, 0.0) + d
    heavy_bw = sum(1 for r in running if r.demand.get("bw", 0.0) >= 0.5)
    bw_capacity = 1.0 / (1.0 + contention * max(0, heavy_bw - 1))
    rates = {}
    for r in running:
        rate = 1.0
        for res, d in r.demand.items():
            if d <= 0:
                continue
            cap = bw_capacity if res == "bw" else 1.0
            if load[res] > cap:
                rate = min(rate, cap / load[res])
        rates[id(r)] = rate
    return rates


class SimExecutor(Executor):
    """Computes the outputs on the serial path (so results are exact) and reports the *simulated* timeline
    of the program on its cost model, not the wall clock of this machine."""

    name = "sim"

    def __init__(self, cost: CostModel | None = None, num_sms: int | None = None, contention: float = 0.1,
                 compute: bool = True, wait_latency: float = 0.0) -> None:
        super().__init__()
        self.wait_latency = wait_latency
        self.cost = cost
        self.num_sms = num_sms
        self.contention = contention
        self.compute = compute

    @classmethod
    def from_context(cls, ctx: ExecutorContext) -> "SimExecutor":
        spec = ctx.device() if ctx.device is not None else None
        return cls(cost=ctx.cost_model() if ctx.cost_model is not None else None,
                   num_sms=spec.num_sms if spec is not None and spec.num_sms > 1 else None,
                   wait_latency=spec.wait_latency if spec is not None else 0.0)

    def predict(self, program: Program) -> Timeline:
        if self.cost is None:
            raise BackendError("executor='sim' needs a cost model; dynaflow.compile(..., executor='sim') builds one "
                               "from FLOP/byte counts (and a measured profile if given).")
        return simulate(program, self.cost, num_sms=self.num_sms, contention=self.contention,
                        wait_latency=self.wait_latency)

    def run(self, program: Program, inputs: Sequence[Any], *, capture: bool = False) -> Any:
        timeline = self.predict(program)
        out = None
        if self.compute:
            step = self.begin_step(program, inputs, record=False)
            run_serial(step)
            out = self.outputs(program, step.env)
        self.last_timeline = timeline
        return out
