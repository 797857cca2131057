"""Cost model: FLOP/byte counting, the roofline, measured profiles, SM shares; timeline plots; the demo's
``--plot``."""

from __future__ import annotations

import sys

import pytest
import torch
from torch import nn

import dynaflow
from dynaflow.cost import (DEVICES, CombinedCost, LinearCount, MeasuredCost, RooflineCost, TableCost,
                           bandwidth_share, device_spec)
from dynaflow.errors import ConfigError
from dynaflow.ir import Resource, Segment
from dynaflow.profiles import Profile, load_profiles, save_profiles
from models import grad_off


class TwoLinears(nn.Module):
    def __init__(self, d_in=32, d_mid=64, d_out=16):
        super().__init__()
        self.a, self.b = nn.Linear(d_in, d_mid, bias=False), nn.Linear(d_mid, d_out, bias=False)

    def forward(self, x):
        dynaflow.mark("up", tags=("compute",))
        h = self.a(x)
        dynaflow.mark("down", tags=("memory",))
        return self.b(h)


def test_flop_counting_installs_no_process_wide_module_hooks(monkeypatch):
    """torch's FlopCounterMode enters a ModuleTracker, whose global module hooks run around every module call of
    every thread while it counts: another thread's Dynamo trace broke on them, and a compiled model's hook watch saw
    its hooks change and dropped Dynamo's code under running callers (a segfault). dynaflow counts without them."""
    import torch.utils.module_tracker as tracker
    from torch.utils.flop_counter import FlopCounterMode

    registered: list[str] = []
    for name in ("register_module_forward_pre_hook", "register_module_forward_hook"):
        real = getattr(tracker, name)
        monkeypatch.setattr(tracker, name, lambda hook, *a, _real=real, _name=name, **k:
                            registered.append(_name) or _real(hook, *a, **k))
    with FlopCounterMode(display=False):  # the control: torch's own counter registers them
        pass
    assert registered
    registered.clear()
    model = TwoLinears().eval()
    compiled = dynaflow.compile(model, strategy="sequential", executor="serial")
    x = torch.randn(10, 32)
    with grad_off():
        compiled(x)
        compiled.last_graph.cost_model(_flat_inputs(compiled, x))
    assert compiled.last_graph._counts["up_0"].flops(10) == pytest.approx(2 * 10 * 32 * 64)
    assert not registered


def test_flop_and_byte_counts_are_exact_for_linears():
    model = TwoLinears().eval()
    compiled = dynaflow.compile(model, strategy="sequential", executor="serial")
    x = torch.randn(10, 32)
    with grad_off():
        compiled(x)
        flat = _flat_inputs(compiled, x)
    graph = compiled.last_graph
    cost = graph.cost_model(flat)
    counts = graph._counts
    up, down = counts["up_0"], counts["down_0"]
    assert up.flops(10) == pytest.approx(2 * 10 * 32 * 64) and up.flops_fixed == pytest.approx(0, abs=1e-6)
    assert down.flops(3) == pytest.approx(2 * 3 * 64 * 16)
    # bytes: the weight once (fixed) + input and output rows (per row), fp32
    assert up.bytes_fixed == pytest.approx(32 * 64 * 4)
    assert up.bytes_per_row == pytest.approx((32 + 64) * 4)
    assert isinstance(cost, CombinedCost)


def _flat_inputs(compiled, x):
    store = {}
    g = compiled.last_graph
    g._record = store
    try:
        compiled(x)
    finally:
        g._record = None
    return store[id(g)]


def test_roofline_picks_the_bound_and_scales_with_sm_share():
    h200 = DEVICES["h200"]
    seg_c, seg_m = Segment("gemm", 0, Resource.COMPUTE), Segment("attn", 1, Resource.MEMORY)
    counts = {"gemm": LinearCount(0, 2 * 4096 * 4096, 4096 * 4096 * 2, 0),  # a 4096² bf16 GEMM per row
              "attn": LinearCount(0, 1e3, 0, 8 * 4096 * 2 * 1024)}  # reads a 1k-token KV per row
    model = RooflineCost(counts, h200, "bfloat16")
    big = model.estimate(seg_c, 4096)
    assert big.bound == "compute"
    assert big.seconds == pytest.approx(2 * 4096 ** 3 / h200.peak_flops + h200.launch_overhead, rel=1e-9)
    half = model.estimate(seg_c, 4096, sm_share=0.5)
    assert half.seconds - h200.launch_overhead == pytest.approx(2 * (big.seconds - h200.launch_overhead), rel=1e-9)
    a = model.estimate(seg_m, 64)
    assert a.bound == "memory"
    # a memory-bound op keeps full bandwidth down to the saturation share (40% of the SMs on Hopper)
    assert model.estimate(seg_m, 64, sm_share=0.4).seconds == pytest.approx(a.seconds, rel=1e-9)
    assert model.estimate(seg_m, 64, sm_share=0.2).seconds > 1.9 * (a.seconds - h200.launch_overhead)
    assert bandwidth_share(0.25, 0.4) == pytest.approx(0.625)
    assert model.estimate(Segment("unknown", 2, Resource.COMPUTE), 8) is None
    assert model.dtype == "bfloat16" and h200.flops_for("float32") < h200.flops_for("bfloat16")


