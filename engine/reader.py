"""A request read and checked in one pass over its bytes, for the common valid request.

msgspec decodes the bytes against types generated from the request schema (TypedDicts with their
required fields, Literal enums, length and range bounds), in C, and builds the value as it goes:
the same dicts, lists, strings and numbers as the strict reading's. The reader only VOUCHES: what
it gives back is exactly the value that the strict reading (engine/request.py: parse_json) gives
and that the checker (RequestChecker.checked) takes as it is, with every timestamp usable.
Whatever it refuses or cannot prove is None, and the strict reading and the checker read the
bytes again, with their words for every problem. What msgspec does not check, the bytes and the
value prove:

- a key twice in one object, and a field the schema does not know (msgspec drops both in
  silence): orjson's writing of the value has as many colons as the text (a colon in a string
  is in both; a key dropped takes its colon with it; an escaped colon, \\u003a, is counted);
- numbers: integer fields take only integers within their bounds and +-2^53 (an integer written
  18.0, which JSON Schema takes, is read the long way); a `number` field is taken as its text
  (msgspec.Raw) and read as the reference reads it, a double that holds the number as written;
- strings: no \\u0000 (the contract refuses NUL, which only an escape can write); msgspec, like
  orjson, refuses a lone surrogate and reads a pair as its one character;
- the schema's conditions (`if` a field has one of some values, `then` fields are required);
- timestamps: gathered from the value and matched at once against FAST_TIMESTAMP, a subset of
  what the date-time format and USABLE_TIMESTAMP take (no 29 February: read the long way).

The finishing function (numbers, conditions, timestamps) is written from the schema as Python
source, like NativeConverter's. A schema with anything the generator does not know gets no
one-pass reading (ReaderError; RequestChecker then reads every request the long way).
tests/abuse/test_request_reader.py compares both ways over hostile texts and generated requests.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from decimal import Decimal
from functools import partial
from itertools import product, repeat
from operator import is_not, itemgetter
from string import ascii_uppercase
from typing import Annotated, Any, Literal, NotRequired, Required, TypedDict, Union

import msgspec
import orjson

from engine.schemas import Schema, SchemaWalker

SAFE_INTEGER = 2**53  # beyond it a JSON number is not the same integer in every client (IEEE doubles)


def safe_integer(text: str | bytes) -> int | None:
    """An integer's text as the strict reading takes it: None beyond +-2^53."""
    number = int(text)
    return number if -SAFE_INTEGER <= number <= SAFE_INTEGER else None


def exact_double(text: str) -> float | None:
    """A number's text as the strict reading takes it: the double, where it holds the number
    exactly as written; None otherwise (1e400, 0.10000000000000001)."""
    number = float(text)
    if repr(number) == text or (math.isfinite(number) and Decimal(repr(number)) == Decimal(text)):
        return number
    return None

# A date-time that the date-time format and USABLE_TIMESTAMP (engine/request.py) both take and
# Python holds: years 0002 to 9989, days that every year has in their month (29 February is read
# the long way), no leap second, an offset within a day.
_YEAR = "(?:[1-8][0-9]{3}|000[2-9]|00[1-9][0-9]|0[1-9][0-9]{2}|9[0-8][0-9]{2}|99[0-8][0-9])"  # usual first
_MONTH_DAY = ("(?:(?:0[1-9]|1[0-2])-(?:0[1-9]|1[0-9]|2[0-8])"
              "|(?:0[13-9]|1[0-2])-(?:29|30)"
              "|(?:0[13578]|1[02])-31)")
_TIME = "(?:[01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](?:\\.[0-9]+)?"
_OFFSET = "(?:[Zz]|[+-](?:[01][0-9]|2[0-3]):[0-5][0-9])"
FAST_TIMESTAMP = f"{_YEAR}-{_MONTH_DAY}[Tt]{_TIME}{_OFFSET}"
# Every timestamp of a request, each ended by \n: FAST_TIMESTAMP with each part an atomic group
# (no way back into a part once it matched) and the repeat possessive. The same strings match:
# each part's branches are as wide as each other (a year 4 digits, a month and day 5 characters,
# an hour 2) or end where what follows cannot go on (the fraction's digits before an offset,
# which starts with no digit); 40% less of the regex engine's time than the plain pattern.
_TIMESTAMPS = re.compile(f"(?>(?>{_YEAR})-(?>{_MONTH_DAY})[Tt](?>{_TIME})(?>{_OFFSET})\n)*+")

