"""Hand-written baselines of the GPU-floor benchmark: what a careful engineer gets without dynaflow.

Each builder takes a :class:`~workloads.Workload` and an :class:`Env` and returns a :class:`Runner` whose
``call()`` runs one step and returns what is compared against eager; it raises :class:`Skip` (with the
reason) where the baseline does not apply. ``gpu_floor.py`` times every runner the same way.

* ``eager`` — the model on one stream: the reference every row is divided by.
* ``eager graph`` — the whole eager step captured as one ``torch.cuda.CUDAGraph``; the inputs are the same
  tensors on every step, so they are captured in place and nothing is copied per replay.
* ``reduce-overhead`` — ``torch.compile(mode="reduce-overhead")`` (Inductor + CUDA graph trees), with the
  KV caches marked static (``torch._dynamo.mark_static_address``) so that they are not copied either.
* ``two-stream`` — the batch in two halves, one per stream, each through the whole model (for the mix:
  also decode on one stream and the prefill chunk on the other); ``... graph``: the same captured.
* ``pipe`` — NanoFlow by hand (dense decode only, whose layers expose ``pre``/``attn``/``post``): GEMMs on
  a compute stream, decode attention on a memory stream, two nano-batches software-pipelined across layers
  (compute: pre0 pre1 | post0(i) pre0(i+1) post1(i) pre1(i+1) ...; memory: attn0(i) attn1(i) ...), chained by
  events, so each lane always has the other nano-batch's work to overlap with. ``pipe SM c+m``: the same on
  two *disjoint* SM partitions from one driver split (cuda-python green contexts), the compute lane first
  (a green context per lane, each splitting the whole device, gives overlapping partitions).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
from torch.utils._pytree import tree_leaves

from floor_measure import Streams, capture_graph
from workloads import Workload, cache_counters, static_cache

__all__ = ["Skip", "Env", "Runner", "BASELINES", "disjoint_sm_streams"]


class Skip(Exception):
    """This baseline does not apply here (the message says why)."""


@dataclass
class Env:
    cuda: bool
    num_sms: int = 0
    sm_split: tuple[int, int] | None = None
    """(compute, memory) SMs for the partitioned rows; None: no partitioned rows."""

    @property
    def streams(self) -> Streams:
        return Streams(self.cuda)


@dataclass
class Runner:
    call: Callable[[], Any]
    close: Callable[[], None] = lambda: None
    reset: Callable[[], None] | None = None
    """Runs before every step, untimed, after the workload's own reset (state the runner added)."""
    info: dict[str, Any] = field(default_factory=dict)
    keep: list[Any] = field(default_factory=list)
    """Objects that must outlive the runs (graphs, streams, contexts)."""


def _need_cuda(env: Env, what: str) -> None:
    if not env.cuda:
        raise Skip(f"{what} needs CUDA (dry run on CPU)")


def _graphed(runner: Runner) -> Runner:
    graph, out = capture_graph(runner.call)
    return Runner(lambda: (graph.replay(), out)[1], runner.close, runner.reset, runner.info,
                  runner.keep + [graph, out])


# -- eager, eager graph, reduce-overhead -------------------------------------------------------------------
def eager(w: Workload, env: Env) -> Runner:
    return Runner(lambda: w.output(w.model(*w.inputs, **w.kwargs)))


def eager_graph(w: Workload, env: Env) -> Runner:
    _need_cuda(env, "a CUDA graph")
    if w.reset is not None:
        w.reset()
    return _graphed(eager(w, env))


MARK_PREFIXES = ("_dynamo", "_has_dynamo", "_specialize_on")
"""The attributes ``torch._dynamo.mark_static_address`` / ``(maybe_)mark_dynamic`` leave on a tensor."""


def _marks(t: torch.Tensor) -> dict[str, Any]:
    return {k: v for k, v in t.__dict__.items() if k.startswith(MARK_PREFIXES)}


