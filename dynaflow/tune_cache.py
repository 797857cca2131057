"""The autotuner's disk cache: the winner per (model, bucket, device, dtype, executor, search space) in one JSON
file under ``DYNAFLOW_CACHE_DIR``; data that never runs code, written atomically under a lock."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Iterator

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

from dynaflow import knobs
from dynaflow.errors import StrategyError
from dynaflow.strategies.auto import Candidate

__all__ = ["TuneCache", "CACHE_SCHEMA"]

log = logging.getLogger(__name__)


CACHE_SCHEMA = 2
"""Version of an autotune cache entry; entries of another version are ignored (the bucket is tuned again)."""

_THREAD_LOCKS: dict[str, threading.Lock] = {}
_THREAD_LOCKS_GUARD = threading.Lock()


@dataclass
class TuneCache:
    """Winners per key in one JSON file under ``DYNAFLOW_CACHE_DIR`` (``autotune.json``).

    The file is data, never code: an entry may name only a registered strategy or a Strategy subclass
    (anything else is refused with a :class:`StrategyError` naming the file, before it is called). Writes
    replace the file atomically (temp file + rename) under a lock file, so concurrent threads and processes
    lose no entries. A file that cannot be parsed is moved aside with a warning and tuning runs again."""

    path: str = field(default_factory=lambda: os.path.join(knobs.cache_dir(), "autotune.json"))

    def get(self, key: str) -> tuple[Candidate, str] | None:
        """The cached winner of ``key`` and why it won, or ``None`` (missing, stale, or malformed: tune again)."""
        entry = self._read().get(key)
        if entry is None:
            return None
        if not isinstance(entry, dict) or entry.get("schema") != CACHE_SCHEMA:
            version = entry.get("schema") if isinstance(entry, dict) else None
            log.warning("autotune cache %s: ignoring entry %r (schema %r, expected %d); tuning again",
                        self.path, key, version, CACHE_SCHEMA)
            return None
        try:
            cand = Candidate.from_json(entry.get("candidate"), source=self.path)
        except StrategyError as exc:
            log.warning("autotune cache %s: ignoring malformed entry %r (%s); tuning again", self.path, key, exc)
            return None
        if ":" in cand.strategy:  # refuse, loudly, anything that is not a Strategy class: data never runs code
            from dynaflow.strategies import registry

            registry.load_class(cand.strategy, source=f"{self.path} (entry {key!r})")
        return cand, str(entry.get("reason", ""))

    def build(self, key: str, cand: Candidate) -> Any:
        """The Strategy of a cached candidate, or ``None`` (with a warning) when it no longer builds (an
        unknown name or options the strategy no longer takes): the bucket is then tuned again."""
        try:
            return cand.build(source=f"{self.path} (entry {key!r})")
        except StrategyError as exc:  # get() already refused any "module:attr" that is not a Strategy class
            log.warning("%s; ignoring the cached entry and tuning again", exc)
            return None

    def put(self, key: str, result: Any) -> None:
        """Store ``result``'s winner (a :class:`~dynaflow.tune.TuneResult`) under ``key``."""
        w = result.winner
        entry = {"schema": CACHE_SCHEMA, "candidate": w.candidate.to_json(), "reason": result.reason,
                 "predicted": w.predicted, "measured": w.measured, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
        try:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
            with self._locked():
                data = self._read(locked=True)
                data[key] = entry
                self._write(data)
        except OSError as exc:  # a read-only cache dir must not break planning
            log.warning("could not write the autotune cache %s: %s", self.path, exc)

    # -- file handling ------------------------------------------------------------------------------------
    def _read(self, locked: bool = False) -> dict[str, Any]:
        try:
            with open(self.path, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            return {}
        except OSError as exc:
            log.warning("could not read the autotune cache %s: %s; tuning again", self.path, exc)
            return {}
        try:
            data = json.loads(raw.decode("utf-8"))
            if not isinstance(data, dict):
                raise ValueError(f"the top level is a {type(data).__name__}, not an object")
            return data
        except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError; nesting too deep
            if not locked:  # re-check under the lock: a writer may have replaced it meanwhile
                try:
                    with self._locked():
                        return self._read(locked=True)
                except OSError:
                    return {}
            self._move_aside(exc)
            return {}

    def _move_aside(self, why: Exception) -> None:
        aside = f"{self.path}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
        try:
            os.replace(self.path, aside)
            log.warning("the autotune cache %s is corrupt (%s); moved it to %s and tuning again",
                        self.path, str(why)[:200], aside)
        except OSError as exc:
            log.warning("the autotune cache %s is corrupt (%s) and could not be moved aside (%s); tuning again",
                        self.path, str(why)[:200], exc)

    def _write(self, data: dict[str, Any]) -> None:
        folder = os.path.dirname(os.path.abspath(self.path))
        fd, tmp = tempfile.mkstemp(prefix=".autotune-", suffix=".tmp", dir=folder)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(data, f, sort_keys=True, separators=(",", ":"))
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Exclusive access to the file: a lock per path among this process's threads, ``flock`` on
        ``<path>.lock`` among processes (where the platform has it)."""
        path = os.path.abspath(self.path)
        with _THREAD_LOCKS_GUARD:
            tlock = _THREAD_LOCKS.setdefault(path, threading.Lock())
        with tlock:
            if fcntl is None:  # pragma: no cover - Windows: threads are serialised, processes rely on rename
                yield
                return
            with open(path + ".lock", "a") as lf:
                fcntl.flock(lf.fileno(), fcntl.LOCK_EX)
                try:
                    yield
                finally:
                    fcntl.flock(lf.fileno(), fcntl.LOCK_UN)
