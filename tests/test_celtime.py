"""One parser of CEL duration text (engine/celtime.py), used by the evaluator, checker and prover."""

from __future__ import annotations

import re
from datetime import timedelta
from pathlib import Path

import pytest

from engine import native
from engine.celtime import DurationError, parse_duration
from engine.native import CelError
from engine.prover.cel import Uncovered
from engine.prover.encoding import parse_duration as prover_seconds

ENGINE = Path(__file__).resolve().parent.parent / "engine"


@pytest.mark.parametrize(("text", "value"), [
    ("24h", timedelta(hours=24)), ("1h30m", timedelta(minutes=90)), ("-1.5s", timedelta(seconds=-1.5)),
    ("+5s", timedelta(seconds=5)), ("0", timedelta(0)), ("100ms", timedelta(milliseconds=100)),
    ("1us", timedelta(microseconds=1)), ("1µs", timedelta(microseconds=1)), ("1500ns", timedelta(microseconds=2)),
    ("0.1s", timedelta(milliseconds=100)), ("1.s", timedelta(seconds=1)), (".5m", timedelta(seconds=30)),
    ("315576000000s", timedelta(seconds=315_576_000_000)),
])
def test_cel_durations_read_exactly(text: str, value: timedelta) -> None:
    assert parse_duration(text) == value
    assert native._duration(text) == value


@pytest.mark.parametrize(("text", "says"), [
    ("1d", "CEL has no day unit (d); write '24h'"),
    ("2.5d", "write '60h'"),
    ("24 hours", "units h, m, s, ms, us or ns"),
    ("5", "has no unit: write '5s'"),
    ("", "write a number and a unit"),
    ("1h-5m", "units h, m, s, ms, us or ns"),
    ("315576000001s", "beyond CEL's duration range"),
])
def test_what_cel_refuses_the_evaluator_refuses_with_the_same_words(text: str, says: str) -> None:
    with pytest.raises(DurationError, match=re.escape(says)):
        parse_duration(text)
    with pytest.raises(CelError, match=re.escape(says)):
        native._duration(text)


def test_the_prover_reads_durations_through_the_same_parser() -> None:
    assert prover_seconds("1.5h") == 5400
    assert prover_seconds("-1h") == -3600
    assert prover_seconds("1h30m15s") == 5415
    for text in ("1d", "500ms", "24 hours"):  # refused by CEL, or finer than the prover's seconds
        with pytest.raises(Uncovered):
            prover_seconds(text)


def test_no_other_module_keeps_a_table_of_duration_units() -> None:
    table = re.compile(r"\(ns\|us|\"ms\":|'ms':|\(\\d\+h\)")
    holders = sorted(str(path.relative_to(ENGINE)) for path in ENGINE.rglob("*.py")
                     if table.search(path.read_text(encoding="utf-8")))
    assert holders == ["celtime.py"]
