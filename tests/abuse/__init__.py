"""Hostile input against every edge; what the abuse tests share."""

from __future__ import annotations

from typing import Any


def paths(value: Any, at: tuple[Any, ...] = (), *, items: int | None = None) -> list[tuple[Any, ...]]:
    """Every path into a JSON value (object keys and list indexes), the value itself left out;
    `items`: only the first so many items of each list."""
    found = [at] if at else []
    if isinstance(value, dict):
        for key, item in value.items():
            found += paths(item, (*at, key), items=items)
    elif isinstance(value, list):
        for index, item in enumerate(value[:items]):
            found += paths(item, (*at, index), items=items)
    return found
