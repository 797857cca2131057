"""Test-only CPU shim for SGLang 0.5.20: placeholder ``torchvision`` modules when torchvision is not importable.

``sglang`` imports ``torchvision`` at import time; its PyPI wheels are CUDA builds that fail to load next to the
CPU torch wheel. ``install()`` serves placeholder ``torchvision.*`` modules (every attribute is a placeholder
that raises when called). transformers is imported first so its ``is_torchvision_available()`` stays False.
Nothing on the Llama path calls torchvision.
"""
import importlib.machinery
import importlib.util
import sys
import types


class _Any:
    def __init__(self, name):
        self._name = name

    def __getattr__(self, k):
        return _Any(f"{self._name}.{k}")

    def __call__(self, *a, **k):
        raise RuntimeError(f"{self._name}: torchvision is a placeholder in dynaflow's CPU integration tests")

    def __mro_entries__(self, bases):
        return (object,)


class _StubModule(types.ModuleType):
    def __getattr__(self, k):
        if k.startswith("__"):
            raise AttributeError(k)
        return _Any(f"{self.__name__}.{k}")


class _Finder:
    def find_spec(self, name, path=None, target=None):
        if name == "torchvision" or name.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        m = _StubModule(spec.name)
        m.__path__ = []
        return m

    def exec_module(self, m):
        pass


def install() -> None:
    import transformers.utils.import_utils  # noqa: F401  decide torchvision availability before the shim

    if importlib.util.find_spec("torchvision") is None and not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.append(_Finder())
