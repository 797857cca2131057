"""Every documented ``DYNAFLOW_DEBUG`` level shows something on stderr with no logging setup (issue 12)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CODE = """
import torch, dynaflow
from models import make_mlp, mlp_input
fast = dynaflow.compile(make_mlp().eval(), strategy="round_robin", nano_batches=2, executor="serial")
with torch.no_grad():
    fast(mlp_input(4))
"""


def _stderr(level: int) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DYNAFLOW_")}
    env.update(DYNAFLOW_DEBUG=str(level), PYTHONPATH=str(ROOT / "tests"))
    proc = subprocess.run([sys.executable, "-c", CODE], env=env, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stderr


@pytest.mark.parametrize("level, expected", [
    (0, None),
    (1, "batch 4 -> SplitConfig(4 → 2/2)"),
    (2, "planned in nanograph"),
    (3, "Program(SplitConfig(4 → 2/2)"),
    (4, "launch "),
])
def test_each_debug_level_prints_on_stderr(level, expected):
    err = _stderr(level)
    if expected is None:
        assert "dynaflow" not in err
    else:
        assert expected in err, err
