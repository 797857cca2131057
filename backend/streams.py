"""Lanes → CUDA streams, with disjoint SM partitions through green contexts.

A lane without ``sm_count`` gets a plain ``torch.cuda.Stream``: its kernels may use every SM, so they overlap
the partitioned lanes' SMs. The lanes with ``sm_count`` of one lane set share ONE split of the device, planned
by :func:`~dynaflow.backend.sm_partitions.plan_sm_partitions` (groups for all but the last partitioned lane,
the remainder for the last; see that module for rounding and over-subscription), so their partitions are
disjoint. Mechanisms, feature-detected, never version-sniffed:

1. cuda-python's driver API (preferred: it makes disjoint partitions and reports the SMs granted):
   ``cuDevSmResourceSplitByCount`` once, then per lane ``cuDevResourceGenerateDesc`` (its groups, or the
   remainder), ``cuGreenCtxCreate``, ``cuGreenCtxStreamCreate``, wrapped with ``torch.cuda.ExternalStream``;
2. torch's ``torch.cuda.green_contexts.GreenContext.create(num_sms=...)``, for ONE partitioned lane only:
   every call splits the whole device on its own (pytorch #195378) and torch offers no way to split once
   for several contexts, so two such lanes would overlap.

Where neither can make the plan's partitions, the partitioned lanes fall back to plain streams and a WARNING
says so — never a crash, never silently overlapping partitions. :class:`LaneStream` reports what each lane
was granted; :func:`lane_resources` asks the driver what each lane's green context really holds.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from dynaflow.backend.sm_partitions import SmPart, SmPlan, plan_sm_partitions, round_sms, sm_granularity
from dynaflow.errors import BackendError
from dynaflow.ir import Lane

__all__ = ["LaneStream", "sm_granularity", "round_sms", "make_lane_streams", "green_context_support",
           "lane_resources", "release_lane_streams"]

log = logging.getLogger(__name__)

_SPLITS = itertools.count(1)
"""Ids of the driver split calls made by this process (``LaneStream.split``)."""


@dataclass(frozen=True)
class LaneStream:
    """The stream a lane runs on and what SM partition it was granted."""

    lane: str
    stream: Any = None
    requested_sms: int | None = None
    granted_sms: int | None = None
    """SMs of the partition as the driver reports them (cuda-python); ``None`` for a lane that shares the
    whole device, and where the count is unknown (torch's API does not report it)."""
    mechanism: str = "stream"
    """``stream`` (plain), ``cuda-python-green-context``, ``torch-green-context`` or ``fallback``."""
    context: Any = None
    """The green context (a ``CUgreenCtx`` or torch's ``GreenContext``), kept alive as long as its stream."""
    part: SmPart | None = None
    """The planned partition: SMs, the split's group indices, or the remainder."""
    split: int | None = None
    """Id of the driver split call the partition comes from (cuda-python only). Lanes with the same id whose
    ``part.groups`` do not intersect (at most one holding the remainder) have disjoint SMs."""
    handle: Any = None
    """The driver's ``CUstream`` behind ``stream`` (cuda-python only): destroyed with the context."""

    def __repr__(self) -> str:
        sm = ""
        if self.requested_sms is not None:
            granted = "?" if self.granted_sms is None else self.granted_sms
            sm = f", sm {self.requested_sms}->{granted}"
        if self.part is not None:
            sm += f" [{self.part.where}" + ("]" if self.split is None else f" of split {self.split}]")
        return f"LaneStream({self.lane!r}, {self.mechanism}{sm})"


def green_context_support() -> str | None:
    """Which green-context mechanism this process can use: ``"cuda-python"`` (disjoint partitions),
    ``"torch"`` (one partitioned lane per lane set) or ``None``."""
    if _driver() is not None:
        return "cuda-python"
    if _torch_green_supported():
        return "torch"
    return None


def _torch_green_supported() -> bool:
    try:
        from torch.cuda import green_contexts as gc  # type: ignore[attr-defined]

        return bool(getattr(gc, "SUPPORTED", True) and hasattr(gc, "GreenContext")
                    and hasattr(gc.GreenContext, "create") and hasattr(gc.GreenContext, "Stream"))
    except Exception:  # pragma: no cover - depends on the torch build
        return False


def _driver() -> Any:
    """cuda-python's driver module (``cuda.bindings.driver``, or the older ``cuda.cuda``), or ``None``."""
    for name in ("cuda.bindings.driver", "cuda.cuda"):
        try:
            mod = __import__(name, fromlist=["_"])
        except Exception:
            continue
        if hasattr(mod, "cuGreenCtxCreate") and hasattr(mod, "cuDevSmResourceSplitByCount"):
            return mod
    return None


def _torch_green(lane: Lane, n: int, device: int) -> tuple[Any, Any, int | None]:
    """torch's green context; it does not report the granted SM count (pytorch #195378), so ``None``."""
    from torch.cuda.green_contexts import GreenContext  # type: ignore[attr-defined]

    try:
        ctx = GreenContext.create(num_sms=n, device_id=device)
    except TypeError:  # an older positional-only signature
        ctx = GreenContext.create(n, device)
    return ctx, ctx.Stream(), None


def _check(result: Any, call: str = "CUDA driver call") -> Any:
    err, *rest = result if isinstance(result, tuple) else (result,)
    if int(getattr(err, "value", err)) != 0:
        raise RuntimeError(f"{call}: CUDA driver error {err}")
    return rest[0] if len(rest) == 1 else tuple(rest)


def _sm_count(resources: Sequence[Any]) -> int | None:
    """SMs of driver resources (``CUdevResource.sm.smCount``), ``None`` if one does not say."""
    counts = [getattr(getattr(r, "sm", None), "smCount", None) for r in resources]
    return None if any(c is None for c in counts) else sum(int(c) for c in counts)


def _split(drv: Any, plan: SmPlan, index: int) -> tuple[Any, list[Any], Any]:
    """The one split of the lane set: (device, groups, remainder)."""
    _check(drv.cuInit(0), "cuInit")  # torch initialised the runtime; cuda-python's driver API needs its own init
    dev = _check(drv.cuDeviceGet(index), "cuDeviceGet")
    res = _check(drv.cuDeviceGetDevResource(dev, drv.CUdevResourceType.CU_DEV_RESOURCE_TYPE_SM),
                 "cuDeviceGetDevResource")
    groups, made, remaining = _check(drv.cuDevSmResourceSplitByCount(plan.nb_groups, res, 0, plan.min_count),
                                     "cuDevSmResourceSplitByCount")
    groups = list(groups) if isinstance(groups, (list, tuple)) else [groups]
    if int(made) < plan.nb_groups or len(groups) < plan.nb_groups:
        raise RuntimeError(f"cuDevSmResourceSplitByCount made {int(made)} groups of {plan.min_count} SMs, "
                           f"the plan needs {plan.nb_groups}")
    return dev, groups, remaining


def _driver_streams(plan: SmPlan, lanes: Sequence[Lane], index: int) -> dict[str, LaneStream]:
    """Green-context streams for the plan's lanes from ONE ``cuDevSmResourceSplitByCount`` call; each lane's
    descriptor holds its groups (or the remainder); the granted count is the driver's."""
    drv = _driver()
    dev, groups, remaining = _split(drv, plan, index)
    split, by_name, out, made = next(_SPLITS), {l.name: l for l in lanes}, {}, []
    try:
        for part in plan.parts:
            resources = [remaining] if part.remainder else [groups[i] for i in part.groups]
            desc = _check(drv.cuDevResourceGenerateDesc(resources, len(resources)), "cuDevResourceGenerateDesc")
            ctx = _check(drv.cuGreenCtxCreate(desc, dev, drv.CUgreenCtxCreate_flags.CU_GREEN_CTX_DEFAULT_STREAM),
                         "cuGreenCtxCreate")
            made.append((ctx, None))
            raw = _check(drv.cuGreenCtxStreamCreate(ctx, drv.CUstream_flags.CU_STREAM_NON_BLOCKING,
                                                    _priority(by_name[part.lane])), "cuGreenCtxStreamCreate")
            made[-1] = (ctx, raw)
            stream = torch.cuda.ExternalStream(int(raw), device=torch.device("cuda", index))
            out[part.lane] = LaneStream(part.lane, stream, part.requested, _sm_count(resources),
                                        "cuda-python-green-context", ctx, part, split, raw)
    except Exception:
        _release(drv, made)
        raise
    return out


def release_lane_streams(lane_streams: Sequence[LaneStream]) -> None:
    """Destroy the driver streams and green contexts behind ``lane_streams`` once their queued work is done
    (cuda-python lanes; torch frees its own green contexts and plain streams when they are dropped). The
    lanes must not be used afterwards, and no tensor that was ``record_stream``-ed on them may still be alive:
    torch's caching allocator records an event on those streams when such a tensor is freed. Best effort: a
    failure is logged, never raised."""
    made = [(ls.context, ls.handle) for ls in lane_streams if ls.mechanism == "cuda-python-green-context"]
    drv = _driver() if made else None
    if drv is None:
        return
    for ls in lane_streams:
        sync = getattr(ls.stream, "synchronize", None)
        if ls.mechanism == "cuda-python-green-context" and sync is not None:
            try:
                sync()
            except Exception as exc:  # noqa: BLE001 - releasing must not raise (it runs from close and finalizers)
                log.debug("synchronising lane %r before release failed: %s", ls.lane, exc)
    _release(drv, made)
    log.debug("released %d green-context lane(s)", len(made))


def _release(drv: Any, made: Sequence[tuple[Any, Any]]) -> None:
    """Best effort: destroy these streams and green contexts (newest first)."""
    for ctx, raw in reversed(made):
        for call, arg in (("cuStreamDestroy", raw), ("cuGreenCtxDestroy", ctx)):
            if arg is not None and hasattr(drv, call):
                try:
                    getattr(drv, call)(arg)
                except Exception:  # noqa: BLE001 - cleanup after a failure must not hide it
                    pass


def _green_streams(plan: SmPlan, lanes: Sequence[Lane], index: int) -> tuple[dict[str, LaneStream], str]:
    """The plan's partitioned lanes' streams, or ``({}, why not)``."""
    mechanism = green_context_support()
    if mechanism == "cuda-python":
        try:
            return _driver_streams(plan, lanes, index), ""
        except Exception as exc:  # noqa: BLE001 - any failure falls back to plain streams (make_lane_streams warns)
            return {}, f"cuda-python could not make {plan!r} ({type(exc).__name__}: {exc})"
    if mechanism is None:
        return {}, "green contexts are unavailable here (neither cuda-python nor torch.cuda.green_contexts)"
    if len(plan.parts) > 1:
        return {}, ("disjoint partitions for several lanes need cuda-python's driver API (pip install cuda-python): "
                    "torch's GreenContext.create splits the whole device per lane, so the partitions would overlap")
    (part,) = plan.parts
    lane = next(l for l in lanes if l.name == part.lane)
    try:
        ctx, stream, granted = _torch_green(lane, part.sms, index)
    except Exception as exc:  # noqa: BLE001
        return {}, f"torch's green context failed ({type(exc).__name__}: {exc})"
    return {lane.name: LaneStream(lane.name, stream, lane.sm_count, granted, "torch-green-context", ctx, part)}, ""


def make_lane_streams(lanes: Sequence[Lane], device: torch.device | int | None = None, *,
                      overflow: str = "scale") -> tuple[LaneStream, ...]:
    """One :class:`LaneStream` per lane (see the module docstring). Needs CUDA. ``overflow`` is what
    requests adding up to more SMs than the device has do: ``"scale"`` (WARNING) or ``"error"``
    (:class:`~dynaflow.errors.BackendError`); see :mod:`dynaflow.backend.sm_partitions`."""
    index = _device_index(device)
    props = torch.cuda.get_device_properties(index)
    total, made, why = props.multi_processor_count, {}, ""
    if any(l.sm_count for l in lanes):
        try:
            plan = plan_sm_partitions(lanes, total, props.major, overflow=overflow)
        except BackendError as exc:
            if overflow == "error":
                raise
            plan, why = None, str(exc)
        if plan is not None:
            log.info("SM partitions planned: %r", plan)
            made, why = _green_streams(plan, lanes, index)
    unmade = [l for l in lanes if l.sm_count and l.name not in made]
    if len(unmade) == 1:
        log.warning("lane %r asked for %d SMs but got no SM partition: %s; it runs on a plain stream sharing all %d "
                    "SMs", unmade[0].name, unmade[0].sm_count, why, total)
    elif unmade:
        log.warning("lanes %s asked for SM partitions but got none: %s; they run on plain streams sharing all %d SMs",
                    ", ".join(f"{l.name!r} ({l.sm_count} SMs)" for l in unmade), why, total)
    return tuple(made.get(lane.name) or LaneStream(
        lane.name, torch.cuda.Stream(device=index, priority=_priority(lane)), lane.sm_count, None,
        "fallback" if lane.sm_count else "stream") for lane in lanes)


def lane_resources(lane_streams: Sequence[LaneStream]) -> dict[str, int | None]:
    """The SMs each lane's green context really holds, asked from the driver (``cuGreenCtxGetDevResource``
    → ``sm.smCount``); ``None`` for a lane without a cuda-python green context (or without cuda-python)."""
    drv = _driver()
    out: dict[str, int | None] = {}
    for ls in lane_streams:
        if drv is None or ls.mechanism != "cuda-python-green-context":
            out[ls.lane] = None
            continue
        res = _check(drv.cuGreenCtxGetDevResource(ls.context, drv.CUdevResourceType.CU_DEV_RESOURCE_TYPE_SM),
                     "cuGreenCtxGetDevResource")
        out[ls.lane] = _sm_count([res])
    return out


def _device_index(device: torch.device | int | None) -> int:
    if device is None:
        return torch.cuda.current_device()
    d = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
    return d.index if d.index is not None else torch.cuda.current_device()


def _priority(lane: Lane) -> int:
    """CUDA stream priority: lower numbers are higher priority; a lane's ``priority`` > 0 maps to high."""
    if not lane.priority:
        return 0
    lo, hi = torch.cuda.Stream.priority_range()  # (least, greatest) e.g. (0, -5)
    return hi if lane.priority > 0 else lo
