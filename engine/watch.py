"""Rerun something whenever a file under some folders changes (`bindpolicy test --watch`).

Polls every file's modification time and size: no platform notification API, nothing to install,
and a policy folder is a few dozen files.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from pathlib import Path

Snapshot = dict[str, tuple[int, int]]


def snapshot(roots: Iterable[Path]) -> Snapshot:
    """Every file under the roots (or a root that is a file) with its mtime (ns) and size."""
    seen: Snapshot = {}
    for root in roots:
        for path in [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file()):
            try:
                status = path.stat()
            except OSError:  # removed between the listing and the stat: the next poll sees it gone
                continue
            seen[str(path)] = (status.st_mtime_ns, status.st_size)
    return seen


def watch(roots: list[Path], run: Callable[[], None], interval: float = 0.5, runs: int | None = None,
          sleep: Callable[[float], None] = time.sleep) -> int:
    """Run once, then again after every change under the roots; stop after `runs` runs (None: never).
    A change made while a run is under way starts another run. Returns the number of runs."""
    count = 0
    while True:
        before = snapshot(roots)
        run()
        count += 1
        if runs is not None and count >= runs:
            return count
        while snapshot(roots) == before:
            sleep(interval)