def test_linear_count_fit_worked_example():
    c = LinearCount.fit((8, 100.0, 50.0), (4, 60.0, 30.0))
    assert (c.flops_fixed, c.flops_per_row, c.bytes_fixed, c.bytes_per_row) == pytest.approx((20, 10, 10, 5))
    assert LinearCount.fit((4, 40.0, 8.0), None).flops(2) == pytest.approx(20.0)


def test_measured_cost_interpolates_and_measured_wins_over_roofline():
    seg = Segment("mlp", 0, Resource.COMPUTE)
    measured = MeasuredCost({"mlp": {2: 10e-6, 4: 14e-6}})
    assert measured.seconds(seg, 3) == pytest.approx(12e-6)
    assert measured.seconds(seg, 6) == pytest.approx(18e-6)
    assert measured.seconds(seg, 4, sm_share=0.5) == pytest.approx(28e-6)
    roof = RooflineCost({"mlp": LinearCount(0, 1e9, 0, 0), "other": LinearCount(0, 1e9, 0, 0)})
    both = CombinedCost(measured, roof)
    assert both.seconds(seg, 4) == pytest.approx(14e-6)
    assert both.seconds(Segment("other", 1, Resource.COMPUTE), 1) == pytest.approx(roof.seconds(
        Segment("other", 1, Resource.COMPUTE), 1))
    with pytest.raises(ConfigError, match=r"no estimate for segment 'nope' at 3 rows.*dynaflow.profile"):
        both.seconds(Segment("nope", 2, Resource.COMPUTE), 3)


def test_device_spec_lookup_and_errors():
    assert device_spec("cpu") is DEVICES["cpu"] and device_spec("H200") is DEVICES["h200"]
    assert device_spec(DEVICES["a100"]) is DEVICES["a100"]
    with pytest.raises(ConfigError, match=r"Unknown device 'h20'.*Did you mean 'h200'"):
        device_spec("h20")
    with pytest.raises(ConfigError, match=r"Unknown device 'tpu'"):
        dynaflow.compile(TwoLinears(), config={"cost_device": "tpu"})


def test_profile_round_trip_and_use_by_the_sim_executor(tmp_path):
    model = TwoLinears().eval()
    x = torch.randn(8, 32)
    prof = dynaflow.profile(model, x, sizes=[2, 8], repeats=2)
    (p,) = prof.profiles
    assert set(p.timings) == {"up_0", "down_0"} and all(set(v) == {2, 8} for v in p.timings.values())
    assert all(t > 0 for v in p.timings.values() for t in v.values())
    assert p.device == "cpu" and p.dtype == "float32" and p.meta["repeats"] == 2
    path = prof.save(tmp_path / "prof.json")
    (loaded,) = load_profiles(path)
    assert loaded.key == p.key and loaded.timings == p.timings
    assert "up_0" in prof.table()
    torch._dynamo.reset()
    compiled = dynaflow.compile(model, strategy="sequential", executor="sim", config={"profile": path})
    with grad_off():
        assert torch.equal(compiled(x), model(x))
    t = compiled.last_timeline
    # the simulated step is the measured segments (rows 8), plus nothing else on one lane
    assert t.makespan == pytest.approx(p.timings["up_0"][8] + p.timings["down_0"][8], rel=1e-9)
    with pytest.raises(ConfigError, match=r"profile sizes \[9\] are outside 1..8"):
        dynaflow.profile(model, x, sizes=[9])


def test_profile_files_merge_and_bad_files_are_named(tmp_path):
    a = Profile("m1", "cpu", "float32", {"s": {1: 1e-6}})
    b = Profile("m2", "cpu", "float32", {"s": {1: 2e-6}})
    path = tmp_path / "p.json"
    save_profiles([a], path)
    save_profiles([b], path)
    assert {p.model for p in load_profiles(path)} == {"m1", "m2"}
    (tmp_path / "bad.json").write_text('{"profiles": [{"model": "x"}]}')
    with pytest.raises(ConfigError, match=r"Not a dynaflow profile.*timings"):
        load_profiles(tmp_path / "bad.json")
    with pytest.raises(ConfigError, match=r"Cannot read profile file"):
        load_profiles(tmp_path / "missing.json")


def test_table_cost_accepts_scalars_tables_and_callables():
    seg = Segment("x", 0, Resource.MEMORY)
    assert TableCost({"x": 2e-3}).seconds(seg, 5) == pytest.approx(2e-3)
    assert TableCost({"x": {1: 1e-3, 3: 3e-3}}).seconds(seg, 2) == pytest.approx(2e-3)
    assert TableCost({"x": lambda r: r * 1e-3}).seconds(seg, 4) == pytest.approx(4e-3)
    assert TableCost({}, default=1e-3).seconds(seg, 4) == pytest.approx(1e-3)
    assert TableCost({}).estimate(seg, 4) is None


