"""Helpers for backend tests: compile a model through the fx path and get its lowered Program and inputs."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

import dynaflow
from dynaflow.backend.checks import map_launches


def program_of(model: torch.nn.Module, x: torch.Tensor, strategy: str = "nanoflow", nano: int = 2,
               executor: str = "serial", **config: Any):
    """(program, flat inputs, compiled) for ``model`` on ``x``: the fx path hands the graph ``[x]``."""
    c = dynaflow.compile(torch.fx.symbolic_trace(model), strategy=strategy, nano_batches=nano, executor=executor,
                         config=config or None)
    with torch.no_grad():
        c(x)
    return c.program, [x], c


def retag(program, names: set[str], hint: str):
    """A copy of ``program`` whose launches of segments ``names`` carry ``hint``."""
    def f(launch):
        if launch.segment.name not in names:
            return launch
        return dataclasses.replace(launch, segment=dataclasses.replace(launch.segment,
                                                                       hints=launch.segment.hints | {hint}))
    return map_launches(program, f)
