"""Type checking, a stage of its own: every CEL expression typed from the request schema and the parameters.

cel-python has no checker, so this one walks the same parse tree the compiler already holds.
It reports every problem of an expression at once, each at its line and column, in plain words
and with what to write instead: operands of incompatible types, unknown functions and macros
(did-you-mean over CEL's standard library), conditions that are not boolean, string literals
that are not one of an enum field's values, duration and timestamp literals CEL refuses; and, as
warnings, conditions the schema makes constant and reliance on behaviour outside the spec.

A type the checker cannot know (`dyn(...)`, a map read by a computed key) checks as `dyn`:
it accepts anything, as CEL's own checker does.
"""

from __future__ import annotations

import difflib
import json
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from lark import Token, Tree

from engine.celtime import DurationError, parse_duration
from engine.model import EACH
from engine.schemas import Schema, SchemaWalker

ERROR, WARNING = "error", "warning"

# CEL's standard library: global functions, and methods (receiver.name(...)).
GLOBAL_FUNCTIONS = ("size", "int", "uint", "double", "string", "bool", "bytes", "dyn", "type",
                    "duration", "timestamp", "matches", "has")
METHODS = ("size", "contains", "startsWith", "endsWith", "matches", "getFullYear", "getMonth",
           "getDate", "getDayOfMonth", "getDayOfWeek", "getDayOfYear", "getHours", "getMinutes",
           "getSeconds", "getMilliseconds")
MACROS = ("all", "exists", "exists_one", "map", "filter")
# Names of CEL extension libraries (cel-go's ext package) and newer macros that bindpolicy's
# runtime does not offer: naming the library says why they fail.
EXTENSIONS = {
    **dict.fromkeys(("lowerAscii", "upperAscii", "trim", "split", "join", "replace", "indexOf",
                     "lastIndexOf", "substring", "charAt", "format", "quote", "reverse"), "strings"),
    **dict.fromkeys(("greatest", "least", "ceil", "floor", "round", "abs", "sign", "sqrt"), "math"),
    **dict.fromkeys(("existsOne", "transformList", "transformMap", "transformMapEntry"),
                    "two-variable comprehensions (cel-spec 2024)"),
    **dict.fromkeys(("sort", "flatten", "distinct", "slice", "range"), "lists"),
    "optMap": "optional types", "orValue": "optional types", "hasValue": "optional types",
    "base64": "encoders",
}
_TIMESTAMP_METHODS = METHODS[5:]
_DURATION_METHODS = ("getHours", "getMinutes", "getSeconds", "getMilliseconds")
# Names from other languages, and what CEL calls them.
_ALIASES = {"len": "size(...)", "length": "size(...)", "count": "size(...)", "now": "`at` (the request's time)",
            "startswith": ".startsWith(...)", "endswith": ".endsWith(...)", "includes": ".contains(...)",
            "any": ".exists(x, ...)", "every": ".all(x, ...)", "float": "double(...)", "str": "string(...)",
            "regex": ".matches(...)", "date": "timestamp(...)", "in": "`x in list`"}
# What each conversion takes (CEL's standard overloads): string(list) has none, and fails at run time.
_CONVERSIONS = {
    "int": ("int", "uint", "double", "string", "timestamp"),
    "uint": ("int", "uint", "double", "string"),
    "double": ("int", "uint", "double", "string"),
    "string": ("string", "int", "uint", "double", "bool", "bytes", "timestamp", "duration"),
    "bool": ("bool", "string"),
    "bytes": ("bytes", "string"),
}
NUMERIC = ("int", "uint", "double")
ORDERED = ("int", "uint", "double", "string", "bytes", "bool", "timestamp", "duration")
# RE2, which CEL's matches() uses, has no look-around and no back-references.
_NOT_RE2 = re.compile(r"\(\?<?[=!]|\\[1-9]")


@dataclass(frozen=True)
class CelType:
    """A static CEL type, with what the schema says about a request field of that type."""

    kind: str  # int uint double string bool bytes null_type timestamp duration list map object type dyn
    elem: CelType | None = None  # list items; map values
    key: CelType | None = None  # map keys
    nullable: bool = False  # the schema admits null here
    enum: tuple[str, ...] | None = None  # the strings the schema allows
    low: float | None = None  # the schema's minimum and maximum
    high: float | None = None
    name: str = ""  # the field or parameter, for messages
    literal: str = ""  # the literal's text, for messages
    schema: Schema | None = field(default=None, compare=False, hash=False)  # an object's schema

    def __str__(self) -> str:
        if self.kind == "list" and self.elem is not None and self.elem.kind != "dyn":
            return f"list of {self.elem}"
        if self.kind == "object":
            return "object"
        return self.kind


DYN = CelType("dyn")
BOOL, INT, UINT, DOUBLE = CelType("bool"), CelType("int"), CelType("uint"), CelType("double")
STRING, BYTES, NULL = CelType("string"), CelType("bytes"), CelType("null_type")
TIMESTAMP, DURATION, TYPE = CelType("timestamp"), CelType("duration"), CelType("type")


def list_of(elem: CelType) -> CelType:
    return CelType("list", elem=elem)


@dataclass(frozen=True)
class TypeProblem:
    """One finding of the checker, at a line and column of the expression text."""

    line: int
    column: int
    code: str
    message: str
    severity: str = ERROR
    # When a parameter's value does not fit where it is read: the parameter, what is wrong with its
    # value and what to write instead (the same wherever it is read), and how it is read here. The
    # loader reports it at the value's own line in version.yaml.
    parameter: str = ""
    fault: str = ""
    use: str = ""


