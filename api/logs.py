"""Structured logs: one JSON object per line, one line per request, with its decision id."""

from __future__ import annotations

import logging
import sys

from pythonjsonlogger.json import JsonFormatter


def configure_logging(level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(JsonFormatter("%(asctime)s %(levelname)s %(name)s %(message)s",
                                       rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
                                       timestamp=False))
    root = logging.getLogger("bindpolicy")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False
