"""Start ``world`` ranks of ``tests/dist_worker.py`` on gloo, with a hard timeout; collect their results."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

WORKER = Path(__file__).with_name("dist_worker.py")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(case: str, world: int, timeout: float = 240.0) -> list[dict[str, Any]]:
    """Run ``case`` on ``world`` processes; kill them all and raise ``TimeoutError`` after ``timeout`` s."""
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        procs, logs = [], []
        for rank in range(world):
            env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                       MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), DIST_OUT=str(Path(tmp) / f"{rank}.json"),
                       DYNAFLOW_WAIT_TIMEOUT="60", OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
            log = open(Path(tmp) / f"{rank}.log", "w+")
            logs.append(log)
            procs.append(subprocess.Popen([sys.executable, os.environ.get("DIST_WORKER", str(WORKER)), case], env=env, stdout=log,
                                          stderr=subprocess.STDOUT))
        deadline = time.monotonic() + timeout
        try:
            for p in procs:
                p.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise TimeoutError(f"case {case!r} on {world} ranks did not finish in {timeout:.0f}s:\n"
                               + _tails(logs)) from None
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
        results = []
        for rank in range(world):
            out = Path(tmp) / f"{rank}.json"
            if not out.exists():
                raise RuntimeError(f"rank {rank} of case {case!r} wrote no result (exit {procs[rank].returncode}):\n"
                                   + _tails(logs))
            results.append(json.loads(out.read_text()))
        for log in logs:
            log.close()
        return results


def _tails(logs: list[Any]) -> str:
    out = []
    for rank, log in enumerate(logs):
        log.flush()
        log.seek(0)
        text = log.read()
        out.append(f"--- rank {rank} ---\n{text[-3000:]}")
    return "\n".join(out)
