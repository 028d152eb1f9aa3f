"""Requests: checked against the contract's schema, then turned into CEL values once."""

from __future__ import annotations

import itertools
import json
import re
import string
from collections.abc import Callable, Mapping, Sequence
from functools import cache, cached_property
from typing import Any, cast

import jsonschema_rs
import orjson
from celpy import celtypes
from celpy.adapter import json_to_cel
from jsonschema import Draft202012Validator, FormatChecker

from engine.checker import first_problems
from engine.errors import Detail, RequestError
from engine.model import EACH, OPTIONAL, FieldPath
from engine.needs import pointer
from engine.reader import NO_NUL, ReaderError, RequestReader, exact_double, safe_integer
from engine.schemas import Schema, SchemaWalker, load_schema
from engine.versions import parse_timestamp

Convert = Callable[[Any], Any]


DEFAULT_MAX_ITEMS = 1000
MAX_PROBLEMS = 20  # problems listed in one refusal; the total is counted, the rest summed up
COUNTED_PROBLEMS = 100  # beyond this, "more than 100": counting costs too (about 50 µs a problem)


MAX_DEPTH = 16  # a request nests 4 deep (account.bind_history[i].bound_at), a batch 2 more
# Bounds known before parsing, from the bytes (strings included): what a body may cost is bounded.
MAX_CONTAINERS = 20_000  # '{' and '[': a batch of 1000 generated requests holds about 11,000
MAX_VALUES = 60_000  # ',' + 1: a batch of 1000 generated requests holds about 37,000


BATCH_ADVICE = "send them as several batches (a batch is bounded to cost about as much CPU as one request)"


def batch_count_problem(count: int) -> str:
    """The detail of a batch with too many requests (the service's answer, and replay's)."""
    return f"has {count} requests: {BATCH_ADVICE}"


def batch_bytes_problem(size: int) -> str:
    """The detail of a batch whose body has too many bytes."""
    return f"the body has {size} bytes: {BATCH_ADVICE}"


def parse_json(data: bytes | str, *, strict: bool = True) -> Any:
    """A request's JSON, strictly, at a cost bounded before anything is built:

    at most MAX_CONTAINERS objects and arrays (counted in the bytes, before parsing) and
    MAX_DEPTH levels; no NaN or Infinity, no lone surrogates (orjson's rules); no key twice in
    one object; no integer beyond +-2^53 and no number that a double cannot hold as written
    (2^64, 17.9999999999999999, 1e400). Anything else is a RequestError naming the place."""
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data
    containers = _bound_values(raw)
    if strict:
        value = _strict_from_orjson(raw, containers)
        if value is not _NOT_PARSED:
            return value
    return parse_json_reference(raw, strict=strict, counted=True)


def parse_json_reference(data: bytes | str, *, strict: bool = True, counted: bool = False) -> Any:
    """parse_json as it read every body before its fast path: the standard library's parse with
    a Python hook per object and number. parse_json hands it whatever its fast path cannot prove
    it reads alike (and the differential tests compare the two over hostile inputs)."""
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data
    if not counted:
        _bound_values(raw)
    value = _strict_in_one_parse(raw) if strict else _NOT_PARSED
    if value is not _NOT_PARSED:
        if (shape(value) if isinstance(value, dict | list) else 0) > MAX_DEPTH:
            raise RequestError("invalid_json", f"the request nests deeper than {MAX_DEPTH} levels",
                               [Detail("", f"objects and arrays nest at most {MAX_DEPTH} deep")])
        return value
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        where = f"line {exc.lineno} column {exc.colno}: {exc.msg}"
        raise RequestError("invalid_json", "the request is not valid JSON", [Detail("", where)]) from exc
    if nests_deeper(raw, MAX_DEPTH):
        raise RequestError("invalid_json", f"the request nests deeper than {MAX_DEPTH} levels",
                           [Detail("", f"objects and arrays nest at most {MAX_DEPTH} deep")])
    if strict:
        strict_json(raw)
    return value


