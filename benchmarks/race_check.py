"""A small multi-lane schedule, intact or with one event wait removed, for race detectors on a GPU.

    python benchmarks/race_check.py --broken                 # prints max |out - ref| (large: a race)
    TORCH_CUDA_SANITIZER=1 python benchmarks/race_check.py --broken   # torch's stream sanitizer reports it
    compute-sanitizer --tool racecheck python benchmarks/race_check.py --broken

Note: ``compute-sanitizer --tool racecheck`` checks *shared-memory* hazards inside kernels; a missing
event between two streams is a global-memory ordering bug, which torch's CUDA sanitizer
(``TORCH_CUDA_SANITIZER=1``, it tracks every tensor access per stream and the events between streams)
is built to catch. Both are run by tests/cuda/test_races.py where available; the exit code is 0 when
the output matched the reference, 3 when it did not.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))


def build(broken: bool, delay_cycles: int):
    import dynaflow
    from dynaflow.backend.checks import drop_wait, map_launches
    from models import make_transformer, transformer_input

    model = make_transformer().cuda()
    x = transformer_input(6).cuda()
    c = dynaflow.compile(torch.fx.symbolic_trace(model), strategy="nanoflow", nano_batches=2, executor="serial")
    with torch.no_grad():
        c(x)
    p = c.program
    dropped, removed = drop_wait(p)
    slow = removed.op

    def delay(launch):
        if launch.op != slow or not delay_cycles:
            return launch
        fn = launch.fn

        def late(*args):
            torch.cuda._sleep(delay_cycles)  # the producer finishes long after the consumer starts
            return fn(*args)

        return dataclasses.replace(launch, fn=late)

    if broken:
        # keep the host issue order (producer issued first), drop only the device-side wait
        p = dataclasses.replace(p, streams=dropped.streams)
    return map_launches(p, delay), [x], model, removed


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--broken", action="store_true", help="remove one cross-lane event wait")
    ap.add_argument("--delay", type=int, default=200_000_000, help="producer delay in GPU cycles (torch.cuda._sleep)")
    args = ap.parse_args(argv)
    from dynaflow.backend.cuda import CudaExecutor

    program, inputs, model, removed = build(args.broken, args.delay)
    ex = CudaExecutor()
    with torch.no_grad():
        # the executor's first step of a program runs on one stream (it measures the merge buffers), so the
        # lanes — and the missing wait — only matter from the second step on; that one gets a different
        # input, so stale memory from the first step cannot pass for the right answer
        ex.run(program, [inputs[0] * 0.5])
        torch.cuda.synchronize()
        ref = model(inputs[0])
        out = ex.run(program, inputs)
        torch.cuda.synchronize()
    err = (out - ref).abs().max().item()
    ok = bool(torch.allclose(out, ref, atol=1e-4, rtol=1e-4))
    print(json.dumps({"broken": args.broken, "removed": repr(removed), "max_abs_err": err, "match": ok}))
    return 0 if ok else 3


if __name__ == "__main__":
    sys.exit(main())
