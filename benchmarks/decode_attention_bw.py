"""HBM bandwidth of decode attention against the SMs it gets: is ``dynaflow::decode_attention`` (split-KV Triton)
able to saturate memory on a fraction of the device? (issue 16: ≥ 80% of the measured copy bandwidth on ≤ 40% of
the SMs.)

Rows, each a CUDA-event median: the device-to-device copy bandwidth of a large ``copy_`` (the ceiling); torch
SDPA on all SMs; the split-KV kernel with ``sm_budget`` in ``--budgets``; and, where cuda-python can make green
contexts, each of them again on a stream confined to that many SMs (one lane with ``sm_count``). Bandwidth is the
bytes of K and V read over the time. Every row's output is checked against the reference.

    python benchmarks/decode_attention_bw.py               # on a GPU: benchmarks/results/decode_attention_bw.json
    python benchmarks/decode_attention_bw.py --dry-run     # tiny sizes on CPU (reference path): plumbing only
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from _results import provenance, write  # noqa: E402
from floor_measure import median_ms  # noqa: E402

log = logging.getLogger("decode_attention_bw")


def _inputs(batch: int, kv_len: int, device: str, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    g = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(batch, 32, 128, device=device, dtype=dtype, generator=g)
    k = torch.randn(batch, kv_len, 8, 128, device=device, dtype=dtype, generator=g)
    v = torch.randn(batch, kv_len, 8, 128, device=device, dtype=dtype, generator=g)
    return q, k, v, torch.full((batch,), kv_len, device=device, dtype=torch.int32)


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    out = F.scaled_dot_product_attention(q.unsqueeze(2), k.transpose(1, 2), v.transpose(1, 2), enable_gqa=True)
    return out.squeeze(2)


def _on_partition(sms: int | None) -> Any:
    """A stream on ``sms`` SMs (a green context from one driver split), or ``None`` when none can be made."""
    if sms is None:
        return None
    from dynaflow.backend.streams import make_lane_streams
    from dynaflow.ir import Lane

    (ls,) = make_lane_streams([Lane("memory", sm_count=sms)])
    return ls.stream if ls.granted_sms else None


def _row(name: str, fn: Callable[[], Any], nbytes: int, ref: torch.Tensor | None, args: argparse.Namespace,
         cuda: bool, stream: Any = None) -> dict[str, Any]:
    def call() -> Any:
        if stream is None:
            return fn()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            out = fn()
        torch.cuda.current_stream().wait_stream(stream)
        return out

    try:
        out = call()
        err = None if ref is None else ((out.float() - ref.float()).norm() / ref.float().norm()).item()
        ms = median_ms(call, repeats=args.repeats, warmup=3, cuda=cuda)
    except Exception as exc:  # one failing row must not hide the others
        log.exception("%s failed", name)
        return {"name": name, "error": f"{type(exc).__name__}: {exc}"}
    return {"name": name, "median_ms": ms, "GB_per_s": nbytes / ms / 1e6, "rel_err": err}


def run(args: argparse.Namespace) -> dict[str, Any]:
    from dynaflow.integrations.kernels.decode_attention import reference, triton_available, triton_decode_attention

    cuda = not args.dry_run
    if cuda and not torch.cuda.is_available():
        raise SystemExit("decode_attention_bw.py needs a CUDA GPU (use --dry-run on CPU to check the plumbing).")
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    batch, kv_len = (args.batch, args.kv_len) if cuda else (2, 16)
    q, k, v, lengths = _inputs(batch, kv_len, device, dtype)
    nbytes = 2 * k.numel() * k.element_size()
    total = torch.cuda.get_device_properties(0).multi_processor_count if cuda else 1
    ref = reference(q, k, v, lengths)
    src, dst = torch.empty(nbytes // 2, device=device, dtype=torch.int16), torch.empty(nbytes // 2, device=device,
                                                                                       dtype=torch.int16)
    rows = [_row("device copy (ceiling)", lambda: dst.copy_(src), 2 * nbytes, None, args, cuda)]
    rows.append(_row(f"torch SDPA, all {total} SMs", lambda: _sdpa(q, k, v), nbytes, ref, args, cuda))
    kernel = triton_decode_attention if (cuda and triton_available()) else (lambda q, k, v, n, b: reference(q, k, v, n))
    for budget in args.budgets if cuda else [total]:
        rows.append(_row(f"split-KV, sm_budget {budget}", lambda b=budget: kernel(q, k, v, lengths, b), nbytes, ref,
                         args, cuda))
        stream = _on_partition(budget) if cuda and budget < total else None
        if stream is not None:
            rows.append(_row(f"split-KV on {budget} SMs (green context)", lambda b=budget: kernel(q, k, v, lengths, b),
                             nbytes, ref, args, cuda, stream))
            rows.append(_row(f"torch SDPA on {budget} SMs (green context)", lambda: _sdpa(q, k, v), nbytes, ref, args,
                             cuda, stream))
    ceiling = rows[0].get("GB_per_s")
    for r in rows[1:]:
        if ceiling and r.get("GB_per_s"):
            r["of_copy_bw"] = r["GB_per_s"] / ceiling
    report = {**provenance("decode_attention_bw", dry_run=bool(args.dry_run)), "batch": batch, "kv_len": kv_len,
              "heads": "32 q / 8 kv of 128", "dtype": str(dtype).replace("torch.", ""), "device_sms": total,
              "repeats": args.repeats, "rows": rows}
    for r in rows:
        if "error" in r:
            log.info("%-46s error: %s", r["name"], r["error"][:80])
        else:
            log.info("%-46s %8.3f ms %8.1f GB/s %s", r["name"], r["median_ms"], r["GB_per_s"],
                     f"{r['of_copy_bw']:.0%} of copy" if "of_copy_bw" in r else "")
    return report


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=256, help="decode requests")
    ap.add_argument("--kv-len", type=int, default=2048, help="KV positions per request")
    ap.add_argument("--budgets", type=int, nargs="+", default=[132, 104, 80, 52, 40, 26])
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--out", default=None, help="results JSON (default benchmarks/results/decode_attention_bw.json)")
    ap.add_argument("--dry-run", action="store_true", help="tiny sizes on CPU; checks the plumbing, measures nothing")
    return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse(argv)
    report = run(args)
    write(report, args.out or (None if args.dry_run else os.path.join(HERE, "results", "decode_attention_bw.json")))
    return report


if __name__ == "__main__":
    main()