@contextlib.contextmanager
def _compile_marks(w: Workload) -> Iterator[None]:
    """For the reduce-overhead row: the persistent inputs marked static for cudagraph trees, and no dynamic
    dims left over from dynaflow rows (which mark the batch dim of every input), so that the baseline is
    the plain static-shape compile; every mark is restored after the row."""
    tensors = {id(t): t for t in [*w.static, *(x for x in tree_leaves((w.inputs, w.kwargs)) if torch.is_tensor(x))]}
    saved = {k: _marks(t) for k, t in tensors.items()}
    for t in tensors.values():
        for m in _marks(t):
            delattr(t, m)
    for t in w.static:
        torch._dynamo.mark_static_address(t)
    try:
        yield
    finally:
        for k, t in tensors.items():
            for m in _marks(t):
                delattr(t, m)
            for m, v in saved[k].items():
                setattr(t, m, v)


def reduce_overhead(w: Workload, env: Env) -> Runner:
    _need_cuda(env, "reduce-overhead (CUDA graph trees)")
    marks = _compile_marks(w)
    marks.__enter__()
    compiled = torch.compile(w.model, mode="reduce-overhead", dynamic=False)

    def call() -> Any:
        torch.compiler.cudagraph_mark_step_begin()  # one inference step per call: outputs of the last may go
        return w.output(compiled(*w.inputs, **w.kwargs))

    return Runner(call, close=lambda: marks.__exit__(None, None, None), keep=[compiled])


# -- two streams, one half of the batch each ---------------------------------------------------------------
def _mix_decode(model: Any, h: torch.Tensor, caches: list[torch.Tensor]) -> torch.Tensor:
    """The decode half of overlap_gpu.Layer.forward, for every layer (the same ops as the model's own)."""
    import torch.nn.functional as F

    for i, layer in enumerate(model.layers):
        s = layer.s
        q, _, _ = layer._qkv(h)
        q = q.view(h.shape[0], s.heads, 1, s.head_dim)
        a = F.scaled_dot_product_attention(q, caches[2 * i], caches[2 * i + 1], enable_gqa=True)
        h = h + layer.o(a.reshape(h.shape[0], s.heads * s.head_dim))
        h = h + layer.mlp(layer.norm2(h))
    return h


def _mix_prefill(model: Any, p: torch.Tensor) -> torch.Tensor:
    """The prefill-chunk half of overlap_gpu.Layer.forward, for every layer."""
    import torch.nn.functional as F

    for layer in model.layers:
        s = layer.s
        c = p.shape[0]
        pq, pk, pv = layer._qkv(p)
        pq = pq.view(1, c, s.heads, s.head_dim).transpose(1, 2)
        pk = pk.view(1, c, s.kv_heads, s.head_dim).transpose(1, 2)
        pv = pv.view(1, c, s.kv_heads, s.head_dim).transpose(1, 2)
        pa = F.scaled_dot_product_attention(pq, pk, pv, is_causal=True, enable_gqa=True)
        p = p + layer.o(pa.transpose(1, 2).reshape(c, s.heads * s.head_dim))
        p = p + layer.mlp(layer.norm2(p))
    return p


def _half_cache(w: Workload, rows: slice) -> Any:
    """A StaticCache whose K/V tensors are views of ``rows`` of the workload's cache (updates land in place),
    with its own position counters."""
    full = next(iter(w.kwargs.values()))
    n = rows.stop - rows.start
    k0 = full.layers[0].keys
    half = static_cache(w.model, n, k0.shape[2], k0.device, k0.dtype)
    for mine, theirs in zip(half.layers, full.layers):
        mine.keys, mine.values = theirs.keys[rows], theirs.values[rows]
    return half


def _two_halves(w: Workload, env: Env) -> Runner:
    st, b = env.streams, w.batch
    if b < 2:
        raise Skip(f"batch {b} cannot be halved")
    sls = (slice(0, b // 2), slice(b // 2, b))
    s1, s2 = st.new(), st.new()
    if w.family == "dense_decode":
        x, ks, vs = w.inputs
        halves = [lambda sl=sl: w.model(x[sl], [k[sl] for k in ks], [v[sl] for v in vs]) for sl in sls]
        return _on_two(st, (s1, s2), halves, lambda outs: torch.cat(outs))
    if w.family == "mix":
        h, caches, p = w.inputs
        dec = [lambda sl=sl: _mix_decode(w.model, h[sl], [c[sl] for c in caches]) for sl in sls]
        # the prefill chunk goes with the second half (the first half's stream starts the decode rows)
        halves = [dec[0], lambda: (dec[1](), _mix_prefill(w.model, p))]
        return _on_two(st, (s1, s2), halves, lambda outs: (torch.cat([outs[0], outs[1][0]]), outs[1][1]))
    if w.family == "hf_decode":
        (ids,) = w.inputs
        name = next(iter(w.kwargs))
        caches = [_half_cache(w, sl) for sl in sls]
        counters = [c for cache in caches for c in cache_counters(cache)]
        halves = [lambda sl=sl, c=c: w.output(w.model(ids[sl], **{name: c})) for sl, c in zip(sls, caches)]
        runner = _on_two(st, (s1, s2), halves, lambda outs: torch.cat(outs))

        def reset() -> None:  # the halves have their own counters: put them where the full cache's reset puts it
            for c in counters:
                c.fill_(w.meta["start"])

        runner.reset = reset
        runner.keep.append(caches)
        return runner
    raise Skip(f"no two-stream split written for workload family {w.family!r}")


def _on_two(st: Streams, streams: tuple[Any, Any], parts: list[Callable[[], Any]],
            merge: Callable[[list[Any]], Any]) -> Runner:
    def call() -> Any:
        st.fork(*streams)
        outs = []
        for s, part in zip(streams, parts):
            with st.on(s):
                outs.append(part())
        st.join(*streams)
        return merge(outs)

    return Runner(call, keep=list(streams))


def two_stream(w: Workload, env: Env) -> Runner:
    return _two_halves(w, env)


def two_stream_graph(w: Workload, env: Env) -> Runner:
    _need_cuda(env, "a CUDA graph")
    runner = _two_halves(w, env)
    for r in (w.reset, runner.reset):
        if r is not None:
            r()
    return _graphed(runner)


def phase_split(w: Workload, env: Env) -> Runner:
    """Mix only: all decode rows on one stream, the prefill chunk on the other."""
    if w.family != "mix":
        raise Skip("only the decode + prefill mix has two phases to put on two streams")
    st = env.streams
    h, caches, p = w.inputs
    return _on_two(st, (st.new(), st.new()), [lambda: _mix_decode(w.model, h, caches), lambda: _mix_prefill(w.model, p)],
                   lambda outs: (outs[0], outs[1]))


def phase_split_graph(w: Workload, env: Env) -> Runner:
    _need_cuda(env, "a CUDA graph")
    return _graphed(phase_split(w, env))


# -- the NanoFlow pipeline, by hand ------------------------------------------------------------------------
def _pipe(w: Workload, st: Streams, comp: Any, mem: Any) -> Runner:
    if w.family != "dense_decode":
        raise Skip("the hand-written pipeline needs layers with pre/attn/post (dense decode only)")
    if w.batch < 2:
        raise Skip(f"batch {w.batch} cannot be split in two nano-batches")
    x, ks, vs = w.inputs
    layers = list(w.model.layers)
    n, b = len(layers), w.batch
    sls = (slice(0, b // 2), slice(b // 2, b))

    def call() -> torch.Tensor:
        st.fork(comp, mem)
        hs = [x[sl] for sl in sls]
        att: dict[tuple[int, int], tuple[torch.Tensor, Any]] = {}
        alive: list[torch.Tensor] = []  # a tensor made on one stream and read on the other lives to the join

        def pre(j: int, i: int) -> None:
            with st.on(comp):
                q = layers[i].pre(hs[j])
                made = st.record(comp)
            st.wait(mem, made)
            with st.on(mem):
                a = layers[i].attn(q, ks[i][sls[j]], vs[i][sls[j]])
                done = st.record(mem)
            att[(j, i)] = (a, done)
            alive.extend((q, a))

        def post(j: int, i: int) -> None:
            a, done = att.pop((j, i))
            st.wait(comp, done)
            with st.on(comp):
                hs[j] = layers[i].post(hs[j], a)

        pre(0, 0)
        pre(1, 0)
        for i in range(n):
            for j in (0, 1):
                post(j, i)
                if i + 1 < n:
                    pre(j, i + 1)
        st.join(comp)
        return torch.cat(hs)

    return Runner(call, keep=[comp, mem])


def pipe(w: Workload, env: Env) -> Runner:
    st = env.streams
    return _pipe(w, st, st.new(), st.new())


def pipe_graph(w: Workload, env: Env) -> Runner:
    _need_cuda(env, "a CUDA graph")
    return _graphed(pipe(w, env))


def disjoint_sm_streams(first: int, device: int = 0) -> tuple[Any, Any, list[Any], list[int | None]]:
    """Two streams on disjoint SM groups from ONE driver split (``cuDevSmResourceSplitByCount`` once): a group
    of ``first`` SMs, and the remainder of the device. Returns the two ``torch.cuda.ExternalStream``s, the
    green contexts (keep them alive) and the SM counts the driver reports."""
    try:
        from cuda.bindings import driver as drv
    except ImportError:
        try:
            from cuda import cuda as drv  # older cuda-python layout
        except ImportError as exc:
            raise Skip("disjoint SM partitions need cuda-python (pip install cuda-python)") from exc

    def ok(step: str, result: Any) -> Any:
        err, *rest = result if isinstance(result, tuple) else (result,)
        if int(getattr(err, "value", err)) != 0:
            raise RuntimeError(f"{step}: CUDA driver error {err}")
        return rest[0] if len(rest) == 1 else rest

    ok("cuInit", drv.cuInit(0))
    dev = ok("cuDeviceGet", drv.cuDeviceGet(device))
    whole = ok("cuDeviceGetDevResource", drv.cuDeviceGetDevResource(dev, drv.CUdevResourceType.CU_DEV_RESOURCE_TYPE_SM))
    groups, _n, rest = ok("cuDevSmResourceSplitByCount", drv.cuDevSmResourceSplitByCount(1, whole, 0, first))
    group = groups[0] if isinstance(groups, (list, tuple)) else groups
    streams, contexts, counts = [], [], []
    for tag, res in (("first", group), ("rest", rest)):
        desc = ok(f"{tag} cuDevResourceGenerateDesc", drv.cuDevResourceGenerateDesc([res], 1))
        ctx = ok(f"{tag} cuGreenCtxCreate", drv.cuGreenCtxCreate(desc, dev, drv.CUgreenCtxCreate_flags.CU_GREEN_CTX_DEFAULT_STREAM))
        raw = ok(f"{tag} cuGreenCtxStreamCreate", drv.cuGreenCtxStreamCreate(ctx, drv.CUstream_flags.CU_STREAM_NON_BLOCKING, 0))
        streams.append(torch.cuda.ExternalStream(int(raw), device=torch.device("cuda", device)))
        contexts.append(ctx)
        counts.append(getattr(getattr(res, "sm", None), "smCount", None))
    return streams[0], streams[1], contexts, counts


def pipe_sm(w: Workload, env: Env) -> Runner:
    _need_cuda(env, "SM partitions")
    if env.sm_split is None:
        raise Skip("no SM split configured")
    if w.family != "dense_decode":
        raise Skip("the hand-written pipeline needs layers with pre/attn/post (dense decode only)")
    comp, mem, contexts, counts = disjoint_sm_streams(env.sm_split[0])
    runner = _pipe(w, env.streams, comp, mem)
    runner.keep.append(contexts)
    runner.info["granted_sms"] = {"compute": counts[0], "memory": counts[1]}
    return runner


def pipe_sm_graph(w: Workload, env: Env) -> Runner:
    inner = pipe_sm(w, env)
    out = _graphed(inner)
    out.info = inner.info
    return out


BASELINES: dict[str, Callable[[Workload, Env], Runner]] = {
    "eager": eager,
    "eager graph": eager_graph,
    "reduce-overhead": reduce_overhead,
    "two-stream": two_stream,
    "two-stream graph": two_stream_graph,
    "decode|prefill streams": phase_split,
    "decode|prefill streams graph": phase_split_graph,
    "pipe": pipe,
    "pipe graph": pipe_graph,
    "pipe SM": pipe_sm,
    "pipe SM graph": pipe_sm_graph,
}
"""Every baseline, in the order the summary lists them (``pipe SM`` rows are named with their split)."""
