"""The one-pass reading and check of a request (engine/reader.py, RequestChecker.read) against the
way it short-cuts, the strict reading then the checker (checked(parse_json(bytes))): over hostile
texts, every field of a whole request made wrong in every way, keys twice and unknown, every
number trap, escapes, and generated requests, both give the same value (order and types
included) and the same `usable`, or refuse with the same words. Where the reader vouches, the
reference must take the request as it is."""

from __future__ import annotations

import copy
import json
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.errors import RequestError
from engine.generator import generate_requests
from engine.reader import FAST_TIMESTAMP, RequestReader
from engine.request import (
    MAX_CONTAINERS,
    MAX_DEPTH,
    MAX_VALUES,
    RequestChecker,
    _bound_values,
    default_checker,
    parse_json,
    within_bounds,
)

from . import paths
from .test_strict_reader import HOSTILE

WHOLE: dict[str, Any] = {
    "action": "bind", "role": "official", "at": "2025-07-01T00:00:00Z", "policy_version": "v2",
    "market": "US", "region": "GB",
    "shop": {"id": "shop-1", "name": "茶叶小店", "market": "US", "status": "normal",
             "official_account": {"account_id": "a-0", "account_type": "personal", "bound_at": "2024-01-31T10:00:00Z"},
             "channel_accounts": [{"account_id": "c-1", "bound_at": "2024-03-01T00:00:00+08:00"}],
             "official_unbinds": ["2024-02-01T00:00:00.5Z"], "channel_unbinds": []},
    "account": {"id": "acct-1", "name": "🍵 tea", "type": "personal", "age": 30, "location": "US", "followers": 5000,
                "ecommerce_revoked": False, "linked_to_revoked": False, "policy_compliant": True,
                "kyc": {"verified": True, "document_type": "passport", "document_country": "ID"},
                "commission_agreement_signed": True, "affiliate_enabled": False, "created_by_shop": None,
                "bind_history": [{"shop_id": "s-9", "bound_at": "2023-05-05T05:05:05Z", "unbound_at": None},
                                 {"shop_id": "s-8", "bound_at": "2022-12-31t23:59:59z",
                                  "unbound_at": "2023-01-01T00:00:00-05:30"}],
                "violation_points": 0, "health_score": -5, "recent_serious_violation": False,
                "upgrade": {"state": "trial", "shop_id": "shop-1", "trial_started_at": "2025-06-01T00:00:00Z",
                            "unwithdrawn_earnings": 12.5}},
    "invitation": {"shop_id": "shop-1", "status": "pending"},
    "login": {"method": "otp", "target": "app"},
}

WRONG = [None, True, 0, -1, 1.5, 18.0, 2**53 + 1, "", "x", "US", "us", "USA", "x" * 129, "x" * 513, "a\u0000b",
         [], ["x"], {}, {"x": 1}, "2025-02-29T00:00:00Z", "2024-02-29T00:00:00Z", "2025-04-31T00:00:00Z",
         "2016-12-31T23:59:60Z", "0001-01-01T00:00:00Z", "9999-12-31T23:59:59Z", "0002-01-01T00:00:00Z",
         "2025-01-01 00:00:00Z", "2025-01-01T00:00:00+0000", "2025-01-01T00:00:00", "2025-01-01T24:00:00Z",
         "2025-01-01T00:00:00." + "1" * 50 + "Z", "2025-01-01T00:00:00.123456789Z", "2025-13-01T00:00:00Z",
         "2025-01-01T00:00:00+24:00", "2025-01-01T00:00:00\nZ", "2025-01-01T00:00:00Z\n"]


def reference(checker: RequestChecker, raw: bytes | str) -> tuple[str, str]:
    try:
        value, usable = checker.checked(parse_json(raw))
        return "value", repr((value, usable))
    except RequestError as exc:
        return "refused", repr(exc.to_dict())


def one_pass(checker: RequestChecker, raw: bytes | str) -> tuple[str, str]:
    try:
        return "value", repr(checker.read(raw))
    except RequestError as exc:
        return "refused", repr(exc.to_dict())


def assert_alike(raw: bytes | str, checker: RequestChecker | None = None) -> bool:
    """Both ways give the same; True where the reader vouched (the reference then took it as it is)."""
    checker = checker or default_checker()
    assert one_pass(checker, raw) == reference(checker, raw), raw
    data = raw.encode("utf-8", "surrogatepass") if isinstance(raw, str) else raw
    vouched = checker.vouch(data)
    if vouched is not None:
        assert reference(checker, raw) == ("value", repr((vouched, True))), raw
        assert repr(vouched) == repr(json.loads(data)), raw  # what impact reads, too
    return vouched is not None


def replaced(value: Any, at: tuple[Any, ...], new: Any) -> Any:
    changed = copy.deepcopy(value)
    target = changed
    for step in at[:-1]:
        target = target[step]
    target[at[-1]] = new
    return changed


