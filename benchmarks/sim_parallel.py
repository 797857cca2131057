"""What-if: the simulator's predicted overlap gain for tensor- and expert-parallel steps on H200 nodes.

No GPU and no second machine needed: each scenario is a chain of marked stages (one per operator of a
decoder layer on one rank), costed by the roofline of ``dynaflow.cost`` (H200 data-sheet numbers, bf16)
and the collective formulas of ``dynaflow.network`` (ring all-reduce, pairwise all-to-all). The model is
compiled with ``executor="sim"`` under each strategy; the predicted step time is compared with sequential
execution and with the ideal bound (all work / the busiest resource). Assumptions are printed and saved.

    python benchmarks/sim_parallel.py --out benchmarks/results/sim_parallel_h200.json
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

import torch
from torch import nn

import dynaflow

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _results  # noqa: E402
from dynaflow.cost import DEVICES, LinearCount, RooflineCost

log = logging.getLogger("bench.sim_parallel")
BF16 = 2


class Chain(nn.Module):
    """One marked stage per operator; the arithmetic is a placeholder, the costs come from the table."""

    def __init__(self, stages):
        super().__init__()
        self.stages = stages

    def forward(self, x):
        for name, kind in self.stages:
            dynaflow.mark(name, tags=(kind,))
            x = x * 1.0001 + 0.5
        return x


def gemm(k: int, n: int) -> LinearCount:
    """A [rows, k] x [k, n] bf16 GEMM: 2kn FLOPs per row, the weight once, activations per row."""
    return LinearCount(0.0, 2.0 * k * n, BF16 * k * n, BF16 * (k + n))


def tp_llama8b(tp: int, kv_len: int, prefill: bool, layers: int):
    """Llama-3-8B decoder layers on one of ``tp`` ranks (column/row parallel, two all-reduces per layer)."""
    h, kv, ffn = 4096, 1024, 14336
    stages, counts = [], {}
    for i in range(layers):
        if prefill:  # chunked prefill attends to a prefix of kv_len tokens: compute-bound flash attention
            attn = LinearCount(0.0, 4.0 * kv_len * h / tp, 0.0, BF16 * (h + 2 * kv) / tp + BF16 * 2 * kv * kv_len / tp / 64)
            attn_kind = "compute"
        else:  # decode: each token reads its request's K and V (kv_len tokens) — memory-bound
            attn = LinearCount(0.0, 4.0 * kv_len * h / tp, 0.0, BF16 * 2 * kv * kv_len / tp)
            attn_kind = "memory"
        layer = [(f"qkv{i}", "compute", gemm(h, (h + 2 * kv) // tp)), (f"attn{i}", attn_kind, attn),
                 (f"o{i}", "compute", gemm(h // tp, h)), (f"ar1_{i}", "network", LinearCount(0, 0, 0, 2 * BF16 * h)),
                 (f"up{i}", "compute", gemm(h, 2 * ffn // tp)), (f"down{i}", "compute", gemm(ffn // tp, h)),
                 (f"ar2_{i}", "network", LinearCount(0, 0, 0, 2 * BF16 * h))]
        for name, kind, c in layer:
            stages.append((name, kind))
            counts[f"{name}_0"] = c
    return stages, counts


def ep_moe(ep: int, layers: int):
    """A DeepSeek-V3-like MoE layer on one of ``ep`` ranks: hidden 7168, 8 of 256 routed experts (ffn 2048)
    plus a shared expert; bf16 dispatch and combine by all-to-all; MLA attention as dense GEMMs."""
    h, ffn, topk = 7168, 2048, 8
    stages, counts = [], {}
    for i in range(layers):
        layer = [(f"attn{i}", "compute", LinearCount(0.0, 2.0 * h * 3 * 1536 + 4.0 * 4096 * 192 * 128 / 8,
                                                      BF16 * h * 3 * 1536, BF16 * 4 * h)),
                 (f"gate{i}", "compute", gemm(h, 256)),
                 (f"dispatch{i}", "network", LinearCount(0, 0, 0, 2 * BF16 * h * topk)),
                 (f"experts{i}", "compute", LinearCount(0.0, topk * 3 * 2.0 * h * ffn, 3 * BF16 * h * ffn * 256 / ep,
                                                        BF16 * topk * (2 * h + ffn))),
                 (f"shared{i}", "compute", gemm(h, 3 * ffn)),
                 (f"combine{i}", "network", LinearCount(0, 0, 0, 2 * BF16 * h * topk))]
        for name, kind, c in layer:
            stages.append((name, kind))
            counts[f"{name}_0"] = c
    return stages, counts


CANDIDATES = [("sequential", {}), ("nanoflow", {"nano_batches": 2}), ("nanoflow", {"nano_batches": 3}),
              ("nanoflow", {"nano_batches": 4}), ("two_batch_overlap", {"stagger": 1})]


def scenario(label: str, stages, counts, world: int, link: str, tokens: int) -> dict:
    cost = RooflineCost(counts, DEVICES["h200"], "bfloat16", world=world, link=link)
    model = Chain(stages)
    x = torch.zeros(tokens, 2)
    rows = []
    seq_time = None
    for name, opts in CANDIDATES:
        torch._dynamo.reset()
        compiled = dynaflow.compile(model, strategy=name, executor="sim",
                                    config={"cost": cost, "cost_device": "h200", "strategy_options": opts})
        with torch.no_grad():
            compiled(x)
        t = compiled.last_timeline
        if seq_time is None:
            seq_time = t.makespan
            busy = {}
            for e in t.events:
                busy[e.resource] = busy.get(e.resource, 0.0) + e.duration
            ideal = sum(busy.values()) / max(busy.values())
        rows.append({"strategy": name, **opts, "step_ms": t.makespan * 1e3, "speedup": seq_time / t.makespan})
    share = {r: v / sum(busy.values()) for r, v in busy.items()}
    return {"scenario": label, "world": world, "link": link, "tokens": tokens, "ideal_bound": ideal,
            "resource_share": share, "rows": rows, "best": max(rows, key=lambda r: r["speedup"])}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    results = []
    for tp in (2, 4, 8):
        for prefill, tokens, kv in ((True, 4096, 4096), (False, 256, 4096)):
            stages, counts = tp_llama8b(tp, kv, prefill, args.layers)
            label = f"TP={tp} Llama-3-8B {'prefill chunk' if prefill else 'decode'} {tokens} tokens, KV {kv}"
            results.append(scenario(label, stages, counts, tp, "nvlink4", tokens))
    for link in ("nvlink4", "ib_ndr"):
        stages, counts = ep_moe(8, args.layers)
        results.append(scenario(f"EP=8 DeepSeek-V3-like MoE prefill 4096 tokens/rank over {link}", stages, counts, 8,
                                link, 4096))
    for r in results:
        log.info("\n%s  (ideal bound %.2fx; time share %s)", r["scenario"], r["ideal_bound"],
                 ", ".join(f"{k} {v:.0%}" for k, v in r["resource_share"].items()))
        for row in r["rows"]:
            opts = {k: v for k, v in row.items() if k not in ("strategy", "step_ms", "speedup")}
            log.info("  %-18s %-20s %9.3f ms  %5.2fx", row["strategy"], opts or "", row["step_ms"], row["speedup"])
    assumptions = {"device": repr(DEVICES["h200"]), "links": "dynaflow.network.LINKS (per-direction peak)",
                   "nccl_sm_share": dynaflow.cost.NCCL_SM_SHARE, "layers": args.layers}
    _results.write(_results.provenance("sim_parallel", predicted_for="NVIDIA H200 (dynaflow.cost.DEVICES['h200'])",
                                       measured=False, assumptions=assumptions, results=results), args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
