"""Lanes → CUDA streams, with optional SM partitions through green contexts.

A lane without ``sm_count`` gets a plain ``torch.cuda.Stream`` (kernels of all lanes share every SM). A
lane with ``sm_count`` asks for a green context limited to that many SMs, rounded to what the device can
grant (:func:`round_sms`: Hopper and later in multiples of 8, at least 8), and runs on a stream of that
context. Two mechanisms are feature-detected, never version-sniffed:

1. torch's ``torch.cuda.green_contexts.GreenContext.create(num_sms=...)`` and its ``.Stream()``;
2. cuda-python's driver API (``cuDevSmResourceSplitByCount``, ``cuDevResourceGenerateDesc``,
   ``cuGreenCtxCreate``, ``cuGreenCtxStreamCreate``) wrapped with ``torch.cuda.ExternalStream``.

Where neither works the lane falls back to a plain stream and a warning is logged — never a crash.
:class:`LaneStream` reports what each lane was granted.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from dynaflow.ir import Lane

__all__ = ["LaneStream", "sm_granularity", "round_sms", "make_lane_streams", "green_context_support"]

log = logging.getLogger(__name__)


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
class LaneStream:
    """The stream a lane runs on and what SM partition it was granted."""

    lane: str
    stream: Any = None
    requested_sms: int | None = None
    granted_sms: int | None = None
    """SMs of the partition (``None``: the lane shares the whole device). The driver's count where it
    reports one (cuda-python), else the request rounded to the device granularity (torch's API)."""
    mechanism: str = "stream"
    """``stream`` (plain), ``torch-green-context``, ``cuda-python-green-context`` or ``fallback``."""
    context: Any = None
    """The green context object, kept alive as long as its stream is used."""

    def __repr__(self) -> str:
        sm = "" if self.requested_sms is None else f", sm {self.requested_sms}->{self.granted_sms}"
        return f"LaneStream({self.lane!r}, {self.mechanism}{sm})"


def green_context_support() -> str | None:
    """Which green-context mechanism this process can use: ``"torch"``, ``"cuda-python"`` or ``None``."""
    try:
        from torch.cuda import green_contexts as gc  # type: ignore[attr-defined]

        if (getattr(gc, "SUPPORTED", True) and hasattr(gc, "GreenContext") and hasattr(gc.GreenContext, "create")
                and hasattr(gc.GreenContext, "Stream")):
            return "torch"
    except Exception:  # pragma: no cover - depends on the torch build
        pass
    if _driver() is not None:
        return "cuda-python"
    return None


def _driver() -> Any:
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


def _check(result: Any) -> Any:
    err, *rest = result if isinstance(result, tuple) else (result,)
    if int(getattr(err, "value", err)) != 0:
        raise RuntimeError(f"CUDA driver error {err}")
    return rest[0] if len(rest) == 1 else tuple(rest)


def _driver_green(lane: Lane, n: int, device: int) -> tuple[Any, Any, int | None]:
    """cuda-python driver calls: split one group of ``n`` SMs off the device, make a green context and a
    non-blocking stream on it; the driver reports the SMs it granted."""
    drv = _driver()
    _check(drv.cuInit(0))  # torch initialised the runtime; the driver API of cuda-python needs its own init
    dev = _check(drv.cuDeviceGet(device))
    res = _check(drv.cuDeviceGetDevResource(dev, drv.CUdevResourceType.CU_DEV_RESOURCE_TYPE_SM))
    groups, _count, _remaining = _check(drv.cuDevSmResourceSplitByCount(1, res, 0, n))
    group = groups[0] if isinstance(groups, (list, tuple)) else groups
    desc = _check(drv.cuDevResourceGenerateDesc([group], 1))
    ctx = _check(drv.cuGreenCtxCreate(desc, dev, drv.CUgreenCtxCreate_flags.CU_GREEN_CTX_DEFAULT_STREAM))
    raw = _check(drv.cuGreenCtxStreamCreate(ctx, drv.CUstream_flags.CU_STREAM_NON_BLOCKING, 0))
    granted = getattr(getattr(group, "sm", None), "smCount", None)
    return ctx, torch.cuda.ExternalStream(int(raw), device=torch.device("cuda", device)), granted


def make_lane_streams(lanes: Sequence[Lane], device: torch.device | int | None = None) -> tuple[LaneStream, ...]:
    """One :class:`LaneStream` per lane (see the module docstring). Needs CUDA."""
    if device is None:
        index = torch.cuda.current_device()
    else:
        d = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
        index = d.index if d.index is not None else torch.cuda.current_device()
    props = torch.cuda.get_device_properties(index)
    mechanism = green_context_support() if any(l.sm_count for l in lanes) else None
    out = []
    for lane in lanes:
        if not lane.sm_count:
            out.append(LaneStream(lane.name, torch.cuda.Stream(device=index, priority=_priority(lane))))
            continue
        granted = round_sms(lane.sm_count, props.multi_processor_count, props.major)
        if granted != lane.sm_count:
            log.info("lane %r: %d SMs requested, %d granted (granularity of compute capability %d.%d)",
                     lane.name, lane.sm_count, granted, props.major, props.minor)
        makers = {"torch": _torch_green, "cuda-python": _driver_green}
        tried = [m for m in (mechanism, "cuda-python") if m in makers]
        made = None
        for m in dict.fromkeys(tried):
            try:
                ctx, stream, reported = makers[m](lane, granted, index)
                made = LaneStream(lane.name, stream, lane.sm_count, reported or granted, f"{m}-green-context", ctx)
                break
            except Exception as exc:  # noqa: BLE001 - any failure falls back to a plain stream
                log.warning("lane %r: green context via %s failed (%s: %s)", lane.name, m, type(exc).__name__, exc)
        if made is None:
            log.warning("lane %r asked for %d SMs but green contexts are unavailable here; it runs on a plain stream "
                        "sharing all %d SMs", lane.name, lane.sm_count, props.multi_processor_count)
            made = LaneStream(lane.name, torch.cuda.Stream(device=index, priority=_priority(lane)), lane.sm_count, None,
                              "fallback")
        out.append(made)
    return tuple(out)


def _priority(lane: Lane) -> int:
    """CUDA stream priority: lower numbers are higher priority; a lane's ``priority`` > 0 maps to high."""
    if not lane.priority:
        return 0
    lo, hi = torch.cuda.Stream.priority_range()  # (least, greatest) e.g. (0, -5)
    return hi if lane.priority > 0 else lo