@dataclass
class TypeEnvironment:
    """What names mean: the request's top-level fields (from the schema), `params`, and `at`."""

    walker: SchemaWalker
    request_schema: Schema
    parameters: Mapping[str, Any]

    def variable(self, name: str) -> CelType | None:
        if name == "params":
            return CelType("params")
        if name == "at":
            return CelType("timestamp", name="at")
        schema = self.walker.child(self.request_schema, name)
        return None if schema is None else self.from_schema(schema, name)

    def from_schema(self, schema: Schema, name: str) -> CelType:
        kinds = self.walker.types(schema)
        nullable = "null" in kinds or _admits_null(self.walker, schema)
        kinds.discard("null")
        enum: list[str] = []
        low = high = None
        for alt in self.walker.alternatives(schema):
            enum.extend(v for v in alt.get("enum", []) if isinstance(v, str))
            if "const" in alt and isinstance(alt["const"], str):
                enum.append(alt["const"])
            low = alt.get("minimum", low)
            high = alt.get("maximum", high)
        if "timestamp" in kinds:
            return CelType("timestamp", nullable=nullable, name=name)
        if kinds == {"integer"}:
            return CelType("int", nullable=nullable, low=low, high=high, name=name)
        if kinds <= {"integer", "number"} and kinds:
            return CelType("double", nullable=nullable, low=low, high=high, name=name)
        if kinds == {"string"}:
            return CelType("string", nullable=nullable, enum=tuple(enum) or None, name=name)
        if kinds == {"boolean"}:
            return CelType("bool", nullable=nullable, name=name)
        if kinds == {"array"}:
            items = self.walker.child(schema, EACH)
            elem = self.from_schema(items, f"{name}[]") if items is not None else DYN
            return CelType("list", elem=elem, nullable=nullable, name=name, low=0)
        if kinds == {"object"}:
            return CelType("object", nullable=nullable, name=name, schema=schema)
        return CelType("dyn", nullable=nullable, name=name)

    def parameter(self, name: str) -> CelType:
        return type_of_value(self.parameters[name], f"params.{name}")


def _admits_null(walker: SchemaWalker, schema: Schema) -> bool:
    """A oneOf/anyOf with a null branch (the walker's alternatives leave those out)."""
    resolved = walker.resolve(schema)
    kind = resolved.get("type")
    if kind == "null" or (isinstance(kind, list) and "null" in kind):
        return True
    return any(_admits_null(walker, b) for b in resolved.get("oneOf", []) + resolved.get("anyOf", []))


def type_of_value(value: Any, name: str = "") -> CelType:
    """The CEL type of a YAML parameter value."""
    if isinstance(value, bool):
        return CelType("bool", name=name)
    if isinstance(value, int):
        return CelType("int", name=name, low=value, high=value)
    if isinstance(value, float):
        return CelType("double", name=name, low=value, high=value)
    if isinstance(value, str):
        return CelType("string", name=name)
    if isinstance(value, list):
        kinds = {type_of_value(v).kind for v in value}
        elem = type_of_value(value[0]) if len(kinds) == 1 else DYN
        return CelType("list", elem=CelType(elem.kind), name=name)
    if isinstance(value, dict):
        return CelType("map", key=STRING, elem=DYN, name=name)
    return DYN


def check_types(tree: Any, env: TypeEnvironment, condition: bool) -> list[TypeProblem]:
    """Every type problem of one parsed expression; `condition`: it must give a bool."""
    checker = _Checker(env)
    result = checker.type_of(tree, {})
    if condition and result.kind not in ("bool", "dyn"):
        checker.report_use(tree, "not_boolean", (
            f"a condition must be true or false, and this expression gives {result}; "
            f"compare it with something (for instance `... == ...`)"), result, "bool", "read as a condition")
    checker.constant(tree, condition)
    return checker.problems


def _position(node: Any) -> tuple[int, int]:
    if isinstance(node, Token):
        return node.line or 1, node.column or 1
    if isinstance(node, Tree):
        meta = node.meta
        if not meta.empty and getattr(meta, "line", None) is not None:  # a tree the parser built has none
            return meta.line, meta.column or 1
        for token in node.scan_values(lambda v: isinstance(v, Token)):
            return token.line or 1, token.column or 1
    return 1, 1


# The grammar's one-child levels (expr -> conditionalor -> ... -> member -> primary).
_WRAPPERS = frozenset({"expr", "conditionalor", "conditionaland", "relation", "addition", "multiplication",
                       "unary", "member", "primary"})


def _unwrap(node: Any) -> Any:
    while isinstance(node, Tree) and len(node.children) == 1 and node.data in _WRAPPERS:
        node = node.children[0]
    return node


def _first(node: Any) -> Any:
    """The first child of a tree node (a literal's token, an ident's name)."""
    return node.children[0]


def _args(node: Any) -> list[Any]:
    """The expressions of an exprlist child (or none)."""
    if isinstance(node, Tree) and node.data == "exprlist":
        return list(node.children)
    return []


def _string_value(token: Any) -> str | None:
    """The text of a plain string literal (no escapes), else None."""
    text = str(token.value)
    raw = text[:1] in "rR"
    if raw:
        text = text[1:]
    quote = text[:3] if text[:3] in ('"""', "'''") else text[:1]
    body = text[len(quote):-len(quote)]
    if "\\" in body and not raw:
        return None
    return body