def written(value: Any, style: str) -> str:
    return {"compact": lambda: orjson.dumps(value).decode(), "spaced": lambda: json.dumps(value, ensure_ascii=False),
            "ascii": lambda: json.dumps(value), "indent": lambda: json.dumps(value, indent=2)}[style]()


def test_the_whole_request_is_vouched_for_written_every_way() -> None:
    for style in ("compact", "spaced", "ascii", "indent"):  # ascii: \\uXXXX escapes for 茶叶小店 and 🍵
        assert assert_alike(written(WHOLE, style)), style


def test_the_reader_vouches_for_generated_requests_as_the_reference_reads_them() -> None:
    """The corpus generator's requests (some broken): the same outcome, and most read in one pass."""
    vouched = total = 0
    for request in generate_requests(300, seed=11, broken=0.2):
        for style in ("spaced", "ascii"):
            total += 1
            vouched += assert_alike(written(request, style))
    assert vouched > total // 2


@pytest.mark.parametrize("text", HOSTILE)
def test_a_hostile_text_is_read_alike(text: bytes | str) -> None:
    assert_alike(text)


def test_every_field_made_wrong_every_way_is_judged_alike() -> None:
    for number, at in enumerate(paths(WHOLE)):  # each field a fourth of the wrong values, each value many fields
        for new in WRONG[number % 4::4]:
            assert_alike(written(replaced(WHOLE, at, new), "spaced"))
        if isinstance(at[-1], str):  # the field taken away
            parent = replaced(WHOLE, at, None)
            holder = parent
            for step in at[:-1]:
                holder = holder[step]
            del holder[at[-1]]
            assert_alike(written(parent, "compact"))


@pytest.mark.parametrize("number", ["0", "-0", "-0.0", "0.0", "12.5", "12.50", "1E2", "1e2", "1e+2", "0.1",
                                    "0.10000000000000001", "17.9999999999999999", "1e400", "-1", "-0.5",
                                    "9007199254740992", "9007199254740993", "18446744073709551616", "5e-324",
                                    "1e-400", "\"12\"", "null", "true", "[]", "{}", "1.7976931348623157e+308",
                                    "-9007199254740992", "1" * 5000, "-" + "1" * 5000])
@pytest.mark.parametrize("field", ["unwithdrawn_earnings", "age", "followers", "health_score"])
def test_every_number_trap_in_every_numeric_field(field: str, number: str) -> None:
    text = written(WHOLE, "compact")
    holder = '"unwithdrawn_earnings":12.5' if field == "unwithdrawn_earnings" else f'"{field}":'
    start = text.index(holder if field == "unwithdrawn_earnings" else f'"{field}":')
    end = text.index(",", start) if field != "unwithdrawn_earnings" else start + len(holder)
    if field == "unwithdrawn_earnings":
        end = text.index("}", start)
    assert_alike(text[:start] + f'"{field}": {number}' + text[end:])


def test_keys_twice_and_unknown_fields_in_every_object() -> None:
    """A key twice (with or without whitespace before its colon), or a field the schema does not
    know, inserted first and last in every object of the request: read the long way, refused alike."""
    text = written(WHOLE, "compact")
    opens = [i for i, c in enumerate(text) if c == "{"]
    for at in opens:
        first_key = text[at + 1:text.index(":", at)]
        for pair in (f"{first_key}:null", f"{first_key} :null", f'{first_key}\n\t: "x"', '"unknown":1',
                     '"unknown":{"a":[1,{"b":2}]}', '"id\\u003a":1', '"\\u0069d":"x"'):
            assert_alike(text[:at + 1] + pair + "," + text[at + 1:])
        close = text.index("}", at)
        if text[at + 1:close].strip():
            assert_alike(text[:close] + "," + f"{first_key}:null" + text[close:])


@pytest.mark.parametrize("name", ["\\u8336\\u53f6", "a\\\"b", "a\\\\", "\\/", "a\\u003ab", "\\u0000", "\\ud800",
                                  "\\udc00x", "\\ud83c\\udf75", "\\n", "\\t", "a\\u0041", "\\u00e9" * 600])
def test_escapes_in_strings(name: str) -> None:
    text = written(WHOLE, "compact").replace('"name":"茶叶小店"', f'"name":"{name}"')
    assert_alike(text)
    assert_alike(text.encode())


