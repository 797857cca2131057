"""dynaflow: intra-device parallelism (NanoFlow / DynaFlow style) as a compiler pass for PyTorch models.

    import dynaflow
    fast = dynaflow.compile(model, strategy="nanoflow", nano_batches=2)
    out = fast(x)              # equals model(x)
    print(fast.explain())      # segments, tags, split config, schedule table
"""

from __future__ import annotations

import logging

from dynaflow.config import DynaflowConfig
from dynaflow.errors import (
    BackendError,
    BatchCouplingError,
    CaptureError,
    ConfigError,
    DynaflowError,
    PartitionError,
    ScheduleError,
    StrategyError,
)
from dynaflow.ir import ALL, InputInfo, Lane, NanoGraph, NanoOp, Resource, Schedule, Segment, SegmentKind, SplitConfig
from dynaflow.requests import RequestLayout, requests
from dynaflow.timeline import Timeline, TimelineEvent
from dynaflow import timeline
from dynaflow.frontend.markers import mark
from dynaflow.frontend.rules import Mod, Op, Seq, Where, default_rules
from dynaflow import strategies
from dynaflow.strategies import Strategy, register_strategy
from dynaflow.api import Compiled, compile, parallelize
from dynaflow.strategies import load_strategy
from dynaflow.profiling import profile

logging.getLogger("dynaflow").addHandler(logging.NullHandler())

__version__ = "0.1.0"

__all__ = [
    "compile", "parallelize", "Compiled", "DynaflowConfig", "requests", "RequestLayout",
    "mark", "Op", "Mod", "Seq", "Where", "default_rules",
    "Strategy", "register_strategy", "strategies", "load_strategy", "profile",
    "SplitConfig", "InputInfo", "NanoOp", "NanoGraph", "Lane", "Schedule", "Segment", "SegmentKind", "Resource", "ALL",
    "Timeline", "TimelineEvent", "timeline",
    "DynaflowError", "ConfigError", "CaptureError", "PartitionError", "BatchCouplingError", "StrategyError",
    "ScheduleError", "BackendError",
]
