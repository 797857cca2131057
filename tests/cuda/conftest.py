"""GPU tests: every test here is marked ``cuda`` and skipped, with the reason, when CUDA is unavailable.

Run them on a GPU machine with ``pytest -m cuda`` (written for an H200 with torch 2.11+cu130).
"""

from __future__ import annotations

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    reason = (f"needs a CUDA GPU: torch.cuda.is_available() is False (torch {torch.__version__}, "
              f"CUDA runtime {torch.version.cuda or 'none'}); run `pytest -m cuda` on a GPU machine")
    skip = pytest.mark.skip(reason=reason)
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _cuda_clean():
    yield
    if torch.cuda.is_available():
        torch.cuda.synchronize()