def _hint(name: str, candidates: list[str] | tuple[str, ...]) -> str:
    close = difflib.get_close_matches(name, list(candidates), n=1)
    return f"; did you mean '{close[0]}'?" if close else ""


def _same(a: CelType, b: CelType) -> bool:
    """May values of these two types meet in ==, <, +...? (dyn meets anything)."""
    if "dyn" in (a.kind, b.kind):
        return True
    if a.kind == b.kind == "list":
        return a.elem is None or b.elem is None or _same(a.elem, b.elem)
    return a.kind == b.kind


def _operator(op_node: Any, symbol: str) -> tuple[int, int] | None:
    """Where a binary operator is written: its tree (`relation_lt`...) ends just after it."""
    meta = getattr(op_node, "meta", None)
    if meta is None or meta.empty or getattr(meta, "end_line", None) is None:
        return None
    return meta.end_line, max(1, meta.end_column - len(symbol))


def _shown_value(value: Any) -> str:
    """A parameter's value as version.yaml spells it."""
    if isinstance(value, str):
        return f"'{value}'"
    return json.dumps(value, ensure_ascii=False)


def _a(kind: str) -> str:
    return f"{'an' if kind[:1] in 'aeiou' else 'a'} {kind}"


def _value_fix(value: Any, want: str) -> str | None:
    """What to write in version.yaml instead of a parameter's value that is read as a `want`; None
    when the value is not at fault (a duration string compared with a duration needs duration(...)
    in the expression, a list compared with one value needs `in`)."""
    number = isinstance(value, int | float) and not isinstance(value, bool)
    text = value.strip() if isinstance(value, str) else None
    if isinstance(value, list | dict) and not want.startswith("list"):
        return None
    if want in ("int", "uint"):
        if text is not None and re.fullmatch(r"-?\d+", text):
            return f"write {text} without quotes"
        if isinstance(value, float) and value.is_integer():
            return f"write {int(value)}"
        return "write a whole number, without quotes"
    if want == "double":
        if isinstance(value, int) and not isinstance(value, bool):
            return f"write {value}.0"
        if text is not None and re.fullmatch(r"-?\d+(\.\d+)?", text):
            return f"write {float(text)} without quotes"
        return "write a number with a decimal point, such as 0.5"
    if want == "string":
        return f"write '{_shown_value(value)}' in quotes" if number or isinstance(value, bool) else None
    if want == "bool":
        if text is not None and text.lower() in ("true", "false", "yes", "no", "on", "off"):
            return f"write {'true' if text.lower() in ('true', 'yes', 'on') else 'false'} without quotes"
        return "write true or false"
    if want.startswith("list") and isinstance(value, list):
        item = want.removeprefix("list of ")
        return f"write every item as {_a(item)}" + (" in quotes" if item == "string" else "")
    if want.startswith("list"):
        return f"write a list, such as [{_shown_value(value)}]"
    if want == "duration string":
        return f"write '{int(value)}h' (hours) or another duration such as '30m'" if number else \
            "write a duration such as '24h'"
    if want == "timestamp string":
        return "write an RFC 3339 timestamp such as '2025-06-01T00:00:00Z'"
    return None


def _conversion(left: CelType, right: CelType) -> str:
    """A string parameter met by a duration or a timestamp: the expression converts it."""
    for text, other in ((left, right), (right, left)):
        if text.kind == "string" and text.name.startswith("params.") and other.kind in ("duration", "timestamp"):
            return f"; write {other.kind}({text.name})"
    return ""


def _literal_fix(node: Any, want: CelType) -> str:
    """What to write instead of a literal of the wrong type, where that is obvious."""
    node = _unwrap(node)
    if isinstance(node, Tree) and node.data == "literal":
        token = _first(node)
        text = str(token.value)
        if token.type == "INT_LIT" and want.kind == "double":
            return f"; write {text}.0 (a double)"
        if token.type == "FLOAT_LIT" and want.kind == "int" and float(text).is_integer():
            return f"; write {int(float(text))} (an int)"
        if token.type == "STRING_LIT" and want.kind in ("int", "double"):
            inner = _string_value(token) or ""
            if re.fullmatch(r"-?\d+", inner):
                return f"; write {inner}{'.0' if want.kind == 'double' else ''} without quotes"
        if token.type in ("INT_LIT", "FLOAT_LIT") and want.kind == "string":
            return f'; write "{text}" in quotes, or compare with a number field'
    if want.kind == "double":
        return "; convert with double(...)"
    if want.kind == "int":
        return "; convert with int(...)"
    return ""