def test_a_batch_read_at_once_is_its_requests_read_one_by_one() -> None:
    """RequestChecker.vouch_all (a batch's requests in one pass, engine/reader.py read_all) vouches
    for a group of texts exactly where vouch() vouches for each (escapes aside: then each is read
    alone), with the same values; a text whose colons are one short (a key written before a space)
    beside one a colon over (a key twice) is not let through by their sum."""
    checker = default_checker()
    compact = written(WHOLE, "compact")
    spaced_key = compact.replace('"shop":{', '"shop" :{', 1)
    key_twice = compact.replace('"shop":{', '"shop":{"id":"x",', 1)
    unknown = compact[:-1] + ',"unknown":1}'
    texts = [written(request, style) for request in generate_requests(150, seed=3, broken=0.2)
             for style in ("compact", "spaced")]
    groups = [[compact] * 5, [spaced_key, key_twice], [key_twice, spaced_key, compact], [unknown, compact],
              [compact, compact.replace('"at":"2025-07-01T00:00:00Z"', '"at":"2025-02-29T00:00:00Z"')],
              [written(WHOLE, "ascii"), compact], [], *(texts[n:n + 7] for n in range(0, len(texts), 7))]
    vouched_whole = 0
    for group in groups:
        data = [text.encode() for text in group]
        alone = [checker.vouch(text) for text in data]
        together = checker.vouch_all(data)
        colons = b"".join(data).count(b":")
        # the texts' colons counted by the caller (a batch body's check): the same; one more, refused
        # (and one fewer where they were vouched for)
        assert repr(checker.vouch_all(data, colons=colons)) == repr(together)
        if data:
            assert checker.vouch_all(data, colons=colons + 1) is None
            assert together is None or checker.vouch_all(data, colons=colons - 1) is None
        if together is not None:
            assert repr(together) == repr(alone), group
            vouched_whole += bool(group)
        else:
            assert None in alone or any(b"\\" in text for text in data), group
    assert vouched_whole >= 3


def test_bounds_in_one_pass_are_the_strict_reading_bounds() -> None:
    """within_bounds takes exactly the bytes _bound_values takes: at and past each bound, and with
    the characters counted inside strings, where its one pass over the three characters decides."""
    bodies = [b"{}", b"[" * MAX_CONTAINERS, b"[" * (MAX_CONTAINERS + 1), b"{" * 10_000 + b"[" * 10_000,
              b"{" * 10_000 + b"[" * 10_001, b"," * (MAX_VALUES - 1), b"," * MAX_VALUES,
              b'"' + b"{" * MAX_CONTAINERS + b'"', b'"' + b"{[," * 7_000 + b'"', b" " * 100_000 + b"[" * 20_001,
              b"[" * 5_000 + b"," * 15_000 + b"x" * 50_000, b"[" * 5_000 + b"," * 15_001 + b"x" * 50_000]
    for body in bodies:
        try:
            _bound_values(body)
            strict = True
        except RequestError:
            strict = False
        assert within_bounds(body) is strict, body[:40]


def test_escaped_chinese_names_are_read_in_one_pass() -> None:
    text = written(WHOLE, "ascii")
    assert "\\u8336" in text
    assert default_checker().vouch(text.encode()) == WHOLE


def test_long_lists_and_bounds_of_the_service_setting() -> None:
    small = RequestChecker(max_items=2)
    request = copy.deepcopy(WHOLE)
    for count in (0, 1, 2, 3, 5):
        request["shop"]["official_unbinds"] = ["2024-02-01T00:00:00Z"] * count
        request["account"]["bind_history"] = [{"shop_id": "s", "bound_at": "2023-05-05T05:05:05Z"}] * count
        assert_alike(written(request, "spaced"), small)
        assert_alike(written(request, "spaced"))


def test_a_body_with_too_many_values_is_refused_first_as_before() -> None:
    request = copy.deepcopy(WHOLE)
    request["account"]["bind_history"] = [{"shop_id": "{" * 120, "bound_at": "2023-05-05T05:05:05Z"}] * 200
    text = written(request, "compact")
    assert one_pass(default_checker(), text) == reference(default_checker(), text)
    assert "too many values" in one_pass(default_checker(), text)[1]


@pytest.mark.parametrize("depth", [MAX_DEPTH, 5000, 19_000])
def test_deep_nesting_where_msgspec_skips_or_keeps_the_text(depth: int) -> None:
    """In a field the schema does not know, and in the `number` field taken as its text."""
    deep = "[" * depth + "]" * depth
    text = written(WHOLE, "compact")
    assert_alike(text[:-1] + f',"unknown":{deep}}}')
    assert_alike(text.replace('"unwithdrawn_earnings":12.5', f'"unwithdrawn_earnings":{deep}'))


def test_the_conditions_of_the_schema() -> None:
    for action in ("bind", "unbind", "create_org_account", "upgrade_start", "enable_affiliate", "login"):
        for dropped in ("role", "shop", "account", "region", "market", "login"):
            request = {k: v for k, v in WHOLE.items() if k != dropped}
            assert_alike(written({**request, "action": action}, "compact"))
    for state in ("none", "trial", "upgraded", "cancelled"):
        for dropped in ("shop_id", "trial_started_at", "state"):
            upgrade = {k: v for k, v in WHOLE["account"]["upgrade"].items() if k != dropped}
            assert_alike(written(replaced(WHOLE, ("account", "upgrade"), {**upgrade, "state": state}), "compact"))


