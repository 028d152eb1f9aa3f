"""Structured logs: one JSON object per line, one line per request, with its decision id."""

from __future__ import annotations

import logging
import sys
from typing import Any

import orjson

# What every LogRecord has: anything else on a record came as `extra` and goes into the line.
_STANDARD = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}


class JsonLineFormatter(logging.Formatter):
    """time, level, logger, message, then the record's extra fields, serialized by orjson (the
    access log writes a line per request: python-json-logger cost about 10% of a decision)."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {"time": self.formatTime(record), "level": record.levelname, "logger": record.name,
                                "message": record.getMessage()}
        for key, value in record.__dict__.items():
            if key not in _STANDARD:
                line[key] = value
        if record.exc_info:
            line["exc_info"] = self.formatException(record.exc_info)
        if record.stack_info:
            line["stack_info"] = self.formatStack(record.stack_info)
        return orjson.dumps(line, default=str).decode()


def configure_logging(level: str = "INFO") -> None:
    # Nothing here prints the caller's file and line, or the thread and process names: not
    # looking them up saves a stack walk per line (logging's documented optimization).
    logging._srcfile = None
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(JsonLineFormatter())
    root = logging.getLogger("bindpolicy")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False