class _Checker:
    def __init__(self, env: TypeEnvironment) -> None:
        self.env = env
        self.problems: list[TypeProblem] = []

    def report(self, node: Any, code: str, message: str, severity: str = ERROR,
               at: tuple[int, int] | None = None, parameter: str = "", fault: str = "", use: str = "") -> None:
        line, column = at or _position(node)
        found = TypeProblem(line, column, code, message, severity, parameter, fault, use)
        if found not in self.problems:
            self.problems.append(found)

    def report_use(self, node: Any, code: str, message: str, given: CelType, want: str, use: str,
                   at: tuple[int, int] | None = None) -> None:
        """An error where `given` is read as a `want`; when `given` is a parameter whose value is
        what does not fit, the problem says so (the loader moves it to the value's line)."""
        name = given.name.removeprefix("params.") if given.name.startswith("params.") else ""
        value = self.env.parameters.get(name) if name else None
        fix = _value_fix(value, want) if name in self.env.parameters else None
        if fix is None:
            self.report(node, code, message, at=at)
            return
        fault = f"{_shown_value(value)} is {_a(str(given))}, where {_a(want)} is wanted: {fix}"
        self.report(node, code, message, at=at, parameter=name, fault=fault, use=use)

    def misfit(self, node: Any, code: str, message: str, left: CelType, right: CelType, use: str,
               at: tuple[int, int] | None = None) -> None:
        """Two operands that do not fit: when one is a parameter and the other is not, the
        parameter is the one to change (request fields are the contract's)."""
        params = [t.name.startswith("params.") for t in (left, right)]
        if params == [True, False]:
            self.report_use(node, code, message, left, str(right), use.format(other=_named(right)), at=at)
        elif params == [False, True]:
            self.report_use(node, code, message, right, str(left), use.format(other=_named(left)), at=at)
        else:
            self.report(node, code, message, at=at)

    # --- the walk ---------------------------------------------------------------------------

    def type_of(self, node: Any, scope: Mapping[str, CelType]) -> CelType:
        node = _unwrap(node)
        if isinstance(node, Token):
            return DYN
        kind = node.data
        handler: Callable[[Any, Mapping[str, CelType]], CelType] | None = getattr(self, f"_{kind}", None)
        if handler is None:
            for child in node.children:
                self.type_of(child, scope)
            return DYN
        return handler(node, scope)

    def _literal(self, node: Any, scope: Mapping[str, CelType]) -> CelType:
        token = node.children[0]
        kind = {"INT_LIT": "int", "UINT_LIT": "uint", "FLOAT_LIT": "double", "STRING_LIT": "string",
                "MLSTRING_LIT": "string", "BYTES_LIT": "bytes", "BOOL_LIT": "bool",
                "NULL_LIT": "null_type"}.get(token.type, "dyn")
        return CelType(kind, literal=str(token.value))

    def _paren_expr(self, node: Any, scope: Mapping[str, CelType]) -> CelType:
        return self.type_of(node.children[0], scope)

    def _list_lit(self, node: Any, scope: Mapping[str, CelType]) -> CelType:
        items = [self.type_of(e, scope) for e in _args(node.children[0] if node.children else None)]
        kinds = {t.kind for t in items if t.kind != "dyn"}
        if len(kinds) == 1:
            return list_of(CelType(kinds.pop()))
        if len(kinds) > 1 and not (kinds <= {"int", "double"}):
            self.report(node, "mixed_list", (
                f"this list mixes {', '.join(sorted(kinds))}: CEL compares an item only with "
                "items of its own type; keep one type per list"), severity=WARNING)
        return list_of(DYN)

    def _map_lit(self, node: Any, scope: Mapping[str, CelType]) -> CelType:
        inits = node.children[0].children if node.children and node.children[0] is not None else []
        keys = [self.type_of(k, scope) for k in inits[0::2]]
        values = [self.type_of(v, scope) for v in inits[1::2]]
        key_kinds = {k.kind for k in keys}
        value_kinds = {v.kind for v in values}
        return CelType("map", key=CelType(key_kinds.pop()) if len(key_kinds) == 1 else DYN,
                       elem=CelType(value_kinds.pop()) if len(value_kinds) == 1 else DYN)

    def _ident(self, node: Any, scope: Mapping[str, CelType]) -> CelType:
        name = str(node.children[0].value)
        if name in scope:
            return scope[name]
        if name in ("int", "uint", "double", "string", "bool", "bytes", "list", "map", "null_type",
                    "type", "dyn"):
            return TYPE
        found = self.env.variable(name)
        return found if found is not None else DYN  # unknown names: the compiler reports them

    def _member_dot(self, node: Any, scope: Mapping[str, CelType]) -> CelType:
        target = self.type_of(node.children[0], scope)
        name = str(node.children[1].value)
        if target.kind == "params":
            if name in self.env.parameters:
                return self.env.parameter(name)
            return DYN  # the compiler reports unknown parameters
        if target.kind == "object" and target.schema is not None:
            child = self.env.walker.child(target.schema, name)
            return self.env.from_schema(child, f"{target.name}.{name}") if child is not None else DYN
        if target.kind == "map":
            return target.elem or DYN
        if target.kind == "dyn":
            return DYN
        self.report(node.children[1], "no_field", (
            f"{target.name or 'this value'} is {target} and has no fields: '.{name}' cannot be read"))
        return DYN

    def _member_index(self, node: Any, scope: Mapping[str, CelType]) -> CelType:
        target = self.type_of(node.children[0], scope)
        index = self.type_of(node.children[1], scope)
        if target.kind == "list":
            if index.kind not in ("int", "uint", "dyn"):
                self.report(node.children[1], "bad_index", f"a list is indexed by an int, not a {index}")
            return target.elem or DYN
        if target.kind == "map":
            return target.elem or DYN
        if target.kind == "object" and target.schema is not None:
            literal = _unwrap(node.children[1])
            if isinstance(literal, Tree) and literal.data == "literal":
                key = _string_value(literal.children[0]) or ""
                child = self.env.walker.child(target.schema, key)
                if child is not None:
                    return self.env.from_schema(child, f"{target.name}.{key}")
            return DYN
        if target.kind not in ("dyn",):
            self.report(node, "bad_index", f"{target.name or 'this value'} is {target}: it cannot be indexed")
        return DYN

    def _member_object(self, node: Any, scope: Mapping[str, CelType]) -> CelType:
        self.report(node, "unsupported", "message construction (Type{field: ...}) needs protobuf types, "
                    "which requests do not have; build a map instead: {\"field\": ...}")
        return DYN

    def _dot_ident(self, node: Any, scope: Mapping[str, CelType]) -> CelType:
        return self._ident(node, scope)

    def _unary(self, node: Any, scope: Mapping[str, CelType]) -> CelType:
        op, operand = node.children[0], node.children[1]
        inner = self.type_of(operand, scope)
        if isinstance(op, Tree) and op.data == "unary_not":
            if inner.kind not in ("bool", "dyn"):
                self.report_use(operand, "bad_operand", f"'!' negates a bool, and {_named(inner)} is {inner}",
                                inner, "bool", "negated by '!'")
            return BOOL
        if inner.kind not in ("int", "double", "duration", "dyn"):
            self.report_use(operand, "bad_operand", f"'-' negates a number, and {_named(inner)} is {inner}",
                            inner, "int", "negated by '-'")
        return CelType(inner.kind) if inner.kind != "dyn" else DYN

    def _logical(self, node: Any, scope: Mapping[str, CelType], symbol: str) -> CelType:
        for child in node.children:
            found = self.type_of(child, scope)
            if found.kind not in ("bool", "dyn"):
                self.report_use(child, "bad_operand", (
                    f"'{symbol}' joins conditions, and {_named(found)} is {found}, not true or false"),
                    found, "bool", f"joined by '{symbol}'")
        return BOOL

    def _conditionalor(self, node: Any, scope: Mapping[str, CelType]) -> CelType:
        return self._logical(node, scope, "||")

    def _conditionaland(self, node: Any, scope: Mapping[str, CelType]) -> CelType:
        return self._logical(node, scope, "&&")

    def _expr(self, node: Any, scope: Mapping[str, CelType]) -> CelType:
        if len(node.children) != 3:
            return self.type_of(node.children[0], scope)
        condition, yes, no = (self.type_of(c, scope) for c in node.children)
        if condition.kind not in ("bool", "dyn"):
            self.report(node.children[0], "not_boolean", f"the condition of '? :' must be a bool, not {condition}")
        if yes.kind == "null_type":
            return CelType(no.kind, elem=no.elem, nullable=True)
        if no.kind == "null_type" or _same(yes, no):
            return yes if yes.kind != "dyn" else no
        self.report(node.children[2], "mismatch", (
            f"the two branches of '? :' give different types ({yes} and {no}); make them one type"))
        return DYN

    def _relation(self, node: Any, scope: Mapping[str, CelType]) -> CelType:
        op_node, right_node = node.children
        op = op_node.data
        left_node = op_node.children[0]
        left, right = self.type_of(left_node, scope), self.type_of(right_node, scope)
        symbol = {"relation_eq": "==", "relation_ne": "!=", "relation_lt": "<", "relation_le": "<=",
                  "relation_gt": ">", "relation_ge": ">=", "relation_in": "in"}[op]
        if op == "relation_in":
            self._check_in(node, left_node, right_node, left, right)
            return BOOL
        at = _operator(op_node, symbol)
        if "null_type" in (left.kind, right.kind):
            other = right if left.kind == "null_type" else left
            if symbol in ("==", "!="):
                if other.kind not in ("dyn", "null_type") and not other.nullable and other.name:
                    self.report(node, "constant", (
                        f"{other.name} is never null in the request schema, so this is always "
                        f"{'false' if symbol == '==' else 'true'}"), severity=WARNING, at=at)
                return BOOL
            self.report(node, "mismatch", f"'{symbol}' does not order null; compare with == or != null", at=at)
            return BOOL
        if not _same(left, right):
            numbers = {left.kind, right.kind} <= set(NUMERIC)
            fix_node, want = (right_node, left) if left.name or not right.name else (left_node, right)
            advice = _literal_fix(fix_node, want) or _conversion(left, right)
            if numbers:
                message = (f"'{symbol}' between {_named(left)} ({left}) and {_named(right)} ({right}): "
                           f"CEL does not convert numbers implicitly{advice or '; use double(...) or int(...)'}")
            else:
                message = (f"'{symbol}' between {_named(left)} ({left}) and {_named(right)} ({right}) can never "
                           f"be true: they are different types{advice}")
            self.misfit(node, "mismatch", message, left, right, f"compared with {{other}} by '{symbol}'", at=at)
            return BOOL
        if symbol not in ("==", "!=") and left.kind not in (*ORDERED, "dyn"):
            self.report(node, "mismatch", f"'{symbol}' orders numbers, strings, timestamps and durations, "
                        f"not {left}", at=at)
        if symbol in ("==", "!="):
            self._check_enum(left_node, right_node, left, right)
        return BOOL

    def _check_enum(self, left_node: Any, right_node: Any, left: CelType, right: CelType) -> None:
        for field_type, literal_node in ((left, right_node), (right, left_node)):
            literal = _unwrap(literal_node)
            if field_type.enum and isinstance(literal, Tree) and literal.data == "literal":
                self._enum_literal(field_type, literal)

    def _enum_literal(self, field_type: CelType, literal: Any) -> None:
        token = literal.children[0]
        value = _string_value(token) if token.type in ("STRING_LIT", "MLSTRING_LIT") else None
        if value is not None and field_type.enum and value not in field_type.enum:
            values = ", ".join(f'"{v}"' for v in field_type.enum)
            self.report(literal, "not_in_enum", (
                f'"{value}" is not a value of {field_type.name} ({values}), so this never matches'
                f"{_hint(value, field_type.enum)}"))

    def _check_in(self, node: Any, left_node: Any, right_node: Any, left: CelType, right: CelType) -> None:
        at = _operator(node.children[0], "in")
        if right.kind == "list":
            elem = right.elem or DYN
            if not _same(left, elem):
                message = f"'in' looks for {_named(left)} ({left}) in a list of {elem}: it can never be found"
                if right.name.startswith("params.") and not left.name.startswith("params."):
                    self.report_use(node, "mismatch", message, right, f"list of {left}",
                                    f"searched for {_named(left)} by 'in'", at=at)
                else:
                    self.report_use(node, "mismatch", message, left, str(elem),
                                    f"looked for in {_named(right)} by 'in'", at=at)
            elif left.enum:
                items = _unwrap(right_node)
                if isinstance(items, Tree) and items.data == "list_lit" and items.children:
                    for item in _args(items.children[0]):
                        literal = _unwrap(item)
                        if isinstance(literal, Tree) and literal.data == "literal":
                            self._enum_literal(left, literal)
        elif right.kind == "map":
            if right.key is not None and not _same(left, right.key):
                self.report(node, "mismatch", f"'in' looks for a {left} among map keys of type {right.key}", at=at)
        elif right.kind not in ("dyn",):
            self.report_use(right_node, "mismatch", f"'in' needs a list or a map on its right, not {right}",
                            right, f"list of {left}", f"searched for {_named(left)} by 'in'")

    def _arith(self, node: Any, scope: Mapping[str, CelType], names: dict[str, str]) -> CelType:
        op_node, right_node = node.children
        left_node = op_node.children[0]
        left, right = self.type_of(left_node, scope), self.type_of(right_node, scope)
        symbol = names[op_node.data]
        if "dyn" in (left.kind, right.kind):
            return DYN
        result = _ARITHMETIC.get((symbol, left.kind, right.kind))
        if result is not None:
            return list_of(DYN) if result == "list" else CelType(result)
        numbers = {left.kind, right.kind} <= set(NUMERIC)
        fix_node, want = (right_node, left) if left.name or not right.name else (left_node, right)
        advice = _literal_fix(fix_node, want) if numbers else ""
        if numbers and (not advice or "convert" in advice):
            advice = ": CEL does not convert numbers implicitly; convert one side with double(...) or int(...)"
        at = _operator(op_node, symbol)
        if left.kind == right.kind:
            self.report(node, "mismatch", f"'{symbol}' is not defined for {left}", at=at)
        else:
            self.misfit(node, "mismatch", (
                f"'{symbol}' between {_named(left)} ({left}) and {_named(right)} ({right}) is not defined{advice}"),
                left, right, f"'{symbol}' with {{other}}", at=at)
        return DYN

    def _addition(self, node: Any, scope: Mapping[str, CelType]) -> CelType:
        return self._arith(node, scope, {"addition_add": "+", "addition_sub": "-"})

    def _multiplication(self, node: Any, scope: Mapping[str, CelType]) -> CelType:
        return self._arith(node, scope, {"multiplication_mul": "*", "multiplication_div": "/",
                                          "multiplication_mod": "%"})

    # --- calls ------------------------------------------------------------------------------

    def _ident_arg(self, node: Any, scope: Mapping[str, CelType]) -> CelType:
        name_token = node.children[0]
        name = str(name_token.value)
        args = _args(node.children[1] if len(node.children) > 1 else None)
        if name == "has":
            return BOOL  # the compiler checks has()'s argument as a field read
        types = [self.type_of(a, scope) for a in args]
        if name not in GLOBAL_FUNCTIONS:
            self._unknown(name_token, name, GLOBAL_FUNCTIONS + METHODS, method=False)
            return DYN
        return self._call(node, name_token, name, None, args, types)

    def _dot_ident_arg(self, node: Any, scope: Mapping[str, CelType]) -> CelType:
        return self._ident_arg(node, scope)

    def _member_dot_arg(self, node: Any, scope: Mapping[str, CelType]) -> CelType:
        target_node, name_token = node.children[0], node.children[1]
        name = str(name_token.value)
        args = _args(node.children[2] if len(node.children) > 2 else None)
        target = self.type_of(target_node, scope)
        if name in MACROS:
            return self._macro(node, name_token, name, target, args, scope)
        types = [self.type_of(a, scope) for a in args]
        if name not in METHODS:
            self._unknown(name_token, name, METHODS + MACROS, method=True)
            return DYN
        return self._call(node, name_token, name, target, args, types)

    def _unknown(self, token: Any, name: str, known: tuple[str, ...], method: bool) -> None:
        library = EXTENSIONS.get(name)
        if library:
            self.report(token, "unknown_function", (
                f"'{name}' comes from CEL's {library} extension, which bindpolicy does not offer; "
                "the standard library has size, contains, startsWith, endsWith, matches"))
            return
        what = "method" if method else "function"
        alias = _ALIASES.get(name.lower())
        hint = f"; write {alias}" if alias else _hint(name, known)
        self.report(token, "unknown_function", f"'{name}' is not a {what} of CEL's standard library{hint}")

    def _call(self, node: Any, token: Any, name: str, target: CelType | None, args: list[Any],
              types: list[CelType]) -> CelType:
        operands = ([target] if target is not None else []) + types
        shown = f"{name}()" if target is None else f".{name}()"

        def want(count: int) -> bool:
            if len(operands) != count:
                self.report(token, "bad_call", f"{shown} takes {count - (target is not None)} "
                            f"argument{'s' if count - (target is not None) != 1 else ''}, not {len(types)}")
                return False
            return True

        def kinds(index: int, *allowed: str) -> bool:
            got = operands[index]
            if got.kind in (*allowed, "dyn"):
                return True
            place = "its receiver" if target is not None and index == 0 else (
                got.name or got.literal or "its argument")
            want = f"{name} string" if name in ("duration", "timestamp") else allowed[0]
            self.report_use(args[index - (target is not None)] if index >= (target is not None) else node,
                            "bad_call", f"{shown} takes {' or '.join(allowed)}, and {place} is {got}",
                            got, want, f"read by {shown}")
            return False

        if name == "size":
            if want(1):
                kinds(0, "string", "bytes", "list", "map")
            return CelType("int", name=f"size({operands[0].name})" if operands and operands[0].name else "",
                           low=0)
        if name in ("contains", "startsWith", "endsWith", "matches"):
            if want(2):
                kinds(0, "string")
                kinds(1, "string")
                if name == "matches":
                    self._pattern(args[-1])
            return BOOL
        if name in _TIMESTAMP_METHODS and target is not None:
            allowed = _TIMESTAMP_METHODS if target.kind == "timestamp" else _DURATION_METHODS
            if target.kind in ("timestamp", "duration") and name not in allowed:
                self.report(token, "bad_call", f".{name}() reads a timestamp, not a duration")
            elif target.kind not in ("timestamp", "duration", "dyn"):
                self.report(token, "bad_call", f".{name}() reads a timestamp or a duration, not {target}")
            for extra, arg in zip(types, args, strict=True):
                if extra.kind not in ("string", "dyn"):
                    self.report(arg, "bad_call", f".{name}() takes a time zone name (a string), not {extra}")
            return INT
        if name == "duration":
            if want(1) and kinds(0, "string", "duration"):
                self._time_literal(args[0], operands[0], parse_duration_checked)
            return DURATION
        if name == "timestamp":
            if want(1) and kinds(0, "string", "timestamp", "int"):
                self._time_literal(args[0], operands[0], parse_timestamp_checked)
            return TIMESTAMP
        if name in _CONVERSIONS:
            if want(1):
                kinds(0, *_CONVERSIONS[name])
            return CelType(name)
        if name == "type":
            want(1)
            return TYPE
        return DYN  # dyn()

    def _pattern(self, node: Any) -> None:
        literal = _unwrap(node)
        if isinstance(literal, Tree) and literal.data == "literal" and _first(literal).type == "STRING_LIT":
            value = _string_value(literal.children[0])
            if value is not None and _NOT_RE2.search(value):
                self.report(literal, "not_portable", (
                    "CEL's matches() uses RE2, which has no look-around or back-references; "
                    "this pattern works only where the runtime uses another regex engine"), severity=WARNING)

    def _time_literal(self, node: Any, given: CelType, parse: Callable[[str], str | None]) -> None:
        """A duration()/timestamp() of a literal or a parameter that CEL would refuse."""
        literal = _unwrap(node)
        value: str | None = None
        if isinstance(literal, Tree) and literal.data == "literal" and _first(literal).type == "STRING_LIT":
            value = _string_value(literal.children[0])
        elif given.name.startswith("params."):
            raw = self.env.parameters.get(given.name[len("params."):])
            value = raw if isinstance(raw, str) else None
        if value is None:
            return
        problem = parse(value)
        if problem is None:
            return
        if given.name.startswith("params."):
            name = given.name[len("params."):]
            called = "duration()" if parse is parse_duration_checked else "timestamp()"
            self.report(literal, "bad_literal", f"parameter {name}: {problem}", parameter=name, fault=problem,
                        use=f"read by {called}")
        else:
            self.report(literal, "bad_literal", problem)

    def _macro(self, node: Any, token: Any, name: str, target: CelType, args: list[Any],
               scope: Mapping[str, CelType]) -> CelType:
        variable = _unwrap(args[0]) if args else None
        if not (isinstance(variable, Tree) and variable.data == "ident") or len(args) != 2:
            count = len(args)
            if count == 3 and name in ("exists", "all", "map", "filter", "exists_one"):
                self.report(token, "not_portable", (
                    f".{name}() with two variables (or a filter) is newer CEL that bindpolicy's runtime "
                    f"does not offer; write .{name}(x, ...) over one variable"))
            else:
                self.report(token, "bad_call", f".{name}(x, ...) takes a variable name and an expression")
            return DYN
        if target.kind == "list":
            item = target.elem or DYN
        elif target.kind == "map":
            item = target.key or DYN
        elif target.kind == "dyn":
            item = DYN
        else:
            self.report(token, "bad_call", f".{name}() runs over a list or a map, and "
                        f"{target.name or 'this value'} is {target}")
            item = DYN
        inner_scope = {**scope, str(_first(variable).value): item}
        body = self.type_of(args[1], inner_scope)
        if name in ("all", "exists", "exists_one", "filter") and body.kind not in ("bool", "dyn"):
            self.report(args[1], "not_boolean", f"the body of .{name}() must be true or false, not {body}")
        if name == "map":
            return list_of(body)
        if name == "filter":
            return target if target.kind == "list" else list_of(item)
        return BOOL

    # --- constant conditions ----------------------------------------------------------------

    def constant(self, tree: Any, condition: bool) -> None:
        """Comparisons the schema's bounds decide (`account.age >= 0`): warnings, not errors."""
        for node in _subtrees(tree) if isinstance(tree, Tree) else ():
            if node.data != "relation" or len(node.children) != 2:
                continue
            op_node, right_node = node.children
            if not isinstance(op_node, Tree) or op_node.data not in _ORDER_OPS:
                continue
            left = self.type_of(op_node.children[0], {})
            literal = _number(right_node)
            symbol = _ORDER_OPS[op_node.data]
            if literal is None:
                literal = _number(op_node.children[0])
                left = self.type_of(right_node, {})
                symbol = _FLIP[symbol]
            if literal is None or left.kind not in NUMERIC or not left.name:
                continue
            verdict = _decided(symbol, literal, left.low, left.high)
            if verdict is not None:
                bounds = _bounds(left)
                self.report(node, "constant", (
                    f"{left.name} {bounds} in the request schema, so this comparison is always "
                    f"{'true' if verdict else 'false'}; compare with a value it can take"), severity=WARNING,
                    at=_operator(op_node, _ORDER_OPS[op_node.data]))


