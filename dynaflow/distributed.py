"""torch.distributed glue: ranks agree on the split, the collective order is checked, lanes get communicators.

Everything here is guarded: ``import dynaflow`` works without ``torch.distributed`` (or with it present
but not initialized); the functions below only communicate when a process group is initialized.

Three jobs, all at plan time (the collectives they issue are tiny and go over the model's own group):

* :func:`agree_split` — every rank proposes a :class:`SplitConfig`; one ``all_reduce(MIN)`` makes them agree
  on the nano-batch count (the smallest proposal, so a rank that cannot split forces 1 everywhere).
  Worked example: rank 0 proposes ``8 → 4/4``, rank 1 (batch 1) ``1 → 1``: both use 1 nano-batch. When the
  batch sizes agree but the sizes do not (rank 0 ``6 → 4/2``, rank 1 ``6 → 3/3``), both use the even split
  ``6 → 3/3``, so tensor-parallel collectives see equal shapes on every rank.
* :func:`check_same_order` — all ranks must issue the same collectives in the same order per
  communicator; an ``all_reduce`` of a fingerprint of that order (min and max) proves it before anything runs.
* :func:`lane_group` — a communicator (process group) per ``(group, lane)``: lanes that issue collectives
  concurrently must not share one (gloo pairs operations by issue order; NCCL forbids concurrent use of a
  communicator from several streams). ``new_group`` is collective: every member rank must create the
  same groups in the same order, so callers create them in a canonical order (sorted by group name, then
  lane name) at a point every rank reaches together (see docs/distributed.md).
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import logging
import threading
from typing import Any, Iterable, Sequence

import torch

from dynaflow.errors import ConfigError, ScheduleError
from dynaflow.ir import SplitConfig

__all__ = ["available", "initialized", "world_size", "resolve_group", "group_size", "agree_split",
           "agree_split_state", "fail_agreement",
           "agree_key", "max_over_ranks", "check_same_order", "lane_group", "fingerprint", "clear_lane_groups"]

log = logging.getLogger(__name__)

_lock = threading.Lock()
_lane_groups: dict[tuple[str, str], Any] = {}


def available() -> bool:
    """True when this torch build has ``torch.distributed``."""
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover - every CPU/CUDA wheel has it
        return False
    return dist.is_available()


def initialized() -> bool:
    """True when a default process group is initialized."""
    if not available():
        return False
    import torch.distributed as dist

    return dist.is_initialized()


def world_size() -> int:
    """The default group's size, 1 when torch.distributed is not initialized."""
    if not initialized():
        return 1
    import torch.distributed as dist

    return dist.get_world_size()


def resolve_group(name: str) -> Any:
    """The ProcessGroup registered under ``name`` (the string a captured collective carries)."""
    if not initialized():
        raise ConfigError(
            f"The captured graph issues collectives on process group {name!r}, but torch.distributed is not "
            "initialized in this process. Call torch.distributed.init_process_group(...) (e.g. run under torchrun) "
            "before calling the compiled model."
        )
    from torch.distributed.distributed_c10d import _resolve_process_group

    try:
        return _resolve_process_group(name)
    except Exception as exc:  # noqa: BLE001 - torch raises several types here
        raise ConfigError(
            f"Process group {name!r} named in the captured graph is not registered in this process ({exc}). "
            "Create the group (torch.distributed.new_group) before calling the compiled model."
        ) from None


def group_size(group: Any) -> int:
    import torch.distributed as dist

    return dist.get_world_size(group)


def _device_for(group: Any) -> torch.device:
    import torch.distributed as dist

    backend = str(dist.get_backend(group)).lower()
    if "nccl" in backend and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _multi_rank(group: Any) -> Any:
    """``group`` (the world when ``None``) if torch.distributed is initialized and it has several ranks, else
    ``None``: the agreement functions below communicate only then."""
    if not initialized():
        return None
    import torch.distributed as dist

    group = group if group is not None else dist.group.WORLD
    return group if group_size(group) > 1 else None


