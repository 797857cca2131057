"""Stale copies: where a nano-batch split would let an access of a tensor written in place miss the write.

A split segment's output is a fresh tensor per nano-batch, and a whole-batch reader (a barrier, the graph
output) gets a copy of those rows, merged when they were made. A write then reaches one copy only, and an
access of another copy after it sees the old values (``v = x * 2`` split; ``v[0] = 1`` in a barrier; ``v + 1``
split again). :func:`stale_copies` gives every access of a written storage its :data:`Home` and returns the
split segments that must run whole; ``partition.whole_where_written`` applies them until none is left.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Collection, Mapping

import torch
import torch.fx

from dynaflow.frontend.effects import (aliases_of, is_view, reads_metadata_only, storage_root, view_base,
                                       write_targets)
from dynaflow.frontend.rules import op_short_name

__all__ = ["StaleCopy", "Home", "stale_copies", "written_storage_users"]

MAYBE_VIEW_OPS = {"contiguous", "reshape", "reshape_as", "flatten", "ravel"}
"""Views whose result is a copy or a view depending on strides, which differ between the whole batch and a
row slice of it (``x.T.contiguous()`` copies on many rows and aliases ``x`` on one)."""

Home = tuple[str, torch.fx.Node]
"""Which copy of a storage an access touches: ``("real", root)`` the one tensor (an input, a weight, or made by
a whole-batch segment), ``("nano", root)`` the per-nano-batch tensors a split segment made, ``("copy", value)``
the whole-batch copy of a split segment's ``value`` that a whole-batch reader gets, ``("maybe", node)`` the
result of a :data:`MAYBE_VIEW_OPS` node in a split segment (a copy on some nano-batches, a view on others)."""


@dataclass(frozen=True)
class StaleCopy:
    """Evidence that a split would leave a stale copy: ``writer`` writes ``value`` (a tensor or a view of it) in
    one copy, and ``reader`` (``None``: the graph output, or the caller for an input) reads another after it."""

    value: torch.fx.Node
    reader: torch.fx.Node | None
    writer: torch.fx.Node
    maybe_view: torch.fx.Node | None = None
    """The copy-or-view node (``x.T.contiguous()``) that makes the two copies, when that is the cause."""
    shared_rows: bool = False
    """The cause is a split segment reading ``value`` whole (not its own rows) while nano-batches write rows of
    the same storage: a nano-batch would read rows another one already wrote."""
    aliased_output: bool = False
    """The cause is a graph output that shares storage with another output or an input in eager, which a
    merged copy would not (a later write through one, after a graph break or by the caller, would miss it)."""

    def __repr__(self) -> str:
        reader = self.reader.name if self.reader is not None else "the graph output"
        return f"StaleCopy({self.value.name} written by {self.writer.name}, then read by {reader})"

    def describe(self) -> str:
        """What goes wrong, in a sentence (for ``explain()`` and errors)."""
        if self.reader is not None:
            reader = f"node {self.reader.name!r}"
        elif self.value.op in ("placeholder", "get_attr"):
            reader = "the caller (its input or weight)"
        else:
            reader = "the graph output"
        if self.aliased_output:
            return (f"graph output {self.value.name} shares storage with another graph output or an input, and a "
                    "merged copy of its nano-batches would not: a later write through one would miss the other")
        if self.shared_rows:
            return (f"{reader} reads {self.value.name} whole on every nano-batch, and nano-batches write rows of the "
                    f"same tensor in place (node {self.writer.name!r}): a later nano-batch would read rows an "
                    "earlier one already wrote")
        if self.maybe_view is not None:
            return (f"{self.maybe_view.name} ({op_short_name(self.maybe_view)}) is a copy or a view depending on "
                    f"strides, which differ between the whole batch and its rows; node {self.writer.name!r} writes "
                    f"the tensor in place and {reader} reads it after")
        return (f"{self.value.name}: node {self.writer.name!r} writes it in place and {reader} reads it later from "
                "another copy (a split segment's output is a fresh tensor per nano-batch; a whole-batch reader gets "
                "a copy merged when it was made)")


Access = tuple[int, "torch.fx.Node | None", torch.fx.Node, Home, bool]
"""(position in graph order, the accessing node or ``None`` for the output / the caller, the alias it goes
through, its home, whether it writes)."""


class _Storage:
    """One written storage (``root`` and its aliases) and the homes its accesses touch."""

    def __init__(self, root: torch.fx.Node, writers: list[torch.fx.Node], segment_of: Mapping[torch.fx.Node, int],
                 split: Collection[int], order: Mapping[torch.fx.Node, int], seg_end: Mapping[int, int]):
        self.root, self.writers, self.segment_of, self.split = root, writers, segment_of, split
        self.order, self.seg_end = order, seg_end
        self.aliases = aliases_of(root)

    def made_in(self, a: torch.fx.Node) -> int | None:
        return None if a.op in ("placeholder", "get_attr") else self.segment_of.get(a)

    def value_home(self, a: torch.fx.Node) -> Home:
        """Where ``a`` lives as the segment that made it left it."""
        if a is self.root:
            where = self.made_in(a)
            return ("real", a) if where is None or where not in self.split else ("nano", a)
        if is_view(a) and op_short_name(a) in MAYBE_VIEW_OPS and self.segment_of.get(a) in self.split:
            return ("maybe", a)
        return self.base_home(a)

    def base_home(self, a: torch.fx.Node) -> Home:
        """Where the tensor ``a`` views or writes lives, as ``a`` touches it."""
        base = view_base(a) if is_view(a) else next(t for t in write_targets(a) if t in self.aliases)
        return self.access_home(a, base)  # type: ignore[arg-type]

    def access_home(self, n: torch.fx.Node | None, a: torch.fx.Node) -> Home:
        """Where node ``n`` (``None``: the graph output) touches ``a``."""
        made = self.made_in(a)
        at = self.segment_of.get(n) if n is not None else None
        if made is not None and made in self.split and at != made and (n is None or (at is not None and at not in self.split)):
            return ("copy", a)
        return self.value_home(a)

    def as_of(self, home: Home, t_write: int) -> Home:
        """``home`` for an access after a write at ``t_write``: a maybe-view taken after the write holds the
        written data either way, so it is its base's copy."""
        while home[0] == "maybe" and self.order[home[1]] > t_write:
            home = self.base_home(home[1])
        return home

    def copied_after(self, home: Home, t_write: int, written: Home) -> bool:
        """A whole-batch copy made when its producing segment ended, after a write into its source."""
        made = self.made_in(home[1]) if home[0] == "copy" else None
        return (made is not None and t_write <= self.seg_end[made]
                and self.as_of(self.value_home(home[1]), t_write) == written)

    def accesses(self, end: int) -> list[Access]:
        out: list[Access] = []
        if self.root.op in ("placeholder", "get_attr"):  # the caller's tensor: it reads what the step left there
            out.append((end, None, self.root, ("real", self.root), False))
        for a in self.aliases:
            for user in a.users:
                if user.op == "output":
                    out.append((end, None, a, self.access_home(None, a), False))
                elif not reads_metadata_only(user):
                    writes = user in self.writers and a in write_targets(user)
                    out.append((self.order[user], user, a, self.access_home(user, a), writes))
        return out

    def segment_of_home(self, home: Home) -> int | None:
        """The split segment whose running whole would remove ``home`` as a copy of its own."""
        seg = self.segment_of.get(home[1]) if home[0] == "maybe" else (None if home[0] == "real" else self.made_in(home[1]))
        return seg if seg is not None and seg in self.split else None


