"""CEL to native Python closures, for the subset of CEL that policies use; cel-python stays the reference.

The parse tree that cel-python builds is compiled, once, into nested closures over plain Python
values (dict, list, str, int, float, bool, None, datetime, timedelta), so that a decision reads
the request as it came, with no per-request conversion to CEL values and no tree walking.

Two ways out keep this exactly as cel-python decides:
- an expression using anything outside the subset is not compiled at all (`Unsupported`):
  it is always evaluated by cel-python;
- at run time, any operation whose result cel-python might give differently (mixed types,
  non-boolean conditions, division of doubles by zero...) raises `Defer`, and the whole
  expression is evaluated again by cel-python. Only well-defined cases are answered here.
Errors CEL defines (a missing field, division by zero, overflow) raise `CelError`, with the
same absorption by `&&`, `||`, `exists` and `all` as cel-python applies.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import datetime, timedelta
from functools import lru_cache
from typing import Any

from celpy import celtypes
from lark import Token, Tree

Env = dict[str, Any]
Closure = Callable[[Env], Any]

INT_MIN, INT_MAX = -(2**63), 2**63 - 1
MACROS = ("all", "exists", "exists_one", "filter", "map")


class Unsupported(Exception):
    """The expression uses CEL outside the native subset: cel-python evaluates it."""


class Defer(Exception):
    """This evaluation reached a case the native subset does not decide: ask cel-python."""


class CelError(Exception):
    """A CEL run-time error (the expression has no value); the rule fails closed."""


def compile_native(tree: Any) -> Closure:
    """A closure evaluating the parse tree over native values; Unsupported if it cannot."""
    return _compile(tree)


# --- semantics ------------------------------------------------------------------------------


def _check_int(value: int) -> int:
    if value < INT_MIN or value > INT_MAX:
        raise CelError("return error for overflow")
    return value


def _eq(a: Any, b: Any) -> bool:
    ta, tb = type(a), type(b)
    if ta is tb:
        if ta is list:
            return len(a) == len(b) and all(_eq(x, y) for x, y in zip(a, b, strict=True))
        if ta is dict:
            return a.keys() == b.keys() and all(_eq(a[k], b[k]) for k in a)
        if ta is float or ta is int or ta is str or ta is bool or ta is datetime or ta is timedelta or a is None:
            return bool(a == b)
        raise Defer
    if a is None or b is None:
        # cel-python: null == (string, map, list, timestamp, duration, bool) is false; others raise.
        other = b if a is None else a
        if type(other) in (str, dict, list, datetime, timedelta, bool):
            return False
    raise Defer


def _ne(a: Any, b: Any) -> bool:
    if (a is None) != (b is None):
        # cel-python: null != (string, timestamp, duration, bool) is true; map and list raise.
        other = b if a is None else a
        if type(other) in (str, datetime, timedelta, bool):
            return True
        raise Defer
    return not _eq(a, b)


_ORDERED = (int, float, str, datetime, timedelta)


def _ordered(a: Any, b: Any) -> None:
    if type(a) is not type(b) or type(a) not in _ORDERED:
        raise Defer


def _lt(a: Any, b: Any) -> bool:
    _ordered(a, b)
    return bool(a < b)


def _le(a: Any, b: Any) -> bool:
    _ordered(a, b)
    return bool(a <= b)


def _gt(a: Any, b: Any) -> bool:
    _ordered(a, b)
    return bool(a > b)


def _ge(a: Any, b: Any) -> bool:
    _ordered(a, b)
    return bool(a >= b)


def _in(item: Any, container: Any) -> bool:
    if type(container) is list:
        return any(_eq(element, item) for element in container)
    if type(container) is dict and type(item) in (str, int, bool):
        return item in container
    raise Defer


def _add(a: Any, b: Any) -> Any:
    ta, tb = type(a), type(b)
    if ta is tb:
        if ta is int:
            return _check_int(a + b)
        if ta in (float, str, list, timedelta):
            return a + b
    if (ta is datetime and tb is timedelta) or (ta is timedelta and tb is datetime):
        try:
            return a + b
        except OverflowError as exc:
            raise CelError("timestamp out of range") from exc
    raise Defer


def _sub(a: Any, b: Any) -> Any:
    ta, tb = type(a), type(b)
    if ta is tb:
        if ta is int:
            return _check_int(a - b)
        if ta in (float, timedelta, datetime):
            return a - b
    if ta is datetime and tb is timedelta:
        try:
            return a - b
        except OverflowError as exc:
            raise CelError("timestamp out of range") from exc
    raise Defer


def _mul(a: Any, b: Any) -> Any:
    ta = type(a)
    if ta is type(b):
        if ta is int:
            return _check_int(a * b)
        if ta is float:
            return a * b
    raise Defer


def _div(a: Any, b: Any) -> Any:
    ta = type(a)
    if ta is type(b):
        if ta is int:
            if b == 0:
                raise CelError("modulus or divide by zero")
            quotient = abs(a) // abs(b)
            return _check_int(quotient if (a < 0) == (b < 0) else -quotient)
        if ta is float and b != 0.0:
            return a / b
    raise Defer


def _mod(a: Any, b: Any) -> Any:
    if type(a) is int and type(b) is int:
        if b == 0:
            raise CelError("modulus or divide by zero")
        quotient = abs(a) // abs(b)
        quotient = quotient if (a < 0) == (b < 0) else -quotient
        return a - b * quotient  # the sign of the dividend, as in C and CEL
    raise Defer


def _negate(a: Any) -> Any:
    if type(a) is int:
        return _check_int(-a)
    if type(a) in (float, timedelta):
        return -a
    raise Defer


@lru_cache(maxsize=1024)
def _duration(text: str) -> timedelta:
    try:
        value = celtypes.DurationType(text)
    except Exception as exc:
        raise CelError(f"invalid duration {text!r}") from exc
    return timedelta(days=value.days, seconds=value.seconds, microseconds=value.microseconds)


@lru_cache(maxsize=1024)
def _timestamp(text: str) -> datetime:
    try:
        value = celtypes.TimestampType(text)
    except Exception as exc:
        raise CelError(f"invalid timestamp {text!r}") from exc
    return datetime(value.year, value.month, value.day, value.hour, value.minute, value.second,
                    value.microsecond, tzinfo=value.tzinfo)


@lru_cache(maxsize=256)
def _regex(pattern: str) -> re.Pattern[str]:
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise CelError(f"invalid regular expression {pattern!r}") from exc


def _size(value: Any) -> int:
    if type(value) in (str, list, dict):
        return len(value)
    raise Defer


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
    text, kind = str(token.value), token.type
    value: Any
    if kind == "INT_LIT":
        negative = text.startswith("-")
        digits = text.lstrip("-")
        value = int(digits, 16) if digits.lower().startswith("0x") else int(digits)
        value = _check_int(-value if negative else value)
    elif kind == "FLOAT_LIT":
        value = float(text)
    elif kind == "BOOL_LIT":
        value = text == "true"
    elif kind == "NULL_LIT":
        value = None
    elif kind == "STRING_LIT" and text[0] in "\"'" and "\\" not in text and not text.startswith(("'''", '"""')):
        value = text[1:-1]
    else:
        raise Unsupported(f"literal {text!r}")
    return lambda env: value