_NOT_PARSED = object()
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def _bound_values(raw: bytes) -> int:
    """How many objects and arrays the bytes may hold: RequestError past the bounds."""
    containers, commas = raw.count(b"{") + raw.count(b"["), raw.count(b",")
    if containers > MAX_CONTAINERS or commas >= MAX_VALUES:
        raise RequestError("invalid_json", "the request has too many values", [Detail(
            "", f"{containers} '{{' and '[' and {commas} ',' characters: a body holds at most {MAX_CONTAINERS} "
                f"objects and arrays and {MAX_VALUES} values (strings included in the count)")])
    return containers


def within_bounds(raw: bytes) -> bool:
    """Whether _bound_values takes the bytes, in one pass where their '{', '[' and ',' together
    are within MAX_CONTAINERS (then so is each count: MAX_VALUES is larger), as a batch of a
    hundred requests is: a pass costs about as much for one character as for three."""
    if len(raw) <= MAX_CONTAINERS or len(raw) - len(raw.translate(None, b"{[,")) <= MAX_CONTAINERS:
        return True
    try:
        _bound_values(raw)
    except RequestError:
        return False
    return True


_JSON_WHITESPACE = b" \t\n\r"
DIGITS_AS_ZERO = bytes.maketrans(b"123456789", b"000000000")  # where runs of digits are looked for
_SIXTEEN_DIGITS = b"0" * 16  # 2^53 has 16 digits: every integer of 15 digits is exchanged exactly


def _strict_from_orjson(raw: bytes, containers: int) -> Any:
    """The common case at orjson's cost: its value, where the bytes prove that the reference
    reading (parse_json_reference) gives the same value; else _NOT_PARSED, and the reference reads
    it, with the same words as ever. The proof: orjson writes the value back, and outside
    whitespace the text is the one read. A key written twice comes back once; a number a double
    cannot hold as written (17.9999999999999999, 1.10, 1e400) comes back otherwise written, as does
    any integer orjson reads as a float (beyond 2^64); strings come back as they were (there are no
    escapes in the text: a backslash, and the reference reads it). What is left to look at: an
    integer of 16 digits and more (orjson keeps those within 2^64 as they were), and the depth,
    only where there are more objects and arrays than MAX_DEPTH (tests/abuse/test_strict_reader.py
    compares both readings over hostile inputs)."""
    if b"\\" in raw:
        return _NOT_PARSED
    try:
        value = orjson.loads(raw)
        again = orjson.dumps(value)
    except (orjson.JSONDecodeError, orjson.JSONEncodeError):
        return _NOT_PARSED
    if b" " in again:  # in a string (orjson writes no other whitespace)
        again = again.translate(None, _JSON_WHITESPACE)
    if again != raw.translate(None, _JSON_WHITESPACE):
        return _NOT_PARSED
    if len(raw) >= 16 and _SIXTEEN_DIGITS in raw.translate(DIGITS_AS_ZERO):
        return _NOT_PARSED
    if containers > MAX_DEPTH and nests_deeper(raw, MAX_DEPTH):
        return _NOT_PARSED
    return value


def _strict_in_one_parse(raw: bytes) -> Any:
    """The common case in one parse: the standard library's, with the strict hooks, gives the value
    itself. Anything it would not say exactly as the two-step reading does (a \\u escape of a
    surrogate, which orjson checks for lone ones; bytes that are not UTF-8; NaN; any error) is
    _NOT_PARSED, and parse_json reads it the two-step way, with the same words as ever."""
    if b"\\u" in raw and _SURROGATE_ESCAPE.search(raw):
        return _NOT_PARSED
    try:
        return json.loads(raw.decode("utf-8"), object_pairs_hook=_unique_keys, parse_int=_safe_integer,
                          parse_float=_exact_number, parse_constant=_no_constant)
    except (ValueError, RequestError, RecursionError):  # UnicodeDecodeError and JSONDecodeError included
        return _NOT_PARSED


def _no_constant(text: str) -> Any:
    raise ValueError(f"{text} is not JSON")


def strict_json(raw: bytes) -> None:
    """RequestError for a key twice in one object, an integer beyond +-2^53 or a number a double
    cannot hold as written. The standard library parses again, its hooks seeing each object's keys
    in order and each number as written: a Python call per object and number, so the service
    runs it only on a body it is about to decide (parse_json has bounded its size and syntax)."""
    json.loads(raw, object_pairs_hook=_unique_keys, parse_int=_safe_integer, parse_float=_exact_number)


_NOT_STRUCTURE = bytes(b for b in range(256) if b not in b'[]{}"')


