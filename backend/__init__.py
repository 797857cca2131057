"""dynaflow.backend: lowering schedules into programs and running them (serial, thread, cuda).

The CUDA executor lives in ``dynaflow.backend.cuda`` and is imported lazily by the ``"cuda"`` registry entry.
"""

from dynaflow.backend.executors import Executor, SerialExecutor, ThreadExecutor, executors
from dynaflow.backend.program import Launch, Program, Wait, lower

__all__ = ["Executor", "SerialExecutor", "ThreadExecutor", "executors", "Launch", "Program", "Wait", "lower"]
