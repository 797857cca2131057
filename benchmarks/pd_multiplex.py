"""Prefill ∥ decode on disjoint SM partitions (issue 16; SGLang's PD-Multiplexing case), measured.

One serving step carries a **prefill chunk** of one request (``--prefill`` tokens, causal attention over itself:
GEMM-bound) and a **decode batch** (``--decode`` requests of one token, each attending over its own KV cache of
``--kv-len`` positions: memory-bound) through Llama-8B-shaped layers in bf16, tokens flattened into one batch
dimension as an engine lays them out (prefill rows first). ``dynaflow.requests`` declares the layout, so
``prefill_decode`` runs the two phases on their own lanes, each optionally a green-context SM partition.

Rows, each a median of ``--repeats`` CUDA-event timings of the whole step, every one checked against eager:

* **sequential** — the step as one eager call on the whole GPU (the two parts take turns layer by layer);
* **parts alone** — the prefill rows alone and the decode rows alone on the whole GPU: the *ideal bound* is
  ``(prefill + decode) / max(prefill, decode)``, and ``decode alone`` is what the decode bound refers to;
* **hand-written streams** — the two parts issued on two streams (plain, then each on its own partition:
  dynaflow's green-context lanes used as a library, scheduled by hand);
* **dynaflow prefill_decode** — shared SMs, then every decode partition of ``--decode-sms``;
* **dynaflow auto** — with its decode bound (``--decode-bound``, 1.2): what it picks by itself.

Each row also reports when the decode rows finished (CUDA events on their stream, or dynaflow's timeline of the
decode lane) over ``decode alone``: the PD contract is that this stays within the bound.

The attention is one op, ``pdbench::attention``: for the rows of the launch it runs causal SDPA on the prefill
rows and ``dynaflow::decode_attention`` (the split-KV Triton kernels, sized by the lane's SMs) on the decode
rows. Which rows a launch holds comes from the step's layout and dynaflow's nano context, as an engine's
attention reads its metadata from a forward context. The decode rows read their caches; this step does not
append to them (inputs stay the same every step, as in the dense-decode workload).

    python benchmarks/pd_multiplex.py                 # a GPU; writes benchmarks/results/pd_multiplex.json
    python benchmarks/pd_multiplex.py --dry-run       # tiny sizes on CPU: checks the plumbing only
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import statistics
import sys
import tempfile
from dataclasses import asdict, dataclass, replace
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

from _results import common_args, provenance, run_main, setup  # noqa: E402
from floor_measure import Streams, median_ms, rel_err, tolerance  # noqa: E402
from overlap_gpu import MLP, RMSNorm, Shape  # noqa: E402  (its Shape: the same Llama-8B layer sizes)

import dynaflow.integrations.kernels.decode_attention  # noqa: E402,F401 - registers dynaflow::decode_attention

log = logging.getLogger("pd_multiplex")


# -- the step's layout, as an engine's forward context holds it ---------------------------------------------
@dataclass
class _Layout:
    prefill: int = 0
    """Prefill rows at the front of the step's batch (one request)."""
    rows: tuple[int, int] | None = None
    """The rows of the nano-batch being launched (dynaflow's nano context); ``None``: every row of the call."""


_STEP = _Layout()


@contextlib.contextmanager
def step_layout(prefill: int) -> Iterator[None]:
    """The layout of the calls inside: ``prefill`` rows of one prefill request, then one row per decode request."""
    before = replace(_STEP)
    _STEP.prefill, _STEP.rows = prefill, None
    try:
        yield
    finally:
        _STEP.prefill, _STEP.rows = before.prefill, before.rows


@contextlib.contextmanager
def _nano_rows(rows: tuple[int, int]) -> Iterator[None]:
    before, _STEP.rows = _STEP.rows, rows
    try:
        yield
    finally:
        _STEP.rows = before


@torch.library.custom_op("pdbench::attention", mutates_args=())
def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
              lengths: torch.Tensor) -> torch.Tensor:
    """Attention of the launch's rows (module docstring): q (T, Hq, D), k/v (T, Hkv, D) of these rows; the decode
    requests' caches (R, L, Hkv, D) and lengths (R,) whole."""
    t = q.shape[0]
    start, stop = _STEP.rows or (0, t)
    prefill = min(_STEP.prefill, stop) if _STEP.rows else min(_STEP.prefill, t)
    n_pre = max(0, prefill - start)
    if n_pre and (start != 0 or (_STEP.rows and stop < _STEP.prefill)):
        raise RuntimeError(f"pdbench::attention: rows {start}:{stop} cut the prefill request of {_STEP.prefill} rows")
    out = []
    if n_pre:
        pq, pk, pv = (x[:n_pre].transpose(0, 1).unsqueeze(0) for x in (q, k, v))
        out.append(F.scaled_dot_product_attention(pq, pk, pv, is_causal=True, enable_gqa=True)[0].transpose(0, 1))
    if t > n_pre:
        a = max(start, prefill) - prefill if _STEP.rows else 0
        b = a + t - n_pre
        out.append(torch.ops.dynaflow.decode_attention(q[n_pre:], k_cache[a:b], v_cache[a:b], lengths[a:b]))
    return torch.cat(out) if len(out) > 1 else out[0].contiguous()