def _h_literal(kids: list[Any]) -> Closure:
    return _literal(kids[0])


def _h_ident(kids: list[Any]) -> Closure:
    name = str(kids[0].value)

    def ident(env: Env) -> Any:
        try:
            return env[name]
        except KeyError:
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
        raise Defer

    return ternary


def _operand(closure: Closure, env: Env) -> bool | CelError:
    """An operand of && or ||: its boolean, or its error (which the other operand may absorb)."""
    try:
        value = closure(env)
    except CelError as exc:
        return exc
    if type(value) is not bool:
        raise Defer
    return value


def _logical(decisive: bool) -> Callable[[list[Any]], Closure]:
    def build(kids: list[Any]) -> Closure:
        left, right = _compile(kids[0]), _compile(kids[1])

        def logic(env: Env) -> bool:
            a = _operand(left, env)
            if a is decisive:
                return decisive is True
            b = _operand(right, env)
            if b is decisive:
                return decisive is True
            if isinstance(a, CelError):
                raise a
            if isinstance(b, CelError):
                raise b
            if a is (not decisive) and b is (not decisive):
                return not decisive
            raise Defer

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
            return _literal(node)({})
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
            raise Defer

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
            raise CelError(f"no such member in mapping: {name!r}") from None
    if value is None:
        raise CelError(f"null does not support field selection ({name!r})")
    raise Defer


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


