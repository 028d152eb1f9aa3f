"""The native runtime: CEL compiled to Python closures, with the semantics of the CEL specification.

The parse tree that cel-python builds is compiled, once, into nested closures over plain Python
values (dict, list, str, int, float, bool, None, datetime, timedelta), so that a decision reads
the request as it came, with no per-request conversion to CEL values and no tree walking.

The specification is the reference, not cel-python: numbers compare across int and double,
null and values of other types are simply unequal, lists and maps may mix types, NaN is
unequal to itself, durations and timestamps stay within their ranges, and errors are absorbed
by `&&`, `||`, `all` and `exists` as the spec says (google/cel-spec's conformance data runs in
the test suite: tests/celspec.py).

Two ways out to cel-python remain, both explicit:
- an expression using CEL outside this runtime (uint and bytes literals, message
  construction...) is not compiled at all (`Unsupported`): the loader refuses it in a policy;
- at run time, a value outside the native types (which no request carries) raises `Defer`.
Errors CEL defines (a missing key, division by zero, overflow, no such overload) raise `CelError`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta, timezone
from functools import lru_cache
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from celpy import celtypes
from lark import Token, Tree

from engine.celtime import DurationError, parse_duration

Env = dict[str, Any]
Closure = Callable[[Env], Any]

INT_MIN, INT_MAX = -(2**63), 2**63 - 1


class Unsupported(Exception):
    """The expression uses CEL outside the native runtime: a policy may not hold it (the loader says so)."""


class Defer(Exception):
    """This evaluation reached a case the native subset does not decide: ask cel-python."""


class CelError(Exception):
    """A CEL run-time error (the expression has no value); the rule fails closed."""


class CelType:
    """A CEL type as a value (what `type(x)` gives): compared by its name."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __eq__(self, other: object) -> bool:
        return type(other) is CelType and other.name == self.name

    def __hash__(self) -> int:
        return hash(self.name)

    def __repr__(self) -> str:
        return self.name


