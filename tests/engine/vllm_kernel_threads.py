"""Evidence, not a test: vLLM's CPU GEMM (``_C.onednn_mm``) is not safe to call from several threads at once.

``python tests/engine/vllm_kernel_threads.py`` (in the engine tier's venv) calls it from three threads, first with
four different weight handlers, then all on one, and compares every product with the single-threaded one. On the
2-core CI machine the first part gave wrong products (31 of 9000 calls in one run) and the second aborted with
heap corruption (``munmap_chunk(): invalid pointer``). This is why the vLLM integration refuses dynaflow's thread
executor on vLLM's CPU platform (``dynaflow.integrations.vllm._setup.cpu_executor``).
"""

from __future__ import annotations

import os
import threading

os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")

import torch  # noqa: E402
from vllm import _custom_ops as ops  # noqa: E402


def main(calls: int = 3000, threads: int = 3) -> None:
    torch.manual_seed(0)
    handlers = [ops.create_onednn_mm(torch.randn(256, 128).t(), 32) for _ in range(4)]
    xs = [torch.randn(m, 128) for m in (3, 5, 7, 11, 13, 17, 19, 23)]
    ref = {(h, m): ops.onednn_mm(handlers[h], xs[m], None) for h in range(4) for m in range(8)}
    for shared in (False, True):
        wrong = [0]

        def work(seed: int) -> None:
            g = torch.Generator().manual_seed(seed)
            for _ in range(calls):
                h = 0 if shared else int(torch.randint(0, 4, (1,), generator=g))
                m = int(torch.randint(0, 8, (1,), generator=g))
                if not torch.equal(ops.onednn_mm(handlers[h], xs[m], None), ref[(h, m)]):
                    wrong[0] += 1

        workers = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
        for t in workers:
            t.start()
        for t in workers:
            t.join()
        print(f"{'one shared handler' if shared else 'four handlers'}: {wrong[0]} wrong products of {calls * threads}",
              flush=True)


if __name__ == "__main__":
    main()