def _subtrees(tree: Tree[Any]) -> Iterator[Tree[Any]]:
    """Every subtree, in the order of lark's iter_subtrees (breadth first, backwards), at a
    fraction of its cost: a parse tree holds no node twice, so nothing need be looked up."""
    queue: list[Tree[Any]] = [tree]
    for node in queue:  # the list grows as it is read
        children = node.children
        if len(children) == 1:  # most: the grammar's one-child wrappers
            if isinstance(children[0], Tree):
                queue.append(children[0])
        else:
            queue.extend([child for child in reversed(children) if isinstance(child, Tree)])
    return iter(queue[::-1])


_ORDER_OPS = {"relation_lt": "<", "relation_le": "<=", "relation_gt": ">", "relation_ge": ">="}
_FLIP = {"<": ">", "<=": ">=", ">": "<", ">=": "<="}


def _number(node: Any) -> float | None:
    literal = _unwrap(node)
    if isinstance(literal, Tree) and literal.data == "literal" and _first(literal).type in ("INT_LIT", "FLOAT_LIT"):
        text = str(_first(literal).value)
        try:
            return float(int(text, 0)) if _first(literal).type == "INT_LIT" else float(text)
        except ValueError:
            return None
    return None


def _decided(symbol: str, value: float, low: float | None, high: float | None) -> bool | None:
    """Whether `field <symbol> value` is the same for every field value in [low, high]."""
    def checks(x: float) -> bool:
        return {"<": x < value, "<=": x <= value, ">": x > value, ">=": x >= value}[symbol]

    if low is not None and high is not None:
        a, b = checks(low), checks(high)
        return a if a == b else None
    if low is not None:  # only a minimum: `>= low` and `> below low` always hold
        if symbol in (">=", ">") and checks(low):
            return True
        if symbol in ("<", "<=") and not checks(low):
            return False
    if high is not None:
        if symbol in ("<", "<=") and checks(high):
            return True
        if symbol in (">", ">=") and not checks(high):
            return False
    return None


