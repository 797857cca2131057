"""dynaflow.backend: lowering schedules into programs and running them.

Every executor is registered here, in one registry (:data:`executors`, which also loads the
``dynaflow.executors`` entry-point group); ``executor=`` is validated against it. Adding an executor is one
file (a :class:`~dynaflow.backend.launch.Executor` subclass using the shared step loop) plus one line:
``executors.register("name", MyExecutor)``. The CUDA executor is imported on first use.
"""

from typing import Any

from dynaflow.errors import BackendError, ConfigError, did_you_mean
from dynaflow.registry import Registry
from dynaflow.backend.launch import Executor, ExecutorContext, StepContext, run_launch, step_loop
from dynaflow.backend.executors import SerialExecutor, ThreadExecutor
from dynaflow.backend.program import Launch, Program, Wait, lower
from dynaflow.backend.sim import SimExecutor, simulate

__all__ = ["Executor", "ExecutorContext", "StepContext", "SerialExecutor", "ThreadExecutor", "SimExecutor",
           "executors", "make_executor", "check_executor_name", "run_launch", "step_loop", "simulate",
           "Launch", "Program", "Wait", "lower"]

executors: Registry[Executor] = Registry("executor", Executor, BackendError, entry_point_group="dynaflow.executors")
executors.register("serial", SerialExecutor)
executors.register("thread", ThreadExecutor)
executors.register("sim", SimExecutor)
executors.register("cuda", "dynaflow.backend.cuda:CudaExecutor")  # raises BackendError without CUDA


def check_executor_name(name: Any) -> None:
    """Refuse an ``executor=`` that is neither ``"auto"`` nor registered (entry points included)."""
    names = ["auto", *executors.available()]
    if not isinstance(name, str) or name.lower() not in names:
        raise ConfigError(f"executor={name!r} is not one of {tuple(names)}.{did_you_mean(str(name), names)} "
                          "Register a new one with dynaflow.backend.executors.register(name, ExecutorClass).")


def make_executor(name: str, ctx: ExecutorContext) -> Executor:
    """A new executor ``name`` for a compiled graph: the class's ``from_context(ctx)``, or the factory called
    without options."""
    factory = executors.factory(name)
    if isinstance(factory, type) and issubclass(factory, Executor):
        return factory.from_context(ctx)
    return executors.resolve(name)