@attention.register_fake
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
      lengths: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(q)


def rules() -> list[Any]:
    """The op is batch-local (whole requests per launch), reads the nano context, and writes nothing hidden."""
    import dynaflow

    return [dynaflow.Op("pdbench.attention", name="attention", tags=("memory", "batch-local", "nano-context", "pure")),
            dynaflow.Mod("MLP", name="mlp", tags=("compute",))]


# -- the model -----------------------------------------------------------------------------------------------
class Layer(nn.Module):
    def __init__(self, s: Shape):
        super().__init__()
        self.s = s
        self.norm1, self.norm2 = RMSNorm(s.hidden), RMSNorm(s.hidden)
        self.qkv = nn.Linear(s.hidden, (s.heads + 2 * s.kv_heads) * s.head_dim, bias=False)
        self.o = nn.Linear(s.heads * s.head_dim, s.hidden, bias=False)
        self.mlp = MLP(s)

    def forward(self, x: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                lengths: torch.Tensor) -> torch.Tensor:
        s, t = self.s, x.shape[0]
        q, k, v = self.qkv(self.norm1(x)).split([s.heads * s.head_dim, s.kv_heads * s.head_dim,
                                                  s.kv_heads * s.head_dim], dim=-1)
        a = torch.ops.pdbench.attention(q.reshape(t, s.heads, s.head_dim), k.reshape(t, s.kv_heads, s.head_dim),
                                        v.reshape(t, s.kv_heads, s.head_dim), k_cache, v_cache, lengths)
        x = x + self.o(a.reshape(t, s.heads * s.head_dim))
        return x + self.mlp(self.norm2(x))


class Step(nn.Module):
    def __init__(self, s: Shape):
        super().__init__()
        self.layers = nn.ModuleList(Layer(s) for _ in range(s.layers))

    def forward(self, x: torch.Tensor, caches: list[torch.Tensor], lengths: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x, caches[2 * i], caches[2 * i + 1], lengths)
        return x