NO_NUL = "^[^\\u0000]*$"  # the contract's pattern for stored strings: proven from the bytes instead

_NUMBER_START = frozenset(b"-0123456789")

_STRING_WORDS = frozenset({"type", "description", "title", "minLength", "maxLength", "pattern", "format"})
_INTEGER_WORDS = frozenset({"type", "description", "title", "minimum", "maximum"})
_NUMBER_WORDS = _INTEGER_WORDS
_OBJECT_WORDS = frozenset({"type", "description", "title", "properties", "required", "additionalProperties",
                           "allOf", "if", "then", "$schema", "$id", "$defs"})
_ARRAY_WORDS = frozenset({"type", "description", "title", "items", "maxItems"})

# What a node asks of the finishing function (besides an object's own function)
NUMBER, TIMESTAMP, TIMESTAMPS = "number", "timestamp", "timestamps"


def _timestamp_colons(timestamps: list[str]) -> int:
    """The colons of the timestamps gathered, each matched at once against FAST_TIMESTAMP; -1 if
    one does not match."""
    if not timestamps:
        return 0
    joined = "\n".join(timestamps) + "\n"  # a \n in one of them would be one more
    if _TIMESTAMPS.fullmatch(joined) is None or joined.count("\n") != len(timestamps):
        return -1
    return joined.count(":")


class ReaderError(Exception):
    """The schema holds something the one-pass reading does not know: it is not used."""


