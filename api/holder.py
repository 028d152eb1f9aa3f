"""The policy set in service, and its hot reload: check the new set fully, then swap it in whole."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from engine.decider import Engine
from engine.errors import Location, PolicyLoadError, Problem
from engine.loader import load_policies
from engine.sources import PolicySource
from engine.yamlpos import read_yaml

log = logging.getLogger("bindpolicy.reload")

Signature = tuple[tuple[str, int, int], ...]
RETIRED_FILE = "retired.yaml"  # at the root of the policy folder: `retired: [v1]`, versions that may go


@dataclass(frozen=True)
class ReloadFailure:
    at: str
    error: str


def signature(folder: Path) -> Signature:
    """The signature of the folder `folder` leads to now (through a symlink, its target's path too)."""
    real = folder.resolve()
    return (("", hash(str(real)), 0), *_files(real))


def _files(folder: Path) -> Signature:
    """Names, sizes and modification times of every policy file: cheap to take every second.

    Polling rather than inotify (watchdog): `stat` follows symlinks, so a file replaced by a
    rename or behind a re-pointed symlink is seen alike, it works on network file systems, and
    it costs a few dozen stat calls a second per worker.
    """
    found = []
    for path in sorted(folder.rglob("*")):
        if path.suffix in (".yaml", ".yml") and path.is_file():
            try:
                stat = path.stat()
            except OSError:
                continue
            found.append((path.relative_to(folder).as_posix(), stat.st_mtime_ns, stat.st_size))
    return tuple(found)


def _retired(folder: Path) -> set[str]:
    """The versions that the set says may be removed (`retired: [...]` in retired.yaml)."""
    path = folder / RETIRED_FILE
    if not path.is_file():
        return set()
    document, problems = read_yaml(path, RETIRED_FILE)
    data = document.data if document is not None else None
    names = data.get("retired") if isinstance(data, dict) else None
    if problems or not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise PolicyLoadError(problems or [Problem(Location(RETIRED_FILE), "schema",
                                                   "expected `retired: [version, ...]`")])
    return set(names)


class PolicyHolder:
    """Holds the engine that serves; a request takes `engine` once, so it never sees half a set.

    If the files do not load when it starts, it serves the last good set, read by digest from
    `archive` (the log keeps every set it served) through `last_good()`; `fallback` says so.
    So it does if they lack a version that the last good set had (`served_before()`: removed
    while the service was stopped) and `retired.yaml` does not retire it.
    """

    def __init__(self, folder: Path | str, runtime: str, *, interval: float = 1.0, max_list_items: int = 1000,
                 on_load: Callable[[Engine], None] | None = None,
                 on_failure: Callable[[ReloadFailure], None] | None = None,
                 last_good: Callable[[], PolicySource | None] | None = None,
                 served_before: Callable[[], set[str]] | None = None) -> None:
        self.folder = Path(folder)
        self.runtime = runtime
        self.max_list_items = max_list_items
        self.interval = interval
        self.on_load = on_load
        self.on_failure = on_failure
        self.failure: ReloadFailure | None = None
        self.fallback: str | None = None  # what serves instead of the files, while they do not load
        self._signature = signature(self.folder)
        self._seen = self._signature  # what the last check saw
        try:
            engine = self._build()
            self._refuse_removals(served_before() if served_before else set(), engine)
            self.engine = engine
        except PolicyLoadError as exc:  # a bad set never serves; the last good one may
            source = last_good() if last_good else None
            if source is None:
                raise
            self.engine = Engine(load_policies(source), runtime=runtime, max_list_items=max_list_items)
            self.fallback = f"the last good set, {source}, from the decision log's archive"
            self._fail(str(exc))
        self.loaded_at = datetime.now(UTC)
        self._watcher: threading.Thread | None = None
        self._lock = threading.Lock()
        if on_load and self.fallback is None:
            on_load(self.engine)

    def reload_if_changed(self, settle: bool = False) -> bool:
        """Reload when the files changed; True if a new set now serves.

        With `settle` (the watcher), a change is loaded only once the files have stayed the same
        for one check: a file still being written is never loaded half-way.
        """
        current = signature(self.folder)
        if current == self._signature:
            self._seen = current
            return False
        if settle and current != self._seen:
            self._seen = current
            return False
        with self._lock:
            if current == self._signature:
                return False
            previous, self._signature = self._signature, current
            try:
                engine = self._build()
                self._check_removals(engine)
                if self.on_load:  # e.g. keep its content for replay: before it serves, or not at all
                    self.on_load(engine)
            except PolicyLoadError as exc:  # the files are wrong: tried again once they change
                self._fail(str(exc))
                return False
            except Exception as exc:  # the folder or the log database failed: tried again next time
                self._signature = previous
                self._fail(f"{type(exc).__name__}: {exc}")
                return False
            old = {v.name: v.digest for v in self.engine.policies}
            self.engine = engine  # one reference swap: atomic for every request that follows
            self.failure = None
            self.fallback = None
            self.loaded_at = datetime.now(UTC)
            new = {v.name: v.digest for v in engine.policies}
            log.info("policies reloaded", extra={"event": "policy_reload", "before": old, "after": new})
            return True

    def _build(self) -> Engine:
        # Read through the symlink's target as it is now: a deploy that swaps the link mid-load
        # cannot mix two releases.
        return Engine(load_policies(self.folder.resolve()), runtime=self.runtime, max_list_items=self.max_list_items)

    def _check_removals(self, engine: Engine) -> None:
        """A reload may drop a version that served (or is in force) only if the set retires it."""
        self._refuse_removals({v.name for v in self.engine.policies}, engine)

    def _refuse_removals(self, served: set[str], engine: Engine) -> None:
        gone = sorted(served - {v.name for v in engine.policies})
        if not gone:
            return
        retired = _retired(self.folder.resolve())
        kept = [name for name in gone if name not in retired]
        if kept:
            raise PolicyLoadError([Problem(Location(RETIRED_FILE), "version_removed", (
                f"version {name} served and is missing from the new set; to remove it, list it in "
                f"{RETIRED_FILE} at the root of the policy folder (retired: [{name}])")) for name in kept])

    def _fail(self, error: str) -> None:
        self.failure = ReloadFailure(datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"), error)
        log.error("policy reload refused; the last good set keeps serving",
                  extra={"event": "policy_reload_failed", "error": error})
        if self.on_failure:
            self.on_failure(self.failure)

    def ensure_watching(self) -> None:
        """Start the watcher in this process (after a fork, threads do not survive)."""
        if self.interval <= 0 or (self._watcher is not None and self._watcher.is_alive()):
            return
        with self._lock:
            if self._watcher is None or not self._watcher.is_alive():
                self._watcher = threading.Thread(target=self._watch, name="policy-reload", daemon=True)
                self._watcher.start()

    def _watch(self) -> None:
        while True:
            time.sleep(self.interval)
            try:
                self.reload_if_changed(settle=True)
            except Exception:  # never let the watcher die
                log.exception("policy watcher error")
