"""CEL's duration strings as the specification reads them (units h, m, s, ms, us, ns; no days).

The one parser of duration text: the evaluator (engine/native.py), the type checker, the loader's
parameter types, the messages and the prover all read durations through parse_duration.
"""

from __future__ import annotations

import re
from datetime import timedelta
from decimal import Decimal
from functools import lru_cache

# One signed sequence of decimal amounts, each with its unit: "24h", "1h30m", "-1.5s", "300ms".
_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|h|m|s)")
_NANOS = {"h": 3_600_000_000_000, "m": 60_000_000_000, "s": 1_000_000_000, "ms": 1_000_000,
          "us": 1_000, "µs": 1_000, "ns": 1}
# CEL keeps durations within about 10,000 years either way.
MAX_SECONDS = 315_576_000_000


class DurationError(ValueError):
    """A string CEL's duration() refuses, with what to write instead."""


@lru_cache(maxsize=1024)
def parse_duration(text: str) -> timedelta:
    """The duration a CEL `duration(text)` gives (to the microsecond, rounded half to even), or
    DurationError saying why CEL refuses it. Amounts add exactly: '0.1s' is 100ms, not 0.1000000001."""
    body = text[1:] if text[:1] in "+-" else text
    if body == "0":
        return timedelta(0)
    if not body:
        raise DurationError(f"'{text}' is not a duration: write a number and a unit, such as '24h'")
    nanos = Decimal(0)
    position = 0
    for match in _PART.finditer(body):
        if match.start() != position:
            break
        nanos += Decimal(match.group(1)) * _NANOS[match.group(2)]
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
    if nanos > MAX_SECONDS * 1_000_000_000:
        raise DurationError(f"'{text}' is beyond CEL's duration range (about 10,000 years)")
    micros = int((nanos / 1000).to_integral_value())
    return timedelta(microseconds=-micros if text.startswith("-") else micros)


def is_duration(text: str) -> bool:
    try:
        parse_duration(text)
    except DurationError:
        return False
    return True
