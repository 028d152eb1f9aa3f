"""CEL's duration strings as the specification reads them (units h, m, s, ms, us, ns; no days)."""

from __future__ import annotations

import re
from datetime import timedelta

# One signed sequence of decimal amounts, each with its unit: "24h", "1h30m", "-1.5s", "300ms".
_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|h|m|s)")
_UNITS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}
# CEL keeps durations within about 10,000 years either way.
MAX_SECONDS = 315_576_000_000


class DurationError(ValueError):
    """A string CEL's duration() refuses, with what to write instead."""


def parse_duration(text: str) -> timedelta:
    """The duration a CEL `duration(text)` gives, or DurationError saying why CEL refuses it."""
    body = text[1:] if text[:1] in "+-" else text
    if body == "0":
        return timedelta(0)
    if not body:
        raise DurationError(f"'{text}' is not a duration: write a number and a unit, such as '24h'")
    seconds = 0.0
    position = 0
    for match in _PART.finditer(body):
        if match.start() != position:
            break
        seconds += float(match.group(1)) * _UNITS[match.group(2)]
        position = match.end()
    if position != len(body):
        rest = body[position:]
        day = re.fullmatch(r"(\d+(?:\.\d*)?)d", rest) if position == 0 else None
        if day is not None:
            hours = float(day.group(1)) * 24
            shown = f"{hours:g}h"
            raise DurationError(f"'{text}' is not a CEL duration: CEL has no day unit (d); "
                                f"write '{shown}' ({day.group(1)} x 24h)")
        if re.fullmatch(r"\d+(?:\.\d*)?", body):
            raise DurationError(f"'{text}' has no unit: write '{body}s' (seconds) or another unit "
                                "of h, m, s, ms, us, ns")
        raise DurationError(f"'{text}' is not a CEL duration: write amounts with units h, m, s, "
                            "ms, us or ns, such as '24h' or '1h30m'")
    if abs(seconds) > MAX_SECONDS:
        raise DurationError(f"'{text}' is beyond CEL's duration range (about 10,000 years)")
    return timedelta(seconds=-seconds if text.startswith("-") else seconds)


def is_duration(text: str) -> bool:
    try:
        parse_duration(text)
    except DurationError:
        return False
    return True
