"""The GPU-floor benchmark (benchmarks/gpu_floor.py and its modules) on CPU: the row plan, the checks
computed from rows, the time limits, and a ``--dry-run`` end to end whose every row must equal eager.
Nothing here asserts a speed: the dry run times tiny models on a CPU."""

from __future__ import annotations

import json
import os
import sys
import time

import pytest
import torch

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
sys.path.insert(0, BENCH)
import baselines  # noqa: E402
import floor_dynaflow  # noqa: E402
import floor_measure  # noqa: E402
import floor_report  # noqa: E402
import gpu_floor  # noqa: E402
import workloads  # noqa: E402

PROVENANCE = {"benchmark", "gpu", "torch", "date", "command"}


# -- the dry run, end to end (one run shared by the tests that read it) ----------------------------------
@pytest.fixture(scope="module")
def quick_dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("floor") / "floor.json"
    t0 = time.perf_counter()
    report = gpu_floor.main(["--dry-run", "--quick", "--out", str(out)])
    return report, json.loads(out.read_text()), out, time.perf_counter() - t0


def _rows(report):
    return [(w, r) for w in report["workloads"] for r in w["rows"]]


def test_dry_run_writes_the_json_with_provenance_and_every_workload(quick_dry_run):
    report, data, out, _ = quick_dry_run
    assert PROVENANCE <= set(data) and data["benchmark"] == "gpu_floor" and data["dry_run"] and data["quick"]
    assert "gpu_floor.py" in data["command"] and data["skipped_on_cpu"]
    assert [w["name"] for w in data["workloads"]] == ["a-2L", "b", "c-b1", "c-b4"]
    for w in data["workloads"]:
        assert w["status"] == "complete" and w["description"] and w["meta"]["dtype"] == "float32"
        assert w["rows"][0]["row"] == "eager" and w["rows"][0]["vs_eager"] == 1.0
        kinds = [r["kind"] for r in w["rows"]]
        assert kinds == sorted(kinds), "baselines are listed before the dynaflow rows"
        nano = min(2, w["batch"])  # batch 1 runs (and is named) with one nano-batch
        assert {"dynaflow auto", "dynaflow sequential nano=1", f"dynaflow nanoflow nano={nano}"} <= {r["row"] for r in w["rows"]}
        # auto timed again beside eager, in alternating blocks (not on transformers: its rows hook the model)
        paired = [(p["row"], p["baseline"]) for p in w["paired"] if p.get("ratio")]
        assert paired == ([] if w["family"] == "hf_decode" else [("dynaflow auto", "eager")]), w["paired"]


def test_every_dry_run_row_that_ran_equals_eager(quick_dry_run):
    _, data, _, _ = quick_dry_run
    ran = [(w["name"], r) for w, r in _rows(data) if r.get("ms") is not None]
    assert len(ran) >= 16
    for name, r in ran:
        assert r["equal"] and r["rel_err"] <= r["tol"] == 1e-4, (name, r["row"], r["rel_err"])
    for w, r in _rows(data):
        if r["kind"] == "baseline":  # the benchmark's own code never fails
            assert "error" not in r, (w["name"], r["row"], r.get("traceback"))
        elif "error" in r:  # a dynaflow row may fail (it is then recorded), but inside dynaflow, not in the harness
            assert BENCH not in (r["raised_in"] or ""), (w["name"], r["row"], r["traceback"])
    # the hand-written splits ran on the CPU stand-in streams, and dynaflow's sequential row everywhere
    ok = {(w["name"], r["row"]) for w, r in _rows(data) if r.get("equal")}
    assert {("a-2L", "two-stream"), ("a-2L", "pipe"), ("b", "decode|prefill streams"), ("c-b4", "two-stream")} <= ok
    assert all((w, "dynaflow sequential nano=1") in ok for w in ("a-2L", "b", "c-b1", "c-b4"))


def test_cuda_rows_are_skipped_on_the_dry_run_and_say_why(quick_dry_run):
    _, data, _, _ = quick_dry_run
    rows = {(w["name"], r["row"]): r for w, r in _rows(data)}
    for key in [("a-2L", "eager graph"), ("a-2L", "reduce-overhead"), ("a-2L", "pipe SM graph"), ("b", "two-stream graph"),
                ("c-b1", "reduce-overhead")]:
        assert "needs CUDA" in rows[key]["skipped"], key
    assert rows[("c-b1", "two-stream")]["skipped"] == "batch 1 cannot be halved"
    assert not any(r["row"].endswith("+graphs") or " SM " in r["row"] for _, r in _rows(data) if r["kind"] == "dynaflow")


