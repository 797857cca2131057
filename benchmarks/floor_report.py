"""The GPU-floor benchmark's summary: ratios per row, the must-show checks of issue 13, and the table.

Everything here is computed from the measured rows of one run (no numbers are assumed), so the checks are
reproducible from the JSON alone: ``python benchmarks/floor_report.py results/gpu_floor.json`` prints them
again.

Checks (issue 13, "Must show"):
1. every ``dynaflow auto`` row of every workload ≥ 0.99x of eager;
2. dense decode: ``dynaflow sequential`` + ``cuda_graphs`` within 2% of the eager whole-step CUDA graph;
3. launch-bound (c) at batch 1: the best dynaflow ``cuda_graphs=True`` row ≥ 1.5x of eager and ≥ 0.95x of
   ``torch.compile(mode="reduce-overhead")``;
and, for every row that ran, its outputs equal eager within the dtype's tolerance. Where a check's two rows
were also timed side by side in alternating blocks (the run's ``paired`` records), that ratio decides.
"""

from __future__ import annotations

import json
import sys
from typing import Any, Sequence

__all__ = ["annotate", "checks", "table", "render"]

SEQ_GRAPHS = "dynaflow sequential nano=1 +graphs"


def _ms(rows: list[dict[str, Any]], name: str) -> float | None:
    for r in rows:
        if r["row"] == name and r.get("ms") is not None:
            return r["ms"]
    return None


def annotate(workload: dict[str, Any]) -> None:
    """Add ``vs_eager`` and ``vs_eager_graph`` (their ms over this row's ms: > 1 is faster) to every timed row."""
    rows = workload["rows"]
    eager, graph = _ms(rows, "eager"), _ms(rows, "eager graph")
    for r in rows:
        ms = r.get("ms")
        r["vs_eager"] = eager / ms if ms and eager else None
        r["vs_eager_graph"] = graph / ms if ms and graph else None


def _why_missing(rows: list[dict[str, Any]], name: str) -> tuple[str, str]:
    for r in rows:
        if r["row"] == name:
            if r.get("error"):
                return "FAIL", f"row failed: {r['error'][:160]}"
            if r.get("skipped"):
                return "SKIP", f"row skipped: {r['skipped']}"
    return "SKIP", "row not run"


def _check(name: str, workload: str, value: float | None, threshold: float, status: str, detail: str) -> dict[str, Any]:
    return {"check": name, "workload": workload, "value": value, "threshold": threshold, "status": status,
            "detail": detail}


def _ratio_check(name: str, wl: str, rows: list[dict[str, Any]], num: str, den: str, threshold: float,
                 paired: Sequence[dict[str, Any]] = ()) -> dict[str, Any]:
    """PASS when ms(num) / ms(den) ≥ threshold (the ``den`` row is at least that much faster). Where the two
    rows were also timed side by side in alternating blocks (``paired``, see ``gpu_floor.paired``), that ratio
    decides: it is free of the drift between the rows' own slots in the run; the rows' ratio is shown too."""
    a, b = _ms(rows, num), _ms(rows, den)
    if a is None or b is None:
        status, why = _why_missing(rows, num if a is None else den)
        return _check(name, wl, None, threshold, status, why)
    v = a / b
    rows_detail = f"{num} {a:.3f} ms / {den} {b:.3f} ms = {v:.3f}x"
    pair = next((p for p in paired if p.get("row") == den and p.get("baseline") == num and p.get("ratio")), None)
    if pair is not None:
        v = pair["ratio"]
        rows_detail = (f"side by side ({pair['rounds']} alternating blocks each): {num} {pair['baseline_ms']:.3f} ms "
                       f"/ {den} {pair['ms']:.3f} ms = {v:.3f}x; in their own rows: {rows_detail}")
    return _check(name, wl, v, threshold, "PASS" if v >= threshold else "FAIL", rows_detail)


def checks(workloads: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for w in workloads:
        rows, wl, paired = w["rows"], w["name"], w.get("paired") or []
        autos = [r["row"] for r in rows if r["row"].startswith("dynaflow auto")]
        for name in autos or ["dynaflow auto"]:
            out.append(_ratio_check(f"1. {name} >= 0.99x eager", wl, rows, "eager", name, 0.99, paired))
        if w.get("family") == "dense_decode":
            out.append(_ratio_check("2. sequential+cuda_graphs within 2% of eager graph", wl, rows, "eager graph",
                                    SEQ_GRAPHS, 0.98, paired))
        if w.get("family") == "hf_decode" and w.get("batch") == 1:
            graphed = [r for r in rows if r["row"].startswith("dynaflow") and r["row"].endswith("+graphs")
                       and r.get("ms") is not None]
            if graphed:
                best = min(graphed, key=lambda r: r["ms"])["row"]
                out.append(_ratio_check(f"3. {best} >= 1.5x eager", wl, rows, "eager", best, 1.5))
                out.append(_ratio_check(f"3. {best} >= 0.95x reduce-overhead", wl, rows, "reduce-overhead", best, 0.95))
            else:
                failed = [r for r in rows if r["row"].endswith("+graphs") and r["row"].startswith("dynaflow")]
                status, why = ("FAIL", "every dynaflow cuda_graphs row failed") if any(r.get("error") for r in failed) \
                    else ("SKIP", "no dynaflow cuda_graphs row ran (dry run or not run)")
                out.append(_check("3. dynaflow cuda_graphs >= 1.5x eager and >= 0.95x reduce-overhead", wl, None, 1.5,
                                  status, why))
    bad = [f"{w['name']}/{r['row']} ({r['rel_err']:.2e} > {r['tol']:.0e})" for w in workloads for r in w["rows"]
           if r.get("rel_err") is not None and not r.get("equal")]
    ran = sum(1 for w in workloads for r in w["rows"] if r.get("rel_err") is not None)
    out.append(_check("outputs equal eager (every row that ran)", "all", float(len(bad)), 0.0,
                      "FAIL" if bad else ("PASS" if ran else "SKIP"),
                      "; ".join(bad) if bad else f"{ran} rows checked"))
    return out


def best_dynaflow(workloads: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The dynaflow row with the best ratio to eager over all workloads (with its workload's timeline PNG)."""
    rows = [(w, r) for w in workloads for r in w["rows"]
            if r.get("kind") == "dynaflow" and r.get("vs_eager") is not None and r.get("equal")]
    if not rows:
        return None
    w, r = max(rows, key=lambda wr: wr[1]["vs_eager"])
    tl = w.get("timeline") or {}
    return {"workload": w["name"], "row": r["row"], "vs_eager": r["vs_eager"], "vs_eager_graph": r.get("vs_eager_graph"),
            "timeline_png": tl.get("png") if tl.get("row") == r["row"] else None}


def _fmt(v: float | None, spec: str, unit: str = "") -> str:
    return "-" if v is None else format(v, spec) + unit


def table(workloads: list[dict[str, Any]]) -> str:
    """One line per row: workload, row, ms, vs eager, vs eager-graph, error (relative error or what failed)."""
    head = ("workload", "row", "ms", "vs eager", "vs eager-graph", "error")
    lines = []
    for w in workloads:
        for r in w["rows"]:
            if r.get("error"):
                err = "ERROR " + r["error"].splitlines()[0][:80]
            elif r.get("skipped"):
                err = "skipped: " + r["skipped"][:80]
            elif r.get("rel_err") is not None:
                err = f"{r['rel_err']:.1e}" + ("" if r.get("equal") else " NOT EQUAL")
            else:
                err = "-"
            lines.append((w["name"], r["row"], _fmt(r.get("ms"), ".3f"), _fmt(r.get("vs_eager"), ".2f", "x"),
                          _fmt(r.get("vs_eager_graph"), ".2f", "x"), err))
    widths = [max(len(str(x[i])) for x in [head, *lines]) for i in range(len(head) - 1)]
    fmt = "  ".join(f"{{:{'<' if i < 2 else '>'}{wd}}}" for i, wd in enumerate(widths)) + "  {}"
    return "\n".join([fmt.format(*head), fmt.format(*("-" * wd for wd in widths), "-----")]
                     + [fmt.format(*line) for line in lines])


def render(report: dict[str, Any]) -> str:
    """The table, then one line per check."""
    note = " (dry run: CPU timings of tiny models, not evidence of anything)" if report.get("dry_run") else ""
    out = [table(report["workloads"])]
    if report.get("skipped_on_cpu"):
        out.append(f"not run on the CPU: {report['skipped_on_cpu']}")
    for w in report["workloads"]:
        if w.get("status", "complete") != "complete":
            out.append(f"{w['name']}: {w['status'][:300]}")
    out += ["", f"checks{note}:"]
    for c in report["checks"]:
        out.append(f"  {c['status']:4}  {c['check']} [{c['workload']}]: {c['detail']}")
    return "\n".join(out)


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        print(render(json.load(f)))