def stale_copies(gm: torch.fx.GraphModule, segment_of: Mapping[torch.fx.Node, int],
                 split: Collection[int], has_rows: Callable[[torch.fx.Node], bool] = lambda n: True,
                 trusted: Collection[int] = ()) -> dict[int, StaleCopy]:
    """The split segments that must run whole so that no access of a tensor written in place misses the write.

    Wherever an access follows a write (in graph order, which the schedule keeps for accesses of one storage)
    in another :data:`Home`, the split segments behind both homes are returned, with the evidence.

    Within one split segment the nano-batches also share what is not split by rows: a split segment that reads
    a view of a shared storage whole (``has_rows(view)`` is false: ``x[0]``) while a split segment writes rows
    of it would let a later nano-batch read rows an earlier one already wrote; that reader runs whole too,
    unless it is ``trusted`` (tagged ``batch-local`` or ``nano-context``: the user's or engine's word that each
    nano-batch reads only its own rows, as a paged-attention op reads only its requests' pages)."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    seg_end: dict[int, int] = {}
    for n, seg in segment_of.items():
        seg_end[seg] = max(seg_end.get(seg, -1), order.get(n, -1))
    writers: dict[torch.fx.Node, list[torch.fx.Node]] = {}
    for w in gm.graph.nodes:
        for target in write_targets(w):
            writers.setdefault(storage_root(target), []).append(w)
    found: dict[int, StaleCopy] = {}
    _aliased_outputs(gm, segment_of, split, order, seg_end, found)
    for root, ws in writers.items():
        s = _Storage(root, ws, segment_of, split, order, seg_end)
        accesses = s.accesses(len(order))
        split_writer = next((w for w in ws if segment_of.get(w) in split), None)
        if split_writer is not None and s.value_home(root)[0] == "real":  # one tensor all nano-batches share
            for _, n, a, _, _ in accesses:
                at = segment_of.get(n) if n is not None else None
                if (at is not None and at in split and at not in trusted and not has_rows(a)
                        and view_base(n) is not a and not reads_metadata_only(n)):  # type: ignore[arg-type]
                    found.setdefault(at, StaleCopy(a, n, split_writer, shared_rows=True))
        for t_w, w, _, home_w, is_write in accesses:
            if not is_write:
                continue
            for t, n, a, home, _ in accesses:
                seen = s.as_of(home, t_w)
                if t > t_w and seen != home_w and not s.copied_after(seen, t_w, home_w):
                    maybe = next((h[1] for h in (home_w, seen) if h[0] == "maybe"), None)
                    for h in (home_w, seen):
                        seg = s.segment_of_home(h)
                        if seg is not None:
                            found.setdefault(seg, StaleCopy(a, n, w, maybe))  # type: ignore[arg-type]
    return found


def _aliased_outputs(gm: torch.fx.GraphModule, segment_of: Mapping[torch.fx.Node, int], split: Collection[int],
                     order: Mapping[torch.fx.Node, int], seg_end: Mapping[int, int], found: dict[int, StaleCopy]) -> None:
    """Graph outputs that share storage in eager (a tensor and its view, or a view of an input) must be the one
    tensor here too: a split segment making one of them would hand out a merged copy instead."""
    out_node = next((n for n in gm.graph.nodes if n.op == "output"), None)
    if out_node is None:
        return
    outs = [a for a in _flat_nodes(out_node.args)
            if isinstance(a.meta.get("val", a.meta.get("example_value")), torch.Tensor)]
    groups: dict[torch.fx.Node, list[torch.fx.Node]] = {}
    for o in outs:
        groups.setdefault(storage_root(o), []).append(o)
    for root, group in groups.items():
        from_caller = root.op in ("placeholder", "get_attr")
        if len(set(group)) < 2 and not from_caller:
            continue
        s = _Storage(root, [], segment_of, split, order, seg_end)
        for o in group:
            if o is root and from_caller:
                continue  # the caller's tensor itself
            seg = s.segment_of_home(s.access_home(None, o))
            if seg is not None:
                found.setdefault(seg, StaleCopy(o, None, o, aliased_output=True))


def _flat_nodes(args: object) -> list[torch.fx.Node]:
    out: list[torch.fx.Node] = []
    torch.fx.node.map_arg(args, lambda n: out.append(n) or n)
    return out


def written_storage_users(gm: torch.fx.GraphModule, segment_of: Mapping[torch.fx.Node, int]) -> list[frozenset[int]]:
    """For each storage some node writes in place, the segments that make, view, read or write it (when more
    than one does). The stale-copy analysis assumes they all split the batch at the same rows; a per-resource
    re-split (``SplitConfig.stages``) must not give them different ones."""
    roots = {storage_root(t) for w in gm.graph.nodes for t in write_targets(w)}
    groups = []
    for root in roots:
        segs = set()
        for a in aliases_of(root):
            if a.op not in ("placeholder", "get_attr") and a in segment_of:
                segs.add(segment_of[a])
            segs.update(segment_of[u] for u in a.users
                        if u.op != "output" and u in segment_of and not reads_metadata_only(u))
        if len(segs) > 1:
            groups.append(frozenset(segs))
    return groups