# -- timelines you can look at ------------------------------------------------------------------------
def _timeline():
    model = TwoLinears().eval()
    compiled = dynaflow.compile(model, strategy="nanoflow", nano_batches=2, executor="thread")
    with grad_off():
        compiled(torch.randn(8, 32))
    return compiled.last_timeline


def test_plot_writes_a_png_with_one_row_per_lane(tmp_path):
    pytest.importorskip("matplotlib")
    import matplotlib.image

    t = _timeline()
    path = dynaflow.timeline.plot(t, tmp_path / "t.png", title="two linears")
    img = matplotlib.image.imread(path)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 600
    assert len(t.lanes) == 2


def test_plot_without_matplotlib_names_the_extra(tmp_path, monkeypatch):
    t = _timeline()
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ConfigError, match=r"dynaflow.timeline.plot needs matplotlib.*pip install 'dynaflow\[plot\]'"):
        dynaflow.timeline.plot(t, tmp_path / "t.png")


def test_demo_plot_writes_the_png(tmp_path):
    pytest.importorskip("matplotlib")
    from dynaflow.cli import main

    png = tmp_path / "demo.png"
    rc = main(["demo", "--model", "builtin", "--layers", "1", "--hidden", "32", "--batch", "4", "--seq", "8",
               "--repeats", "1", "--trace", str(tmp_path / "t.json"), "--plot", str(png)])
    assert rc == 0 and png.stat().st_size > 10_000


def test_model_hash_is_stable_across_captures():
    from dynaflow.profiles import model_hash
    from models import make_transformer, transformer_input

    hashes = set()
    for strategy in ("sequential", "nanoflow"):
        torch._dynamo.reset()
        compiled = dynaflow.compile(make_transformer(), strategy=strategy, executor="serial")
        with grad_off():
            compiled(transformer_input(5))
        hashes.add(model_hash(compiled.last_graph.segmented))
    assert len(hashes) == 1
    other = dynaflow.compile(TwoLinears(), executor="serial")
    with grad_off():
        other(torch.randn(4, 32))
    assert model_hash(other.last_graph.segmented) not in hashes


def test_network_segments_cost_their_collectives_over_the_link():
    from dynaflow import network

    seg = Segment("ar", 0, Resource.NETWORK, collectives=("all_reduce@tp", "all_reduce@tp"))
    nbytes_each = 4096 * 2 * 256  # hidden 4096, bf16, 256 tokens
    counts = {"ar": LinearCount(0, 0, 0, 2 * 2 * 4096 * 2)}  # two collectives: (in + out) each
    tp8 = RooflineCost(counts, "h200", "bfloat16", world=8, link="nvlink4")
    expect = 2 * network.all_reduce_time(nbytes_each, 8, "nvlink4") + DEVICES["h200"].launch_overhead
    est = tp8.estimate(seg, 256)
    assert est.seconds == pytest.approx(expect, rel=1e-9) and est.bound == "network"
    assert dict(est.demand)["net"] == 1.0 and 0 < dict(est.demand)["sm"] < 0.2  # NCCL kernels hold a few SMs
    # one rank: the collective is free; an unmarked network segment on one rank has no estimate
    assert RooflineCost(counts, "h200", world=1).estimate(seg, 256).seconds == pytest.approx(
        DEVICES["h200"].launch_overhead)
    # the device's own link when none is named
    own = RooflineCost(counts, "h200", world=2).estimate(seg, 256).seconds
    assert own == pytest.approx(2 * network.all_reduce_time(nbytes_each, 2, network.Link("h200", 450e9, 3e-6))
                                + DEVICES["h200"].launch_overhead, rel=1e-9)
    with pytest.raises(ConfigError, match=r"Unknown link|nvlnk"):
        dynaflow.DynaflowConfig(cost_link="nvlnk")


def test_sim_parallel_what_if_reproduces_its_committed_predictions():
    """benchmarks/sim_parallel.py is deterministic: rerunning one scenario gives the committed numbers."""
    import json
    import pathlib

    bench = pathlib.Path(__file__).resolve().parents[1] / "benchmarks"
    sys.path.insert(0, str(bench))
    try:
        import sim_parallel
    finally:
        sys.path.remove(str(bench))
    committed = json.loads((bench / "results" / "sim_parallel_h200.json").read_text())
    label = committed["results"][4]["scenario"]
    assert label.startswith("TP=8") and "prefill" in label
    stages, counts = sim_parallel.tp_llama8b(8, 4096, True, committed["assumptions"]["layers"])
    again = sim_parallel.scenario(label, stages, counts, 8, "nvlink4", 4096)
    assert [round(r["step_ms"], 6) for r in again["rows"]] == [round(r["step_ms"], 6) for r in committed["results"][4]["rows"]]
    assert again["best"]["speedup"] > 1.0 and again["ideal_bound"] > again["best"]["speedup"]