def to_native(value: Any) -> Any:
    """A cel-python value (or a native one) as a native value: bool, int, float, str, list, dict..."""
    if value is None or type(value) in (bool, int, float, str, datetime, timedelta, CelType):
        return value
    if isinstance(value, celtypes.BoolType):
        return bool(value)
    if isinstance(value, celtypes.UintType):
        return value  # no native form: stays a uint, which nothing native equals
    if isinstance(value, celtypes.IntType):
        return int(value)
    if isinstance(value, celtypes.DoubleType):
        return float(value)
    if isinstance(value, celtypes.StringType):
        return str(value)
    if isinstance(value, celtypes.TimestampType):
        return datetime(value.year, value.month, value.day, value.hour, value.minute, value.second,
                        value.microsecond, tzinfo=value.tzinfo)
    if isinstance(value, celtypes.DurationType):
        return timedelta(days=value.days, seconds=value.seconds, microseconds=value.microseconds)
    if isinstance(value, dict):
        return {to_native(k): to_native(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_native(v) for v in value]
    if isinstance(value, type):
        return CelType(_CEL_TYPE_NAMES.get(value.__name__, value.__name__))
    return value


_CEL_TYPE_NAMES = {"BoolType": "bool", "IntType": "int", "UintType": "uint", "DoubleType": "double",
                   "StringType": "string", "BytesType": "bytes", "ListType": "list", "MapType": "map",
                   "NullType": "null_type", "TimestampType": "google.protobuf.Timestamp",
                   "DurationType": "google.protobuf.Duration", "TypeType": "type"}


def to_cel(value: Any) -> Any:
    """A native value as cel-python's value, for the reference runtime."""
    if type(value) is datetime:
        return celtypes.TimestampType(value)
    if type(value) is timedelta:
        return celtypes.DurationType(value)
    if type(value) is dict:
        return celtypes.MapType({to_cel(k): to_cel(v) for k, v in value.items()})
    if type(value) is list:
        return celtypes.ListType([to_cel(v) for v in value])
    if value is None:
        return None
    if type(value) is bool:
        return celtypes.BoolType(value)
    if type(value) is int:
        return celtypes.IntType(value)
    if type(value) is float:
        return celtypes.DoubleType(value)
    if type(value) is str:
        return celtypes.StringType(value)
    return value


def compile_native(tree: Any) -> Closure:
    """A closure evaluating the parse tree over native values; Unsupported if it cannot."""
    return _compile(tree)


# --- semantics ------------------------------------------------------------------------------

_MISSING = object()
_NUMBERS = (int, float)  # bool is not a number in CEL (type(True) is bool, never int)
_NATIVE = frozenset({type(None), bool, int, float, str, list, dict, datetime, timedelta, CelType})
_ORDERED = frozenset({bool, int, float, str, datetime, timedelta})
# Durations: the spec's range, +-10,000 years; the difference of two timestamps must also fit
# in 64-bit nanoseconds, as every reference implementation computes it.
MAX_DURATION = timedelta(seconds=315_576_000_000)
MAX_NANOS_DURATION = timedelta(microseconds=(2**63 - 1) // 1000)


def _check_int(value: int) -> int:
    if value < INT_MIN or value > INT_MAX:
        raise CelError("return error for overflow")
    return value


def _check_duration(value: timedelta) -> timedelta:
    if value > MAX_DURATION or value < -MAX_DURATION:
        raise CelError("duration out of range")
    return value


def _no_overload(operation: str, *values: Any) -> CelError:
    """The error for operand types CEL has no overload for; Defer for values outside the subset."""
    if any(type(v) not in _NATIVE for v in values):
        raise Defer
    kinds = ", ".join(type_name(v) for v in values)
    return CelError(f"no such overload: {operation}({kinds})")


def type_name(value: Any) -> str:
    """The CEL type name of a native value."""
    return _TYPE_NAMES.get(type(value), type(value).__name__)


_TYPE_NAMES = {type(None): "null_type", bool: "bool", int: "int", float: "double", str: "string", list: "list",
               dict: "map", datetime: "google.protobuf.Timestamp", timedelta: "google.protobuf.Duration",
               CelType: "type", bytes: "bytes"}
TYPE_DENOTATIONS = frozenset({"bool", "int", "uint", "double", "string", "bytes", "list", "map", "null_type",
                              "type"})


def _eq(a: Any, b: Any) -> bool:
    """CEL equality: numbers compare across int and double, other types never equal each other."""
    ta, tb = type(a), type(b)
    if ta is tb:
        if ta is list:
            return len(a) == len(b) and all(_eq(x, y) for x, y in zip(a, b, strict=True))
        if ta is dict:
            return _map_eq(a, b)
        return bool(a == b)  # NaN != NaN, as IEEE and CEL say
    if ta in _NUMBERS and tb in _NUMBERS:
        return float(a) == float(b)
    if ta not in _NATIVE or tb not in _NATIVE:
        raise Defer
    return False


def _map_eq(a: dict[Any, Any], b: dict[Any, Any]) -> bool:
    if len(a) != len(b):
        return False
    for key, value in a.items():
        other = _get(b, key)
        if other is _MISSING or not _eq(value, other):
            return False
    return True


def _get(mapping: dict[Any, Any], key: Any) -> Any:
    """mapping[key] with CEL's key semantics (1 and 1.0 are one key; true and 1 are not), or _MISSING."""
    kind = type(key)
    if kind is str:
        return mapping.get(key, _MISSING)
    if kind is int or kind is float or kind is bool:
        value = mapping.get(key, _MISSING)
        if value is not _MISSING and (key == 0 or key == 1):
            # Python holds True and 1 as one key: make sure the key found is of the same kind.
            wanted = kind is bool
            if not any(k == key and (type(k) is bool) == wanted for k in mapping):
                return _MISSING
        return value
    if kind in _NATIVE:
        return _MISSING
    raise Defer


def _ne(a: Any, b: Any) -> bool:
    return not _eq(a, b)


def _ordered(a: Any, b: Any, operation: str) -> tuple[Any, Any]:
    ta, tb = type(a), type(b)
    if ta is tb and ta in _ORDERED:
        return a, b
    if ta in _NUMBERS and tb in _NUMBERS:
        return float(a), float(b)
    raise _no_overload(operation, a, b)


def _lt(a: Any, b: Any) -> bool:
    if type(a) is type(b) and type(a) in _ORDERED:
        return bool(a < b)
    x, y = _ordered(a, b, "_<_")
    return bool(x < y)


def _le(a: Any, b: Any) -> bool:
    if type(a) is type(b) and type(a) in _ORDERED:
        return bool(a <= b)
    x, y = _ordered(a, b, "_<=_")
    return bool(x <= y)


def _gt(a: Any, b: Any) -> bool:
    if type(a) is type(b) and type(a) in _ORDERED:
        return bool(a > b)
    x, y = _ordered(a, b, "_>_")
    return bool(x > y)


def _ge(a: Any, b: Any) -> bool:
    if type(a) is type(b) and type(a) in _ORDERED:
        return bool(a >= b)
    x, y = _ordered(a, b, "_>=_")
    return bool(x >= y)


def _in(item: Any, container: Any) -> bool:
    kind = type(container)
    if kind is list:
        return any(_eq(element, item) for element in container)
    if kind is dict:
        return _get(container, item) is not _MISSING
    raise _no_overload("@in", item, container)


def _add(a: Any, b: Any) -> Any:
    ta, tb = type(a), type(b)
    try:
        if ta is tb:
            if ta is int:
                return _check_int(a + b)
            if ta is float or ta is str or ta is list:
                return a + b
            if ta is timedelta:
                return _check_duration(a + b)
        elif (ta is datetime and tb is timedelta) or (ta is timedelta and tb is datetime):
            return a + b
    except OverflowError:
        raise CelError("timestamp or duration out of range") from None
    raise _no_overload("_+_", a, b)


def _sub(a: Any, b: Any) -> Any:
    ta, tb = type(a), type(b)
    try:
        if ta is tb:
            if ta is int:
                return _check_int(a - b)
            if ta is float:
                return a - b
            if ta is timedelta:
                return _check_duration(a - b)
            if ta is datetime:
                difference = a - b
                if difference > MAX_NANOS_DURATION or difference < -MAX_NANOS_DURATION:
                    raise CelError("duration out of range")
                return difference
        elif ta is datetime and tb is timedelta:
            return a - b
    except OverflowError:
        raise CelError("timestamp or duration out of range") from None
    raise _no_overload("_-_", a, b)


def _mul(a: Any, b: Any) -> Any:
    ta = type(a)
    if ta is type(b):
        if ta is int:
            return _check_int(a * b)
        if ta is float:
            return a * b
    raise _no_overload("_*_", a, b)


def _div(a: Any, b: Any) -> Any:
    ta = type(a)
    if ta is type(b):
        if ta is int:
            if b == 0:
                raise CelError("modulus or divide by zero")
            quotient = abs(a) // abs(b)
            return _check_int(quotient if (a < 0) == (b < 0) else -quotient)
        if ta is float:
            if b != 0.0:
                return a / b
            if a != a or a == 0.0:
                return math.nan
            return math.copysign(math.inf, a) * math.copysign(1.0, b)  # IEEE 754, as CEL says
    raise _no_overload("_/_", a, b)


def _mod(a: Any, b: Any) -> Any:
    if type(a) is int and type(b) is int:
        if b == 0:
            raise CelError("modulus or divide by zero")
        quotient = abs(a) // abs(b)
        quotient = quotient if (a < 0) == (b < 0) else -quotient
        return a - b * quotient  # the sign of the dividend, as in C and CEL
    raise _no_overload("_%_", a, b)


def _negate(a: Any) -> Any:
    if type(a) is int:
        return _check_int(-a)
    if type(a) is float:
        return -a
    raise _no_overload("-_", a)


def _duration(text: str) -> timedelta:
    """CEL's duration(text): engine/celtime.py is the one parser (units h, m, s, ms, us, ns; no `d`)."""
    try:
        return parse_duration(text)
    except DurationError as error:
        raise CelError(str(error)) from None


_RFC3339 = re.compile(r"(\d{4})-(\d{2})-(\d{2})[Tt](\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,9}))?([Zz]|[+-]\d{2}:\d{2})")


@lru_cache(maxsize=1024)
def _timestamp(text: str) -> datetime:
    """An RFC 3339 timestamp, years 0001 to 9999 in UTC; fractions beyond microseconds are cut."""
    match = _RFC3339.fullmatch(text)
    if match is None:
        raise CelError(f"invalid timestamp {text!r}")
    year, month, day, hour, minute, second = (int(match.group(i)) for i in range(1, 7))
    fraction = (match.group(7) or "").ljust(6, "0")[:6]
    zone = match.group(8).upper()
    try:
        offset = timedelta(0) if zone == "Z" else (1 if zone[0] == "+" else -1) * timedelta(
            hours=int(zone[1:3]), minutes=int(zone[4:6]))
        local = datetime(year, month, day, hour, minute, second, int(fraction), tzinfo=UTC)
        return local - offset
    except (ValueError, OverflowError):
        raise CelError(f"timestamp out of range: {text!r}") from None


def _from_seconds(seconds: int) -> datetime:
    try:
        return _EPOCH + timedelta(seconds=seconds)
    except OverflowError:
        raise CelError("timestamp out of range") from None


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@lru_cache(maxsize=256)
def _regex(pattern: str) -> re.Pattern[str]:
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise CelError(f"invalid regular expression {pattern!r}") from exc


def _size(value: Any) -> int:
    if type(value) in (str, list, dict):
        return len(value)
    raise _no_overload("size", value)


def _to_int(value: Any) -> int:
    kind = type(value)
    if kind is int:
        return int(value)
    if kind is float:
        if value != value or not -9.223372036854775808e18 < value < 9.223372036854775808e18:
            raise CelError("int() out of range")
        return int(value)
    if kind is str:
        if not re.fullmatch(r"[+-]?\d+", value):
            raise CelError(f"cannot convert {value!r} to int")
        return _check_int(int(value))
    if kind is datetime:
        return int((value - _EPOCH) // timedelta(seconds=1))
    raise _no_overload("int", value)


def _to_double(value: Any) -> float:
    kind = type(value)
    if kind is float or kind is int:
        return float(value)
    if kind is str:
        try:
            return float(value)
        except ValueError:
            raise CelError(f"cannot convert {value!r} to double") from None
    raise _no_overload("double", value)


def _to_string(value: Any) -> str:
    kind = type(value)
    if kind is str:
        return str(value)
    if kind is bool:
        return "true" if value else "false"
    if kind is int:
        return str(value)
    if kind is float:
        return _format_double(value)
    if kind is datetime:
        return format_timestamp(value)
    if kind is timedelta:
        return format_duration(value)
    raise _no_overload("string", value)


def _format_double(value: float) -> str:
    if value != value:
        return "NaN"
    if value in (math.inf, -math.inf):
        return "+Inf" if value > 0 else "-Inf"
    text = repr(value)
    return text[:-2] if text.endswith(".0") else text


def format_timestamp(value: datetime) -> str:
    """RFC 3339 in UTC with a Z; fractional seconds only where there are some."""
    v = value.astimezone(UTC)
    text = f"{v.year:04d}-{v.month:02d}-{v.day:02d}T{v.hour:02d}:{v.minute:02d}:{v.second:02d}"
    if v.microsecond:
        text += f".{v.microsecond:06d}".rstrip("0")
    return text + "Z"


def format_duration(value: timedelta) -> str:
    """A duration as seconds with an 's', fractions only where there are some ('1.5s')."""
    micros = value // timedelta(microseconds=1)
    sign = "-" if micros < 0 else ""
    whole, fraction = divmod(abs(micros), 1_000_000)
    return f"{sign}{whole}.{fraction:06d}".rstrip("0") + "s" if fraction else f"{sign}{whole}s"


_BOOL_TEXT = {"1": True, "t": True, "T": True, "TRUE": True, "true": True, "True": True,
              "0": False, "f": False, "F": False, "FALSE": False, "false": False, "False": False}


def _to_bool(value: Any) -> bool:
    if type(value) is bool:
        return value
    if type(value) is str and value in _BOOL_TEXT:
        return _BOOL_TEXT[value]
    if type(value) is str:
        raise CelError(f"cannot convert {value!r} to bool")
    raise _no_overload("bool", value)


def _to_timestamp(value: Any) -> datetime:
    if type(value) is datetime:
        return value
    if type(value) is str:
        return _timestamp(value)
    if type(value) is int:
        return _from_seconds(value)
    raise _no_overload("timestamp", value)


def _to_duration(value: Any) -> timedelta:
    if type(value) is timedelta:
        return value
    if type(value) is str:
        return _duration(value)
    raise _no_overload("duration", value)


def _type_of(value: Any) -> CelType:
    if type(value) not in _NATIVE:
        raise Defer
    return CelType(type_name(value))


_CONVERSIONS: dict[str, Callable[[Any], Any]] = {
    "int": _to_int, "double": _to_double, "string": _to_string, "bool": _to_bool,
    "timestamp": _to_timestamp, "duration": _to_duration, "type": _type_of, "dyn": lambda value: value,
    "size": _size,
}


@lru_cache(maxsize=64)
def _zone(name: str) -> Any:
    match = re.fullmatch(r"([+-])?(\d{2}):(\d{2})", name)
    if match:
        offset = timedelta(hours=int(match.group(2)), minutes=int(match.group(3)))
        return timezone(-offset if match.group(1) == "-" else offset)
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise CelError(f"unknown time zone {name!r}") from None


def _in_zone(value: datetime, zone: Any) -> datetime:
    if zone is None:
        return value.astimezone(UTC)
    if type(zone) is not str:
        raise _no_overload("time zone", zone)
    return value.astimezone(_zone(zone))


_TIMESTAMP_PARTS: dict[str, Callable[[datetime], int]] = {
    "getFullYear": lambda t: t.year, "getMonth": lambda t: t.month - 1, "getDate": lambda t: t.day,
    "getDayOfMonth": lambda t: t.day - 1, "getDayOfWeek": lambda t: (t.weekday() + 1) % 7,
    "getDayOfYear": lambda t: t.timetuple().tm_yday - 1, "getHours": lambda t: t.hour,
    "getMinutes": lambda t: t.minute, "getSeconds": lambda t: t.second,
    "getMilliseconds": lambda t: t.microsecond // 1000,
}
_DURATION_PARTS: dict[str, Callable[[timedelta], int]] = {
    "getHours": lambda d: int(d / timedelta(hours=1)), "getMinutes": lambda d: int(d / timedelta(minutes=1)),
    "getSeconds": lambda d: int(d / timedelta(seconds=1)),
    "getMilliseconds": lambda d: int(math.fmod(d // timedelta(microseconds=1), 1_000_000) / 1000),
}


def _part(name: str, value: Any, zone: Any = None) -> int:
    if type(value) is datetime:
        return _TIMESTAMP_PARTS[name](_in_zone(value, zone))
    if type(value) is timedelta and zone is None and name in _DURATION_PARTS:
        return _DURATION_PARTS[name](value)
    raise _no_overload(name, value)


# --- compilation ----------------------------------------------------------------------------


def _children(tree: Any) -> list[Any]:
    return list(tree.children) if isinstance(tree, Tree) else []


def _args(exprlist: Any) -> list[Any]:
    return _children(exprlist) if exprlist is not None else []


def _compile(tree: Any) -> Closure:
    if isinstance(tree, Token):
        return _literal(tree)
    if not isinstance(tree, Tree):
        raise Unsupported(f"unexpected node {tree!r}")
    kids = _children(tree)
    kind = tree.data
    if len(kids) == 1 and kind not in ("ident", "literal", "list_lit", "map_lit", "paren_expr", "ident_arg",
                                       "dot_ident"):
        return _compile(kids[0])
    handler = _HANDLERS.get(str(kind))
    if handler is None:
        raise Unsupported(f"CEL construct {kind!r}")
    return handler(kids)


def _literal(token: Token) -> Closure:
    value = literal_value(token)
    return lambda env: value


def literal_value(token: Token) -> Any:
    """The value of a literal token; Unsupported for uint and bytes, which no request carries."""
    text, kind = str(token.value), token.type
    if kind == "INT_LIT":
        negative = text.startswith("-")
        digits = text.lstrip("-")
        value = int(digits, 16) if digits.lower().startswith("0x") else int(digits)
        return _check_int(-value if negative else value)
    if kind == "FLOAT_LIT":
        return float(text)
    if kind == "BOOL_LIT":
        return text == "true"
    if kind == "NULL_LIT":
        return None
    if kind in ("STRING_LIT", "MLSTRING_LIT"):
        return decode_string(text)
    raise Unsupported(f"literal {text!r} ({kind})")


_SIMPLE_ESCAPES = {"a": "\a", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v", "\\": "\\",
                   "?": "?", '"': '"', "'": "'", "`": "`"}
_ESCAPE = re.compile(r"\\(?:([abfnrtv\\?\"'`])|[xX]([0-9a-fA-F]{2})|u([0-9a-fA-F]{4})|U([0-9a-fA-F]{8})"
                     r"|([0-3][0-7]{2})|(.))", re.S)


def decode_string(text: str) -> str:
    """A CEL string literal's value: quotes, raw prefix, triple quotes and every escape of the spec."""
    raw = text[0] in "rR"
    body = text[1:] if raw else text
    quote = 3 if body[:3] in ('"""', "'''") else 1
    body = body[quote:-quote]
    if raw or "\\" not in body:
        return body

    def escape(match: re.Match[str]) -> str:
        simple, hex2, hex4, hex8, octal, bad = match.groups()
        if simple is not None:
            return _SIMPLE_ESCAPES[simple]
        if bad is not None:
            raise Unsupported(f"invalid escape \\{bad} in a string literal")
        code = int(hex2 or hex4 or hex8, 16) if octal is None else int(octal, 8)
        if 0xD800 <= code <= 0xDFFF or code > 0x10FFFF:
            raise Unsupported(f"invalid code point {code:#x} in a string literal")
        return chr(code)

    return _ESCAPE.sub(escape, body)


def _h_literal(kids: list[Any]) -> Closure:
    return _literal(kids[0])


def _h_ident(kids: list[Any]) -> Closure:
    name = str(kids[0].value)
    denotation = CelType(name) if name in TYPE_DENOTATIONS else None

    def ident(env: Env) -> Any:
        try:
            return env[name]
        except KeyError:
            if denotation is not None:
                return denotation
            raise CelError(f"undeclared reference to {name!r}") from None

    return ident


def _h_paren(kids: list[Any]) -> Closure:
    return _compile(kids[0])


def _h_expr(kids: list[Any]) -> Closure:
    condition, when_true, when_false = (_compile(k) for k in kids)

    def ternary(env: Env) -> Any:
        chosen = condition(env)
        if chosen is True:
            return when_true(env)
        if chosen is False:
            return when_false(env)
        raise _no_overload("_?_:_", chosen)

    return ternary


def _operand(closure: Closure, env: Env) -> bool | CelError:
    """An operand of && or ||: its boolean, or its error (which the other operand may absorb)."""
    try:
        value = closure(env)
    except CelError as exc:
        return exc
    if type(value) is not bool:
        return _no_overload("logical operator", value)
    return value


def _logical(decisive: bool) -> Callable[[list[Any]], Closure]:
    def build(kids: list[Any]) -> Closure:
        left, right = _compile(kids[0]), _compile(kids[1])

        def logic(env: Env) -> bool:
            a = _operand(left, env)
            if a is decisive:
                return decisive
            b = _operand(right, env)
            if b is decisive:
                return decisive
            if isinstance(a, CelError):
                raise a
            if isinstance(b, CelError):
                raise b
            return not decisive

        return logic

    return build


_RELATIONS: dict[str, Callable[[Any, Any], Any]] = {
    "relation_eq": _eq, "relation_ne": _ne, "relation_lt": _lt, "relation_le": _le,
    "relation_gt": _gt, "relation_ge": _ge, "relation_in": _in,
    "addition_add": _add, "addition_sub": _sub,
    "multiplication_mul": _mul, "multiplication_div": _div, "multiplication_mod": _mod,
}


def _binary(kids: list[Any]) -> Closure:
    operator_node, right_node = kids
    operate = _RELATIONS.get(str(operator_node.data))
    if operate is None:
        raise Unsupported(f"operator {operator_node.data!r}")
    left, right = _compile(operator_node.children[0]), _compile(right_node)
    constant = _constant(right_node)
    if operate in (_eq, _ne) and constant is not _NOT_CONSTANT and type(constant) in (str, int, bool):
        # The commonest shape, `field == "literal"`: same-type comparisons answered inline.
        kind, equal = type(constant), operate is _eq

        def compare_constant(env: Env) -> bool:
            value = left(env)
            if type(value) is kind:
                return (value == constant) is equal
            return bool(operate(value, constant))

        return compare_constant
    return lambda env: operate(left(env), right(env))


_NOT_CONSTANT = object()


def _constant(tree: Any) -> Any:
    """The value of a literal operand, or _NOT_CONSTANT."""
    node = _unwrap(tree)
    if isinstance(node, Tree) and node.data == "literal":
        node = node.children[0]
    if isinstance(node, Token) and node.type in ("STRING_LIT", "INT_LIT", "BOOL_LIT"):
        try:
            return literal_value(node)
        except Unsupported:
            return _NOT_CONSTANT
    return _NOT_CONSTANT


def _h_unary(kids: list[Any]) -> Closure:
    operator_node, operand_node = kids
    operand = _compile(operand_node)
    if operator_node.data == "unary_not":

        def negation(env: Env) -> bool:
            value = operand(env)
            if type(value) is bool:
                return not value
            raise _no_overload("!_", value)

        return negation
    return lambda env: _negate(operand(env))


def _select(base: Closure, name: str) -> Closure:
    return lambda env: _step(base(env), name)


def _h_member_dot(kids: list[Any]) -> Closure:
    names = _field_chain(kids)
    if names is not None and len(names) in (2, 3):
        return _chain(names)
    return _select(_compile(kids[0]), str(kids[1].value))


def _field_chain(kids: list[Any]) -> list[str] | None:
    """`a.b` or `a.b.c` straight off a variable, as names; None for anything else."""
    names = [str(kids[1].value)]
    node = _unwrap(kids[0])
    while isinstance(node, Tree) and node.data == "member_dot":
        names.append(_text(node.children[1]))
        node = _unwrap(node.children[0])
    if isinstance(node, Tree) and node.data == "ident":
        return [_text(node.children[0]), *reversed(names)]
    return None


def _step(value: Any, name: str) -> Any:
    if type(value) is dict:
        try:
            return value[name]
        except KeyError:
            raise CelError(f"no such key: {name!r}") from None
    if value is None:
        raise CelError(f"null does not support field selection ({name!r})")
    raise _no_overload(f".{name}", value)


def _chain(names: list[str]) -> Closure:
    """A field chain read in one closure (the same checks as _select, step by step)."""
    root, rest = names[0], names[1:]

    def read(env: Env) -> Any:
        try:
            value = env[root]
        except KeyError:
            raise CelError(f"undeclared reference to {root!r}") from None
        for name in rest:
            value = value[name] if type(value) is dict and name in value else _step(value, name)
        return value

    return read


def _index(value: Any, key: Any) -> Any:
    kind = type(value)
    if kind is list:
        position = key
        if type(key) is float and math.isfinite(key) and key == int(key):  # [7, 8][dyn(0.0)] is 7
            position = int(key)
        if type(position) is not int:
            raise _no_overload("_[_]", value, key)
        if 0 <= position < len(value):
            return value[position]
        raise CelError(f"index out of range: {position}")
    if kind is dict:
        found = _get(value, key)
        if found is _MISSING:
            raise CelError(f"no such key: {key!r}")
        return found
    raise _no_overload("_[_]", value, key)


def _h_member_index(kids: list[Any]) -> Closure:
    base, index = _compile(kids[0]), _compile(kids[1])
    return lambda env: _index(base(env), index(env))


def _h_list(kids: list[Any]) -> Closure:
    items = [_compile(k) for k in _args(kids[0] if kids else None)]
    return lambda env: [item(env) for item in items]


def _h_map(kids: list[Any]) -> Closure:
    parts = [_compile(k) for k in _args(kids[0] if kids else None)]
    pairs = list(zip(parts[0::2], parts[1::2], strict=True))

    def mapping(env: Env) -> dict[Any, Any]:
        out: dict[Any, Any] = {}
        for key_fn, value_fn in pairs:
            key = key_fn(env)
            if type(key) not in (str, int, bool):
                raise _no_overload("map key", key)
            if key in out:
                if _get(out, key) is not _MISSING:
                    raise CelError(f"repeated key in a map literal: {key!r}")
                # Python would merge true and 1 into one key: bindpolicy cannot hold both.
                raise CelError("a map with both a boolean and an integer key 0 or 1 cannot be held")
            out[key] = value_fn(env)
        return out

    return mapping


def _h_ident_arg(kids: list[Any]) -> Closure:
    name = str(kids[0].value)
    args = _args(kids[1] if len(kids) > 1 else None)
    if name == "has" and len(args) == 1:
        target = _unwrap(args[0])
        if not (isinstance(target, Tree) and target.data == "member_dot"):
            raise Unsupported("has() of something other than a field selection")
        base, field = _compile(target.children[0]), _text(target.children[1])

        def has(env: Env) -> bool:
            value = base(env)
            if type(value) is dict:
                return field in value
            if value is None:
                return False  # a JSON null in place of an object: nothing is present in it
            raise _no_overload("has", value)

        return has
    compiled = [_compile(a) for a in args]
    if name in _CONVERSIONS and len(compiled) == 1:
        convert, only = _CONVERSIONS[name], compiled[0]
        return lambda env: convert(only(env))
    if name == "matches" and len(compiled) == 2:
        text_fn, pattern_fn = compiled
        return lambda env: _matches(text_fn(env), pattern_fn(env))
    return _unknown_function(name)


def _matches(text: Any, pattern: Any) -> bool:
    if type(text) is str and type(pattern) is str:
        return _regex(pattern).search(text) is not None
    raise _no_overload("matches", text, pattern)


def _text(node: Any) -> str:
    return str(node.value) if isinstance(node, Token) else str(node)


_TRANSPARENT = frozenset({"expr", "conditionalor", "conditionaland", "relation", "addition", "multiplication",
                          "unary", "member", "primary", "paren_expr"})


def _unwrap(tree: Any) -> Any:
    """The node under the grammar's one-child precedence levels (never into a list or call)."""
    while isinstance(tree, Tree) and len(tree.children) == 1 and tree.data in _TRANSPARENT:
        tree = tree.children[0]
    return tree


_STRING_METHODS: dict[str, Callable[[str, str], bool]] = {
    "startsWith": str.startswith, "endsWith": str.endswith, "contains": str.__contains__,
    "matches": lambda text, pattern: _regex(pattern).search(text) is not None,
}


def _h_member_dot_arg(kids: list[Any]) -> Closure:
    target = _compile(kids[0])
    name = str(kids[1].value)
    args = _args(kids[2] if len(kids) > 2 else None)
    if name in _MACRO_ARITY and len(args) in _MACRO_ARITY[name]:
        variables = [_unwrap(a) for a in args[:_MACRO_ARITY[name][len(args)]]]
        if not all(isinstance(v, Tree) and v.data == "ident" for v in variables):
            raise Unsupported(f"{name}() without loop variables")
        names = [_text(v.children[0]) for v in variables]
        bodies = [_compile(a) for a in args[len(names):]]
        return _macro(name, target, names, bodies)
    if name == "size" and not args:
        return lambda env: _size(target(env))
    if name in _STRING_METHODS and len(args) == 1:
        method, argument = _STRING_METHODS[name], _compile(args[0])

        def call(env: Env) -> bool:
            text, other = target(env), argument(env)
            if type(text) is str and type(other) is str:
                return method(text, other)
            raise _no_overload(name, text, other)

        return call
    if name in _TIMESTAMP_PARTS and len(args) <= 1:
        zone = _compile(args[0]) if args else None
        if zone is None:
            return lambda env: _part(name, target(env))
        return lambda env: _part(name, target(env), zone(env))
    target_args = [_compile(a) for a in args]  # evaluated first: their errors come first, as in CEL
    unknown = _unknown_function(f".{name}")

    def call_unknown(env: Env) -> Any:
        target(env)
        for argument in target_args:
            argument(env)
        return unknown(env)

    return call_unknown


# Functions cel-python offers and the native runtime does not: left to cel-python (Unsupported).
_REFERENCE_ONLY = frozenset({"uint", "bytes"})


def _unknown_function(name: str) -> Closure:
    """A function CEL does not define: an error when evaluated (as the spec says), never a guess."""
    if name.lstrip(".") in _REFERENCE_ONLY:
        raise Unsupported(f"function {name}()")

    def unknown(env: Env) -> Any:
        raise CelError(f"unknown function {name}()")

    return unknown


# Per macro, per number of arguments: how many of them name loop variables.
_MACRO_ARITY: dict[str, dict[int, int]] = {
    "all": {2: 1, 3: 2}, "exists": {2: 1, 3: 2}, "exists_one": {2: 1, 3: 2}, "existsOne": {2: 1, 3: 2},
    "filter": {2: 1}, "map": {2: 1, 3: 1}, "transformList": {3: 2, 4: 2}, "transformMap": {3: 2, 4: 2},
}


def _pairs(collection: Any, two: bool) -> list[tuple[Any, ...]]:
    """What a macro iterates: list items (with their index), or map keys (with their value)."""
    if type(collection) is list:
        return list(enumerate(collection)) if two else [(item,) for item in collection]
    if type(collection) is dict:
        return list(collection.items()) if two else [(key,) for key in collection]
    raise _no_overload("comprehension", collection)


def _items(collection: Any) -> Any:
    """What a one-variable macro iterates: a list's items, or a map's keys."""
    if type(collection) is list or type(collection) is dict:
        return collection
    raise _no_overload("comprehension", collection)


def _macro(name: str, target: Closure, names: list[str], bodies: list[Closure]) -> Closure:
    if len(names) == 1 and name in ("exists", "all"):
        return _quantifier(name == "exists", target, names[0], bodies[0])
    two = len(names) == 2

    def each(env: Env) -> Iterator[tuple[Env, tuple[Any, ...]]]:
        inner = dict(env)
        for values in _pairs(target(env), two):
            for variable, value in zip(names, values, strict=True):
                inner[variable] = value
            yield inner, values

    def test(body: Closure, inner: Env) -> bool:
        result = body(inner)
        if type(result) is not bool:
            raise _no_overload(name, result)
        return result

    if name in ("exists", "all"):
        decisive = name == "exists"
        (body,) = bodies

        def quantifier(env: Env) -> bool:
            error = None
            for inner, _ in each(env):
                try:
                    if test(body, inner) is decisive:
                        return decisive
                except CelError as exc:
                    error = exc
            if error is not None:
                raise error
            return not decisive

        return quantifier

    if name in ("exists_one", "existsOne"):
        (body,) = bodies
        return lambda env: sum(test(body, inner) for inner, _ in each(env)) == 1

    if name == "filter":
        (body,) = bodies
        variable = names[0]

        def keep_matching(env: Env) -> list[Any]:
            inner, kept = dict(env), []
            for item in _items(target(env)):
                inner[variable] = item
                if test(body, inner):
                    kept.append(item)
            return kept

        return keep_matching

    keep = bodies[0] if len(bodies) == 2 else None
    transform = bodies[-1]
    if name in ("map", "transformList"):
        return lambda env: [transform(inner) for inner, _ in each(env) if keep is None or test(keep, inner)]

    def transform_map(env: Env) -> dict[Any, Any]:
        return {values[0]: transform(inner) for inner, values in each(env) if keep is None or test(keep, inner)}

    return transform_map


def _quantifier(decisive: bool, target: Closure, variable: str, body: Closure) -> Closure:
    """all() and exists() over one variable: errors absorbed by a decisive item, as CEL says."""

    answer: bool = decisive

    def quantifier(env: Env) -> bool:
        inner, error = dict(env), None
        for item in _items(target(env)):
            inner[variable] = item
            try:
                result = body(inner)
            except CelError as exc:
                error = exc
                continue
            if result is decisive:
                return answer
            if type(result) is not bool:
                error = _no_overload("exists" if decisive else "all", result)
        if error is not None:
            raise error
        return not decisive

    return quantifier


_HANDLERS: dict[str, Callable[[list[Any]], Closure]] = {
    "expr": _h_expr,
    "conditionalor": _logical(True),
    "conditionaland": _logical(False),
    "relation": _binary, "addition": _binary, "multiplication": _binary,
    "unary": _h_unary,
    "member_dot": _h_member_dot,
    "member_dot_arg": _h_member_dot_arg,
    "member_index": _h_member_index,
    "literal": _h_literal,
    "ident": _h_ident,
    "ident_arg": _h_ident_arg,
    "paren_expr": _h_paren,
    "list_lit": _h_list,
    "map_lit": _h_map,
}