class RequestReader:
    """Reads a request from its bytes in one pass where it can vouch for it: __call__ gives the
    value (the strict reading's, which the checker takes as it is, every timestamp usable), or
    None: read it the long way."""

    def __init__(self, schema: Schema) -> None:
        self._walker = SchemaWalker(schema)
        self._count = 0
        self._constants: dict[str, Any] = {}
        if self._walker.resolve(schema).get("type") != "object":
            raise ReaderError("the request is not an object")
        request_type, finish = self._type(schema, "request")
        body = finish[1]("o", 1)
        self.source = "def finish(o, ts):\n" + "\n".join(["    add, more, k = ts.append, ts.extend, 0", *body,
                                                           "    return k"]) + "\n"  # for a reviewer
        namespace: dict[str, Any] = {"number": _number, "itemgetter": itemgetter, "repeat": repeat,
                                     "is_value": partial(is_not, None), **self._constants}
        exec(compile(self.source, "<request reader>", "exec"), namespace)  # written from the schema
        self._finish: Callable[[Any, list[str]], int] = namespace["finish"]  # keys, or -1: refused
        self._decode = msgspec.json.Decoder(request_type).decode
        self._decode_list = msgspec.json.Decoder(list[request_type]).decode  # type: ignore[valid-type]

    def __call__(self, raw: bytes) -> dict[str, Any] | None:
        escaped = b"\\" in raw
        if escaped and b"\\u0000" in raw:
            return None
        try:
            value: dict[str, Any] = self._decode(raw)
        except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError, RecursionError):
            return None  # RecursionError: deep nesting in a field msgspec skips or takes as Raw
        timestamps: list[str] = []
        keys = self._finish(value, timestamps)
        if keys < 0:
            return None
        timestamp_colons = _timestamp_colons(timestamps)
        if timestamp_colons < 0:
            return None
        if escaped:  # a key twice, or unknown, is dropped with its colon: fewer in orjson's writing
            colons = raw.count(b":") + raw.count(b"\\u003a") + raw.count(b"\\u003A")
            return value if orjson.dumps(value).count(b":") == colons else None
        # Without escapes, every colon of the text is a key's (one a key, outside strings) or in a
        # string. The keys decoded are at most the text's (a key twice is decoded once, an unknown
        # one not at all), and each timestamp gathered is a string of the text with its colons. So
        # the text has at least keys + the timestamps' colons, and exactly as many only where no
        # key is twice or unknown and no other string holds a colon (one count of the bytes).
        return value if raw.count(b":") == keys + timestamp_colons else None

    def read_all(self, texts: Sequence[bytes], colons: int | None = None) -> list[dict[str, Any]] | None:
        """The requests of these texts (a batch's), where the reader vouches for every one of them,
        in one pass over them all: what __call__ gives for each, or None (then ask __call__ for each).
        msgspec reads them as one list in C; the finishing function runs on each value as it would
        alone; their timestamps are matched in one look, their colons counted once over all the
        texts. The sums prove what each text's counts do: in each text every colon is a key's
        written '":' or a timestamp's or another, and no key is decoded that was not written, so
        each text has at least its keys' '":' and its timestamps' colons; the totals equal only
        where every text's do. `colons`: the texts' colons, where the caller counted them already
        (a batch body's check of its shape)."""
        if not texts:
            return []
        joined = b",".join(texts)
        if b"\\" in joined:  # escapes: each text is proven apart (__call__)
            return None
        try:
            values: list[dict[str, Any]] = self._decode_list(b"[" + joined + b"]")
        except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError, RecursionError):
            return None
        if len(values) != len(texts):  # (a text that was more than one value)
            return None
        timestamps: list[str] = []
        keys = 0
        finish = self._finish
        for value in values:
            counted = finish(value, timestamps)
            if counted < 0:
                return None
            keys += counted
        timestamp_colons = _timestamp_colons(timestamps)
        if timestamp_colons < 0:
            return None
        tight = joined.count(b'":')
        if colons is None:
            colons = joined.count(b":")  # (the commas that join the texts hold none)
        return values if tight == keys and colons == tight + timestamp_colons else None

    # --- the types, from the schema --------------------------------------------------------

    def _type(self, schema: Schema, name: str) -> tuple[Any, Any]:
        """The msgspec type of a schema node, and what the finishing function does with its
        value: None, NUMBER, TIMESTAMP, TIMESTAMPS, or ("object" or "objects" for a list of them,
        the function writing the source that finishes one, the timestamp fields a list of them
        gathers in C where that is all there is to do)."""
        schema = self._walker.resolve(schema)
        branches = schema.get("oneOf") or schema.get("anyOf")
        if branches:
            if set(schema) - {"oneOf", "anyOf", "description", "title"}:
                raise ReaderError(f"{name}: a oneOf beside other keywords")
            kinds = [self._walker.resolve(b) for b in branches]
            others = [b for b in kinds if b != {"type": "null"}]
            if len(kinds) != 2 or len(others) != 1:
                raise ReaderError(f"{name}: only a oneOf of null and one other schema is read in one pass")
            inner, finish = self._type(others[0], name)
            if finish == NUMBER:
                raise ReaderError(f"{name}: a number or null")
            return Union[inner, None], finish  # noqa: UP007 (a type built at run time)
        if "enum" in schema or "const" in schema:
            values = schema.get("enum", [schema.get("const")])
            if set(schema) - {"enum", "const", "description", "title"} or not all(isinstance(v, str) for v in values):
                raise ReaderError(f"{name}: only enums of strings are read in one pass")
            return Literal[tuple(values)], None
        kind = schema.get("type")
        if kind == "string":
            return self._string(schema, name)
        if kind == "boolean" and set(schema) <= {"type", "description", "title"}:
            return bool, None
        if kind == "integer":
            return self._integer(schema, name), None
        if kind == "number":
            if set(schema) - _NUMBER_WORDS:
                raise ReaderError(f"{name}: {sorted(set(schema) - _NUMBER_WORDS)} on a number")
            return msgspec.Raw, NUMBER  # its text, read by the object's finishing function
        if kind == "array":
            return self._array(schema, name)
        if kind == "object":
            return self._object(schema, name)
        raise ReaderError(f"{name}: {schema!r} is not read in one pass")

    def _string(self, schema: Schema, name: str) -> tuple[Any, Any]:
        if set(schema) - _STRING_WORDS:
            raise ReaderError(f"{name}: {sorted(set(schema) - _STRING_WORDS)} on a string")
        bounds: dict[str, Any] = {}
        if "minLength" in schema:
            bounds["min_length"] = schema["minLength"]
        if "maxLength" in schema:
            bounds["max_length"] = schema["maxLength"]
        pattern, finish = schema.get("pattern"), None
        if schema.get("format") == "date-time":
            if pattern is not None:
                raise ReaderError(f"{name}: a pattern on a date-time")
            finish = TIMESTAMP
        elif "format" in schema:
            raise ReaderError(f"{name}: the format {schema['format']!r}")
        elif pattern is not None and pattern != NO_NUL:  # NUL: no \u0000 in the bytes
            letters = re.fullmatch(r"\^\[A-Z\]\{([12])\}\$", pattern)
            size = int(letters.group(1)) if letters else 0
            if letters and bounds.get("min_length", 0) <= size <= bounds.get("max_length", size):
                # every string of `size` capital letters, as an enum: a look-up in C, no regex per string
                return Literal[tuple(map("".join, product(ascii_uppercase, repeat=size)))], finish
            if not re.fullmatch(r"\^[A-Za-z0-9\[\]{},\-]*\$", pattern):
                raise ReaderError(f"{name}: the pattern {pattern!r}")
            bounds["pattern"] = pattern[:-1] + "\\Z"  # ECMA's $ is the end; Python's also before a last \n
        return (Annotated[str, msgspec.Meta(**bounds)] if bounds else str), finish

    def _integer(self, schema: Schema, name: str) -> Any:
        if set(schema) - _INTEGER_WORDS:
            raise ReaderError(f"{name}: {sorted(set(schema) - _INTEGER_WORDS)} on an integer")
        low, high = schema.get("minimum", -SAFE_INTEGER), schema.get("maximum", SAFE_INTEGER)
        if not (isinstance(low, int) and isinstance(high, int)):
            raise ReaderError(f"{name}: bounds that are not integers")
        return Annotated[int, msgspec.Meta(ge=max(low, -SAFE_INTEGER), le=min(high, SAFE_INTEGER))]

    def _array(self, schema: Schema, name: str) -> tuple[Any, Any]:
        if set(schema) - _ARRAY_WORDS or "items" not in schema:
            raise ReaderError(f"{name}: {sorted(set(schema) - _ARRAY_WORDS)} on an array")
        items, finish = self._type(schema["items"], name)
        if finish in (NUMBER, TIMESTAMPS) or (isinstance(finish, tuple) and finish[0] == "objects"):
            raise ReaderError(f"{name}: numbers or lists in list items")
        bound = schema.get("maxItems")
        listed: Any = list[items]  # type: ignore[valid-type]
        kind = Annotated[listed, msgspec.Meta(max_length=bound)] if bound is not None else listed
        if finish == TIMESTAMP:
            return kind, TIMESTAMPS
        return kind, ("objects", *finish[1:]) if isinstance(finish, tuple) else None

    def _object(self, schema: Schema, name: str) -> tuple[Any, Any]:
        """A TypedDict, and ("object", lines, gather) where lines(variable, depth) is the source
        that finishes a value of it (counts its keys, reads its numbers, gathers its timestamps,
        checks its conditions)."""
        if set(schema) - _OBJECT_WORDS or schema.get("additionalProperties") is not False:
            raise ReaderError(f"{name}: {sorted(set(schema) - _OBJECT_WORDS)} on an object, or other fields allowed")
        required = set(schema.get("required", []))
        fields: dict[str, Any] = {}
        plans: list[tuple[str, Any, Schema]] = []
        for field, sub in schema.get("properties", {}).items():
            kind, finish = self._type(sub, field)
            fields[field] = Required[kind] if field in required else NotRequired[kind]
            if finish is not None:  # every object has one: it counts its keys
                plans.append((field, finish, self._walker.resolve(sub)))
        if required - set(fields):
            raise ReaderError(f"{name}: required fields that are not properties")
        conditions = [*schema.get("allOf", [])]
        if "if" in schema or "then" in schema:
            conditions.append({"if": schema.get("if"), "then": schema.get("then")})
        tests = self._conditions(conditions, name, set(fields))
        self._count += 1
        made: Any = TypedDict(f"{name}_{self._count}", fields, total=False)  # type: ignore[misc]
        # A list of these objects counts its keys, and gathers its timestamps, in C where that is all
        direct = [(f, f in required and "oneOf" not in sub) for f, plan, sub in plans if plan == TIMESTAMP]
        gather = direct if len(direct) == len(plans) and not tests else None

        def lines(o: str, depth: int) -> list[str]:
            pad, out = "    " * depth, [f"{'    ' * depth}k += len({o})"]
            for field, plan, sub in plans:
                x = f"x{depth}"
                if plan == NUMBER:
                    out += [f"{pad}if {field!r} in {o}:",
                            f"{pad}    {x} = number({o}[{field!r}], {sub.get('minimum')!r}, {sub.get('maximum')!r})",
                            f"{pad}    if {x} is None:", f"{pad}        return -1",
                            f"{pad}    {o}[{field!r}] = {x}"]
                    continue
                out.append(f"{pad}{x} = {o}.get({field!r})")
                # (a list: an empty one holds no key and no timestamp, and is passed over at once)
                listed = plan == TIMESTAMPS or not (plan == TIMESTAMP or plan[0] == "object")
                out.append(f"{pad}if {x}:" if listed else f"{pad}if {x} is not None:")
                if plan == TIMESTAMP:
                    out.append(f"{pad}    add({x})")
                elif plan == TIMESTAMPS:
                    out.append(f"{pad}    more({x})")
                elif plan[0] == "object":
                    out += plan[1](x, depth + 1)  # written in place: no call per object
                elif plan[2] is not None:  # a list of objects with only timestamps to gather
                    out.append(f"{pad}    k += sum(map(len, {x}))")
                    for key, always in plan[2]:
                        out.append(f"{pad}    more(map(itemgetter({key!r}), {x}))" if always else
                                   f"{pad}    more(filter(is_value, map(dict.get, {x}, repeat({key!r}))))")
                else:
                    out.append(f"{pad}    for i{depth} in {x}:")
                    out += plan[1](f"i{depth}", depth + 2)
            return out + [line.replace("{o}", o).replace("{pad}", pad) for line in tests]

        return made, ("object", lines, gather)

    def _conditions(self, conditions: list[Any], name: str, fields: set[str]) -> list[str]:
        """Each `if` {required?, properties: {one field: enum or const}} `then` {required: [...]},
        as source (templates of {o} and {pad}): those whose `if` requires its field, by field, in
        one look-up of the fields the value requires."""
        needs: dict[str, dict[str, frozenset[str]]] = {}
        tests: list[str] = []
        for condition in conditions:
            test, then = condition.get("if"), condition.get("then")
            unknown = ReaderError(f"{name}: a condition the one-pass reading does not read: {condition!r}")
            if set(condition) != {"if", "then"} or not isinstance(test, dict) or not isinstance(then, dict):
                raise unknown
            properties = test.get("properties", {})
            if set(test) - {"required", "properties"} or len(properties) != 1 or set(then) != {"required"}:
                raise unknown
            (field, values), = properties.items()
            chosen = tuple(values.get("enum", [values.get("const")]))
            if set(values) - {"enum", "const"} or set(then["required"]) - fields \
                    or set(test.get("required", [])) - {field} or not all(isinstance(v, str) for v in chosen):
                raise unknown
            if field in test.get("required", []):  # `if` holds where the field has one of the values
                table = needs.setdefault(field, {})
                for value in chosen:
                    table[value] = table.get(value, frozenset()) | frozenset(then["required"])
                continue
            # `if` holds too where the field is absent, as `if` does not require it
            needed = " and ".join(f"{k!r} in {{o}}" for k in then["required"])
            tests.append(f"{{pad}}if {{o}}.get({field!r}, {chosen[0]!r}) in {chosen!r} and not ({needed}):\n"
                         f"{{pad}}    return -1")
        for field, table in needs.items():
            constant = f"_NEEDS_{len(self._constants)}"
            self._constants[constant] = table
            tests.append(f"{{pad}}n = {{o}}.get({field!r})\n"  # a value that is no string has none of them
                         f"{{pad}}n = {constant}.get(n) if type(n) is str else None\n"
                         f"{{pad}}if n is not None and not n <= {{o}}.keys():\n{{pad}}    return -1")
        return tests


def _number(raw: msgspec.Raw, low: float | None, high: float | None) -> int | float | None:
    """A `number` field's text as the strict reading reads it (an integer within +-2^53 stays an
    integer; a double is taken only where it holds the number exactly as written), within the
    schema's bounds; None for anything else (a string or null there, 1e400, 0.10000000000000001).
    The text is one JSON value (msgspec has read it)."""
    text = bytes(raw)
    if text[0] not in _NUMBER_START:
        return None
    value: int | float | None
    if text.isdigit() or (text[0] == 45 and text[1:].isdigit()):  # 45: "-"
        if len(text) > 17:  # beyond +-2^53 (and Python's int() refuses 4,300 digits and more)
            return None
        value = safe_integer(text)
    elif len(text) <= 16 and b"e" not in text and b"E" not in text:  # 15 significant digits at most,
        value = float(text)  # no exponent: the double holds it as written (exact_double says so)
    else:
        value = exact_double(text.decode())
    if value is None or (low is not None and value < low) or (high is not None and value > high):
        return None
    return value
