"""``auto``'s floor check: after planning, calls alternate between dynaflow and the model itself, timed whole,
and the faster path keeps them (the model itself on a tie); every call's answer equals eager."""

from __future__ import annotations

import time

import torch

import dynaflow
from dynaflow.floor_check import SAMPLES, WARMUP, FloorCheck


def _run(check: FloorCheck, floor_s: float, dynaflow_s: float, calls: int) -> tuple[str, list]:
    order, verdicts = [], []
    for _ in range(calls):
        _, v = check.run("k", "calls like these", lambda: (order.append("F"), time.sleep(floor_s)),
                         lambda: (order.append("D"), time.sleep(dynaflow_s)), cuda=False)
        verdicts += [v] if v is not None else []
    return "".join(order), verdicts


def test_the_paths_alternate_after_dynaflows_warm_up_and_the_faster_keeps_the_calls():
    check = FloorCheck()
    check.start("k")
    order, verdicts = _run(check, floor_s=0.004, dynaflow_s=0.001, calls=2 * SAMPLES + 5 + 4)
    probe = WARMUP["dynaflow"] + WARMUP["floor"] + 2 * SAMPLES
    assert order[:3] == "DDF" and order[3:probe] == "DF" * SAMPLES and set(order[probe:]) == {"D"}
    assert len(verdicts) == 1 and verdicts[0].keeps_dynaflow and not check.active
    check.start("k")  # a decided key is not probed again
    assert not check.active


def test_a_slower_dynaflow_path_loses_to_the_model_itself():
    check = FloorCheck()
    check.start("k")
    _, verdicts = _run(check, floor_s=0.001, dynaflow_s=0.004, calls=20)
    assert len(verdicts) == 1 and not verdicts[0].keeps_dynaflow
    assert "the model itself runs them" in repr(verdicts[0])


def test_auto_on_a_tiny_model_hands_its_calls_to_the_model_itself_and_keeps_the_answer():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.GELU(), torch.nn.Linear(16, 16)).eval()
    x = torch.randn(8, 16)
    torch._dynamo.reset()
    # predicted only (measure_top_k=0): auto plans the best prediction, never its eager floor, so the floor
    # check is what compares it with the model itself
    c = dynaflow.compile(model, strategy=dynaflow.strategies.get("auto", cache=False, measure_top_k=0),
                         executor="serial")
    with torch.no_grad():
        ref = model(x)
        for i in range(40):
            torch.testing.assert_close(c(x), ref, rtol=0, atol=0, msg=lambda m, i=i: f"call {i}: {m}")
    verdicts = c.floor_check.verdicts
    assert len(verdicts) == 1 and not c.floor_check.active, c.explain()
    # the planned path (Dynamo, the front end, the executor) costs more than a tiny eager forward
    assert not verdicts[0].keeps_dynaflow, verdicts
    before = c.direct_calls
    with torch.no_grad():
        torch.testing.assert_close(c(x), ref, rtol=0, atol=0)
    assert c.direct_calls == before + 1
    assert "auto's floor check" in c.explain()