def _h_member_index(kids: list[Any]) -> Closure:
    base, index = _compile(kids[0]), _compile(kids[1])

    def subscript(env: Env) -> Any:
        value, key = base(env), index(env)
        if type(value) is list and type(key) is int:
            if 0 <= key < len(value):
                return value[key]
            raise CelError("invalid_argument")
        if type(value) is dict and type(key) in (str, int, bool):
            try:
                return value[key]
            except KeyError:
                raise CelError(f"no such key: {key!r}") from None
        raise Defer

    return subscript


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
            if type(key) not in (str, int, bool) or key in out:
                raise Defer
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
                return False
            raise Defer

        return has
    compiled = [_compile(a) for a in args]
    if name == "size" and len(compiled) == 1:
        only = compiled[0]
        return lambda env: _size(only(env))
    if name in ("duration", "timestamp") and len(compiled) == 1:
        parse = _duration if name == "duration" else _timestamp
        text_fn = compiled[0]

        def convert(env: Env) -> Any:
            text = text_fn(env)
            if type(text) is not str:
                raise Defer
            return parse(text)

        return convert
    raise Unsupported(f"function {name}()")


def _text(node: Any) -> str:
    return str(node.value) if isinstance(node, Token) else str(node)


def _unwrap(tree: Any) -> Any:
    while isinstance(tree, Tree) and len(tree.children) == 1 and tree.data not in ("ident", "literal"):
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
    if name in MACROS and len(args) == 2:
        variable = _unwrap(args[0])
        if not (isinstance(variable, Tree) and variable.data == "ident"):
            raise Unsupported(f"{name}() without a loop variable")
        return _macro(name, target, _text(variable.children[0]), _compile(args[1]))
    if name == "size" and not args:
        return lambda env: _size(target(env))
    if name in _STRING_METHODS and len(args) == 1:
        method, argument = _STRING_METHODS[name], _compile(args[0])

        def call(env: Env) -> bool:
            text, other = target(env), argument(env)
            if type(text) is str and type(other) is str:
                return method(text, other)
            raise Defer

        return call
    raise Unsupported(f"method .{name}()")


def _macro(name: str, target: Closure, variable: str, body: Closure) -> Closure:
    def items(env: Env) -> list[Any]:
        collection = target(env)
        if type(collection) is list:
            return collection
        if type(collection) is dict:
            return list(collection)
        raise Defer

    def scoped(env: Env) -> Env:
        return dict(env)

    if name in ("exists", "all"):
        decisive = name == "exists"

        def quantifier(env: Env) -> bool:
            inner, error = scoped(env), None
            for item in items(env):
                inner[variable] = item
                try:
                    result = body(inner)
                except CelError as exc:
                    error = exc
                    continue
                if result is decisive:
                    return decisive is True
                if type(result) is not bool:
                    raise Defer
            if error is not None:
                raise error
            return not decisive

        return quantifier

    if name == "exists_one":

        def exactly_one(env: Env) -> bool:
            inner, count = scoped(env), 0
            for item in items(env):
                inner[variable] = item
                result = body(inner)
                if type(result) is not bool:
                    raise Defer
                count += result
            return count == 1

        return exactly_one

    if name == "filter":

        def keep(env: Env) -> list[Any]:
            inner, kept = scoped(env), []
            for item in items(env):
                inner[variable] = item
                result = body(inner)
                if type(result) is not bool:
                    raise Defer
                if result:
                    kept.append(item)
            return kept

        return keep

    def transform(env: Env) -> list[Any]:
        inner, out = scoped(env), []
        for item in items(env):
            inner[variable] = item
            out.append(body(inner))
        return out

    return transform


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