def test_dry_run_prints_the_table_and_the_checks_last(quick_dry_run, capsys):
    report, data, out, _ = quick_dry_run
    text = floor_report.render(data)
    assert text.splitlines()[0].split() == ["workload", "row", "ms", "vs", "eager", "vs", "eager-graph", "error"]
    assert "checks (dry run" in text and "1. dynaflow auto >= 0.99x eager [a-2L]" in text
    assert [c["status"] for c in data["checks"] if c["check"].startswith("2.")] == ["SKIP"]  # needs the eager graph
    assert data["checks"][-1]["check"].startswith("outputs equal eager") and data["checks"][-1]["status"] == "PASS"
    pngs = [w["timeline"]["png"] for w in data["workloads"] if w["timeline"] and w["timeline"].get("png")]
    assert pngs and all(os.path.dirname(p) == str(out.parent) and os.path.exists(p) for p in pngs)


@pytest.mark.slow  # every registered strategy on every tiny workload
def test_full_dry_run_every_strategy(tmp_path):
    out = tmp_path / "floor.json"
    gpu_floor.main(["--dry-run", "--out", str(out)])
    data = json.loads(out.read_text())
    names = {r["row"] for w in data["workloads"] for r in w["rows"]}
    assert {f"dynaflow {s}" for s in ("auto", "prefill_decode")} | {"dynaflow round_robin nano=2",
                                                                    "dynaflow two_batch_overlap nano=2"} <= names
    assert all(r["equal"] for w in data["workloads"] for r in w["rows"] if r.get("ms") is not None)


def test_isolated_worker_runs_one_workload_in_a_subprocess(tmp_path):
    out = tmp_path / "floor.json"
    gpu_floor.main(["--dry-run", "--workloads", "b", "--strategies", "sequential", "--isolate", "--out", str(out)])
    (w,) = json.loads(out.read_text())["workloads"]
    assert w["name"] == "b" and w["status"] == "complete"
    assert {r["row"]: r.get("equal") for r in w["rows"] if r.get("ms") is not None} == {
        "eager": True, "two-stream": True, "decode|prefill streams": True, "dynaflow sequential nano=1": True}


def test_a_worker_past_its_share_of_the_budget_is_killed_and_the_run_goes_on(tmp_path):
    out = tmp_path / "floor.json"
    t0 = time.perf_counter()
    report = gpu_floor.main(["--dry-run", "--workloads", "b", "--isolate", "--budget-s", "2", "--out", str(out)])
    assert time.perf_counter() - t0 < 30
    (w,) = report["workloads"]
    assert w["status"].startswith("killed after its time limit") and json.loads(out.read_text())["checks"]


def test_assemble_keeps_the_rows_of_a_killed_worker_in_display_order():
    records = [{"type": "workload", "name": "b", "family": "mix", "batch": 6},
               {"type": "row", "workload": "b", "row": "dynaflow auto", "kind": "dynaflow", "ms": 1.0, "order": 5},
               {"type": "row", "workload": "b", "row": "eager", "kind": "baseline", "ms": 2.0, "order": 0}]
    entry = gpu_floor.assemble(records, "b", "killed after its time limit of 9 s", 9.0)
    assert [r["row"] for r in entry["rows"]] == ["eager", "dynaflow auto"] and entry["status"].startswith("killed")
    floor_report.annotate(entry)
    assert entry["rows"][1]["vs_eager"] == 2.0 and "order" not in entry["rows"][0]


# -- the plan of rows ------------------------------------------------------------------------------------
def _tiny_dense():
    return workloads.dense_decode(2, tiny=True, device="cpu", dtype=torch.float32)


