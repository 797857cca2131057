"""dynaflow.backend: lowering schedules into programs and running them (serial, thread, sim; cuda next)."""

from dynaflow.backend.executors import Executor, SerialExecutor, ThreadExecutor, executors
from dynaflow.backend.program import Launch, Program, Wait, lower
from dynaflow.backend.sim import SimExecutor, simulate

__all__ = ["Executor", "SerialExecutor", "ThreadExecutor", "SimExecutor", "executors", "simulate",
           "Launch", "Program", "Wait", "lower"]
