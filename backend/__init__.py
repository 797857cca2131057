"""dynaflow.backend: lowering schedules into programs and running them (serial, thread, sim, cuda).

The CUDA executor lives in ``dynaflow.backend.cuda`` and is imported lazily by the ``"cuda"`` registry entry.
"""

from dynaflow.backend.executors import Executor, SerialExecutor, ThreadExecutor, executors
from dynaflow.backend.program import Launch, Program, Wait, lower
from dynaflow.backend.sim import SimExecutor, simulate

__all__ = ["Executor", "SerialExecutor", "ThreadExecutor", "SimExecutor", "executors", "simulate",
           "Launch", "Program", "Wait", "lower"]
