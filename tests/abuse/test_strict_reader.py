"""The strict JSON reading's fast path (orjson, and a proof from the bytes) against the reference
reading it short-cuts (the standard library with a hook per object and number): over hostile
texts, both give the same value, key order and types included, or the same error, word for word."""

from __future__ import annotations

import json
import random
import struct
from decimal import Decimal
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine import request
from engine.errors import RequestError
from engine.request import MAX_DEPTH, parse_json, parse_json_reference

from ..conftest import bind_request


def outcome(read: Any, text: bytes | str) -> tuple[str, str]:
    """What a reading gives: the value's repr (order and types: 1, 1.0 and True differ), or the error."""
    try:
        return "value", repr(read(text))
    except RequestError as exc:
        return "refused", repr(exc.to_dict())
    except Exception as exc:  # the same failure on both sides is what is compared
        return "failed", f"{type(exc).__name__}: {exc}"


def assert_read_alike(text: bytes | str) -> tuple[str, str]:
    fast, reference = outcome(parse_json, text), outcome(parse_json_reference, text)
    assert fast == reference, text
    return fast


BIND = orjson.dumps(bind_request()).decode()
SPACED = json.dumps(bind_request(), ensure_ascii=False)

HOSTILE = [
    BIND, SPACED, json.dumps(bind_request(), indent=2), "{}", "[]", "1", "-0", "-0.0", '"x"', "null", "true",
    " \r\n\t{}\n", "\ufeff{}", b"\xef\xbb\xbf{}", b"{\"a\": \"\xff\"}", "\x0c{}", '{"a": "\x01"}',
    # keys twice, hidden or not by the counting of '":'
    '{"a": 1, "a": 1}', '{"a":1,"b":{"c":1,"c":2}}', '{"a": ":", "a": 1}', '{"a": 1, "a": ":"}',
    '{"a" : 1, "a"\n:\t2}', '{"a\\"": 1, "a\\"": 2}', '{"a": "\\u003a", "a": 1}', '{"\\u0061": 1, "a": 2}',
    '{":": ":", ":": ":"}', '{"a": " :", "b": 1}', '{"a":"x\\":","a":1}',
    '[{"a": 1}, {"a": 1, "a": 2}]', BIND[:-1] + ',"action":"bind"}',
    # numbers
    '{"n": 9007199254740992}', '{"n": 9007199254740993}', '{"n": -9007199254740993}',
    '{"n": 18446744073709551616}', '{"n": 9223372036854775808}', '{"n": 1234567890123456}',
    '{"n": 0000000000000000}', '{"n": 17.9999999999999999}', '{"n": 17.99}', '{"n": 1.10}', '{"n": 1.1}',
    '{"n": 1e400}', '{"n": -1e400}', '{"n": 1e-400}', '{"n": 1E2}', '{"n": 1e2}', '{"n": 1e+16}',
    '{"n": 1e16}', '{"n": 100.0}', '{"n": 5e-324}', '{"n": 1.7976931348623157e+308}', '{"n": 0.1}',
    '{"n": NaN}', '{"n": Infinity}', '{"n": -Infinity}', '{"n": 01}', '{"n": 1.}', '{"n": .5}',
    '{"id": "1234567890123456789"}', '{"t": "2025-01-01T00:00:00.123456Z"}',
    # strings and escapes
    '{"s": "\\ud800"}', '{"s": "\\udc00"}', '{"s": "\\ud83d\\ude00"}', '{"s": "😀"}', '{"s": "\\u0000"}',
    '{"s": "a\\\\"}', '{"s": "\\"{["}', '{"s": "[[[[[[[[[[[[[[[[[[[[["}', '{"s": "\\/"}',
    '{"s": "\u2028"}', '{"s": "\x7f"}', "\"\udc80\"",
    # depth and size
    "[" * MAX_DEPTH + "]" * MAX_DEPTH, "[" * (MAX_DEPTH + 1) + "]" * (MAX_DEPTH + 1),
    '{"a":' * MAX_DEPTH + "1" + "}" * MAX_DEPTH, '{"a":' * (MAX_DEPTH + 1) + "1" + "}" * (MAX_DEPTH + 1),
    "[" + "[]," * 40 + "[]]", "[" + "{}," * 25_000 + "{}]", "[" * 5000 + "]" * 5000,
    # not JSON
    "", " ", "{", '{"a": 1,}', "[1,]", "{'a': 1}", '{"a" 1}', "{} {}", "tru", "nul", '"\\x"',
]


