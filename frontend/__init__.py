"""dynaflow.frontend: capture, split rules and markers, partitioning, and batch analysis."""

from dynaflow.frontend.batching import BatchAnalysis, analyze, find_batch_symbol
from dynaflow.frontend.capture import check_outputs, mark_batch_dynamic, symbolize
from dynaflow.frontend.markers import mark
from dynaflow.frontend.partition import partition
from dynaflow.frontend.rules import Mod, Op, Rule, Seq, Where, default_rules

__all__ = ["mark", "Op", "Mod", "Seq", "Where", "Rule", "default_rules", "partition", "analyze", "BatchAnalysis",
           "find_batch_symbol", "mark_batch_dynamic", "symbolize", "check_outputs"]
