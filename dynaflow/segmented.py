"""The hand-off between the frontend and the backend: a graph cut into callable segments.

``SegmentedModule`` says, for every value crossing a segment boundary, where it comes from (a graph
input or a segment output) and how it meets the batch (``batch_dim`` or batch-free), so the backend can
slice nano-batch views and merge nano outputs without knowing anything about fx.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Callable

from dynaflow.ir import Segment

__all__ = ["ValueKind", "Value", "OutRef", "SegmentCall", "InputRoles", "SegmentedModule"]


class ValueKind(str, enum.Enum):
    BATCH = "batch"        # a tensor whose dim ``batch_dim`` has size k·batch
    FREE = "free"          # anything that does not depend on the batch (weights, masks of seq, ints)
    BATCH_SIZE = "batch_size"  # an int equal to the batch size (Dynamo lifts the batch symbol as an input)

    def __repr__(self) -> str:
        return self.value


@dataclass(frozen=True)
class Value:
    """A boundary value: a graph input (``source == "input"``, ``index`` = position), a constant
    (``source == "const"``), or output ``index`` of the segment named ``source``."""

    name: str
    kind: ValueKind
    batch_dim: int | None = None
    source: str = "input"
    index: int = 0
    dim_order: tuple[int, ...] | None = None
    """Its dims from outermost to innermost in memory, when eager does not lay it out row-major (a transposed
    copy): a merge buffer of it is laid out alike, so ops whose result follows the layout (random draws fill
    memory in order) see eager's layout."""

    def __repr__(self) -> str:
        dim = f"@dim{self.batch_dim}" if self.kind is ValueKind.BATCH else ""
        return f"{self.name}:{self.kind.value}{dim}<-{self.source}[{self.index}]"


@dataclass(frozen=True)
class OutRef:
    """A leaf of the graph's output structure that refers to a boundary value."""

    name: str


@dataclass(frozen=True)
class SegmentCall:
    """How to call one segment: its callable, the boundary values it takes and the ones it returns."""

    segment: Segment
    fn: Callable[..., Any]
    args: tuple[str, ...]
    outputs: tuple[str, ...]
    returns_tuple: bool

    @property
    def module(self) -> Any:
        """The segment's ``fx.GraphModule`` (``fn`` is its bound ``forward``), or ``None`` for a plain callable."""
        owner = getattr(self.fn, "__self__", self.fn)
        return owner if hasattr(owner, "graph") else None


@dataclass(frozen=True)
class InputRoles:
    """What the graph's flat inputs are to a CUDA-graph replay: their names, the ones the graph writes in place
    (a copied one must be copied back to the caller's tensor), and the ones the caller declared persistent
    (``static_inputs``: read in place, and an error if they move)."""

    names: tuple[str, ...] = ()
    written: frozenset[int] = frozenset()
    declared: frozenset[int] = frozenset()
    aliased: frozenset[int] = frozenset()
    """Inputs some graph output shares storage with (is, or views): that output must be the caller's tensor
    or a view of it, never of a private copy."""

    def name(self, i: int) -> str:
        return self.names[i] if i < len(self.names) else f"input {i}"

    def __repr__(self) -> str:
        def listed(idx: frozenset[int]) -> str:
            return ", ".join(self.name(i) for i in sorted(idx)) or "none"

        aliased = f"; aliased by outputs: {listed(self.aliased)}" if self.aliased else ""
        return (f"InputRoles({len(self.names)} inputs; written: {listed(self.written)}; static: {listed(self.declared)}"
                f"{aliased})")


@dataclass(frozen=True)
class SegmentedModule:
    """A captured graph cut into segments, in program order, with its boundary values."""

    calls: tuple[SegmentCall, ...]
    values: dict[str, Value]
    num_inputs: int
    output_tree: Any
    """The graph's output structure: :class:`OutRef` leaves for boundary values, constants elsewhere."""
    output_is_tuple: bool
    batch_symbol: str | None
    graph_text: str = ""
    constants: dict[str, Any] = field(default_factory=dict)
    """Values with ``source == "const"``: weights the root graph passes to several segments."""
    effect_deps: tuple[tuple[str, str], ...] = ()
    """(earlier, later) segment pairs ordered by an in-place write, not by a value (a KV-cache write before
    the attention that reads the cache placeholder)."""
    inputs: InputRoles = InputRoles()
    """The inputs' names and roles (set by the compiled graph after partitioning)."""

    @property
    def segments(self) -> tuple[Segment, ...]:
        return tuple(c.segment for c in self.calls)

    def segment_deps(self) -> list[tuple[str, str]]:
        """(producer, consumer) segment pairs linked by a boundary value or ordered by an in-place write."""
        producer = {v.name: v.source for v in self.values.values() if v.source not in ("input", "const")}
        deps = set(self.effect_deps)
        for call in self.calls:
            for a in call.args:
                if a in producer:
                    deps.add((producer[a], call.segment.name))
        return sorted(deps)

    def __repr__(self) -> str:
        return f"SegmentedModule({len(self.calls)} segments, {len(self.values)} boundary values)"
