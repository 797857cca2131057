"""Shared pytest configuration for the dynaflow test suite.

* every test starts from a clean Dynamo state (``torch._dynamo.reset()``) and a fixed torch seed, so
  Dynamo's per-code-object recompile limit is never hit across tests and the results do not depend on
  the test order;
* hypothesis runs the ``ci`` profile (no deadline: the first example of a test may compile a model);
  ``HYPOTHESIS_PROFILE=large`` runs 20x the examples;
* ``DYNAFLOW_VERIFY_SPLITS=1`` unless the caller set it: every split segment is run whole and on two
  halves on the first call (the batch analysis's differential safety net).
"""

from __future__ import annotations

import os
import sys

import pytest
import torch
from hypothesis import HealthCheck, settings

sys.path.insert(0, os.path.dirname(__file__))  # make ``import models`` work from every test module

settings.register_profile(
    "ci",
    deadline=None,
    max_examples=25,
    derandomize=False,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                           HealthCheck.data_too_large],
)
settings.register_profile("large", parent=settings.get_profile("ci"), max_examples=500)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
os.environ.setdefault("DYNAFLOW_VERIFY_SPLITS", "1")


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    torch.manual_seed(0)
    yield


OPT_IN_TIERS = ("integration", "engine", "triton")
"""Markers whose tests need their own venv (.ci/integration, .ci/engine) or environment (``triton``:
``TRITON_INTERPRET=1`` from the start; the default tier runs them in a subprocess): *deselected* (not skipped)
unless the ``-m`` expression names the marker, so ``pytest -q`` neither runs nor counts them."""


def pytest_collection_modifyitems(config, items):
    expr = config.option.markexpr or ""
    off = [m for m in OPT_IN_TIERS if m not in expr]
    keep, drop = [], []
    for item in items:
        (drop if any(item.get_closest_marker(m) for m in off) else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep
