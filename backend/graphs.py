"""Capture plan: cut a Program into CUDA-graph pieces around launches that cannot be captured.

A step is captured as *one* CUDA graph holding every lane, nano-batch and segment, except where a
segment is tagged ``no-cudagraph``: such a launch runs eagerly between graph pieces. Pieces are cut from
the program's ``serial_order`` (a topological order of every launch), so each piece is closed under
"happens before": a wait inside a piece is on an event recorded in the same piece or in an earlier one.
Every piece forks from the capture stream into the lanes and joins back, so the join already covers
events of earlier pieces — those waits are dropped from the piece. Pure logic, testable on CPU.
"""

from __future__ import annotations

from dataclasses import dataclass

from dynaflow.backend.program import Instr, Launch, Program, Wait

__all__ = ["Piece", "CapturePlan", "capture_plan", "capturable", "waits_before"]

NO_CUDAGRAPH = "no-cudagraph"


def capturable(launch: Launch) -> bool:
    """A launch may go into a CUDA graph unless its segment is tagged ``no-cudagraph``."""
    return NO_CUDAGRAPH not in launch.segment.hints


@dataclass(frozen=True)
class Piece:
    """A run of launches executed together: per lane, the instructions of this piece (waits kept only
    for events recorded inside the piece). ``graph`` says whether it is captured or run eagerly."""

    index: int
    graph: bool
    lanes: tuple[tuple[Instr, ...], ...]
    order: tuple[Launch, ...]
    """The piece's launches in serial order: the host issue order (every wait's record is issued first)."""

    @property
    def num_launches(self) -> int:
        return len(self.order)

    def __repr__(self) -> str:
        kind = "graph" if self.graph else "eager"
        return f"Piece({self.index}, {kind}, {self.num_launches} launches)"


@dataclass(frozen=True)
class CapturePlan:
    """The pieces of one Program, in execution order."""

    pieces: tuple[Piece, ...]

    @property
    def num_graphs(self) -> int:
        return sum(p.graph for p in self.pieces)

    @property
    def whole(self) -> bool:
        """The whole step is one captured graph."""
        return len(self.pieces) == 1 and self.pieces[0].graph

    def __repr__(self) -> str:
        return f"CapturePlan({', '.join(map(repr, self.pieces))})"


def capture_plan(program: Program, graphs: bool = True) -> CapturePlan:
    """Cut ``program`` into pieces: maximal runs of capturable launches (in serial order), and one eager
    piece per ``no-cudagraph`` launch (consecutive ones share a piece). ``graphs=False``: one eager piece."""
    runs: list[tuple[bool, list[Launch]]] = []
    for launch in program.serial_order:
        g = graphs and capturable(launch)
        if runs and runs[-1][0] == g:
            runs[-1][1].append(launch)
        else:
            runs.append((g, [launch]))
    if not runs:  # a graph with nothing to launch (it returns its inputs): one empty eager piece
        runs.append((False, []))
    lane_index = {lane.name: i for i, lane in enumerate(program.lanes)}
    before = waits_before(program)
    pieces = []
    for idx, (g, launches) in enumerate(runs):
        recorded = {l.event for l in launches if l.event is not None}
        per_lane: list[list[Instr]] = [[] for _ in program.lanes]
        for launch in launches:
            li = lane_index[launch.lane]
            per_lane[li].extend(w for w in before[id(launch)] if w.event in recorded)
            per_lane[li].append(launch)
        pieces.append(Piece(idx, g, tuple(tuple(x) for x in per_lane), tuple(launches)))
    return CapturePlan(tuple(pieces))


def waits_before(program: Program) -> dict[int, tuple[Wait, ...]]:
    """For each launch (by id), the waits that precede it on its lane (after the previous launch)."""
    out: dict[int, tuple[Wait, ...]] = {}
    for instrs in program.streams:
        pending: list[Wait] = []
        for ins in instrs:
            if isinstance(ins, Wait):
                pending.append(ins)
            else:
                out[id(ins)] = tuple(pending)
                pending = []
    return out
