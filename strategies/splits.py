"""Split policies: plain functions from an input bucket to nano-batch sizes.

Strategies compose them in ``split_config``; users can call them directly in their own strategies.
Every policy returns a :class:`~dynaflow.ir.SplitConfig` whose sizes sum to the batch.
"""

from __future__ import annotations



from dynaflow.errors import ConfigError
from dynaflow.ir import InputInfo, SplitConfig

__all__ = ["even", "token_balanced", "with_min_rows", "at_most", "by_phase", "round_to_multiple"]


def even(info: InputInfo, n: int) -> SplitConfig:
    """``n`` near-equal nano-batches, larger first; ``n`` is capped at the batch size.

    Example: a batch of 7 in 3 → sizes (3, 2, 2).
    """
    return SplitConfig.even(info.batch_size, max(1, min(n, info.batch_size)))


def token_balanced(info: InputInfo, n: int) -> SplitConfig:
    """``n`` nano-batches cut only at request boundaries, each as close to ``batch / n`` rows as possible.

    Without a request layout every row is its own request (same as :func:`even`). With fewer requests than
    ``n``, there are as many nano-batches as requests. Example: requests of 5, 1, 1, 1 rows in 2 →
    sizes (5, 3): the cut after the first request is the closest to 4 rows.
    """
    if info.request_lengths is None:
        return even(info, n)
    lengths = info.request_lengths
    n = max(1, min(n, len(lengths)))
    prefix = [0]
    for length in lengths:
        prefix.append(prefix[-1] + length)
    total = prefix[-1]
    cuts: list[int] = []  # indices into prefix (request boundaries), strictly increasing
    lo = 1
    for k in range(1, n):
        hi = len(prefix) - 1 - (n - k)  # leave at least one request for each remaining nano-batch
        target = total * k / n
        best = min(range(lo, hi + 1), key=lambda i: (abs(prefix[i] - target), i))
        cuts.append(best)
        lo = best + 1
    edges = [0] + [prefix[c] for c in cuts] + [total]
    return SplitConfig(tuple(b - a for a, b in zip(edges, edges[1:])))


def with_min_rows(split: SplitConfig, min_rows: int) -> SplitConfig:
    """Merge nano-batches until each has at least ``min_rows`` rows (down to one nano-batch).

    Splitting a small, memory-bound batch loses throughput (each nano-batch re-reads the weights), so
    below the minimum the split collapses. The smallest nano-batch merges into its smaller neighbour.
    Example: sizes (3, 3, 2) with ``min_rows=3`` → (3, 5); with ``min_rows=4`` → (3, 5) → (8,).
    """
    sizes = list(split.sizes)
    while len(sizes) > 1 and min(sizes) < min_rows:
        i = sizes.index(min(sizes))
        j = i - 1 if i == len(sizes) - 1 else (i + 1 if i == 0 else (i - 1 if sizes[i - 1] <= sizes[i + 1] else i + 1))
        a, b = sorted((i, j))
        sizes[a:b + 1] = [sizes[a] + sizes[b]]
    labels = None
    if split.labels is not None and len(sizes) == split.num:
        labels = split.labels
    return SplitConfig(tuple(sizes), labels)


def at_most(split: SplitConfig, most: int) -> SplitConfig:
    """Merge the pair of neighbouring nano-batches that is smallest together, again, until at most ``most``
    are left, in the main sizes and in each per-resource stage (the remaining cuts stay where they were, so on
    request boundaries if they were; labels go with a merge). Example: sizes (5, 37, 2, 16, 4) with ``most=4`` →
    (5, 37, 18, 4)."""
    sizes = _merged(split.sizes, most)
    stages = tuple((r, _merged(sz, most)) for r, sz in split.stages)
    if sizes == split.sizes and stages == split.stages:
        return split
    return SplitConfig(sizes, labels=split.labels if sizes == split.sizes else None,
                       stages=tuple((r, sz) for r, sz in stages if sz != sizes))


def _merged(sizes: tuple[int, ...], most: int) -> tuple[int, ...]:
    out = list(sizes)
    while len(out) > max(most, 1):
        i = min(range(len(out) - 1), key=lambda k: out[k] + out[k + 1])
        out[i:i + 2] = [out[i] + out[i + 1]]
    return tuple(out)


def by_phase(info: InputInfo) -> SplitConfig:
    """One nano-batch per run of consecutive requests in the same phase, labelled with that phase.

    Example: phases prefill, prefill, decode, decode with lengths 4, 3, 1, 1 → sizes (7, 2) labelled
    ("prefill", "decode"). Without phases: one unlabelled nano-batch.
    """
    if info.request_phases is None or info.request_lengths is None:
        return SplitConfig.whole(info.batch_size)
    sizes: list[int] = []
    labels: list[str] = []
    for length, phase in zip(info.request_lengths, info.request_phases):
        if labels and labels[-1] == phase:
            sizes[-1] += length
        else:
            sizes.append(length)
            labels.append(phase)
    return SplitConfig(tuple(sizes), tuple(labels))


def round_to_multiple(split: SplitConfig, multiple: int) -> SplitConfig:
    """Round every nano-batch but the last up to a multiple of ``multiple`` rows (kernel-friendly tiles);
    the last takes what is left, and nano-batches that end up empty are dropped.

    Example: sizes (5, 5, 5) with multiple 4 → (8, 7).
    """
    if multiple < 1:
        raise ConfigError(f"multiple={multiple} must be >= 1.")
    total, out, used = split.batch_size, [], 0
    for s in split.sizes[:-1]:
        size = min(-(-s // multiple) * multiple, total - used)
        if size > 0:
            out.append(size)
            used += size
    if total - used > 0:
        out.append(total - used)
    return SplitConfig(tuple(out))