def test_plan_runs_what_the_checks_need_first_and_quick_trims_the_rest():
    env = baselines.Env(cuda=True, num_sms=132, sm_split=(80, 52))
    w = _tiny_dense()
    args = gpu_floor.parse(["--quick"])
    names = [p.name for p in gpu_floor.plan(w, env, args)]
    assert names[:4] == ["eager", "eager graph", "dynaflow auto", "dynaflow auto +graphs"]
    assert names[4:6] == ["dynaflow sequential nano=1", "dynaflow sequential nano=1 +graphs"]
    assert {"reduce-overhead", "pipe SM 80+52", "pipe SM 80+52 graph", "dynaflow nanoflow nano=2 SM 80+52 +graphs"} <= set(names)
    assert not any("round_robin" in n for n in names)  # --quick: auto, sequential, nanoflow
    w.name = "a-8L"  # under --quick only a-2L gets the partitions, and a-2L and c-b1 reduce-overhead
    trimmed = [p.name for p in gpu_floor.plan(w, env, args)]
    assert "reduce-overhead" not in trimmed and not any(" SM " in n for n in trimmed)
    full = [p.name for p in gpu_floor.plan(w, env, gpu_floor.parse([]))]
    assert {"dynaflow round_robin nano=2 +graphs", "dynaflow prefill_decode SM 80+52", "reduce-overhead"} <= set(full)
    order = sorted(gpu_floor.plan(w, env, gpu_floor.parse([])), key=lambda p: p.order)
    assert [p.kind for p in order] == sorted(p.kind for p in order)


def test_matrix_covers_auto_and_every_registered_strategy():
    from dynaflow.strategies import available

    cpu = floor_dynaflow.matrix(None, baselines.Env(cuda=False))
    assert [r.strategy for r in cpu][0] == "auto" and {r.strategy for r in cpu} == set(available())
    assert not any(r.graphs or r.sm for r in cpu)
    gpu = floor_dynaflow.matrix(None, baselines.Env(cuda=True, num_sms=132, sm_split=(80, 52)))
    assert len(gpu) == 2 * len(cpu) + 2 * len(floor_dynaflow.SM_OPTIONS) + 1  # + sequential with Inductor
    ind = [r for r in gpu if r.inductor]
    assert [r.name for r in ind] == ["dynaflow sequential nano=1 +inductor +graphs"]
    assert ind[0].config()["inductor"] and ind[0].config()["cuda_graphs"]
    nf = next(r for r in gpu if r.strategy == "nanoflow" and r.sm and r.graphs)
    assert nf.name == "dynaflow nanoflow nano=2 SM 80+52 +graphs"
    assert nf.config()["strategy_options"] == {"sm_counts": {"compute": 80, "memory": 52}} and nf.config()["cuda_graphs"]
    pd = next(r for r in gpu if r.strategy == "prefill_decode" and r.sm)
    assert pd.options() == {"prefill_sms": 80, "decode_sms": 52}


def test_parse_defaults():
    gpu = gpu_floor.parse([])
    assert gpu.out_path.endswith(os.path.join("benchmarks", "results", "gpu_floor.json"))
    assert gpu.executor == "cuda" and gpu.repeats >= 20 and gpu.budget_s == 1500
    assert gpu_floor.parse(["--quick"]).budget_s <= 420  # leaves room in 8 minutes for start-up and the summary
    dry = gpu_floor.parse(["--dry-run"])
    assert dry.executor == "serial" and dry.budget_s is None and "results" not in dry.out_path
    with pytest.raises(SystemExit):
        gpu_floor.parse(["--repeats", "5"])


def test_full_size_workloads_are_the_issue_s():
    s = workloads.DenseShape()
    assert (s.hidden, s.heads, s.kv_heads, s.head_dim, s.intermediate, s.batch, s.kv_len) == (4096, 32, 8, 128, 14336, 2048, 512)
    h = workloads.HFShape()
    assert (h.hidden, h.layers, h.heads, h.intermediate, h.vocab) == (2048, 4, 16, 5632, 32000)
    assert [n for n, _ in workloads.instances("a,b,c", tiny=False)] == ["a-2L", "a-8L", "b", "c-b1", "c-b4", "c-b16"]
    with pytest.raises(SystemExit, match="unknown workload 'd'"):
        workloads.instances("a,d", tiny=False)


def test_dense_decode_does_not_modify_its_caches_and_hf_decode_resets_its_position():
    w = _tiny_dense()
    model, (x, ks, vs), desc = w
    before = [k.clone() for k in ks]
    with torch.no_grad():
        a, b = w.step(), w.step()
    assert torch.equal(a, b) and all(torch.equal(k, c) for k, c in zip(ks, before)) and "read-only" in desc
    hf = workloads.hf_decode(2, tiny=True, device="cpu", dtype=torch.float32)
    counters = workloads.cache_counters(next(iter(hf.kwargs.values())))
    with torch.no_grad():
        a, b = hf.step(), hf.step()
    assert torch.equal(a, b) and all(int(c) == hf.meta["start"] + 1 for c in counters)
    assert set(hf.kwargs) <= {"cache", "past_key_values"}