def _bounds(t: CelType) -> str:
    def show(x: float) -> str:
        return f"{x:g}"
    if t.low is not None and t.high is not None:
        return f"is between {show(t.low)} and {show(t.high)}"
    return f"is at least {show(t.low)}" if t.low is not None else f"is at most {show(t.high or 0)}"


def _named(t: CelType) -> str:
    return t.name or t.literal or "the other side"


_ARITHMETIC: dict[tuple[str, str, str], str] = {}
for _op in "+-*/%":
    for _kind in NUMERIC:
        if not (_op == "%" and _kind == "double"):
            _ARITHMETIC[(_op, _kind, _kind)] = _kind
_ARITHMETIC.update({
    ("+", "string", "string"): "string", ("+", "bytes", "bytes"): "bytes", ("+", "list", "list"): "list",
    ("+", "timestamp", "duration"): "timestamp", ("+", "duration", "timestamp"): "timestamp",
    ("+", "duration", "duration"): "duration", ("-", "timestamp", "timestamp"): "duration",
    ("-", "timestamp", "duration"): "timestamp", ("-", "duration", "duration"): "duration",
})


def parse_duration_checked(text: str) -> str | None:
    try:
        parse_duration(text)
    except DurationError as exc:
        return str(exc)
    return None


def parse_timestamp_checked(text: str) -> str | None:
    """Why CEL's timestamp() refuses `text` (RFC 3339 with a time zone), or None."""
    if not re.fullmatch(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,9})?(Z|[+-]\d{2}:\d{2})", text):
        if re.fullmatch(r"\d{4}-\d{2}-\d{2}", text):
            return f"'{text}' is a date, not a timestamp: write '{text}T00:00:00Z'"
        if re.fullmatch(r"\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}:\d{2}(\.\d+)?", text):
            return f"'{text}' has no time zone: CEL timestamps are RFC 3339, write '{text.replace(' ', 'T')}Z'"
        return f"'{text}' is not an RFC 3339 timestamp such as '2025-06-01T00:00:00Z'"
    try:
        datetime.fromisoformat(re.sub(r"\.\d+", "", text).replace("Z", "+00:00"))
    except ValueError:
        return f"'{text}' is not a real moment (check the month, day and time)"
    return None