def _all_reduce_min(values: Sequence[int], group: Any) -> list[int]:
    import torch.distributed as dist

    t = torch.tensor(list(values), dtype=torch.int64, device=_device_for(group))
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=group)
    return [int(v) for v in t.tolist()]


def _hash63(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") & ((1 << 62) - 1)


def agree_split(proposal: SplitConfig, group: Any = None, resplit: Any = None) -> SplitConfig:
    """The split every rank of ``group`` uses: the smallest proposed nano-batch count wins.

    ``resplit(n)`` (optional) re-asks the strategy for ``n`` nano-batches when this rank proposed another
    count; its answer is used when it has ``n`` parts, else the even split. Ranks with equal batch sizes but
    different splits (sizes or per-resource stages) all take the even split. One ``all_reduce(MIN)`` of eight
    ints; without an initialized group (or with one rank) the proposal is returned unchanged.
    """
    return agree_split_state(proposal, group, resplit)[0]


def agree_split_state(proposal: SplitConfig, group: Any = None, resplit: Any = None,
                      state: str = "") -> tuple[SplitConfig, bool]:
    """:func:`agree_split`, and whether every rank holds the same ``state`` (a text of what the caller planned
    before), in the same all_reduce. Raises :class:`ScheduleError` when another rank's planning failed
    (:func:`fail_agreement`)."""
    group = _multi_rank(group)
    if group is None:
        return proposal, True
    import torch.distributed as dist

    n, batch = proposal.num, proposal.batch_size
    h = _hash63(repr((proposal.sizes, proposal.stages)))
    s = _hash63(state)
    n_min, neg_n_max, b_min, neg_b_max, h_min, neg_h_max, s_min, neg_s_max = _all_reduce_min(
        [n, -n, batch, -batch, h, -h, s, -s], group)
    if n_min <= FAILED:
        raise ScheduleError(f"Planning failed on another rank (see its error) while rank {dist.get_rank()} "
                            f"proposed {proposal}: this rank stops too rather than wait for it.")
    same_state = s_min == -neg_s_max
    n_agreed = min(n_min, max(batch, 1))  # a rank without rows runs one nano-batch of none
    same_everywhere = n_min == -neg_n_max and b_min == -neg_b_max and h_min == -neg_h_max
    if same_everywhere:
        return proposal, same_state
    split = proposal
    if n != n_agreed:
        split = resplit(n_agreed) if resplit is not None else None
        if not isinstance(split, SplitConfig) or split.num != n_agreed or split.batch_size != batch:
            split = SplitConfig.even(batch, n_agreed)
    if b_min == -neg_b_max and (n_min != -neg_n_max or h_min != -neg_h_max):
        split = SplitConfig.even(batch, n_agreed)  # same batch everywhere: identical splits on every rank
    if split != proposal:
        log.info("dynaflow.distributed: rank %d proposed %s; ranks agreed on %s", dist.get_rank(), proposal, split)
    return (dataclasses.replace(split, labels=None) if split.labels and split is not proposal else split), same_state


FAILED = 0
"""The nano-batch count :func:`fail_agreement` proposes: no real split has it."""


def fail_agreement(group: Any = None) -> None:
    """Take part in the split agreement for a rank whose own planning failed (its caller raises that error):
    the other ranks, waiting in it, raise :class:`ScheduleError` instead of waiting until the group's
    timeout."""
    group = _multi_rank(group)
    if group is not None:
        _all_reduce_min([FAILED] * 8, group)


def agree_key(key: str, batch: int, group: Any = None, detail: str = "") -> tuple[bool, int, bool]:
    """Whether every rank of ``group`` holds the same ``key`` (e.g. the autotuner's bucket), the smallest
    ``batch`` among them, and whether they hold the same ``detail`` too (e.g. the bucket's winner: a graph one
    rank alone captured has none yet). One ``all_reduce(MIN)`` of five ints; ``(True, batch, True)`` without a
    group."""
    group = _multi_rank(group)
    if group is None:
        return True, batch, True
    h, d = _hash63(key), _hash63(detail)
    lo, neg_hi, b_min, d_lo, neg_d_hi = _all_reduce_min([h, -h, batch, d, -d], group)
    return lo == -neg_hi, b_min, d_lo == -neg_d_hi


def max_over_ranks(values: Sequence[float], group: Any = None) -> list[float]:
    """Element-wise maximum of ``values`` over the ranks of ``group`` (a step is as slow as its slowest
    rank); ``inf`` stands for "not applicable on this rank". Unchanged without a group."""
    group = _multi_rank(group)
    if group is None:
        return [float(v) for v in values]
    import torch.distributed as dist

    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=_device_for(group))
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return [float(v) for v in t.tolist()]