# -- measuring --------------------------------------------------------------------------------------------
@pytest.mark.slow  # Inductor compiles for the CPU
def test_reduce_overhead_baseline_plumbing_on_cpu():
    """The reduce-overhead row's code (static marks, step marks, restoring the marks) with Inductor for the CPU:
    cudagraph trees skip CPU tensors, so this checks the plumbing only."""
    env = baselines.Env(cuda=True)  # lifts the CUDA guard only
    for w in (_tiny_dense(), workloads.hf_decode(4, tiny=True, device="cpu", dtype=torch.float32)):
        torch._dynamo.maybe_mark_dynamic(w.static[0], 0)  # as a dynaflow row before it leaves the inputs
        before = [getattr(t, "_dynamo_static_input_type", None) for t in w.static]
        with torch.no_grad():
            ref = w.step()
            runner = baselines.reduce_overhead(w, env)
            assert all(getattr(t, "_dynamo_static_input_type", None) for t in w.static)
            assert not hasattr(w.static[0], "_dynamo_weak_dynamic_indices")  # a static-shape compile
            for _ in range(2):
                w.reset and w.reset()
                out = runner.call()
            runner.close()
        assert floor_measure.rel_err(out, ref) < 1e-4
        assert [getattr(t, "_dynamo_static_input_type", None) for t in w.static] == before
        assert w.static[0]._dynamo_weak_dynamic_indices == {0}
        torch._dynamo.reset()


def test_rel_err_and_tolerances():
    ref = (torch.ones(4), torch.full((2,), 2.0))
    assert floor_measure.rel_err(ref, ref) == 0.0
    assert floor_measure.rel_err((torch.ones(4), torch.full((2,), 2.2)), ref) == pytest.approx(0.1)
    assert floor_measure.tolerance(torch.bfloat16) == 3e-2 and floor_measure.tolerance("float32") == 1e-4
    with pytest.raises(ValueError):
        floor_measure.rel_err(torch.ones(3), torch.ones(4))


def test_time_limit_interrupts_a_row():
    with pytest.raises(floor_measure.RowTimeout, match="past its time limit"):
        with floor_measure.time_limit(0.2, "row"):
            time.sleep(5)
    with floor_measure.time_limit(None):
        pass


def test_a_failing_row_is_recorded_and_a_skipped_row_says_why():
    w = _tiny_dense()
    args = gpu_floor.parse(["--dry-run"])
    ref = w.step()

    def broken():
        raise RuntimeError("boom")

    def skipped():
        raise baselines.Skip("not here")

    rec = gpu_floor.measure(w, "broken", "baseline", broken, ref, args, False, None)
    assert rec["error"] == "RuntimeError: boom" and rec["raised_in"].startswith(__file__) and "ms" not in rec
    assert gpu_floor.measure(w, "skipped", "baseline", skipped, ref, args, False, None)["skipped"] == "not here"
    ok = gpu_floor.measure(w, "eager", "baseline", lambda: baselines.eager(w, baselines.Env(False)), ref, args, False, 30)
    assert ok["equal"] and ok["ms"] > 0


# -- the checks, computed from rows -----------------------------------------------------------------------
def _wl(name, family, rows, batch=2048):
    w = {"name": name, "family": family, "batch": batch, "rows": [{"row": r, "ms": ms} for r, ms in rows.items()]}
    floor_report.annotate(w)
    return w