@pytest.mark.parametrize("text", HOSTILE)
def test_a_hostile_text_is_read_as_the_reference_reads_it(text: bytes | str) -> None:
    assert_read_alike(text)


def test_the_strictness_cases_are_refused_by_the_fast_reading_too() -> None:
    """Not only alike: refused, and with the words the reference has always used."""
    for text, words in [('{"a": 1, "a": 2}', "the key 'a' appears twice"),
                        ('{"a": 1, "a": ":"}', "the key 'a' appears twice"),
                        ('{"n": 17.9999999999999999}', "would be read as 18.0"),
                        ('{"n": 9007199254740993}', "is beyond +-2^53"),
                        ('{"n": 18446744073709551616}', "is beyond +-2^53"),
                        ("[" * (MAX_DEPTH + 1) + "]" * (MAX_DEPTH + 1), f"at most {MAX_DEPTH} deep"),
                        ('{"n": NaN}', "not valid JSON"), ('{"s": "\\ud800"}', "not valid JSON")]:
        with pytest.raises(RequestError) as caught:
            parse_json(text)
        assert words in caught.value.details[0].problem or words in caught.value.message, text


def test_the_common_request_takes_the_fast_path() -> None:
    """The bytes of an ordinary request prove the fast reading right, so the reference is not asked."""
    for text in (BIND, SPACED):
        raw = text.encode()
        assert request._strict_from_orjson(raw, raw.count(b"{") + raw.count(b"[")) == json.loads(text)


def test_orjson_writes_every_double_as_python_reads_it_back_exactly() -> None:
    """The fast path takes a number written as orjson writes it to be one the reference accepts:
    orjson's shortest form of a double is, as a decimal, Python's repr of it."""
    draw = random.Random(20251128)
    for _ in range(20_000):
        number = struct.unpack("<d", draw.randbytes(8))[0]
        if number != number or number in (float("inf"), float("-inf")):
            continue
        assert Decimal(orjson.dumps(number).decode()) == Decimal(repr(number)), repr(number)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(st.sampled_from('ab:" \\{}[],\u00e9😀\u2028'), max_size=6),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from(["a", "b", ":", "a\"", ""]),
                                                                inner, max_size=4),
    max_leaves=20)


@st.composite
def hostile_texts(draw: st.DrawFn) -> str:
    """A JSON text, written one of several ways, then maybe spoiled: a key repeated, a number
    written otherwise, nesting deepened, a piece cut off."""
    value = draw(json_values)
    style = draw(st.sampled_from(["orjson", "spaced", "ascii", "indent"]))
    text = {"orjson": lambda: orjson.dumps(value).decode() if _orjson_can(value) else json.dumps(value),
            "spaced": lambda: json.dumps(value, ensure_ascii=False),
            "ascii": lambda: json.dumps(value),
            "indent": lambda: json.dumps(value, indent=1, ensure_ascii=False)}[style]()
    spoil = draw(st.sampled_from(["none", "repeat", "number", "deeper", "cut", "insert"]))
    if spoil == "repeat" and '{"' in text:
        at = text.index('{"') + 1
        key = draw(st.sampled_from(['"a"', '"b"', '":"']))
        text = text[:at] + f"{key}: {draw(st.sampled_from(['1', '1', ':', '[]']))}, " + text[at:]
        text = text.replace('": :,', '": ":",')
    elif spoil == "number":
        number = draw(st.sampled_from(["17.9999999999999999", "1e400", "9007199254740993", "1.10", "-0", "1E2",
                                       "18446744073709551616", "0.1", "5e-324", "1e16"]))
        text = f'{{"n": {number}, "v": {text}}}'
    elif spoil == "deeper":
        depth = draw(st.integers(MAX_DEPTH - 3, MAX_DEPTH + 2))
        text = "[" * depth + text + "]" * depth
    elif spoil == "cut" and len(text) > 1:
        text = text[: draw(st.integers(0, len(text) - 1))]
    elif spoil == "insert":
        at = draw(st.integers(0, len(text)))
        text = text[:at] + draw(st.sampled_from([",", '"', ":", "\\", "\x00", "\ud800", "1", " ", "}"])) + text[at:]
    return text


def _orjson_can(value: Any) -> bool:
    try:
        orjson.dumps(value)
    except orjson.JSONEncodeError:
        return False
    return True


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(hostile_texts())
def test_generated_hostile_texts_are_read_as_the_reference_reads_them(text: str) -> None:
    assert_read_alike(text)
