"""HBM bandwidth of decode attention against the SMs it gets: can ``dynaflow::decode_attention`` (split-KV Triton)
saturate memory on a fraction of the device? (The target: ≥ 80% of the measured copy bandwidth on ≤ 40% of the
SMs.)

Rows, each a CUDA-event median after warm-up: the device-to-device bandwidth of a large ``copy_`` (the ceiling,
bytes read + written); torch SDPA on all SMs (whatever backend it dispatches to, then flash, cuDNN and efficient
attention forced one at a time); the split-KV kernel with ``sm_budget`` in ``--budgets`` on a plain stream (its grid
is the budget; other kernels may share the SMs); and, where green contexts can be made (cuda-python, or torch's
``GreenContext``), the split-KV kernel and SDPA again on a stream confined to that many SMs (one lane with
``sm_count``, :func:`dynaflow.backend.streams.make_lane_streams`). Attention bandwidth is the bytes of K and V read
over the time (every request attends to its whole cache). Every row's output is checked against the reference on
the first rows of the batch. ``--sweep`` also times kernel configurations (tile, stages, programs per SM) at
``--sweep-budget`` SMs.

    python benchmarks/decode_attention_bw.py               # on a GPU: benchmarks/results/decode_attention_bw.json
    python benchmarks/decode_attention_bw.py --sweep       # and the configuration sweep
    python benchmarks/decode_attention_bw.py --dry-run     # tiny sizes on CPU (reference path): plumbing only
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import os
import sys
import time
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from _results import common_args, provenance, run_main  # noqa: E402
from floor_measure import median_ms, rel_err  # noqa: E402

log = logging.getLogger("decode_attention_bw")

TARGET_OF_COPY, TARGET_SM_SHARE = 0.8, 0.4
CHECK_ROWS = 8
"""Requests checked against the reference (it repeats K and V per query head in float32: all of them would not fit)."""
SWEEP = ([dict(block_n=n, num_stages=s, programs_per_sm=2) for n in (32, 64, 128) for s in (2, 3, 4)]
         + [dict(block_n=64, num_stages=3, programs_per_sm=p) for p in (1, 4)])
"""The configurations ``--sweep`` times: tile and stages, then fewer and more programs per SM (11 compilations of
the partial kernel; one whose tiles do not fit in shared memory is a row with its error)."""


def _inputs(batch: int, kv_len: int, device: str, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    g = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(batch, 32, 128, device=device, dtype=dtype, generator=g)
    k = torch.randn(batch, kv_len, 8, 128, device=device, dtype=dtype, generator=g)
    v = torch.randn(batch, kv_len, 8, 128, device=device, dtype=dtype, generator=g)
    return q, k, v, torch.full((batch,), kv_len, device=device, dtype=torch.int32)


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: Any = None) -> torch.Tensor:
    from torch.nn.attention import sdpa_kernel

    with sdpa_kernel(backend) if backend is not None else contextlib.nullcontext():
        out = F.scaled_dot_product_attention(q.unsqueeze(2), k.transpose(1, 2), v.transpose(1, 2), enable_gqa=True)
    return out.squeeze(2)


def _partition(sms: int) -> tuple[Any, int | None, str] | None:
    """A stream on ``sms`` SMs (a green context: the lane's partition of one driver split), its granted SMs where
    the driver says, and how it was made; ``None`` when no green context can be made here."""
    from dynaflow.backend.streams import make_lane_streams
    from dynaflow.ir import Lane

    (ls,) = make_lane_streams([Lane("memory", sm_count=sms)])
    return (ls.stream, ls.granted_sms, ls.mechanism) if ls.mechanism.endswith("green-context") else None


class Bench:
    """One configuration's inputs, reference and timing rule."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args, self.cuda = args, not args.dry_run
        self.device, self.dtype = ("cuda", torch.bfloat16) if self.cuda else ("cpu", torch.float32)
        self.batch, self.kv_len = (args.batch, args.kv_len) if self.cuda else (2, 16)
        self.q, self.k, self.v, self.lengths = _inputs(self.batch, self.kv_len, self.device, self.dtype)
        self.kv_bytes = 2 * self.k.numel() * self.k.element_size()
        self.sms = torch.cuda.get_device_properties(0).multi_processor_count if self.cuda else 1
        from dynaflow.integrations.kernels.decode_attention import reference

        n = min(CHECK_ROWS, self.batch)
        self.ref = reference(self.q[:n], self.k[:n], self.v[:n], self.lengths[:n])

    def row(self, name: str, fn: Callable[[], Any], *, nbytes: int | None = None, check: bool = True,
            stream: Any = None, **extra: Any) -> dict[str, Any]:
        """Time ``fn`` (on ``stream`` when given, ordered after and before the caller's stream)."""
        def call() -> Any:
            if stream is None:
                return fn()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                out = fn()
            torch.cuda.current_stream().wait_stream(stream)
            return out

        nbytes = self.kv_bytes if nbytes is None else nbytes
        try:
            out = call()
            err = rel_err(out[: len(self.ref)], self.ref) if check else None
            ms = median_ms(call, repeats=self.args.repeats, warmup=3, cuda=self.cuda)
        except Exception as exc:  # noqa: BLE001 - one failing row must not hide the others
            log.warning("%s failed: %s: %s", name, type(exc).__name__, str(exc)[:200])
            return {"name": name, **extra, "error": f"{type(exc).__name__}: {exc}"[:500]}
        return {"name": name, **extra, "median_ms": ms, "GB_per_s": nbytes / ms / 1e6, "rel_err": err}


def _kernel(bench: Bench) -> Callable[..., torch.Tensor]:
    from dynaflow.integrations.kernels.decode_attention import DEFAULT_CONFIG, reference, triton_available
    from dynaflow.integrations.kernels.decode_attention import triton_decode_attention

    if bench.cuda and triton_available():
        return triton_decode_attention
    return lambda q, k, v, n, budget, config=DEFAULT_CONFIG: reference(q, k, v, n)


def _plan(bench: Bench, budget: int, config: Any) -> dict[str, Any]:
    from dynaflow.integrations.kernels.decode_attention import plan_for

    return dataclasses.asdict(plan_for(bench.q, bench.k, budget, config))


def _with_plan(row: dict[str, Any], bench: Bench, budget: int, config: Any) -> dict[str, Any]:
    """``row`` with the plan the kernel ran (after the row: the first call measures the occupancy)."""
    return {**row, "plan": _plan(bench, budget, config)} if bench.cuda and "error" not in row else row


def run(args: argparse.Namespace) -> dict[str, Any]:
    from dynaflow.integrations.kernels.decode_attention import DEFAULT_CONFIG, KernelConfig

    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit("decode_attention_bw.py needs a CUDA GPU (use --dry-run on CPU to check the plumbing).")
    t0 = time.perf_counter()
    bench = Bench(args)
    q, k, v, lengths, total = bench.q, bench.k, bench.v, bench.lengths, bench.sms
    kernel = _kernel(bench)
    src = torch.empty(bench.kv_bytes // 2, device=bench.device, dtype=torch.int16)
    dst = torch.empty_like(src)
    rows = [bench.row("device copy (ceiling)", lambda: dst.copy_(src), nbytes=2 * src.numel() * 2, check=False,
                      kind="copy", sms=total)]
    from torch.nn.attention import SDPBackend

    sdpa = [("torch SDPA", None)] + ([] if args.dry_run else [
        ("torch SDPA flash", SDPBackend.FLASH_ATTENTION), ("torch SDPA cuDNN", SDPBackend.CUDNN_ATTENTION),
        ("torch SDPA efficient", SDPBackend.EFFICIENT_ATTENTION)])
    for name, backend in sdpa:
        rows.append(bench.row(f"{name}, all {total} SMs", lambda b=backend: _sdpa(q, k, v, b), kind="sdpa", sms=total))
    for budget in args.budgets:  # the dry run's CPU reference ignores the budget
        rows.append(_with_plan(bench.row(f"split-KV, sm_budget {budget} (plain stream)",
                                         lambda b=budget: kernel(q, k, v, lengths, b), kind="split-kv", sms=budget,
                                         partition=None), bench, budget, DEFAULT_CONFIG))
        part = _partition(budget) if bench.cuda and budget < total else None
        if part is None:
            continue
        stream, granted, mechanism = part
        sms = granted or budget
        rows.append(_with_plan(bench.row(f"split-KV on {sms} SMs ({mechanism})",
                                         lambda b=sms: kernel(q, k, v, lengths, b), stream=stream, kind="split-kv",
                                         sms=sms, partition=mechanism), bench, sms, DEFAULT_CONFIG))
        rows.append(bench.row(f"torch SDPA on {sms} SMs ({mechanism})", lambda: _sdpa(q, k, v), stream=stream,
                              kind="sdpa", sms=sms, partition=mechanism))
    if args.sweep and bench.cuda:
        b = args.sweep_budget
        part = _partition(b) if b < total else None
        stream, sms, where = (part[0], part[1] or b, part[2]) if part else (None, b, "plain stream")
        for cfg in (KernelConfig(**c) for c in SWEEP):
            rows.append(_with_plan(bench.row(
                f"sweep, {sms} SMs ({where}): block_n {cfg.block_n}, stages {cfg.num_stages}, "
                f"{cfg.programs_per_sm}/SM", lambda c=cfg: kernel(q, k, v, lengths, sms, c), stream=stream,
                kind="sweep", sms=sms, partition=part and where, config=dataclasses.asdict(cfg)), bench, sms, cfg))
    ceiling = rows[0].get("GB_per_s")
    for r in rows[1:]:
        if ceiling and r.get("GB_per_s"):
            r["of_copy_bw"] = r["GB_per_s"] / ceiling
    report = {**provenance("decode_attention_bw", dry_run=bool(args.dry_run)), "batch": bench.batch,
              "kv_len": bench.kv_len, "heads": "32 q / 8 kv of 128", "dtype": str(bench.dtype).replace("torch.", ""),
              "device_sms": total, "repeats": args.repeats, "kernel_config": dataclasses.asdict(DEFAULT_CONFIG),
              "target": _target(rows, total), "rows": rows, "seconds": round(time.perf_counter() - t0, 1)}
    _print(report)
    return report


def _target(rows: Sequence[dict[str, Any]], total: int) -> dict[str, Any]:
    """The best split-KV row on at most 40% of the SMs, as a share of the copy bandwidth; green-context rows
    count first (their SMs are really limited), plain-stream rows only where no partition could be made."""
    few = [r for r in rows if r.get("kind") == "split-kv" and "of_copy_bw" in r and r["sms"] <= TARGET_SM_SHARE * total]
    confined = [r for r in few if r.get("partition")] or few
    if not confined:
        return {"met": None, "why": "no split-KV row on <= 40% of the SMs was timed"}
    best = max(confined, key=lambda r: r["of_copy_bw"])
    return {"met": best["of_copy_bw"] >= TARGET_OF_COPY, "best": best["name"], "of_copy_bw": best["of_copy_bw"],
            "on_green_context": bool(best.get("partition"))}


def _print(report: dict[str, Any]) -> None:
    log.info("%s, %s SMs, batch %d, KV %d, %s", report["gpu"] or "CPU (dry run)", report["device_sms"],
             report["batch"], report["kv_len"], report["dtype"])
    log.info("%-58s %9s %9s %8s %9s", "row", "ms", "GB/s", "of copy", "rel err")
    for r in report["rows"]:
        if "error" in r:
            log.info("%-58s error: %s", r["name"], r["error"][:80])
            continue
        share = f"{r['of_copy_bw']:.0%}" if "of_copy_bw" in r else "-"
        err = "-" if r["rel_err"] is None else f"{r['rel_err']:.1e}"
        log.info("%-58s %9.3f %9.1f %8s %9s", r["name"], r["median_ms"], r["GB_per_s"], share, err)
    log.info("target (>= %.0f%% of copy on <= %.0f%% of the SMs): %s", 100 * TARGET_OF_COPY, 100 * TARGET_SM_SHARE,
             report["target"])
    log.info("took %.1f s", report["seconds"])


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=256, help="decode requests")
    ap.add_argument("--kv-len", type=int, default=2048, help="KV positions per request")
    ap.add_argument("--budgets", type=int, nargs="+", default=[132, 104, 80, 52, 40, 26])
    ap.add_argument("--sweep", action="store_true", help="also time kernel configurations at --sweep-budget SMs")
    ap.add_argument("--sweep-budget", type=int, default=52)
    common_args(ap, "decode_attention_bw")
    return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    return run_main("decode_attention_bw", parse, run, argv)


if __name__ == "__main__":
    main()
