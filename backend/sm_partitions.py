"""SM partition planning: which lanes get which SMs of ONE green-context split of the device (pure logic), and
the SM budget of a launch on a partition (torch's SM carveout: :func:`launch_carveouts`, :func:`sm_carveout`,
:func:`available_sms`).

What the CUDA driver allows (driver API, Green Contexts: ``cuDevSmResourceSplitByCount``,
``cuDevResourceGenerateDesc``):

- one split call makes ``nbGroups`` *equal*, disjoint groups of ``minCount`` SMs (rounded to the device
  granularity, :func:`sm_granularity`) plus a remainder holding every SM left over;
- the outputs of a split cannot be split again without first making a green context of them (measured on an
  H100: splitting the remainder a second time failed with CUDA_ERROR_INVALID_RESOURCE_CONFIGURATION);
- one descriptor may combine several outputs (groups and/or the remainder) of the *same* split;
- two splits of the whole device each start from the same SMs, so their groups overlap (what one
  ``torch.cuda.green_contexts.GreenContext.create(num_sms=...)`` per lane did: pytorch issue #195378).

The plan therefore uses one split per lane set:

- a lane without ``sm_count`` is *shared*: it runs on a plain stream over the whole device, so its kernels
  overlap the partitioned lanes' SMs;
- one partitioned lane gets one group of its request rounded to the granularity (:func:`round_sms`);
- with ``k >= 2`` partitioned lanes the LAST one (program order: nanoflow's memory or network lane, never its
  compute lane) takes the remainder: every SM the others do not get, at least what it asked for when the
  requests fit. The driver's remainder carries no co-scheduling guarantee (thread-block clusters), which is
  why it goes to the lane listed last. Each other lane gets its request rounded to the step (rounded up, or
  down where rounding up would eat into the remainder lane's request) as a whole number of equal groups of
  ``min_count`` SMs (the gcd of their counts): ``k - 1`` groups when the requests are equal, more when they
  are not, all from the same single call;
- requests adding up to more SMs than the device has: ``overflow="scale"`` (default) scales every request by
  ``device SMs / requested SMs`` (the ratio is the intent of a config written for a bigger GPU; the
  autotuner's candidates always fit) and logs a WARNING naming the lanes, counts and device SMs;
  ``overflow="error"`` raises :class:`~dynaflow.errors.BackendError` with the same facts. A lane set that
  cannot be partitioned at all (more lanes than the device has minimum-size partitions) raises
  ``BackendError`` in both modes.
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Mapping, Sequence

import torch

from dynaflow.errors import BackendError

__all__ = ["SmPart", "SmPlan", "plan_sm_partitions", "sm_granularity", "round_sms", "planned_sms",
           "launch_carveouts", "sm_carveout", "available_sms"]

log = logging.getLogger(__name__)

OVERFLOW = ("scale", "error")


def sm_granularity(major: int) -> tuple[int, int]:
    """(minimum SMs, step) of a green-context SM partition on a device of compute capability ``major``.

    From the CUDA driver documentation of ``cuDevSmResourceSplitByCount``: 6.x: 1/1, 7.x: 2/2,
    8.x: 4/2, 9.0 and later: 8/8.
    """
    if major >= 9:
        return 8, 8
    if major == 8:
        return 4, 2
    if major == 7:
        return 2, 2
    return 1, 1


def round_sms(requested: int, total: int, major: int) -> int:
    """The SM count a partition of ``requested`` SMs gets on a device with ``total`` SMs: rounded up to the
    device's step, at least its minimum, at most the largest multiple of the step that fits."""
    minimum, step = sm_granularity(major)
    if requested < 1:
        raise ValueError(f"sm_count must be >= 1, got {requested}")
    n = max(minimum, -(-requested // step) * step)
    cap = max(minimum, total // step * step)
    return min(n, cap)


@dataclass(frozen=True)
class SmPart:
    """One partitioned lane of a plan: its request, the SMs planned for it and where they come from."""

    lane: str
    requested: int
    sms: int
    groups: tuple[int, ...] = ()
    """Indices of the split's groups this lane gets (``()`` for the remainder lane)."""
    remainder: bool = False

    @property
    def where(self) -> str:
        if self.remainder:
            return "remainder"
        g = self.groups
        if len(g) == 1:
            return f"group {g[0]}"
        return f"groups {g[0]}-{g[-1]}"

    def __repr__(self) -> str:
        return f"{self.lane}: {self.sms} SMs [{self.where}]"


@dataclass(frozen=True)
class SmPlan:
    """Disjoint SM partitions of one device from ONE ``cuDevSmResourceSplitByCount(nb_groups, device, 0,
    min_count)`` call; ``shared`` lanes run unpartitioned on plain streams."""

    device_sms: int
    parts: tuple[SmPart, ...] = ()
    shared: tuple[str, ...] = ()
    min_count: int = 0
    """``minCount`` of the split: SMs per group (0: no split)."""
    nb_groups: int = 0
    """``nbGroups`` of the split."""
    scaled: bool = False
    """The requests did not fit the device and were scaled down."""

    def part(self, lane: str) -> SmPart | None:
        return next((p for p in self.parts if p.lane == lane), None)

    @property
    def planned_sms(self) -> int:
        return sum(p.sms for p in self.parts)

    def __repr__(self) -> str:
        body = ", ".join(repr(p) for p in self.parts) or "no partitions"
        shared = f"; shared: {', '.join(self.shared)}" if self.shared else ""
        return f"SmPlan({body} of {self.device_sms}{shared})"


def plan_sm_partitions(lanes: Sequence[Any], device_sms: int, major: int, *, overflow: str = "scale") -> SmPlan:
    """Plan disjoint SM partitions for ``lanes`` (objects with ``name`` and ``sm_count``, e.g.
    :class:`~dynaflow.ir.Lane`) on a device with ``device_sms`` SMs of compute capability ``major``.
    See the module docstring for the rules."""
    if overflow not in OVERFLOW:
        raise ValueError(f"overflow={overflow!r} must be one of {OVERFLOW}")
    asked = [(l.name, int(l.sm_count)) for l in lanes if l.sm_count]
    shared = tuple(l.name for l in lanes if not l.sm_count)
    if not asked:
        return SmPlan(device_sms, shared=shared)
    targets, scaled = _targets(asked, device_sms, overflow)
    if len(asked) == 1:
        (name, requested), (t,) = asked[0], targets
        n = round_sms(t, device_sms, major)
        if n > device_sms:
            raise BackendError(f"SM partitions: lane {name!r} cannot get a partition on a device with "
                               f"{device_sms} SMs (the smallest is {n})")
        return SmPlan(device_sms, (SmPart(name, requested, n, (0,)),), shared, n, 1, scaled)
    counts, rest = _fit(asked, targets, device_sms, major)
    unit = math.gcd(*counts)
    parts, first = [], 0
    for (name, requested), n in zip(asked, counts):
        parts.append(SmPart(name, requested, n, tuple(range(first, first + n // unit))))
        first += n // unit
    name, requested = asked[-1]
    parts.append(SmPart(name, requested, rest, remainder=True))
    return SmPlan(device_sms, tuple(parts), shared, unit, first, scaled)


def _describe(pairs: Sequence[tuple[str, int]]) -> str:
    return ", ".join(f"{name}={n}" for name, n in pairs)


def _targets(asked: Sequence[tuple[str, int]], total: int, overflow: str) -> tuple[list[int], bool]:
    """The SM counts to plan for: the requests, or (over-subscribed, ``overflow="scale"``) the requests
    scaled by ``total / sum``, keeping their ratio."""
    want = sum(n for _, n in asked)
    if want <= total:
        return [n for _, n in asked], False
    msg = (f"SM partitions: lanes {_describe(asked)} ask for {want} SMs but the device has {total}")
    if overflow == "error":
        raise BackendError(f"{msg}; lower the lanes' sm_count (strategy option sm_counts) to at most {total} "
                           "SMs in all, or let them be scaled (overflow='scale')")
    scaled = [max(1, n * total // want) for _, n in asked]
    log.warning("%s; scaled to %s, keeping their ratio", msg,
                _describe([(name, n) for (name, _), n in zip(asked, scaled)]))
    return scaled, True


def _fit(asked: Sequence[tuple[str, int]], targets: Sequence[int], total: int, major: int) -> tuple[list[int], int]:
    """SM counts of the group lanes (all lanes but the last) and the remainder left for the last lane.

    Group lanes are multiples of ``q`` (the step; with several group lanes also a multiple of the minimum,
    so that the gcd of their counts is a valid ``minCount``) and at least the minimum. Rounded up where the
    remainder still covers the last lane's request, else rounded down, then the largest groups shrink by
    ``q`` until it does (or every group is at its minimum)."""
    minimum, step = sm_granularity(major)
    *group_targets, last = targets
    q = step if len(group_targets) == 1 else math.lcm(minimum, step)
    qmin = -(-minimum // q) * q
    need = max(minimum, last)
    counts = [max(qmin, -(-t // q) * q) for t in group_targets]
    if total - sum(counts) < need:
        counts = [max(qmin, t // q * q) for t in group_targets]
        while total - sum(counts) < need:
            big = max(range(len(counts)), key=lambda i: (counts[i], -i))
            if counts[big] <= qmin:
                break
            counts[big] -= q
    rest = total - sum(counts)
    if rest < minimum:
        raise BackendError(
            f"SM partitions: lanes {_describe(asked)} cannot get disjoint partitions on a device with {total} SMs: "
            f"{len(asked)} partitions need at least {len(group_targets) * qmin + minimum} SMs (at least {minimum} "
            f"each, in steps of {step}); give fewer lanes an sm_count")
    if rest < last:
        log.info("SM partitions: lane %r gets the remaining %d SMs, fewer than the %d it asked for, after rounding "
                 "%s to the device granularity", asked[-1][0], rest, last,
                 _describe([(name, n) for (name, _), n in zip(asked, counts)]))
    return counts, rest


def planned_sms(lanes: Sequence[Any], device_sms: int, major: int) -> dict[str, int]:
    """Lane name → the SMs :func:`plan_sm_partitions` gives it (partitioned lanes only; ``{}`` where the lanes
    cannot be partitioned on this device: they then run on plain streams)."""
    if not any(l.sm_count for l in lanes):
        return {}
    try:
        plan = plan_sm_partitions(lanes, device_sms, major)
    except BackendError:
        return {}
    return {p.lane: p.sms for p in plan.parts}


def launch_carveouts(launches: Iterable[Any], granted: Mapping[str, int | None], device_sms: int) -> dict[int, int]:
    """Launch id → the SMs torch's SM carveout should hold back while it runs: ``device_sms - granted`` for every
    launch on a lane granted fewer SMs than the device. Kernels that size their grid for the whole device (cuBLAS's
    persistent GEMMs, Inductor's persistent templates, :func:`available_sms` readers) then fit the lane's
    partition instead of running 1.5-2 waves on it."""
    out: dict[int, int] = {}
    for launch in launches:
        n = granted.get(launch.lane)
        if n and n < device_sms:
            out[id(launch)] = device_sms - n
    return out


@contextlib.contextmanager
def sm_carveout(carveout: int | None) -> Iterator[None]:
    """torch's SM carveout set to ``carveout`` inside the block and the caller's value restored after (``None``
    or a torch without the knob: nothing changes)."""
    if carveout is None or not hasattr(torch._C, "_set_sm_carveout_experimental"):
        yield
        return
    before = torch._C._get_sm_carveout_experimental()
    torch._C._set_sm_carveout_experimental(carveout)
    try:
        yield
    finally:
        torch._C._set_sm_carveout_experimental(before)


def available_sms(device: torch.device | int | None = None) -> int:
    """The SMs a kernel launched now may size its grid for: the device's, less torch's SM carveout (which the
    cuda executor sets to the SMs a partitioned lane does not have; Inductor reads the same value)."""
    total = torch.cuda.get_device_properties(device).multi_processor_count
    get = getattr(torch._C, "_get_sm_carveout_experimental", None)
    carveout = get() if get is not None else None
    return max(1, total - (carveout or 0))
