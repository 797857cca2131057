"""Quickstart: compile a model with dynaflow, check it equals eager, and look at the schedule.

    python examples/01_quickstart.py
"""

import torch

import dynaflow
from dynaflow.models import TinyTransformer

model = TinyTransformer(vocab=256, dim=64, heads=4, hidden=128, layers=2).eval()
ids = torch.randint(0, 256, (6, 32))

fast = dynaflow.compile(model, strategy="nanoflow", nano_batches=3)
with torch.no_grad():
    assert torch.equal(fast(ids), model(ids))
print(fast.explain())
print(fast.last_timeline)