def test_checks_are_computed_from_the_measured_rows():
    a = _wl("a-2L", "dense_decode", {"eager": 5.7, "eager graph": 5.6, "dynaflow auto": 5.72, "dynaflow auto +graphs": 5.9,
                                     floor_report.SEQ_GRAPHS: 5.65})
    c = _wl("c-b1", "hf_decode", {"eager": 3.0, "eager graph": 1.2, "reduce-overhead": 1.0, "dynaflow auto": 3.0,
                                  "dynaflow sequential nano=1 +graphs": 1.9, "dynaflow nanoflow nano=1 +graphs": 1.05},
            batch=1)
    got = {(ch["workload"], ch["check"]): ch for ch in floor_report.checks([a, c])}
    assert got[("a-2L", "1. dynaflow auto >= 0.99x eager")]["status"] == "PASS"  # 5.7 / 5.72 = 0.9965
    assert got[("a-2L", "1. dynaflow auto +graphs >= 0.99x eager")]["status"] == "FAIL"  # 5.7 / 5.9 = 0.966
    seq = got[("a-2L", "2. sequential+cuda_graphs within 2% of eager graph")]
    assert seq["status"] == "PASS" and seq["value"] == pytest.approx(5.6 / 5.65)
    best = "dynaflow nanoflow nano=1 +graphs"  # the fastest cuda_graphs row is the one checked
    assert got[("c-b1", f"3. {best} >= 1.5x eager")]["status"] == "PASS"  # 3.0 / 1.05
    assert got[("c-b1", f"3. {best} >= 0.95x reduce-overhead")]["status"] == "PASS"  # 1.0 / 1.05 = 0.952
    assert a["rows"][0]["vs_eager"] == 1.0 and a["rows"][2]["vs_eager_graph"] == pytest.approx(5.6 / 5.72)
    assert "vs eager-graph" in floor_report.table([a, c])


def test_checks_fail_on_a_failed_row_skip_a_missing_one_and_catch_wrong_outputs():
    a = _wl("a-2L", "dense_decode", {"eager": 5.7, "eager graph": 5.6})
    a["rows"].append({"row": "dynaflow auto", "error": "StrategyError: no estimate for glue_0"})
    a["rows"].append({"row": "dynaflow nanoflow nano=2", "ms": 5.0, "rel_err": 0.2, "tol": 3e-2, "equal": False})
    c = _wl("c-b1", "hf_decode", {"eager": 3.0}, batch=1)
    got = {(ch["workload"], ch["check"][:2]): ch for ch in floor_report.checks([a, c])}
    assert got[("a-2L", "1.")]["status"] == "FAIL" and "no estimate" in got[("a-2L", "1.")]["detail"]
    assert got[("a-2L", "2.")]["status"] == "SKIP" and got[("c-b1", "3.")]["status"] == "SKIP"
    assert got[("all", "ou")]["status"] == "FAIL" and "a-2L/dynaflow nanoflow nano=2" in got[("all", "ou")]["detail"]
    assert "ERROR StrategyError" in floor_report.table([a, c])


def test_a_check_reads_the_side_by_side_timing_of_its_two_rows_where_there_is_one():
    """Rows timed minutes apart carry the GPU's clock drift between them; the run times a check's two rows again
    in alternating blocks, and that ratio decides (the rows' own ratio is still shown)."""
    a = _wl("a-2L", "dense_decode", {"eager": 5.7, "eager graph": 5.45, "dynaflow auto": 5.72,
                                     floor_report.SEQ_GRAPHS: 5.73})
    a["paired"] = [{"row": floor_report.SEQ_GRAPHS, "baseline": "eager graph", "ms": 5.70, "baseline_ms": 5.62,
                    "ratio": 5.62 / 5.70, "rounds": 8},
                   {"row": "dynaflow auto", "baseline": "eager", "error": "RuntimeError: lost"}]
    got = {ch["check"][:2]: ch for ch in floor_report.checks([a])}
    seq = got["2."]
    assert seq["status"] == "PASS" and seq["value"] == pytest.approx(5.62 / 5.70)  # the rows alone: 5.45/5.73 fails
    assert "side by side" in seq["detail"] and "in their own rows" in seq["detail"]
    assert got["1."]["value"] == pytest.approx(5.7 / 5.72) and "side by side" not in got["1."]["detail"]


def test_pairs_are_the_checks_rows_that_ran_and_equal_eager():
    rows = [{"row": n, "ms": 1.0, "equal": True} for n in ("eager", "eager graph", "dynaflow auto",
                                                            "dynaflow auto +graphs", floor_report.SEQ_GRAPHS)]
    rows.append({"row": "dynaflow nanoflow nano=2", "ms": 1.0, "equal": False})

    class W:
        family = "dense_decode"

    assert gpu_floor.pairs(W(), rows) == [("dynaflow auto", "eager"), ("dynaflow auto +graphs", "eager"),
                                          (floor_report.SEQ_GRAPHS, "eager graph")]
    W.family = "hf_decode"  # its dynaflow rows hook the model: a baseline beside one would run the hook
    assert gpu_floor.pairs(W(), rows) == []
    rows[0]["equal"] = False
    W.family = "mix"
    assert gpu_floor.pairs(W(), rows) == []
