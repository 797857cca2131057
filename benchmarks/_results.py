"""Shared by the benchmarks: the provenance every result file carries, and writing it."""

from __future__ import annotations

import datetime
import json
import logging
import os
import platform
import sys
from typing import Any

import torch

log = logging.getLogger("bench")


def provenance(benchmark: str, **extra: Any) -> dict[str, Any]:
    """What produced a result: benchmark, machine, torch/python versions, date, the exact command."""
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"benchmark": benchmark, "gpu": gpu, "machine": platform.processor() or platform.machine(),
            "cores": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
            "date": datetime.date.today().isoformat(), "command": " ".join(["python"] + sys.argv), **extra}


def write(result: dict[str, Any], path: str | None) -> None:
    """Write ``result`` as indented JSON to ``path`` (nothing when ``path`` is None)."""
    if not path:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    log.info("wrote %s", path)