def nests_deeper(raw: bytes, limit: int) -> bool:
    """Whether objects and arrays in valid JSON text nest deeper than `limit`, from the text
    alone, in C loops over the bytes (walking the parsed value costs a Python step per object:
    19,000 objects took 16 ms). Escaped backslashes, then escaped quotes, are taken out; of the
    rest only quotes and brackets are kept; two quotes side by side go (a string without
    brackets, or nothing between two strings: the quotes left still alternate, opening and
    closing); what lies between the quotes left is dropped (strings holding brackets). Each
    pass then takes away the innermost level (an empty pair is marked, then dropped, so that a
    pass never takes two levels)."""
    text = raw.replace(b"\\\\", b"").replace(b'\\"', b"") if b"\\" in raw else raw
    brackets = text.translate(None, _NOT_STRUCTURE).replace(b'""', b"")
    if b'"' in brackets:
        brackets = b"".join(brackets.split(b'"')[::2])
    for _ in range(limit):
        if not brackets:
            return False
        brackets = brackets.replace(b"{}", b"\0").replace(b"[]", b"\0").replace(b"\0", b"")
    return bool(brackets)


def shape(value: Any) -> int:
    """How deep objects and arrays nest in a parsed JSON value, without recursion (parse_json has
    bounded how many there are)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        deepest = max(deepest, depth)
        for child in item.values() if type(item) is dict else item:
            kind = type(child)
            if kind is dict or kind is list:
                stack.append((child, depth + 1))
    return deepest


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    found = dict(pairs)
    if len(found) != len(pairs):
        seen: set[str] = set()
        twice = next(key for key, _ in pairs if key in seen or seen.add(key))  # type: ignore[func-returns-value]
        raise RequestError("invalid_json", "the request has a key twice in one object",
                           [Detail("", f"the key {twice!r} appears twice in one object; JSON readers "
                                       "disagree on which one counts")])
    return found


def _safe_integer(text: str) -> int:
    number = safe_integer(text)
    if number is None:
        raise RequestError("invalid_json", "the request has an integer too large to be exchanged exactly",
                           [Detail("", f"{text[:40]} is beyond +-2^53")])
    return number


def _exact_number(text: str) -> float:
    number = exact_double(text)
    if number is None:
        raise RequestError("invalid_json", "the request has a number a double cannot hold as written",
                           [Detail("", f"{text[:40]} would be read as {float(text)!r}")])
    return number


def bounded_schema(max_items: int) -> Schema:
    """The request schema with every list bounded to `max_items` (the service's setting)."""

    def bound(node: Any) -> Any:
        if isinstance(node, dict):
            return {k: (max_items if k == "maxItems" else bound(v)) for k, v in node.items()}
        if isinstance(node, list):
            return [bound(v) for v in node]
        return node

    bounded: Schema = bound(load_schema("request"))
    return bounded


class RequestChecker:
    """Checks requests against the contract: jsonschema-rs for the common case (a valid request,
    about 2 µs), jsonschema, the reference, for the precise list of problems of one it refuses."""

    def __init__(self, max_items: int = DEFAULT_MAX_ITEMS) -> None:
        self.schema = bounded_schema(max_items)
        self.max_items = max_items
        self.walker = SchemaWalker(self.schema)
        self._fields: dict[tuple[str, ...], bool] = {}
        self._field_map(self.schema, (), self._fields)
        self.fast = jsonschema_rs.validator_for(self.schema, validate_formats=True)
        usable = _usable_timestamps(self.schema)
        self.usable = jsonschema_rs.validator_for(_leaner(usable, self.walker), validate_formats=True)
        # `usable` for a value read from a text without a backslash (no escape, so no NUL in it:
        # the contract's NUL patterns hold without looking): bindpolicy impact's common line
        self.usable_unescaped = jsonschema_rs.validator_for(_leaner(usable, self.walker, nul=False),
                                                            validate_formats=True)
        # jsonschema-rs has checked the schema against its meta-schema (it refuses one that breaks
        # it); jsonschema's check_schema did it again, and cost each process about 50 ms: a tenth
        # of `bindpolicy impact`'s CPU over 40,000 requests (tests/test_request.py checks both agree)
        self.reference = Draft202012Validator(self.schema, format_checker=FormatChecker())

    @cached_property
    def reader(self) -> RequestReader | None:
        """The one-pass reader of the schema (engine/reader.py), None where it has none: built on
        first use (about 9 ms of CPU that `bindpolicy impact`, which reads as json.loads does,
        never needs; the service builds it when it loads its policies)."""
        return _one_pass_reader(self.schema)

    def __call__(self, raw: Any) -> dict[str, Any]:
        """The request itself if it keeps the contract (nulls in optional fields dropped); else a
        RequestError listing its first MAX_PROBLEMS problems and how many there are in all."""
        if not isinstance(raw, dict):
            raise RequestError("invalid_request", "the request must be a JSON object",
                               [Detail("", "expected an object")])
        if self.fast.is_valid(raw):
            return raw
        request = self.drop_nulls(raw)
        if request is not raw and self.fast.is_valid(request):
            return request
        too_long = _long_lists(request, self.max_items)
        if too_long:  # their items are not checked one by one: that is the cost to bound
            raise RequestError("invalid_request", f"the request has {len(too_long)} list"
                               f"{'s' if len(too_long) != 1 else ''} longer than {self.max_items} items",
                               too_long[:MAX_PROBLEMS])
        problems = first_problems(self.reference, request, COUNTED_PROBLEMS + 1)
        details = [Detail(pointer(path), message) for path, message in problems]
        if not details:  # the two validators disagree: refused all the same, in jsonschema-rs's words
            details = [Detail(pointer(e.instance_path), _fast_problem(e))
                       for e in itertools.islice(self.fast.iter_errors(request), MAX_PROBLEMS)]
        total = len(details)
        counted = f"more than {COUNTED_PROBLEMS}" if total > COUNTED_PROBLEMS else str(total)
        if total > MAX_PROBLEMS:
            details = details[:MAX_PROBLEMS]
            details.append(Detail("", f"... and {counted} problems in all; the first {MAX_PROBLEMS} are listed"))
            message = f"the request breaks the contract in {counted} places; the first {MAX_PROBLEMS} are listed"
        else:
            message = f"the request breaks the contract in {total} place{'s' if total != 1 else ''}"
        raise RequestError("invalid_request", message, details)

    def checked(self, raw: Any) -> tuple[dict[str, Any], bool]:
        """The request as __call__ gives it, and whether every timestamp in it is surely one that
        Python holds (then only the timestamps a rule reads need parsing: engine/codegen.py)."""
        if isinstance(raw, dict) and self.usable.is_valid(raw):
            return raw, True
        request = self(raw)
        return request, request is not raw and self.usable.is_valid(request)

    def read(self, data: bytes | str) -> tuple[dict[str, Any], bool]:
        """A request from its bytes, as checked(parse_json(data)) gives it, with the same errors:
        in one pass (engine/reader.py) where the reader vouches for it, else that way."""
        raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data
        value = self.vouch(raw)
        if value is not None:
            return value, True
        return self.checked(parse_json(raw))  # (too many values: parse_json says so first)

    def vouch(self, raw: bytes) -> dict[str, Any] | None:
        """The request of these bytes where the one-pass reader vouches for it, else None: then it
        is the value parse_json and json.loads give, which checked() takes as it is (every timestamp
        usable); None says nothing (read it the long way)."""
        if self.reader is None:
            return None
        if not within_bounds(raw):
            return None
        return self.reader(raw)

    def vouch_all(self, texts: Sequence[bytes], *, bounded: bool = False,
                  colons: int | None = None) -> list[dict[str, Any]] | None:
        """vouch() of each text, where the reader vouches for all of them in one pass over them
        (RequestReader.read_all: a batch's requests); None: ask vouch() for each. Within vouch()'s
        bounds taken together (then each text is within them); `bounded`: the caller counted them
        within those bounds already (a batch body's counts, which hold its requests'); `colons`:
        the texts' colons, where the caller counted them (a pass over them fewer)."""
        if self.reader is None:
            return None
        if not bounded and not within_bounds(b"".join(texts)):
            return None
        return self.reader.read_all(texts, colons)

    def drop_nulls(self, raw: dict[str, Any]) -> dict[str, Any]:
        """The request with every null that stands for an absent field removed (a copy, or the
        request itself if it has none): protobuf's JSON mapping reads null in an optional field as
        absent, and so do we; where the contract says "or null", null stays a value."""
        return cast(dict[str, Any], self._drop(raw, ()))

    def _drop(self, value: Any, at: tuple[str, ...]) -> Any:
        if type(value) is dict:
            kept: dict[str, Any] = {}
            for name, item in value.items():
                path = (*at, name)
                known = self._fields.get(path)
                if item is None and known is False:
                    continue
                kept[name] = item if known is None or item is None else self._drop(item, path)
            same = len(kept) == len(value) and all(kept[k] is value[k] for k in kept)
            return value if same else kept
        if type(value) is list and len(value) <= self.max_items and (*at, EACH) in self._fields:
            items = [self._drop(item, (*at, EACH)) for item in value]
            return value if all(a is b for a, b in zip(items, value, strict=True)) else items
        return value

    def _field_map(self, schema: Schema, at: tuple[str, ...], found: dict[tuple[str, ...], bool]) -> None:
        """Every field path of the schema (EACH for list items): True where null is a value of its own."""
        for name in self.walker.fields(schema):
            child = self.walker.child(schema, name)
            if child is None or (*at, name) in found:
                continue
            found[(*at, name)] = "null" in self._null_types(child)
            self._field_map(child, (*at, name), found)
        items = self.walker.child(schema, EACH)
        if items is not None and (*at, EACH) not in found:
            found[(*at, EACH)] = True
            self._field_map(items, (*at, EACH), found)

    def _null_types(self, schema: Schema) -> set[str]:
        schema = self.walker.resolve(schema)
        branches = schema.get("oneOf") or schema.get("anyOf") or [schema]
        return {b.get("type") for b in branches if isinstance(b.get("type"), str)}


def _one_pass_reader(schema: Schema) -> RequestReader | None:
    """The one-pass reader of this schema; None where the schema holds what it does not know."""
    try:
        return RequestReader(schema)
    except ReaderError:
        return None


# A date-time that parse_timestamp surely takes: years 0002 to 9998 (an offset cannot push it out
# of Python's 1 to 9999) and no leap second. Others (0000, 23:59:60...) the contract lets through,
# and the evaluator's whole conversion refuses them with the field named: they take that path.
USABLE_TIMESTAMP = ("^(?:000[2-9]|00[1-9][0-9]|0[1-9][0-9]{2}|[1-8][0-9]{3}|9[0-8][0-9]{2}|99[0-8][0-9])"
                    "-[0-9]{2}-[0-9]{2}[Tt][0-9]{2}:[0-9]{2}:[0-5]")


def _usable_timestamps(schema: Schema) -> Schema:
    """The schema with USABLE_TIMESTAMP on every date-time: a request it accepts decides without
    converting its timestamps first."""
    def narrow(node: Any) -> Any:
        if isinstance(node, dict):
            out = {k: narrow(v) for k, v in node.items()}
            if out.get("format") == "date-time":
                out = {"allOf": [out, {"pattern": USABLE_TIMESTAMP}]} if "pattern" in out else \
                    {**out, "pattern": USABLE_TIMESTAMP}
            return out
        if isinstance(node, list):
            return [narrow(v) for v in node]
        return node

    narrowed: Schema = narrow(schema)
    return narrowed


def _leaner(schema: Schema, walker: SchemaWalker, *, nul: bool = True) -> Schema:
    """The schema written so that jsonschema-rs walks it faster, judging every value alike (about
    1.2 µs of 8 a generated request, measured): a oneOf of null and a schema that refuses null
    as an anyOf (exactly one branch holds wherever one does: no need to try the other); a
    string of n capital letters (^[A-Z]{n}$, n = 1 or 2, lengths that allow n) as the enum of
    them all (a look-up, no regex). `nul=False`: without the NUL patterns too, for values read
    from a text without escapes (only an escape writes NUL in JSON)."""
    def refuses_null(branch: Any) -> bool:
        found = walker.resolve(branch) if isinstance(branch, dict) else {}
        kind = found.get("type")
        if isinstance(kind, str):
            return kind != "null"
        values = found.get("enum", [found["const"]] if "const" in found else None)
        return values is not None and None not in values

    def lean(node: Any) -> Any:
        if isinstance(node, list):
            return [lean(v) for v in node]
        if not isinstance(node, dict):
            return node
        out = {k: lean(v) for k, v in node.items()}
        branches = out.get("oneOf")
        if isinstance(branches, list) and len(branches) == 2 and {"type": "null"} in branches \
                and all(b == {"type": "null"} or refuses_null(b) for b in branches):
            out["anyOf"] = out.pop("oneOf")
        letters = re.fullmatch(r"\^\[A-Z\]\{([12])\}\$", str(out.get("pattern", "")))
        if letters and out.get("type") == "string" and out.get("minLength", 0) <= int(letters.group(1)) \
                <= out.get("maxLength", 2) and set(out) <= {"type", "pattern", "minLength", "maxLength", "description"}:
            size = int(letters.group(1))
            return {"enum": ["".join(p) for p in itertools.product(string.ascii_uppercase, repeat=size)]}
        if not nul and out.get("pattern") == NO_NUL:
            del out["pattern"]
        return out

    leaner: Schema = lean(schema)
    return leaner


def _long_lists(value: Any, limit: int) -> list[Detail]:
    """Every list longer than `limit`, by pointer (objects and arrays are bounded by parse_json)."""
    found: list[Detail] = []
    stack: list[tuple[Any, tuple[str | int, ...]]] = [(value, ())]
    while stack:
        item, at = stack.pop()
        if isinstance(item, list):
            if len(item) > limit:
                found.append(Detail(pointer(at), f"has {len(item)} items, more than the {limit} allowed"))
                continue
            stack.extend((child, (*at, i)) for i, child in enumerate(item) if isinstance(child, dict | list))
        elif isinstance(item, dict):
            stack.extend((child, (*at, k)) for k, child in item.items() if isinstance(child, dict | list))
    return sorted(found, key=lambda d: d.path)


def _fast_problem(error: Any) -> str:
    """jsonschema-rs's message, without the whole offending value in it (a list of 100,000 items)."""
    if type(error.kind).__name__ == "MaxItems" and isinstance(error.instance, list):
        return f"has {len(error.instance)} items, more than the {error.kind.limit} allowed"
    message = str(error.message)
    return message if len(message) <= 200 else message[:200] + "..."


@cache
def default_checker() -> RequestChecker:
    return RequestChecker()


def check_request(raw: Any) -> dict[str, Any]:
    """Check a request against the contract with the default list bound."""
    return default_checker()(raw)


def timestamp_problems(request: Any, schema: Schema | None = None) -> list[Detail]:
    """Every timestamp of the request that cannot be used, by JSON pointer."""
    walker = SchemaWalker(schema or load_schema("request"))
    found: list[Detail] = []

    def walk(value: Any, node: Schema, at: tuple[str | int, ...]) -> None:
        if "timestamp" in walker.types(node) and isinstance(value, str):
            try:
                parse_timestamp(value)
            except ValueError as exc:
                found.append(Detail(pointer(at), f"{value!r} cannot be used as a time: {exc}"))
        elif isinstance(value, dict):
            for name, item in value.items():
                child = walker.child(node, name)
                if child is not None:
                    walk(item, child, (*at, name))
        elif isinstance(value, list):
            child = walker.child(node, EACH)
            if child is not None:
                for index, item in enumerate(value):
                    walk(item, child, (*at, index))

    walk(request, schema or load_schema("request"), ())
    return found


def value_at(request: Mapping[str, Any], path: FieldPath) -> tuple[bool, Any]:
    """(present, value) of a field path; an EACH step gives the list of item values."""
    value: Any = request
    path = tuple(p for p in path if p != OPTIONAL)
    for depth, head in enumerate(path):
        if head == EACH:
            if not isinstance(value, list):
                return False, None
            items = [value_at(item, path[depth + 1:]) for item in value]
            return True, [v for ok, v in items if ok]
        if not isinstance(value, dict) or head not in value:
            return False, None
        value = value[head]
    return True, value


class CelConverter:
    """Builds, from the request schema, one function that turns a request into CEL values."""

    def __init__(self, schema: Schema | None = None) -> None:
        schema = schema or load_schema("request")
        self.walker = SchemaWalker(schema)
        self._convert = self._build(schema, top=True)

    def __call__(self, request: dict[str, Any]) -> dict[str, Any]:
        converted: dict[str, Any] = self._convert(request)
        return converted

    def _build(self, schema: Schema, top: bool = False) -> Convert:
        kinds = self.walker.types(schema)
        if "timestamp" in kinds:
            return lambda v: None if v is None else celtypes.TimestampType(parse_timestamp(v))
        if "object" in kinds:
            fields = {name: self._build(self.walker.resolve(sub))
                      for alt in self.walker.alternatives(schema)
                      for name, sub in alt.get("properties", {}).items()}
            if top:  # the activation: one CEL variable per top-level field
                return lambda v: {name: fields[name](item) for name, item in v.items()}
            return lambda v: None if v is None else celtypes.MapType(
                {celtypes.StringType(name): fields[name](item) for name, item in v.items()})
        if "array" in kinds:
            items = next((self.walker.resolve(a["items"]) for a in self.walker.alternatives(schema)
                          if "items" in a), {})
            each = self._build(items)
            return lambda v: None if v is None else celtypes.ListType([each(i) for i in v])
        if "number" in kinds:
            return lambda v: None if v is None else celtypes.DoubleType(float(v))
        if "integer" in kinds:
            return lambda v: None if v is None else celtypes.IntType(int(v))
        if "boolean" in kinds:
            return lambda v: None if v is None else celtypes.BoolType(v)
        if "string" in kinds:
            return lambda v: None if v is None else celtypes.StringType(v)
        return json_to_cel


class NativeConverter:
    """From the request schema: turns a request into plain Python values for native evaluation.

    Only what differs is rebuilt: timestamps become aware datetimes (UTC), `number` fields
    floats, `integer` fields ints (JSON's 18.0 is an integer); everything else is the request's
    own objects, shared, never modified. The schema is written out once as Python source, one
    small function per object or list that holds something to convert.
    """

    def __init__(self, schema: Schema | None = None) -> None:
        schema = schema or load_schema("request")
        self.walker = SchemaWalker(schema)
        self._defs: list[str] = []
        top = self._function(schema) or "_copy"
        namespace: dict[str, Any] = {"parse_timestamp": parse_timestamp, "_copy": dict}
        exec(compile("\n\n".join(self._defs), "<native converter>", "exec"), namespace)  # from the schema
        self._convert: Convert = namespace[top]

    def __call__(self, request: dict[str, Any]) -> dict[str, Any]:
        converted: dict[str, Any] = self._convert(request)
        return converted if converted is not request else dict(request)

    def _scalar(self, schema: Schema, value: str) -> str | None:
        """An expression converting `value` (a name), or None if it stays as it is."""
        kinds = self.walker.types(schema)
        if "timestamp" in kinds:
            return f"(None if {value} is None else parse_timestamp({value}))"
        if "object" in kinds or "array" in kinds:
            name = self._function(schema)
            return f"{name}({value})" if name else None
        if "number" in kinds:
            return f"(float({value}) if type({value}) is int else {value})"
        if "integer" in kinds:
            return f"(int({value}) if type({value}) is float else {value})"
        return None

    def _function(self, schema: Schema) -> str | None:
        """The name of a function converting values of an object or list schema (None: nothing to do)."""
        kinds = self.walker.types(schema)
        self._count = getattr(self, "_count", 0) + 1
        name = f"_convert_{self._count}"  # numbered before the functions it calls are written
        if "object" in kinds:
            body = []
            for alt in self.walker.alternatives(schema):
                for field, sub in alt.get("properties", {}).items():
                    expression = self._scalar(self.walker.resolve(sub), "x")
                    if expression is not None:
                        body.append(f"    if {field!r} in v:\n        x = v[{field!r}]\n"
                                    f"        v[{field!r}] = {expression}")
            if not body:
                return None
            self._defs.append(f"def {name}(v):\n    if v is None:\n        return None\n    v = dict(v)\n"
                              + "\n".join(body) + "\n    return v")
            return name
        if "array" in kinds:
            items = next((self.walker.resolve(a["items"]) for a in self.walker.alternatives(schema)
                          if "items" in a), {})
            expression = self._scalar(items, "x")
            if expression is None:
                return None
            self._defs.append(f"def {name}(v):\n    return None if v is None else [{expression} for x in v]")
            return name
        return None