def build(s: Shape, device: str, dtype: torch.dtype, seed: int = 0) -> tuple[Step, tuple[Any, ...]]:
    """The model and one step's inputs: the prefill chunk's and decode tokens' hidden states (prefill first),
    two caches per layer (R, L, Hkv, D), the decode requests' lengths (each at most L)."""
    assert s.decode != s.prefill + s.decode, "the caches' request count must differ from the token count"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Step(s)
        for prm in model.parameters():
            if prm.dim() > 1:
                prm.data.normal_(0, 0.02)
    model = model.to(device=device, dtype=dtype).eval()
    g = torch.Generator(device=device).manual_seed(seed + 1)
    x = torch.randn(s.prefill + s.decode, s.hidden, device=device, dtype=dtype, generator=g)
    caches = [torch.randn(s.decode, s.kv_len, s.kv_heads, s.head_dim, device=device, dtype=dtype, generator=g)
              for _ in range(2 * s.layers)]
    lengths = torch.randint(s.kv_len // 2, s.kv_len + 1, (s.decode,), device=device, generator=g)
    return model, (x, caches, lengths)


# -- rows ----------------------------------------------------------------------------------------------------
def _layout(s: Shape) -> tuple[list[int], list[str]]:
    return [s.prefill] + [1] * s.decode, ["prefill"] + ["decode"] * s.decode


def dynaflow_call(c: Any, s: Shape, inputs: tuple[Any, ...]) -> Any:
    """One step through a dynaflow-compiled model: the layout declared, the nano context installed."""
    import dynaflow
    from dynaflow.nanocontext import nano_context

    with step_layout(s.prefill), dynaflow.requests(*_layout(s)), nano_context(lambda i, rows: _nano_rows(rows),
                                                                              name="pdbench layout"):
        return c(*inputs)


def parts(model: Step, s: Shape, inputs: tuple[Any, ...]) -> tuple[Callable[[], Any], Callable[[], Any]]:
    """The prefill part and the decode part of the step, each a call of the model on its own rows."""
    x, caches, lengths = inputs
    xp, xd = x[:s.prefill], x[s.prefill:]

    def prefill() -> Any:
        with step_layout(s.prefill):
            return model(xp, caches, lengths)

    def decode() -> Any:
        with step_layout(0):
            return model(xd, caches, lengths)

    return prefill, decode


def two_streams(streams: Streams, lanes: Sequence[Any], prefill: Callable[[], Any], decode: Callable[[], Any],
                ) -> tuple[Callable[[], Any], Callable[[], float]]:
    """Hand-written overlap: prefill issued on ``lanes[0]``, decode on ``lanes[1]``; returns the step, and a
    function that runs one step and returns when its decode part finished (ms from the step's start)."""
    cur, marks = streams.current(), {}
    timed = (lambda s: _timing_event(s)) if streams.cuda else (lambda s: None)  # noqa: E731

    def step() -> Any:
        start = timed(cur)
        streams.fork(*lanes)
        with streams.on(lanes[0]):
            p = prefill()
        with streams.on(lanes[1]):
            d = decode()
        marks["start"], marks["decode"] = start, timed(lanes[1])
        streams.join(*lanes)
        return torch.cat([p, d])

    def finish() -> float:
        step()
        if marks.get("start") is None:
            return float("nan")
        marks["decode"].synchronize()
        return marks["start"].elapsed_time(marks["decode"])

    return step, finish


def _timing_event(stream: Any) -> Any:
    event = torch.cuda.Event(enable_timing=True)
    event.record(stream)
    return event


def decode_finish_ms(c: Any, s: Shape, inputs: tuple[Any, ...]) -> float:
    """One step of ``c`` (compiled with ``gpu_timeline=True``): when its decode rows finished, from its timeline
    (the last launch on the ``decode`` lane; every lane's end when the step has no such lane)."""
    dynaflow_call(c, s, inputs)
    events = c.last_timeline.events if c.last_timeline is not None else ()
    ends = [e.end for e in events if e.lane == "decode"] or [e.end for e in events]
    return max(ends, default=float("nan")) * 1e3


def _finish_ms(samples: list[float]) -> float:
    return statistics.median(samples) if samples else float("nan")


def run(args: argparse.Namespace) -> dict[str, Any]:
    import dynaflow
    from dynaflow import knobs
    from dynaflow.strategies.auto import Auto

    env = setup(args, "pd_multiplex.py")
    cuda, device, dtype, repeats, warmup = env.cuda, env.device, env.dtype, env.repeats, env.warmup
    s = Shape.tiny() if args.dry_run else Shape(layers=args.layers, decode=args.decode, kv_len=args.kv_len,
                                                   prefill=args.prefill)
    tol = tolerance(dtype)
    model, inputs = build(s, device, dtype)
    streams = Streams(cuda)
    time = lambda fn: median_ms(fn, repeats=repeats, warmup=warmup, cuda=cuda)  # noqa: E731
    rows: list[dict[str, Any]] = []

    def add(name: str, fn: Callable[[], Any], finish: Callable[[], float] | None = None, **extra: Any) -> None:
        """A row: ``fn`` runs one step; ``finish`` runs one and returns when its decode rows finished (ms)."""
        try:
            err = rel_err(fn(), ref)
            ms = time(fn)
            done = [finish() for _ in range(5)] if finish is not None else []
        except Exception as exc:  # one failing row must not hide the others
            log.exception("%s failed", name)
            rows.append({"name": name, "error": f"{type(exc).__name__}: {exc}"[:300]})
            return
        row = {"name": name, "median_ms": ms, "speedup": base / ms, "rel_err": err, "equal": err <= tol, **extra}
        if done:
            row["decode_finish_ms"] = _finish_ms(done)
            row["decode_vs_alone"] = row["decode_finish_ms"] / alone["decode_ms"]
        rows.append(row)

    with torch.no_grad():
        with step_layout(s.prefill):
            ref = model(*inputs)
            base = time(lambda: model(*inputs))
        rows.append({"name": "sequential (eager, whole GPU)", "median_ms": base, "speedup": 1.0, "rel_err": 0.0,
                     "equal": True})
        prefill, decode = parts(model, s, inputs)
        alone = {"prefill_ms": time(prefill), "decode_ms": time(decode)}
        busiest = max(alone.values())
        alone["ideal_speedup"] = (alone["prefill_ms"] + alone["decode_ms"]) / busiest if busiest else float("nan")
        alone["sum_ms"] = alone["prefill_ms"] + alone["decode_ms"]
        step, done = two_streams(streams, [streams.new(), streams.new()], prefill, decode)
        add("hand-written two streams (shared SMs)", step, done if cuda else None)
        total = torch.cuda.get_device_properties(0).multi_processor_count if cuda else 0
        for d in args.decode_sms if cuda else []:
            from dynaflow.backend.streams import make_lane_streams, release_lane_streams

            lanes = make_lane_streams((dynaflow.Lane("prefill", sm_count=total - d), dynaflow.Lane("decode", sm_count=d)))
            step, done = two_streams(streams, [l.stream for l in lanes], prefill, decode)
            add(f"hand-written partitions prefill {total - d} + decode {d} SMs", step, done,
                granted={l.lane: l.granted_sms for l in lanes})
            torch.cuda.synchronize()
            torch.cuda.empty_cache()  # no cached block of the lanes' streams outlives them
            release_lane_streams(lanes)
        configs: list[tuple[str, Any, dict[str, Any]]] = [("dynaflow prefill_decode (shared SMs)", "prefill_decode", {})]
        configs += [(f"dynaflow prefill_decode prefill {total - d} + decode {d} SMs", "prefill_decode",
                     {"prefill_sms": total - d, "decode_sms": d}) for d in (args.decode_sms if cuda else [])]
        # auto caches its winner (in a private folder): the timeline instance below reuses it instead of searching again
        configs.append((f"dynaflow auto (decode bound {args.decode_bound:g}x)",
                        Auto(cache=True, repeats=3 if cuda else 1, decode_bound=args.decode_bound), {}))
        executor = "cuda" if cuda else "serial"
        cache = tempfile.TemporaryDirectory(prefix="pd_multiplex-")
        for name, strategy, options in configs:
            torch._dynamo.reset()
            c = dynaflow.compile(model, strategy=strategy, executor=executor,
                                 config={"strategy_options": options, "rules": rules()})
            t = dynaflow.compile(model, strategy=strategy, executor=executor,
                                 config={"strategy_options": options, "rules": rules(), "gpu_timeline": True}) if cuda else None
            extra: dict[str, Any] = {}
            with knobs.scope(DYNAFLOW_CACHE_DIR=cache.name):
                for _ in range(64):  # auto's floor check decides (dynaflow.floor_check) before the row is timed
                    dynaflow_call(c, s, inputs)
                    if not c.floor_check.active:
                        break
                add(name, lambda c=c: dynaflow_call(c, s, inputs),
                    (lambda t=t: decode_finish_ms(t, s, inputs)) if t is not None else None)
            if c.program is not None:
                extra["lanes"] = [repr(l) for l in c.program.lanes]
            tuned = [r for g in c.graphs for r in g.tuned.values()]
            if tuned:
                extra["auto"] = {"winner": repr(tuned[0].winner.candidate), "reason": tuned[0].reason,
                                 "table": tuned[0].table()}
            if "error" not in rows[-1]:
                rows[-1].update(extra)
    cache.cleanup()
    report = {**provenance("pd_multiplex", dry_run=bool(args.dry_run)), "shape": asdict(s),
              "dtype": str(dtype).replace("torch.", ""), "repeats": repeats, "decode_bound": args.decode_bound,
              "alone": alone, "rows": rows}
    _summary(report)
    return report


def _summary(report: dict[str, Any]) -> None:
    a = report["alone"]
    lines = [f"prefill alone {a['prefill_ms']:.3f} ms, decode alone {a['decode_ms']:.3f} ms; parts one after the "
             f"other {a['sum_ms']:.3f} ms; ideal overlap {a['ideal_speedup']:.2f}x",
             f"{'row':<58} {'ms':>9} {'vs seq':>7} {'decode/alone':>12} {'rel err':>8}"]
    for r in report["rows"]:
        if "error" in r:
            lines.append(f"{r['name']:<58} error: {r['error'][:80]}")
            continue
        vs = f"{r['decode_vs_alone']:.2f}x" if "decode_vs_alone" in r else "-"
        lines.append(f"{r['name']:<58} {r['median_ms']:9.3f} {r['speedup']:6.2f}x {vs:>12} {r['rel_err']:8.1e}")
        if "auto" in r:
            lines.append(f"    auto picked {r['auto']['winner']}: {r['auto']['reason']}")
    print("\n".join(lines))  # noqa: T201 - the summary table is the script's output


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--decode", type=int, default=256, help="decode requests (one token each)")
    ap.add_argument("--kv-len", type=int, default=4096, help="KV positions per decode request")
    ap.add_argument("--prefill", type=int, default=1024, help="tokens of the prefill chunk")
    ap.add_argument("--decode-sms", type=int, nargs="+", default=[32, 48, 64, 80],
                    help="decode partitions to try (the prefill partition gets the other SMs)")
    ap.add_argument("--decode-bound", type=float, default=1.2,
                    help="auto's bound on the decode rows' time over their standalone time")
    common_args(ap, "pd_multiplex")
    return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    return run_main("pd_multiplex", parse, run, argv)


if __name__ == "__main__":
    main()
