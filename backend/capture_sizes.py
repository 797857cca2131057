"""Capture sizes for CUDA graphs: choosing one for a batch, padding the batch up to it, and undoing it.

A CUDA graph has fixed shapes, so a step is captured once per *capture size* (a batch size from
``capture_sizes``) and a smaller batch is padded up to the next capture size, as vLLM does. Padding is only
correct when every row of the batch is computed independently of the others: a barrier segment that
reduces over the batch (``h.mean(0)``) would see the padding rows. :func:`choose_capture_size` therefore
refuses to pad a graph with barriers (unless the batch hits a capture size exactly) and says how to fix it.

Everything here is pure logic on sizes and tensors, testable on CPU.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from dynaflow.errors import BackendError
from dynaflow.segmented import OutRef, SegmentedModule, ValueKind

__all__ = ["CaptureChoice", "Mode", "InputSpec", "barrier_names", "choose_capture_size", "copy_back_written",
           "input_specs", "pad_inputs", "unpad_outputs", "copy_into_static"]


class Mode(str, enum.Enum):
    GRAPH = "graph"
    EAGER = "eager"

    def __repr__(self) -> str:
        return self.value


@dataclass(frozen=True)
class CaptureChoice:
    """How one call runs: ``batch`` real rows, planned and captured at ``size`` rows, in ``mode``."""

    batch: int
    size: int
    mode: Mode
    reason: str = ""

    @property
    def padded(self) -> bool:
        return self.size != self.batch

    def __repr__(self) -> str:
        pad = f" (padded from {self.batch})" if self.padded else ""
        why = f": {self.reason}" if self.reason else ""
        return f"Capture({self.size}{pad}, {self.mode.value}{why})"


def choose_capture_size(batch: int, capture_sizes: Sequence[int] | None, over_capture: str = "error",
                  unsafe_pad: Sequence[str] = ()) -> CaptureChoice:
    """Pick the capture size for ``batch``.

    ``capture_sizes=None`` captures every batch size as it comes (no padding). A batch above the largest
    size raises :class:`BackendError` (``over_capture="error"``) or runs eagerly (``"eager"``). A batch that
    would need padding in a graph with ``barriers`` (segments that see the whole batch) runs eagerly under
    ``"eager"`` and raises otherwise: padding rows would change what a batch reduction computes.
    """
    if batch < 1:
        raise BackendError(f"batch size {batch} cannot be captured; a CUDA graph needs at least one row.")
    if not capture_sizes:
        return CaptureChoice(batch, batch, Mode.GRAPH)
    sizes = sorted(set(int(s) for s in capture_sizes))
    fit = next((s for s in sizes if s >= batch), None)
    if fit is None:
        if over_capture == "eager":
            return CaptureChoice(batch, batch, Mode.EAGER, f"batch {batch} > largest capture size {sizes[-1]}")
        raise BackendError(
            f"batch size {batch} is larger than the largest CUDA-graph capture size {sizes[-1]} "
            f"(capture_sizes={tuple(sizes)}). Add a larger size to capture_sizes, or set over_capture='eager' "
            "to run such batches without a graph."
        )
    if fit != batch and unsafe_pad:
        names = "; ".join(unsafe_pad[:3]) + (" ..." if len(unsafe_pad) > 3 else "")
        if over_capture == "eager":
            return CaptureChoice(batch, batch, Mode.EAGER, f"padding {batch}->{fit} is unsafe: {names}")
        raise BackendError(
            f"batch size {batch} would be padded to capture size {fit}, but padding is unsafe here ({names}). "
            f"Add {batch} to capture_sizes, or set over_capture='eager' to run such "
            "batches without a graph."
        )
    return CaptureChoice(batch, fit, Mode.GRAPH)


@dataclass(frozen=True)
class InputSpec:
    """How a graph input meets the batch: ``kind`` (batch / free / batch_size) and the batch ``dim``."""

    kind: ValueKind
    dim: int = 0

    def __repr__(self) -> str:
        return f"{self.kind.value}@{self.dim}" if self.kind is ValueKind.BATCH else self.kind.value


def input_specs(seg: SegmentedModule) -> tuple[InputSpec, ...]:
    """One :class:`InputSpec` per graph input, in input order (inputs no segment reads are batch-free)."""
    specs = [InputSpec(ValueKind.FREE)] * seg.num_inputs
    for v in seg.values.values():
        if v.source == "input":
            specs[v.index] = InputSpec(v.kind, v.batch_dim or 0)
    return tuple(specs)


def _rows(t: torch.Tensor, dim: int, batch: int) -> int:
    k, rem = divmod(t.size(dim), batch)
    if rem or k == 0:
        raise BackendError(f"input of shape {tuple(t.shape)} has size {t.size(dim)} at batch dim {dim}, which is not a "
                           f"multiple of the batch size {batch}; cannot pad it to a capture size.")
    return k


def pad_inputs(inputs: Sequence[Any], specs: Sequence[InputSpec], batch: int, size: int) -> list[Any]:
    """Inputs padded from ``batch`` to ``size`` rows: batch tensors repeat their last item (real, finite
    data, so no NaN can appear in padding rows), batch-size ints become ``size``, the rest pass through."""
    if size == batch:
        return list(inputs)
    out: list[Any] = []
    for x, spec in zip(inputs, specs):
        if spec.kind is ValueKind.BATCH and isinstance(x, torch.Tensor):
            k = _rows(x, spec.dim, batch)
            shape = list(x.shape)
            shape[spec.dim] = k * size
            padded = x.new_empty(shape)
            copy_into_static(padded, x, spec, batch, size)
            out.append(padded)
        elif spec.kind is ValueKind.BATCH_SIZE:
            out.append(size)
        else:
            out.append(x)
    return out


def copy_into_static(static: torch.Tensor, x: torch.Tensor, spec: InputSpec, batch: int, size: int) -> None:
    """Copy ``x`` (``batch`` items) into the first rows of ``static`` (``size`` items); padding rows get the
    last item."""
    k = _rows(x, spec.dim, batch)
    static.narrow(spec.dim, 0, k * batch).copy_(x)
    if size > batch:
        pad = static.narrow(spec.dim, k * batch, k * (size - batch))
        last = x.narrow(spec.dim, k * (batch - 1), k)
        reps = [1] * x.dim()
        reps[spec.dim] = size - batch
        pad.copy_(last.repeat(*reps))


def copy_back_written(inputs: Sequence[Any], padded: Sequence[Any], written: Sequence[int],
                      specs: Sequence[InputSpec], batch: int) -> None:
    """Copy the first ``batch`` items of each padded input the graph wrote in place back into the caller's
    tensor: the step wrote the padded copy, and eager would have written the caller's own."""
    for i in written:
        x, p = inputs[i], padded[i]
        if isinstance(x, torch.Tensor) and p is not x:
            dim = specs[i].dim
            x.copy_(p.narrow(dim, 0, _rows(x, dim, batch) * batch))


def unpad_outputs(out: Any, seg: SegmentedModule, batch: int, size: int) -> Any:
    """Narrow every batch output of ``out`` (shaped like ``seg.output_tree``) from ``size`` items back to
    ``batch`` (a view, no copy)."""
    if size == batch:
        return out

    def walk(tree: Any, value: Any) -> Any:
        if isinstance(tree, OutRef):
            v = seg.values[tree.name]
            if v.kind is ValueKind.BATCH and isinstance(value, torch.Tensor):
                dim = v.batch_dim or 0
                k = value.size(dim) // size
                return value.narrow(dim, 0, k * batch)
            if v.kind is ValueKind.BATCH_SIZE:
                return batch
            return value
        if isinstance(tree, (tuple, list)):
            return type(value)(walk(t, x) for t, x in zip(tree, value))
        if isinstance(tree, dict):
            return {k: walk(tree[k], value[k]) for k in tree}
        return value

    return walk(seg.output_tree, out)


def barrier_names(seg: SegmentedModule) -> tuple[str, ...]:
    """Segments that see the whole batch and touch batch data (kind ``barrier``)."""
    return tuple(s.name for s in seg.segments if s.kind.value == "barrier")
