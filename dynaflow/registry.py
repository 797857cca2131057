"""One registry pattern for every pluggable kind (strategies, executors).

A registry maps names to factories (usually classes). :meth:`Registry.resolve` accepts a registered
name (case-insensitive), a class, an instance, or a ``"pkg.module:Class"`` string, and discovers
plugins published under an entry-point group. Unknown names raise an error listing what exists.

Nothing named by a string is called unless it is registered (in code or by an entry point) or is a
subclass of the registry's base class, checked *before* the call: a ``"module:attr"`` string naming any
other callable (``"os:system"``) is refused. :meth:`Registry.load` is the entry for specs read from data
files (YAML strategy files, the autotune cache): the same rules, errors name the file, and a data file never
imports a module (importing runs the module's top-level code): its ``"module:Class"`` must name a module the
program has imported already.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import reprlib
import sys
from importlib import metadata
from typing import Callable, Generic, Mapping, TypeVar

from dynaflow.errors import DynaflowError, did_you_mean

__all__ = ["Registry"]

log = logging.getLogger(__name__)
T = TypeVar("T")


class Registry(Generic[T]):
    """Name → factory map for one kind of plugin ``T``."""

    def __init__(self, kind: str, base: type, error: type[DynaflowError], entry_point_group: str | None = None):
        self.kind = kind
        self.base = base
        self.error = error
        self.group = entry_point_group
        self._factories: dict[str, Callable[..., T] | str] = {}
        self._entry_points_loaded = False

    def register(self, name: str, factory: Callable[..., T] | str, *, replace: bool = False) -> Callable[..., T] | str:
        """Register ``factory`` under ``name``; a ``"pkg.module:Class"`` string is imported on first use."""
        key = name.lower()
        if key in self._factories and not replace and self._factories[key] is not factory:
            raise self.error(f"{self.kind} {name!r} is already registered; pass replace=True to override it.")
        self._factories[key] = factory
        return factory

    def factory(self, name: str) -> Callable[..., T]:
        """The factory registered as ``name`` (imported now if it was registered as a string)."""
        self._load_entry_points()
        factory = self._factories.get(name.lower())
        if factory is None:
            raise self.error(f"Unknown {self.kind} {name!r}.{did_you_mean(name.lower(), self._factories)} "
                             f"Available {self.kind} names: {', '.join(self.available())}.")
        if isinstance(factory, str):
            factory = self._factories[name.lower()] = self._import_class(factory)
        return factory

    def classes(self) -> list[tuple[str, type]]:
        """(name, class) of every registered class, in registration order (entry points last); a lazily
        registered ``"module:Class"`` is imported now."""
        self._load_entry_points()
        out = []
        for name in list(self._factories):
            factory = self.factory(name)
            if isinstance(factory, type):
                out.append((name, factory))
        return out

    def available(self) -> list[str]:
        self._load_entry_points()
        return sorted(self._factories)

    def load(self, spec: object, options: Mapping[str, object], *, source: str) -> T:
        """Resolve ``spec`` read from the data file ``source``: a registered name or ``"module:Class"`` naming
        a subclass of the base class (strings only: a data file cannot hold objects). Errors name ``source``."""
        if not isinstance(spec, str):
            raise self.error(f"{source}: a {self.kind} must be named by a string (a registered name or "
                             f"'pkg.module:Class'); got {type(spec).__name__} {_short(spec)}.")
        if not isinstance(options, Mapping) or not all(isinstance(k, str) for k in options):
            raise self.error(f"{source}: the options of {self.kind} {spec!r} must be a mapping of option names "
                             f"to values; got {type(options).__name__}.")
        try:
            if ":" in spec:
                return self._make(self._import_class(spec, may_import=False), spec, dict(options))
            return self.resolve(spec, **options)
        except self.error as exc:
            raise self.error(f"{source}: {exc}") from None

    def load_class(self, spec: str, *, source: str) -> type:
        """The class a data file's ``"module:Class"`` names, checked to subclass the base class without calling
        anything it names or importing its module; errors name ``source``."""
        try:
            return self._import_class(spec, may_import=False)
        except self.error as exc:
            raise self.error(f"{source}: {exc}") from None

    def resolve(self, spec: object, **kwargs: object) -> T:
        """Turn ``spec`` (name, class, instance or ``"module:Class"``) into an instance of ``T``."""
        if isinstance(spec, self.base):
            if kwargs:
                raise self.error(f"{self.kind} options {sorted(kwargs)} cannot be applied to an instance {spec!r}.")
            return spec  # type: ignore[return-value]
        if isinstance(spec, type):
            return self._make(spec, spec.__name__, kwargs)
        if isinstance(spec, str):
            if ":" in spec:
                return self._make(self._import_class(spec), spec, kwargs)
            self._load_entry_points()
            factory = self._factories.get(spec.lower())
            if factory is None:
                raise self.error(
                    f"Unknown {self.kind} {spec!r}.{did_you_mean(spec.lower(), self._factories)} "
                    f"Available {self.kind} names: {', '.join(self.available())}. A custom one can be passed as a "
                    f"class, an instance, or a 'pkg.module:Class' string."
                )
            if isinstance(factory, str):
                factory = self._factories[spec.lower()] = self._import_class(factory)
            return self._make(factory, spec, kwargs)
        raise self.error(
            f"Cannot use {spec!r} as a {self.kind}: pass a name ({', '.join(self.available())}), "
            f"a {self.base.__name__} subclass or instance, or a 'pkg.module:Class' string."
        )

    def _make(self, factory: Callable[..., T], label: str, kwargs: dict[str, object]) -> T:
        if isinstance(factory, type) and not issubclass(factory, self.base):
            raise self.error(f"{self.kind} {label!r} resolves to {factory!r}, which is not a {self.base.__name__} subclass.")
        unknown = _unknown_options(factory, kwargs)
        if unknown:
            valid = _option_names(factory)
            key = unknown[0]
            raise self.error(
                f"{self.kind} {label!r} has no option {key!r}.{did_you_mean(key, valid)} "
                f"Valid options: {', '.join(valid) or '(none)'}."
            )
        try:
            obj = factory(**kwargs)
        except (TypeError, ValueError) as exc:  # a data file's option of the wrong type or value
            raise self.error(f"{self.kind} {label!r} rejected its options {sorted(kwargs)}: {exc}") from exc
        if not isinstance(obj, self.base):
            raise self.error(f"{self.kind} {label!r} produced {obj!r}, which is not a {self.base.__name__}.")
        return obj

    def _import_class(self, spec: str, *, may_import: bool = True) -> type:
        """The class ``spec`` (``"module:Class"``) names, refused unless it subclasses the base class: nothing
        it names is called before this check (a data file naming ``"os:system"`` must run nothing). Without
        ``may_import`` (a spec from a data file) the module must be imported already."""
        obj = self._import(spec, may_import)
        if not (isinstance(obj, type) and issubclass(obj, self.base)):
            what = f"the class {obj.__qualname__}" if isinstance(obj, type) else f"a {type(obj).__name__}"
            raise self.error(
                f"{self.kind} {spec!r} names {what}, which is not a {self.base.__name__} subclass; refused without "
                f"calling it. Name a {self.base.__name__} subclass ('pkg.module:Class') or a registered "
                f"{self.kind} ({', '.join(self.available())})."
            )
        return obj

    def _import(self, spec: str, may_import: bool = True) -> Callable[..., T]:
        module, _, attr = spec.partition(":")
        if not module or module.startswith(".") or not attr:
            raise self.error(f"{self.kind} {spec!r}: name a class as 'pkg.module:Class', with the module's absolute "
                             f"name and the class's name (e.g. 'my_strategies:Mine').")
        if not may_import and module not in sys.modules:
            raise self.error(
                f"{self.kind} {spec!r}: module {module!r} is not imported, and a data file never imports code "
                f"(importing runs the module). Import it in your program first (import {module}), or name a "
                f"registered {self.kind} ({', '.join(self.available())})."
            )
        try:
            mod = importlib.import_module(module)
        except (ImportError, ValueError) as exc:  # ValueError: a name importlib refuses outright
            raise self.error(f"{self.kind} {spec!r}: cannot import module {module!r} ({exc}).") from exc
        try:  # a data file's name is looked up in the module's namespace: no module __getattr__ (a lazy import) runs
            return getattr(mod, attr) if may_import else inspect.getattr_static(mod, attr)
        except AttributeError:
            names = [n for n in vars(mod) if not n.startswith("_")]
            raise self.error(
                f"{self.kind} {spec!r}: module {module!r} has no attribute {attr!r}.{did_you_mean(attr, names)}"
            ) from None

    def _load_entry_points(self) -> None:
        if self._entry_points_loaded or self.group is None:
            return
        self._entry_points_loaded = True
        for ep in metadata.entry_points(group=self.group):
            if ep.name.lower() in self._factories:
                continue
            try:
                self._factories[ep.name.lower()] = ep.load()
            except Exception as exc:  # a broken plugin must not break dynaflow
                log.warning("could not load %s plugin %r from entry point %s: %s", self.kind, ep.name, ep.value, exc)

    def __repr__(self) -> str:
        return f"Registry({self.kind}: {', '.join(sorted(self._factories))})"


_SHORT = reprlib.Repr()
_SHORT.maxstring = _SHORT.maxother = 80
_SHORT.maxlist = _SHORT.maxdict = _SHORT.maxtuple = 6
_SHORT.maxlevel = 3


def _short(value: object) -> str:
    """``repr`` cut short: a data file's value in a message (YAML aliases make a 300-byte file a 200 MB list)."""
    return _SHORT.repr(value)


def _option_names(factory: Callable[..., object]) -> list[str]:
    try:
        params = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):
        return []
    return [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name != "self"]


def _unknown_options(factory: Callable[..., object], kwargs: dict[str, object]) -> list[str]:
    try:
        params = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):
        return []
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return []
    names = set(_option_names(factory))
    return sorted(k for k in kwargs if k not in names)
