"""dynaflow.backend: lowering schedules into programs and running them (serial, thread; cuda next)."""

from dynaflow.backend.executors import Executor, SerialExecutor, ThreadExecutor, executors
from dynaflow.backend.program import Launch, Program, Wait, lower

__all__ = ["Executor", "SerialExecutor", "ThreadExecutor", "executors", "Launch", "Program", "Wait", "lower"]
