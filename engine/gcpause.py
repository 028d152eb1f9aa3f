"""Python's cycle collector paused over work that builds many objects and no cycles."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def collector_paused() -> Iterator[None]:
    """The cyclic collector off for the block, back on afterwards if it was on. For work whose
    many new objects hold no cycles and are freed by their counts (a load's parse trees, a chunk
    of parsed requests, a stream of lines): the collections their allocations would start walk
    them all and find nothing."""
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