def test_the_fast_timestamps_are_ones_the_checker_takes_as_usable() -> None:
    """FAST_TIMESTAMP (what the reader lets through) against the checker, over every day of a
    leap and a common year, boundary years and times, offsets and fractions."""
    import re

    fast = re.compile(FAST_TIMESTAMP)
    checker = default_checker()
    login = {"action": "login", "account": {"id": "a"}, "login": {"method": "otp", "target": "app"}}
    samples = [f"{y}-{m:02d}-{d:02d}T{t}{z}" for y in ("0001", "0002", "2024", "2025", "9989", "9990", "9999")
               for m in range(0, 14) for d in (0, 1, 28, 29, 30, 31, 32)
               for t in ("00:00:00", "23:59:59", "23:59:60", "24:00:00", "12:60:00", "00:00:00.000001")
               for z in ("Z", "z", "+23:59", "-00:00", "+24:00", "+0100", "")]
    for sample in samples:
        if fast.fullmatch(sample):
            assert checker.usable.is_valid({**login, "at": sample}), sample


json_scalars = st.none() | st.booleans() | st.integers(-2**60, 2**60) | st.floats(allow_nan=False) \
    | st.text(st.sampled_from('aZ:"\\ {}é茶🍵\u0000\n'), max_size=8) | st.sampled_from(WRONG[19:])


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_generated_requests_changed_anywhere_are_judged_alike(data: st.DataObject) -> None:
    request = data.draw(st.sampled_from(list(generate_requests(40, seed=5))) | st.just(WHOLE))
    for _ in range(data.draw(st.integers(0, 3))):
        at = data.draw(st.sampled_from(paths(request)))
        request = replaced(request, at, data.draw(json_scalars | st.lists(json_scalars, max_size=3)
                                                  | st.dictionaries(st.sampled_from(["id", "x"]), json_scalars)))
    text = written(request, data.draw(st.sampled_from(["compact", "spaced", "ascii", "indent"])))
    spoil = data.draw(st.sampled_from(["none", "none", "repeat", "cut", "insert"]))
    if spoil == "repeat" and '{"' in text:
        at = data.draw(st.sampled_from([i for i in range(len(text)) if text.startswith('{"', i)]))
        key = text[at + 1:text.index('"', at + 2) + 1]
        text = text[:at + 1] + f"{key}{data.draw(st.sampled_from([':', ' :', chr(10) + ':']))} null," + text[at + 1:]
    elif spoil == "cut":
        text = text[:data.draw(st.integers(0, len(text)))]
    elif spoil == "insert":
        at = data.draw(st.integers(0, len(text)))
        text = text[:at] + data.draw(st.sampled_from([",", '"', ":", "\\", "1", " ", "}", "\\u003a"])) + text[at:]
    assert_alike(text)


def test_a_schema_the_generator_does_not_know_gets_no_one_pass_reading() -> None:
    from engine.reader import ReaderError

    for schema in ({"type": "object", "properties": {"a": {"type": "string", "format": "email"}},
                    "additionalProperties": False},
                   {"type": "object", "properties": {"a": {}}, "additionalProperties": False},
                   {"type": "object", "properties": {"a": {"type": "string"}}},
                   {"type": "array", "items": {"type": "string"}}):
        with pytest.raises(ReaderError):
            RequestReader(schema)


def test_short_decimals_are_read_as_the_strict_reading_reads_them() -> None:
    """A `number` field's decimal of 16 characters or fewer and no exponent is taken as float()
    gives it, without exact_double's proof (15 significant digits at most: a double holds them):
    the strict reading takes each of these (a spread of lengths, signs, zeros and digits) as the
    same double, and the longer or exponent-written ones are still read the long way."""
    import random

    import msgspec

    from engine.reader import _number, exact_double

    chosen = random.Random(5)
    texts = ["0.0", "-0.0", "250.50", "0.1", "0.30000000000000", "-0.00000000000001", "999999999999999.9",
             "1.0", "0.10000000000000001", "1e2", "1.5E-3", "123456789012345.67"]
    for _ in range(2000):
        whole, fraction = chosen.randrange(16), chosen.randrange(1, 16)
        digits = "".join(chosen.choice("0123456789") for _ in range(whole + fraction))
        head = digits[:whole].lstrip("0") or "0"
        texts.append(("-" if chosen.random() < 0.3 else "") + head + "." + digits[whole:])
    for text in texts:
        found = _number(msgspec.Raw(text.encode()), None, None)
        assert repr(found) == repr(exact_double(text)), text