def fingerprint(order: Iterable[tuple[str, Sequence[str]]]) -> str:
    """A readable, canonical text of ``[(communicator, [collective op, ...]), ...]`` (hashed by the check)."""
    return "\n".join(f"{comm}: {' '.join(ops)}" for comm, ops in sorted(order, key=lambda x: x[0]))


def check_same_order(text: str, group: Any = None, strategy: str = "?", key: str | None = None) -> None:
    """Raise :class:`ScheduleError` on every rank unless all ranks of ``group`` hold the same ``key`` (default
    ``text``; see :func:`fingerprint`); the error shows ``text``. One ``all_reduce(MIN)`` of two ints."""
    group = _multi_rank(group)
    if group is None:
        return
    import torch.distributed as dist

    h = _hash63(text if key is None else key)
    lo, neg_hi = _all_reduce_min([h, -h], group)
    if lo != -neg_hi:
        raise ScheduleError(
            f"Strategy {strategy!r} ordered collectives differently on different ranks (rank {dist.get_rank()} "
            f"issues, per communicator:\n{text}\n), or planning failed on another rank (see its error). Mismatched "
            "collective orders deadlock or pair the wrong tensors. "
            "Fix: make the strategy deterministic (the same schedule for the same graph and split on every rank), "
            "e.g. order network ops by (segment index, nano-batch)."
        )


def _timeout_of(group: Any) -> datetime.timedelta | None:
    try:
        from torch.distributed.distributed_c10d import _get_pg_default_device  # noqa: F401

        opts = group._get_backend(torch.device("cpu")).options  # type: ignore[attr-defined]
        return getattr(opts, "_timeout", None)
    except Exception:  # noqa: BLE001 - best effort; new_group then uses the default timeout
        return None


def lane_group(group_name: str, lane: str, timeout: datetime.timedelta | None = None) -> str:
    """The name of lane ``lane``'s own communicator over the ranks of group ``group_name`` (created once).

    Collective: every rank of the group must call it for the same ``(group_name, lane)`` pairs in the same
    order. The new group has the same ranks, backend and (unless given) timeout as the original.
    """
    key = (group_name, lane)
    with _lock:
        if key in _lane_groups:
            return _lane_groups[key].group_name
    import torch.distributed as dist

    base = resolve_group(group_name)
    ranks = dist.get_process_group_ranks(base)
    kwargs: dict[str, Any] = {"ranks": ranks, "backend": str(dist.get_backend(base))}
    timeout = timeout or _timeout_of(base)
    if timeout is not None:
        kwargs["timeout"] = timeout
    if len(ranks) != dist.get_world_size():
        kwargs["use_local_synchronization"] = True  # only the members create it
    pg = dist.new_group(**kwargs)
    with _lock:
        _lane_groups[key] = pg
    log.info("dynaflow.distributed: lane %r got its own communicator %r over ranks %s (clone of group %r)",
             lane, pg.group_name, ranks, group_name)
    return pg.group_name


def has_lane_group(group_name: str, lane: str) -> bool:
    with _lock:
        return (group_name, lane) in _lane_groups


def clear_lane_groups() -> None:
    """Forget the cached lane communicators (after ``destroy_process_group``)."""
    with _lock:
        _lane_groups.clear()
