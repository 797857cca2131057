"""The autotuner: simulate every candidate strategy on the cost model, measure the best few on the real
executor, keep the winner per (model, input bucket, device) in an on-disk cache (:mod:`dynaflow.tune_cache`).

The search never returns a candidate predicted slower than sequential execution (one nano-batch, one
lane): that baseline is always a candidate, and anything predicted slower is dropped before measuring.
When measuring, the baseline is measured too, and a candidate must beat it on the real executor; on an
executor that captures CUDA graphs every measured candidate (the baseline included) is measured both eagerly
and as a graph, and the fastest measured wins. A graph that writes its inputs is measured on private copies.
"""

from __future__ import annotations

import logging
import statistics
import sys
import time
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterable, Protocol, Sequence

from dynaflow import knobs
from dynaflow.errors import DynaflowError, StrategyError
from dynaflow.ir import InputInfo, SplitConfig
from dynaflow.phase_bound import PhaseBound, busy_time, finish_time, phase_ops
from dynaflow.strategies.auto import Candidate
from dynaflow.strategies.sequential import Sequential
from dynaflow.tune_cache import CACHE_SCHEMA, TuneCache

__all__ = ["Tuner", "TuneSetup", "Planner", "Trial", "TuneResult", "TuneCache", "CACHE_SCHEMA", "autotune", "median_seconds", "bucket_key", "BUCKET_POLICIES", "sm_family", "SM_OPTIONS"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Trial:
    """One candidate's outcome: its split, predicted seconds, measured seconds (if measured), or why it was
    not eligible."""

    candidate: Candidate
    split: SplitConfig | None
    predicted: float | None
    measured: float | None = None
    note: str = ""

    def __repr__(self) -> str:
        pred = f"{self.predicted * 1e3:.3f}ms" if self.predicted is not None else "-"
        meas = f", measured {self.measured * 1e3:.3f}ms" if self.measured is not None else ""
        return f"Trial({self.candidate!r}: predicted {pred}{meas}{', ' + self.note if self.note else ''})"


@dataclass(frozen=True)
class TuneResult:
    """What the autotuner tried for one bucket and why the winner won."""

    bucket: str
    trials: tuple[Trial, ...]
    winner: Trial
    reason: str
    from_cache: bool = False
    tuned_on: int | None = None
    """The batch size the search ran on (later batches of the bucket reuse its winner)."""

    def table(self) -> str:
        rows = [("candidate", "split", "predicted ms", "vs seq", "measured ms", "note")]
        base = self.trials[0].predicted if self.trials and self.trials[0].predicted else None
        for t in sorted(self.trials, key=lambda t: (t.predicted is None, t.predicted or 0.0)):
            mark = " <- winner" if t is self.winner or t == self.winner else ""
            rows.append((
                repr(t.candidate), "/".join(map(str, t.split.sizes)) if t.split else "-",
                f"{t.predicted * 1e3:.4f}" if t.predicted is not None else "-",
                f"{base / t.predicted:.2f}x" if base and t.predicted else "-",
                f"{t.measured * 1e3:.4f}" if t.measured is not None else "-",
                (t.note + mark).strip(),
            ))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        on = f" (tuned on batch {self.tuned_on})" if self.tuned_on is not None else ""
        head = f"autotune {self.bucket}{on}: winner {self.winner.candidate!r} — {self.reason}"
        return "\n".join([head + (" (from cache)" if self.from_cache else "")] + lines)

    def __repr__(self) -> str:
        return f"TuneResult({self.bucket}: {self.winner.candidate!r} of {len(self.trials)} candidates)"


def median_seconds(fn: Callable[[], Any], repeats: int, sync: Callable[[], None] | None = None,
                   before: Callable[[], None] | None = None) -> float:
    """Median wall time of ``fn`` over ``repeats`` runs after one warm-up run; ``before`` runs ahead of each
    run, untimed (a sandbox's reset)."""
    if before:
        before()
    fn()
    if sync:
        sync()
    times = []
    for _ in range(repeats):
        if before:
            before()
            if sync:
                sync()
        t0 = time.perf_counter()
        fn()
        if sync:
            sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _progress(items: Sequence[Any], desc: str) -> Iterable[Any]:
    show = knobs.progress()
    if show is None:
        show = sys.stderr.isatty()
    if not show:
        return items
    try:
        from tqdm import tqdm

        return tqdm(items, desc=desc, leave=False)
    except ImportError:  # pragma: no cover - tqdm ships with transformers; plain logging otherwise
        log.info("%s: %d candidates", desc, len(items))
        return items


def autotune(
    candidates: Sequence[Candidate],
    bucket: str,
    predict: Callable[[Candidate], tuple[SplitConfig, float]],
    measure: Callable[[Candidate], float] | None = None,
    top_k: int = 2,
    graphs: bool = False,
    always: Sequence[Candidate] = (),
    bounded: Sequence[Candidate] = (),
    admissible: Callable[[Candidate], str | None] | None = None,
) -> TuneResult:
    """Pick the best candidate. ``predict(c)`` returns (split, simulated seconds) or raises a DynaflowError
    (the candidate does not apply); ``measure(c)`` returns real seconds. ``candidates[0]`` is the baseline
    (sequential): nothing predicted slower than it is eligible, and when measuring it is measured too.
    ``graphs``: every measured candidate is also measured as a CUDA graph (the cost model does not predict
    graphs), so "whole batch, one lane" is measured both ways and the winner is the fastest measured.
    ``always``: candidates measured whatever their prediction (the ``eager`` floor; never as graphs).
    The SM splits of a measured candidate are searched by measurement: every eligible candidate that differs
    from one of the ``top_k`` only in its SM options (:func:`sm_family`) is measured as well.
    ``bounded``: candidates measured whatever their rank (those a phase bound applies to: the search sizes their
    partitions by measurement); ``admissible(c)`` says why a measured candidate may not win (its phase broke
    the bound), or ``None``.
    """
    if not candidates:
        raise DynaflowError("autotune needs at least one candidate (the sequential baseline).")
    trials: list[Trial] = []
    for cand in _progress(candidates, f"dynaflow autotune {bucket}"):
        try:
            split, seconds = predict(cand)
            trials.append(Trial(cand, split, seconds))
        except DynaflowError as exc:
            if not trials:  # the baseline: the same error (a ConfigError for a bad option), with the bucket
                raise type(exc)(f"autotune {bucket}: the sequential baseline could not be planned: {exc}") from None
            trials.append(Trial(cand, None, None, note=f"not applicable: {str(exc).splitlines()[0][:80]}"))
    base = trials[0]
    eligible = [t for t in trials if t.predicted is not None and t.predicted <= base.predicted * (1 + 1e-9)]
    trials = [t if t in eligible or t.predicted is None else Trial(t.candidate, t.split, t.predicted,
                                                                   note="predicted slower than sequential")
              for t in trials]
    ranked = sorted((t for t in eligible if t.candidate not in always), key=lambda t: t.predicted)  # type: ignore[arg-type, return-value]
    if measure is None or top_k <= 0:
        best = ranked[0]
        speed = base.predicted / best.predicted if best.predicted else 1.0
        reason = f"best prediction on the cost model ({speed:.2f}x of sequential predicted); nothing measured"
        return TuneResult(bucket, tuple(trials), best, reason)
    to_measure = ranked[:top_k]
    families = {sm_family(t.candidate) for t in to_measure}  # the best predictions' other SM splits, measured too
    to_measure += [t for t in ranked if t not in to_measure and sm_family(t.candidate) in families]
    to_measure += [t for t in ranked if t.candidate in bounded and t not in to_measure]
    if base not in to_measure:
        to_measure.append(base)
    if graphs:
        variants = [Trial(t.candidate.with_graphs(), t.split, t.predicted, note="CUDA graph") for t in to_measure
                    if t.candidate not in always]
        trials += variants
        to_measure += variants
    to_measure += [t for t in trials if t.candidate in always and t not in to_measure and t.predicted is not None]
    measured: dict[Candidate, float] = {}
    for t in to_measure:
        measured[t.candidate] = measure(t.candidate)
    barred: dict[Candidate, str] = {}
    if admissible is not None:
        for t in to_measure:
            plain = replace(t.candidate, graphs=False)
            if t is not base and plain not in always and plain not in barred:
                why = admissible(plain)
                if why:
                    barred[plain] = why
    trials = [Trial(t.candidate, t.split, t.predicted, measured.get(t.candidate),
                    "; ".join(n for n in (t.note, barred.get(replace(t.candidate, graphs=False), "")) if n))
              for t in trials]
    by_cand = {t.candidate: t for t in trials}
    contenders = [by_cand[t.candidate] for t in to_measure if replace(t.candidate, graphs=False) not in barred]
    best = min(contenders, key=lambda t: t.measured)  # type: ignore[arg-type, return-value]
    base_t = by_cand[base.candidate]
    speed = base_t.measured / best.measured if best.measured else 1.0
    if best is base_t:
        reason = f"no candidate beat sequential on the real executor (measured {len(to_measure)} of {len(trials)})"
    elif best.candidate in always:
        reason = f"the captured graph as is ({best.candidate!r}): {speed:.2f}x of sequential measured; nothing beat it"
    elif best.candidate == base.candidate.with_graphs():
        reason = f"sequential as one CUDA graph: {speed:.2f}x of sequential measured; no split beat it"
    else:
        predicted = base.predicted / best.predicted if best.predicted else 1.0  # type: ignore[operator]
        reason = (f"fastest measured of the {len(to_measure) - 1} best predictions: {speed:.2f}x of sequential measured, "
                  f"{predicted:.2f}x predicted")
    if barred:
        reason += f"; {len(barred)} measured candidate(s) broke a phase bound"
    return TuneResult(bucket, tuple(trials), best, reason)


BUCKET_POLICIES = ("pow2", "exact")


def _pow2_ceil(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def bucket_key(info: InputInfo, policy: str = "exact") -> str:
    """Which inputs share one tuning decision.

    ``exact``: every batch size, request count and prefill count is its own bucket. ``pow2``: rows and
    requests are rounded up to a power of two and the phases reduced to decode / prefill / mixed, so a
    serving engine whose token count changes every step tunes once per bucket, not once per step. Example:
    37 rows in 5 decode requests → ``rows<=64,requests<=8,decode``; 40 rows in 7 → the same bucket.
    """
    if policy == "exact":
        extra = ""
        if info.request_lengths is not None:
            extra += f",requests={len(info.request_lengths)}"
        if info.request_phases is not None:
            extra += f",prefill={info.request_phases.count('prefill')}"
        return f"batch={info.batch_size}{extra}"
    if policy != "pow2":
        raise DynaflowError(f"unknown tuning bucket policy {policy!r}; choose one of {', '.join(BUCKET_POLICIES)}.")
    key = f"rows<={_pow2_ceil(info.batch_size)}"
    if info.request_lengths is not None:
        key += f",requests<={_pow2_ceil(len(info.request_lengths))}"
    if info.request_phases is not None:
        phases = set(info.request_phases)
        key += "," + ("mixed" if len(phases) > 1 else next(iter(phases), "decode"))
    return key


class Planner(Protocol):
    """What the :class:`Tuner` needs from a compiled graph: plan a strategy, predict a plan, measure it."""

    label: str

    def split_with(self, strategy: Any, info: InputInfo) -> SplitConfig: ...

    def plan_split(self, info: InputInfo, split: SplitConfig, strategy: Any) -> Any: ...

    def predictor(self, inputs: Sequence[Any]) -> Callable[[Any], float]: ...

    def measure(self, plan: Any, inputs: Sequence[Any], repeats: int, graphs: bool = False,
                passthrough: bool = False) -> float: ...


@dataclass(frozen=True)
class TuneSetup:
    """The graph-side facts of a search: the model hash, segment resources, SMs, the key suffix (device, dtype,
    executor) of the disk cache, whether CUDA-graph variants can be measured, and the distributed planner."""

    model: str
    resources: frozenset[Any]
    num_sms: int | None
    granularity: int
    device: str
    executor: str
    graphs: bool = False
    """The executor can run the step as a CUDA graph: measured candidates are also measured that way."""
    passthrough: bool = True
    """A candidate may run the captured graph as is (not when ``cuda_graphs`` makes every step a graph)."""
    replayable: bool = True
    """Running the step again to time it changes nothing the caller sees (see ``GraphPlanner.setup``)."""
    distributed: Any = None
    cost: str = ""
    """The cost model's description (``config.cost``): it ranks the candidates, so it is part of the cache key."""


class Tuner:
    """Runs a strategy's :class:`~dynaflow.strategies.base.SearchSpec` for one compiled graph: one winner per
    tuning bucket, found by :func:`autotune` (or read from the disk cache), reused by later batches."""

    def __init__(self, planner: Planner, spec: Any, strategy: Any):
        self.planner = planner
        self.spec = spec
        self.strategy = strategy
        self.results: dict[str, TuneResult] = {}
        """``TuneResult`` per bucket key."""
        self.winners: dict[str, Any] = {}
        """The winning strategy per bucket key: later batches of a bucket reuse it untuned."""

    def bucket_winner(self, info: InputInfo) -> tuple[str, Any, bool]:
        """(tuning bucket of ``info``, its winner so far, whether that winner can split this batch)."""
        bucket = bucket_key(info, self.spec.buckets)
        won = self.winners.get(bucket)
        if won is None:
            return bucket, None, True
        try:
            self.planner.split_with(won, info)
            return bucket, won, True
        except DynaflowError as exc:
            log.info("%s: %s's winner %s does not apply to batch %d (%s)", self.planner.label, bucket, won.describe(),
                     info.batch_size, str(exc).splitlines()[0])
            return bucket, won, False

    def tune(self, info: InputInfo, inputs: Sequence[Any], setup: Callable[[], TuneSetup]) -> Any:
        bucket, won, usable = self.bucket_winner(info)
        if won is not None and usable:
            return won
        if won is not None:  # the bucket's winner cannot split this batch: tune it on its own
            bucket = bucket_key(info, "exact")
        won = self.winners[bucket] = self.search(info, inputs, bucket, setup())
        return won

    def lockstep(self, info: InputInfo, inputs: Sequence[Any], setup: Callable[[], TuneSetup], distributed: Any) -> Any:
        """With ranks agreeing on the split: the strategy for this call, decided with the other ranks.

        Every call, the ranks compare their tuning buckets (one tiny all_reduce). A bucket that every rank
        holds and that has no winner yet is searched by all ranks together, in the same order, so that the
        search's own collectives (planning checks, measured steps) pair up; predicted and measured times
        are the maximum over ranks. While the ranks' buckets differ, this call runs sequentially (one
        nano-batch, agreed) rather than tuning alone. Winners therefore stay the same on every rank. A rank may
        hold another winner, or none, for the same bucket (a graph it alone captured: other strides, another grad
        mode); then every rank searches the bucket again, together."""
        bucket, won, usable = self.bucket_winner(info)  # set only in lockstep
        same, smallest, same_winner = distributed.agree_key(f"{bucket}|{'usable' if usable else 'not usable'}",
                                                            info.batch_size, repr(won))
        if not same or not usable:
            log.info("%s: ranks differ in tuning bucket or in whether its winner applies (this rank: %s); "
                     "running this step sequentially", self.planner.label, bucket)
            return self.spec.fallback
        if won is None or not same_winner:
            with distributed.lockstep():
                won = self.winners[bucket] = self.search(info, inputs, bucket, setup(), lockstep_batch=smallest)
        return won

    def search(self, info: InputInfo, inputs: Sequence[Any], bucket: str, setup: TuneSetup,
               lockstep_batch: int | None = None) -> Any:
        """Run (or read from the disk cache) the search for ``bucket`` on this batch.

        ``lockstep_batch``: the ranks search together; candidates come from the smallest batch among them so
        every rank tries the same list, times are the maximum over ranks, and the disk cache is not used
        (ranks could disagree about what it holds)."""
        key = f"{setup.model}|{bucket}|{setup.device}|{info.dtype}|{setup.executor}|{setup.cost}|{self.strategy!r}"
        dist = setup.distributed if lockstep_batch is not None else None
        cache = TuneCache() if self.spec.cache and dist is None else None
        cached = self._from_cache(cache, key, bucket, info, setup)
        if cached is not None:
            return cached
        space = _canonical_info(info, lockstep_batch) if dist is not None else info
        cands = self.spec.candidates(space, set(setup.resources), setup.num_sms, setup.granularity)
        floors = [c for c in cands if _passthrough(c)]
        if not setup.passthrough:  # every step runs as the config's CUDA graph: no candidate runs the graph as is
            cands, floors = [c for c in cands if c not in floors], []
        predict, measure, build = self._callables(info, inputs, dist)
        measuring = self.spec.measure_top_k > 0
        if measuring and not setup.replayable:
            log.info("%s: the graph calls ops whose effects dynaflow cannot see (an engine's kernels); autotune "
                     "predicts only, it does not run the step again to time it", self.planner.label)
            measuring = False
        if dist is not None:
            predict = _agreed(cands, predict, dist)
        bound = self.spec.phase_bound if measuring and dist is None else None
        bounded = [c for c in cands if bound is not None and c not in floors and _applies(bound, build, c)]
        admissible = self._admissible(bound, build, info, inputs) if bounded else None
        result = autotune(cands, bucket, predict, measure if measuring else None, self.spec.measure_top_k,
                          graphs=setup.graphs and measuring, always=floors, bounded=bounded, admissible=admissible)
        result = replace(result, tuned_on=info.batch_size)
        self.results[bucket] = result
        if cache is not None:
            cache.put(key, result)
        if knobs.debug_level() >= 1:
            log.info("%s\n%s", self.planner.label, result.table())
        return self.build(result.winner.candidate)

    def build(self, cand: Candidate) -> Any:
        """The strategy ``cand`` names, as the search runs it (see :meth:`_wrapped`)."""
        return self._wrapped(cand.build())

    def _wrapped(self, strategy: Any) -> Any:
        """``strategy`` wrapped by the spec's ``wrap`` (an integration's request alignment), if it has one."""
        return self.spec.wrap(strategy) if self.spec.wrap is not None else strategy

    def _from_cache(self, cache: "TuneCache | None", key: str, bucket: str, info: InputInfo, setup: TuneSetup) -> Any:
        hit = cache.get(key) if cache is not None else None
        if hit is not None and hit[0].graphs and not setup.graphs:  # an edited (or foreign) entry: never measured so
            log.warning("autotune cache %s: ignoring entry %r: it runs %s as a CUDA graph, which the %r executor "
                        "does not capture here; tuning again", cache.path, key, hit[0].strategy, setup.executor)
            hit = None
        built = cache.build(key, hit[0]) if cache is not None and hit is not None else None
        if hit is None or built is None:
            return None
        built = self._wrapped(built)
        trial = Trial(hit[0], None, None, note="cached")
        self.results[bucket] = TuneResult(bucket, (trial,), trial, hit[1], from_cache=True, tuned_on=info.batch_size)
        return built

    def _admissible(self, bound: PhaseBound, build: Callable[[Candidate], Any], info: InputInfo,
                    inputs: Sequence[Any]) -> Callable[[Candidate], str | None]:
        """Whether a candidate keeps ``bound``: its phase's finish time in its own measured runs against the
        phase's standalone time (its launches' summed durations in a sequential run of the same split)."""
        planner, repeats, alone = self.planner, self.spec.repeats, {}

        def check(cand: Candidate) -> str | None:
            plan = build(cand)
            if not bound.applies(plan):
                return None
            try:
                if plan.split not in alone:
                    seq = planner.plan_split(info, plan.split, Sequential())
                    alone[plan.split] = busy_time(planner.timelines(seq, inputs, repeats),
                                                  phase_ops(seq.program, bound.phase))
                finish = finish_time(planner.timelines(plan, inputs, repeats), phase_ops(plan.program, bound.phase))
            except DynaflowError as exc:  # a bound that cannot be checked is not kept
                return f"{bound.phase} time not measured ({str(exc).splitlines()[0][:80]}): not eligible"
            log.info("%s: %r: %s finished at %.3f ms, %.3f ms standalone", planner.label, cand, bound.phase,
                     finish * 1e3, alone[plan.split] * 1e3)
            return bound.verdict(finish, alone[plan.split])

        return check

    def _callables(self, info: InputInfo, inputs: Sequence[Any], dist: Any
                   ) -> tuple[Callable[[Candidate], Any], Callable[[Candidate], float], Callable[[Candidate], Any]]:
        """``predict``, ``measure`` and ``build`` (its plan) of every candidate, planning each once."""
        planner = self.planner
        plans: dict[Any, Any] = {}
        seconds_of = planner.predictor(inputs)

        def build(cand: Candidate) -> Any:
            cand = replace(cand, graphs=False)  # a CUDA-graph variant runs its candidate's plan
            if cand not in plans:
                strategy = self.build(cand)
                split = planner.split_with(strategy, info)
                if dist is not None:
                    split = dist.agree(split, lambda n: strategy.split_config(replace(info, requested_nano_batches=n)))
                plans[cand] = planner.plan_split(info, split, strategy)
            return plans[cand]

        def predict(cand: Candidate) -> tuple[SplitConfig, float]:
            plan = build(cand)
            return plan.split, seconds_of(plan)

        def measure(cand: Candidate) -> float:
            seconds = planner.measure(build(cand), inputs, self.spec.repeats, graphs=cand.graphs,
                                      passthrough=_passthrough(cand))
            return dist.max_over_ranks([seconds])[0] if dist is not None else seconds

        return predict, measure, build


SM_OPTIONS = frozenset({"sm_counts", "prefill_sms", "decode_sms"})
"""Strategy options that only say how many SMs a lane gets."""


def sm_family(cand: Candidate) -> tuple[Any, ...]:
    """A candidate without its SM options: candidates of one family differ only in how they split the SMs."""
    return (cand.strategy, tuple(kv for kv in cand.options if kv[0] not in SM_OPTIONS), cand.graphs)


def _applies(bound: PhaseBound, build: Callable[[Candidate], Any], cand: Candidate) -> bool:
    """Whether ``bound`` applies to the candidate's plan (a candidate that cannot be planned: no)."""
    try:
        return bound.applies(build(cand))
    except DynaflowError:
        return False


def _passthrough(cand: Candidate) -> bool:
    """Whether the candidate runs the captured graph as is (``eager``) rather than a plan."""
    try:
        return bool(cand.build().passthrough)
    except DynaflowError:
        return False


def _agreed(cands: Sequence[Candidate], predict: Callable[[Candidate], tuple[SplitConfig, float]],
            dist: Any) -> Callable[[Candidate], tuple[SplitConfig, float]]:
    """Predict every candidate here, then take each candidate's slowest rank."""
    local: dict[Any, tuple[SplitConfig, float] | DynaflowError] = {}
    for cand in cands:
        try:
            local[cand] = predict(cand)
        except DynaflowError as exc:
            local[cand] = exc
    slowest = dist.max_over_ranks([r[1] if isinstance(r, tuple) else float("inf") for r in local.values()])
    agreed = dict(zip(local, slowest))

    def agreed_predict(cand: Candidate) -> tuple[SplitConfig, float]:
        mine = local[cand]
        if isinstance(mine, DynaflowError):
            raise mine
        if agreed[cand] == float("inf"):
            raise StrategyError(f"candidate {cand!r} could not be planned on another rank")
        return mine[0], agreed[cand]

    return agreed_predict


def _canonical_info(info: InputInfo, batch: int | None) -> InputInfo:
    """What the autotuner's candidate list depends on, the same on every rank of a lockstep search: the
    smallest batch among the ranks and whether prefill and decode requests are mixed."""
    assert batch is not None
    mixed = info.request_phases is not None and len(set(info.request_phases)) > 1 and batch >= 2
    return InputInfo(batch, info.device.split(":")[0], info.dtype, requested_nano_batches=info.requested_nano_batches,
                     request_lengths=(batch - 1, 1) if mixed else None,
                     request_phases=("prefill", "decode") if mixed else None)
