"""The SMT encoding: a request the contract accepts as solver variables, and a version's decision over it.

Each field is a variable typed and bounded by `request.schema.json` (enums, minimum/maximum,
string lengths, required/optional/null); timestamps and durations are integer seconds; a list
is `bound` item slots and a length; strings are an identity (an integer: the literals of the
policies have their own, any other string a negative one) and a length. CEL follows its spec:
`&&`/`||`/`exists`/`all` absorb errors, `==` across types is false, a missing field is an error.
A form outside the encoding is `Uncovered`: its value is a free variable (so "impossible"
stays proved) and answers that would need it say `unknown`, naming it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import z3

from engine import celtime
from engine.model import EACH, OPTIONAL, Expression, FieldPath, Output, PolicyVersion, Rule
from engine.prover import cel
from engine.prover.cel import Uncovered
from engine.reader import NO_NUL  # every string the policies write and the prover makes up is without NUL
from engine.schemas import Schema, SchemaWalker, load_schema

TS_MIN = int(datetime(1, 1, 1, tzinfo=UTC).timestamp())
TS_MAX = int(datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC).timestamp())
DURATION_MAX = 315_576_000_000  # CEL: about 10,000 years either way
INT_MIN, INT_MAX = -(2**63), 2**63 - 1
COUNTRY = "^[A-Z]{2}$"

Z = Any  # a z3 expression (z3 ships no type hints)


# --- symbolic values --------------------------------------------------------------------------


@dataclass
class SBool:
    v: Z


@dataclass
class SInt:
    v: Z


@dataclass
class SDouble:
    v: Z


@dataclass
class SStr:
    id: Z  # >= 0: the literal of that index; < 0: a string no policy writes


@dataclass
class STime:
    v: Z  # seconds since the epoch


@dataclass
class SDur:
    v: Z  # seconds


@dataclass
class SNull:
    pass


@dataclass
class SNullable:
    null: Z
    inner: Sym


@dataclass
class SList:
    items: list[Sym]
    members: list[Z]  # item i is in the list


@dataclass
class SObj:
    node: ObjectNode


Sym = SBool | SInt | SDouble | SStr | STime | SDur | SNull | SNullable | SList | SObj
Value = tuple[Sym, Z]  # a value and "evaluation failed"

FALSE, TRUE = z3.BoolVal(False), z3.BoolVal(True)


def _or(items: Iterable[Z]) -> Z:
    items = list(items)
    return FALSE if not items else items[0] if len(items) == 1 else z3.Or(*items)


def _and(items: Iterable[Z]) -> Z:
    items = list(items)
    return TRUE if not items else items[0] if len(items) == 1 else z3.And(*items)


def length(lst: SList) -> Z:
    return z3.Sum([z3.If(m, 1, 0) for m in lst.members]) if lst.members else z3.IntVal(0)


# --- the request as variables ---------------------------------------------------------------------


@dataclass
class StringVar:
    id: Z
    schema: Schema


@dataclass
class ObjectNode:
    """An object of the request whose fields become variables when first read."""

    domain: Domain
    schema: Schema
    path: str
    fields: dict[str, tuple[Z, Sym]] = field(default_factory=dict)  # name -> (present, value)

    def field(self, name: str) -> tuple[Z, Sym]:
        found = self.fields.get(name)
        if found is not None:
            return found
        props = self.schema.get("properties", {})
        if name not in props:
            raise Uncovered(f"{self.path or 'the request'} has no field {name!r}")
        where = f"{self.path}.{name}" if self.path else name
        present = TRUE if name in self.schema.get("required", ()) else z3.Bool(f"{where}?")
        value = self.domain.make(props[name], where)
        self.fields[name] = (present, value)
        for test, required in self.domain.conditions(self.schema):
            if name in required:
                self.domain.constraints.append(z3.Implies(test(self), present))
        return present, value


class Domain:
    """The variables of one request, the contract's constraints on them, and the string literals."""

    def __init__(self, bound: int, literals: dict[str, int]) -> None:
        self.schema = load_schema("request")
        self.bound = bound
        self.literals = literals  # shared by every domain of a proof: a literal keeps its id
        self.constraints: list[Z] = []
        self.strings: list[StringVar] = []
        self.slen = z3.Function("slen", z3.IntSort(), z3.IntSort())
        self._names: dict[str, int] = {}
        self.encoded: dict[tuple[str, str], Condition] = {}
        self.preferences: list[Z] = []  # witnesses read better with these, where they can hold
        self.root = ObjectNode(self, self.schema, "")

    def intern(self, text: str) -> int:
        if text not in self.literals:
            self.literals[text] = len(self.literals)
        return self.literals[text]

    def string_literal(self, text: str) -> SStr:
        return SStr(z3.IntVal(self.intern(text)))

    def name(self, base: str) -> str:
        count = self._names.get(base, 0)
        self._names[base] = count + 1
        return base if not count else f"{base}#{count}"

    def resolve(self, schema: Schema) -> Schema:
        while "$ref" in schema:
            target: Any = self.schema
            for part in schema["$ref"][2:].split("/"):
                target = target[part]
            schema = {**target, **{k: v for k, v in schema.items() if k != "$ref"}}
        return schema

    def conditions(self, schema: Schema) -> list[tuple[Callable[[ObjectNode], Z], tuple[str, ...]]]:
        """The `if {field: const/enum} then required [...]` of an object schema, as tests."""
        found: list[tuple[Callable[[ObjectNode], Z], tuple[str, ...]]] = []
        for part in [schema, *schema.get("allOf", ())]:
            condition, then = part.get("if"), part.get("then")
            if not condition or not then:
                continue
            tests = condition.get("properties", {})
            if len(tests) != 1:
                continue
            (key, spec), = tests.items()
            allowed = spec.get("enum", [spec["const"]] if "const" in spec else None)
            if allowed is None:
                continue

            def test(node: ObjectNode, key: str = key, allowed: tuple[str, ...] = tuple(allowed)) -> Z:
                present, value = node.field(key)
                assert isinstance(value, SStr)
                return z3.And(present, _or(value.id == self.intern(a) for a in allowed))

            found.append((test, tuple(then.get("required", ()))))
        return found

    def make(self, schema: Schema, where: str) -> Sym:
        schema = self.resolve(schema)
        if "oneOf" in schema:
            branches = [self.resolve(b) for b in schema["oneOf"]]
            others = [b for b in branches if b.get("type") != "null"]
            if len(others) != 1 or len(branches) != 2:
                raise Uncovered(f"the schema of {where}")
            return SNullable(z3.Bool(self.name(f"{where}=null")), self.make(others[0], where))
        name = self.name(where)
        if "enum" in schema:
            var = z3.Int(name)
            self.constraints.append(_or(var == self.intern(v) for v in schema["enum"]))
            return SStr(var)
        kind = schema.get("type")
        if kind == "string" and schema.get("format") == "date-time":
            var = z3.Int(name)
            self.constraints.append(z3.And(var >= TS_MIN, var <= TS_MAX))
            return STime(var)
        if kind == "string":
            if schema.get("pattern") not in (None, COUNTRY, NO_NUL):
                raise Uncovered(f"the pattern of {where}")
            var = z3.Int(name)
            self.strings.append(StringVar(var, schema))
            return SStr(var)
        if kind == "integer":
            var = z3.Int(name)
            low, high = schema.get("minimum", INT_MIN), schema.get("maximum", INT_MAX)
            self.constraints.append(z3.And(var >= low, var <= high))
            return SInt(var)
        if kind == "number":
            var = z3.Real(name)
            if "minimum" in schema:
                self.constraints.append(var >= schema["minimum"])
            if "maximum" in schema:
                self.constraints.append(var <= schema["maximum"])
            return SDouble(var)
        if kind == "boolean":
            return SBool(z3.Bool(name))
        if kind == "object":
            return SObj(ObjectNode(self, schema, where))
        if kind == "array":
            size = z3.Int(f"size({name})")
            most = min(schema.get("maxItems", self.bound), self.bound)
            self.constraints.append(z3.And(size >= schema.get("minItems", 0), size <= most))
            items = [self.make(schema["items"], f"{where}[{i}]") for i in range(most)]
            return SList(items, [size > i for i in range(most)])
        raise Uncovered(f"the schema of {where}")

    def assertions(self) -> list[Z]:
        """Every constraint of the contract on the variables made so far."""
        out = list(self.constraints)
        country = z3.Function("country", z3.IntSort(), z3.BoolSort())
        count = len(self.literals)
        nul = z3.Function("has_nul", z3.IntSort(), z3.BoolSort())
        for text, index in self.literals.items():
            out.append(self.slen(index) == len(text))
            out.append(country(index) == bool(re.fullmatch(COUNTRY[1:-1], text)))
            out.append(nul(index) == ("\0" in text))
        for var in self.strings:
            low = var.schema.get("minLength", 0)
            high = var.schema.get("maxLength", 10**6)
            pattern = var.schema.get("pattern") == COUNTRY
            if pattern:
                low = high = 2
            # a string no policy writes, or one of the literals that fits the schema
            literal = z3.And(var.id < count, self.slen(var.id) >= low, self.slen(var.id) <= high,
                             country(var.id) if pattern else TRUE, z3.Not(nul(var.id)))
            fresh = z3.And(self.slen(var.id) >= max(low, 1), self.slen(var.id) <= high)
            out.append(z3.If(var.id < 0, fresh, literal))
        return out


# --- expressions -------------------------------------------------------------------------------------


def parse_duration(text: str) -> int:
    """A duration literal in whole seconds (the prover's unit), read by engine/celtime.py; one CEL
    refuses, or with a fraction of a second, is outside what the prover covers."""
    try:
        value = celtime.parse_duration(text)
    except celtime.DurationError:
        raise Uncovered(f'duration("{text}")') from None
    if value.microseconds:
        raise Uncovered(f'duration("{text}")')
    return value.days * 86_400 + value.seconds


class Encoder:
    """Encodes CEL trees over one request's variables."""

    def __init__(self, domain: Domain) -> None:
        self.domain = domain

    def var(self, name: str, scope: Mapping[str, Sym]) -> Value:
        if name in scope:
            return scope[name], FALSE
        present, value = self.domain.root.field(name)
        return value, z3.Not(present)

    def encode(self, node: cel.Node, scope: Mapping[str, Sym] | None = None) -> Value:
        scope = scope or {}
        if isinstance(node, cel.Lit):
            return self.literal(node.value), FALSE
        if isinstance(node, cel.Var):
            if node.name == "at":
                return self.var("at", scope)[0], FALSE  # the engine always binds `at`
            return self.var(node.name, scope)
        if isinstance(node, cel.ListOf):
            values = [self.encode(i, scope) for i in node.items]
            return SList([v for v, _ in values], [TRUE] * len(values)), _or(e for _, e in values)
        if isinstance(node, cel.Select):
            base, err = self.encode(node.base, scope)
            value, err2 = self.select(base, node.field)
            return value, z3.Or(err, err2)
        if isinstance(node, cel.Has):
            base, err = self.encode(node.base, scope)
            return SBool(self.has(base, node.field)), err
        if isinstance(node, cel.Not):
            value, err = self.encode(node.operand, scope)
            if not isinstance(value, SBool):
                return SBool(FALSE), TRUE
            return SBool(z3.Not(value.v)), err
        if isinstance(node, cel.Neg):
            value, err = self.encode(node.operand, scope)
            if isinstance(value, SInt):
                return SInt(-value.v), z3.Or(err, value.v == INT_MIN)
            if isinstance(value, SDouble):
                return SDouble(-value.v), err
            raise Uncovered(cel.show(node))
        if isinstance(node, cel.And | cel.Or):
            return self.logical(isinstance(node, cel.Or), self.encode(node.left, scope),
                                self.encode(node.right, scope))
        if isinstance(node, cel.Cond):
            test, err = self.encode(node.test, scope)
            if not isinstance(test, SBool):
                return SBool(FALSE), TRUE
            then, err1 = self.encode(node.then, scope)
            other, err2 = self.encode(node.other, scope)
            return self.choose(test.v, then, other, node), z3.Or(err, z3.If(test.v, err1, err2))
        if isinstance(node, cel.Binary):
            left, err1 = self.encode(node.left, scope)
            right, err2 = self.encode(node.right, scope)
            value, err3 = self.binary(node.op, left, right, node)
            return value, z3.Or(err1, err2, err3)
        if isinstance(node, cel.Call):
            return self.call(node, scope)
        if isinstance(node, cel.Macro):
            return self.macro(node, scope)
        if isinstance(node, cel.Index):
            base, err = self.encode(node.base, scope)
            index = node.index
            if isinstance(base, SList) and isinstance(index, cel.Lit) and type(index.value) is int \
                    and 0 <= index.value < len(base.items):
                return base.items[index.value], z3.Or(err, z3.Not(base.members[index.value]))
            raise Uncovered(cel.show(node))
        raise Uncovered(cel.show(node))

    def literal(self, value: Any) -> Sym:
        if value is None:
            return SNull()
        if isinstance(value, bool):
            return SBool(z3.BoolVal(value))
        if isinstance(value, int):
            return SInt(z3.IntVal(value))
        if isinstance(value, float):
            return SDouble(z3.RealVal(value))
        if isinstance(value, str):
            return self.domain.string_literal(value)
        raise Uncovered(repr(value))

    def select(self, base: Sym, name: str) -> Value:
        if isinstance(base, SObj):
            present, value = base.node.field(name)
            return value, z3.Not(present)
        if isinstance(base, SNullable):
            value, err = self.select(base.inner, name)
            return value, z3.Or(base.null, err)
        if isinstance(base, SNull):
            return SNull(), TRUE
        raise Uncovered(f"the field {name} of a {type(base).__name__[1:].lower()}")

    def has(self, base: Sym, name: str) -> Z:
        if isinstance(base, SObj):
            return base.node.field(name)[0]
        if isinstance(base, SNullable):
            return z3.And(z3.Not(base.null), self.has(base.inner, name))
        if isinstance(base, SNull):
            return FALSE
        raise Uncovered(f"has() on a {type(base).__name__[1:].lower()}")

    def logical(self, is_or: bool, a: Value, b: Value) -> Value:
        (va, ea), (vb, eb) = a, b
        if not isinstance(va, SBool):
            va, ea = SBool(FALSE), TRUE
        if not isinstance(vb, SBool):
            vb, eb = SBool(FALSE), TRUE
        if is_or:
            decided = z3.Or(z3.And(z3.Not(ea), va.v), z3.And(z3.Not(eb), vb.v))
            err = z3.And(z3.Not(decided), z3.Or(ea, eb))
            return SBool(decided), err
        refuted = z3.Or(z3.And(z3.Not(ea), z3.Not(va.v)), z3.And(z3.Not(eb), z3.Not(vb.v)))
        err = z3.And(z3.Not(refuted), z3.Or(ea, eb))
        return SBool(z3.Not(refuted)), err

    def choose(self, test: Z, a: Sym, b: Sym, node: cel.Node) -> Sym:
        if isinstance(a, SBool) and isinstance(b, SBool):
            return SBool(z3.If(test, a.v, b.v))
        for kind in (SInt, SDouble, STime, SDur):
            if isinstance(a, kind) and isinstance(b, kind):
                return kind(z3.If(test, a.v, b.v))
        if isinstance(a, SStr) and isinstance(b, SStr):
            return SStr(z3.If(test, a.id, b.id))
        raise Uncovered(cel.show(node))

    def equal(self, a: Sym, b: Sym) -> Z:
        """CEL's ==, which never fails: values of different types are not equal."""
        if isinstance(a, SNullable) or isinstance(b, SNullable):
            if isinstance(b, SNullable) and not isinstance(a, SNullable):
                a, b = b, a
            assert isinstance(a, SNullable)
            if isinstance(b, SNull):
                return a.null
            if isinstance(b, SNullable):
                return z3.Or(z3.And(a.null, b.null),
                             z3.And(z3.Not(a.null), z3.Not(b.null), self.equal(a.inner, b.inner)))
            return z3.And(z3.Not(a.null), self.equal(a.inner, b))
        if isinstance(a, SNull) or isinstance(b, SNull):
            return z3.BoolVal(isinstance(a, SNull) and isinstance(b, SNull))
        if isinstance(a, SBool) and isinstance(b, SBool):
            return a.v == b.v
        if isinstance(a, SInt | SDouble) and isinstance(b, SInt | SDouble):
            if type(a) is not type(b):
                return z3.ToReal(a.v) == z3.ToReal(b.v)
            return a.v == b.v
        if isinstance(a, SStr) and isinstance(b, SStr):
            return a.id == b.id
        if (isinstance(a, STime) and isinstance(b, STime)) or (isinstance(a, SDur) and isinstance(b, SDur)):
            return a.v == b.v
        if isinstance(a, SObj | SList) and type(a) is type(b):
            raise Uncovered("== between objects or lists")
        return FALSE

    def binary(self, op: str, a: Sym, b: Sym, node: cel.Node) -> Value:
        if op == "==":
            return SBool(self.equal(a, b)), FALSE
        if op == "!=":
            return SBool(z3.Not(self.equal(a, b))), FALSE
        if op == "in":
            if not isinstance(b, SList):
                raise Uncovered(cel.show(node))
            return SBool(_or(z3.And(m, self.equal(a, item)) for item, m in zip(b.items, b.members, strict=True))), FALSE
        null_err = FALSE
        if isinstance(a, SNullable):
            null_err = a.null
            a = a.inner
        if isinstance(b, SNullable):
            null_err = z3.Or(null_err, b.null)
            b = b.inner
        if op in ("<", "<=", ">", ">="):
            compare: Callable[[Z, Z], Z] = {"<": lambda x, y: x < y, "<=": lambda x, y: x <= y,
                                            ">": lambda x, y: x > y, ">=": lambda x, y: x >= y}[op]
            if isinstance(a, SInt | SDouble) and isinstance(b, SInt | SDouble):
                x, y = (a.v, b.v) if type(a) is type(b) else (z3.ToReal(a.v), z3.ToReal(b.v))
                return SBool(compare(x, y)), null_err
            if (isinstance(a, STime) and isinstance(b, STime)) or (isinstance(a, SDur) and isinstance(b, SDur)):
                return SBool(compare(a.v, b.v)), null_err
            if isinstance(a, SStr | SBool) and type(a) is type(b):
                raise Uncovered(cel.show(node))
            return SBool(FALSE), TRUE  # no such overload
        if op in ("+", "-"):
            sign = 1 if op == "+" else -1
            if isinstance(a, SInt) and isinstance(b, SInt):
                result = a.v + sign * b.v
                return SInt(result), z3.Or(null_err, result < INT_MIN, result > INT_MAX)
            if isinstance(a, STime) and isinstance(b, SDur):
                result = a.v + sign * b.v
                return STime(result), z3.Or(null_err, result < TS_MIN, result > TS_MAX)
            if op == "+" and isinstance(a, SDur) and isinstance(b, STime):
                result = a.v + b.v
                return STime(result), z3.Or(null_err, result < TS_MIN, result > TS_MAX)
            if op == "-" and isinstance(a, STime) and isinstance(b, STime):
                return SDur(a.v - b.v), null_err
            if isinstance(a, SDur) and isinstance(b, SDur):
                result = a.v + sign * b.v
                return SDur(result), z3.Or(null_err, result < -DURATION_MAX, result > DURATION_MAX)
        raise Uncovered(cel.show(node))

    def call(self, node: cel.Call, scope: Mapping[str, Sym]) -> Value:
        (arg,) = node.args
        if node.name == "duration" and isinstance(arg, cel.Lit) and isinstance(arg.value, str):
            return SDur(z3.IntVal(parse_duration(arg.value))), FALSE
        if node.name == "timestamp" and isinstance(arg, cel.Lit) and isinstance(arg.value, str):
            try:
                moment = datetime.fromisoformat(arg.value.replace("Z", "+00:00"))
            except ValueError:
                raise Uncovered(cel.show(node)) from None
            if moment.microsecond or moment.tzinfo is None:
                raise Uncovered(cel.show(node))
            return STime(z3.IntVal(int(moment.timestamp()))), FALSE
        if node.name == "size":
            value, err = self.encode(arg, scope)
            if isinstance(value, SNullable):
                err = z3.Or(err, value.null)
                value = value.inner
            if isinstance(value, SStr):
                return SInt(self.domain.slen(value.id)), err
            if isinstance(value, SList):
                return SInt(length(value)), err
        raise Uncovered(cel.show(node))

    def macro(self, node: cel.Macro, scope: Mapping[str, Sym]) -> Value:
        target, err = self.encode(node.target, scope)
        if isinstance(target, SNullable):
            err = z3.Or(err, target.null)
            target = target.inner
        if not isinstance(target, SList):
            raise Uncovered(cel.show(node))
        results = [self.encode(node.body, {**scope, node.variable: item}) for item in target.items]
        members = target.members
        if node.kind in ("exists", "all"):
            want = node.kind == "exists"
            bools = [(v.v if isinstance(v, SBool) else FALSE, e if isinstance(v, SBool) else TRUE) for v, e in results]
            hit = _or(z3.And(m, z3.Not(e), v if want else z3.Not(v)) for (v, e), m in zip(bools, members, strict=True))
            failed = z3.And(z3.Not(hit), _or(z3.And(m, e) for (_, e), m in zip(bools, members, strict=True)))
            value = hit if want else z3.And(z3.Not(hit), z3.Not(failed))
            return SBool(value), z3.Or(err, failed)
        failed = _or(z3.And(m, e) for (_, e), m in zip(results, members, strict=True))
        if node.kind == "filter":
            keep = []
            for (v, _), m in zip(results, members, strict=True):
                if not isinstance(v, SBool):
                    raise Uncovered(cel.show(node))
                keep.append(z3.And(m, v.v))
            return SList(target.items, keep), z3.Or(err, failed)
        return SList([v for v, _ in results], members), z3.Or(err, failed)  # map


# --- presence: the engine's missing_field check --------------------------------------------------


def needs_met(value: Sym, rest: FieldPath, optional: bool) -> Z:
    """True when the request carries `rest` below `value` as engine/needs.py's absent_fields requires."""
    if not rest:
        return TRUE
    if isinstance(value, SNullable):
        return z3.Or(value.null, needs_met(value.inner, rest, optional))
    if isinstance(value, SNull):
        return TRUE
    head = rest[0]
    if head == OPTIONAL:
        return needs_met(value, rest[1:], False)
    if head == EACH:
        if not isinstance(value, SList):
            return TRUE
        return _and(z3.Implies(m, needs_met(item, rest[1:], optional))
                    for item, m in zip(value.items, value.members, strict=True))
    if not isinstance(value, SObj):
        return z3.BoolVal(optional)
    try:
        present, child = value.node.field(head)
    except Uncovered:
        return z3.BoolVal(optional)
    return z3.If(present, needs_met(child, rest[1:], optional), z3.BoolVal(optional))


def needs_of(domain: Domain, expr: Expression | None, action: str, role: str | None) -> Z:
    if expr is None:
        return TRUE
    return _and(needs_met(SObj(domain.root), path, OPTIONAL in path) for path in expr.needs_for(action, role))


# --- a version's decision for one (action, role) --------------------------------------------------------


@dataclass
class Condition:
    """One expression of a rule or output, encoded: true, failed, and what it is as CEL."""

    expr: Expression | None
    node: cel.Node | None  # params inlined; None where the text is outside the encoding
    true: Z  # evaluated, no failure, true
    failed: Z
    uncovered: str | None


@dataclass
class RuleModel:
    id: str
    effect: str
    where: str
    applies: Condition | None
    fires: Condition
    needs: Z  # the request carries what this rule needs
    fired: Z
    failed: Z
    passed: Z
    violation: Z  # it denies (fired as deny, or failed: fail closed)
    is_output: bool = False
    denial: Z = None  # the same, as one disjunct of "the version denies" that needs no other rule

    def __post_init__(self) -> None:
        if self.denial is None:
            self.denial = self.violation

    @property
    def uncovered(self) -> list[str]:
        return [c.uncovered for c in (self.applies, self.fires) if c is not None and c.uncovered]

    @property
    def denies(self) -> cel.Node | None:
        """The rule's denial as one CEL tree, or None if outside the encoding."""
        if self.fires.node is None or (self.applies is not None and self.applies.node is None):
            return None
        if self.is_output:
            return None
        return self.fires.node if self.applies is None else cel.And(self.applies.node, self.fires.node)  # type: ignore[arg-type]


@dataclass
class DecisionModel:
    version: PolicyVersion
    action: str
    role: str | None
    rules: list[RuleModel]
    decidable: Z  # no field that an applicable rule needs is missing
    deny: Z

    def decider(self, model: Any) -> str | None:
        """The rule that decides in a solver model (None: allowed)."""
        for rule in self.rules:
            if z3.is_true(model.eval(rule.violation, model_completion=True)):
                return rule.id
        return None

    def uncovered(self) -> list[str]:
        return [u for r in self.rules for u in r.uncovered]


def condition(encoder: Encoder, expr: Expression | None, params: Mapping[str, Any]) -> Condition | None:
    """An expression encoded once per domain (two versions share what they both say)."""
    if expr is None:
        return None
    key = (expr.text, repr(sorted((k, repr(v)) for k, v in params.items() if k in expr.text)))
    found = encoder.domain.encoded.get(key)
    if found is None:
        found = encoder.domain.encoded[key] = _condition(encoder, expr, params)
    return Condition(expr, found.node, found.true, found.failed, found.uncovered)


def _condition(encoder: Encoder, expr: Expression, params: Mapping[str, Any]) -> Condition:
    try:
        node = cel.parse(expr.text, params)
        value, err = encoder.encode(node)
    except Uncovered as exc:
        name = z3.Bool(encoder.domain.name(f"uncovered:{expr.text}"))
        failed = z3.Bool(encoder.domain.name(f"uncovered-failure:{expr.text}"))
        return Condition(expr, None, z3.And(name, z3.Not(failed)), failed, f"{exc} (in `{expr.text}`)")
    if not isinstance(value, SBool):  # a rule's condition must be a boolean: anything else fails
        return Condition(expr, node, FALSE, TRUE, None)
    return Condition(expr, node, z3.And(value.v, z3.Not(err)), err, None)


def value_failure(encoder: Encoder, expr: Expression, params: Mapping[str, Any]) -> Condition:
    """An output's value: only whether it fails matters."""
    try:
        node = cel.parse(expr.text, params)
        _, err = encoder.encode(node)
    except Uncovered as exc:
        failed = z3.Bool(encoder.domain.name(f"uncovered-failure:{expr.text}"))
        return Condition(expr, None, z3.Not(failed), failed, f"{exc} (in `{expr.text}`)")
    return Condition(expr, node, z3.Not(err), err, None)


def decision_model(domain: Domain, version: PolicyVersion, action: str, role: str | None) -> DecisionModel:
    """The decision of `version` for requests of this action and role, over `domain`'s variables."""
    encoder = Encoder(domain)
    params = version.parameters
    rules: list[RuleModel] = []
    needs: list[Z] = []
    for rule in version.rules_for(action, role):
        applies = condition(encoder, rule.applies_when, params)
        fires = condition(encoder, rule.fires_when, params)
        assert fires is not None
        applies_true = TRUE if applies is None else applies.true
        applies_failed = FALSE if applies is None else applies.failed
        need = z3.And(needs_of(domain, rule.applies_when, action, role),
                      z3.Implies(applies_true, needs_of(domain, rule.fires_when, action, role)))
        needs.append(need)
        fired = z3.And(applies_true, fires.true)
        failed = z3.Or(applies_failed, z3.And(applies_true, fires.failed))
        passed = z3.And(applies_true, z3.Not(fires.true), z3.Not(fires.failed))
        violation = z3.Or(failed, fired) if rule.effect == "deny" else failed
        rules.append(RuleModel(rule.id, rule.effect, rule.where, applies, fires, need, fired, failed, passed,
                               violation))
    any_rule = _or(r.violation for r in rules)
    output_needs: list[Z] = []
    for output in version.outputs_for(action, role):
        applies = condition(encoder, output.applies_when, params)
        value = value_failure(encoder, output.value, params)
        applies_true = TRUE if applies is None else applies.true
        failed = z3.Or(FALSE if applies is None else applies.failed, z3.And(applies_true, value.failed))
        need = z3.And(needs_of(domain, output.applies_when, action, role),
                      z3.Implies(applies_true, needs_of(domain, output.value, action, role)))
        output_needs.append(need)
        where = f"{output.location.file}:{output.location.line}"
        rules.append(RuleModel(f"output.{output.name}", "deny", where, applies, value, need, FALSE, failed,
                               FALSE, z3.And(z3.Not(any_rule), failed), is_output=True))
    decidable = z3.And(_and(needs), z3.Implies(z3.Not(any_rule), _and(output_needs)))
    for output_model in rules:
        if output_model.is_output:  # outputs run only when no rule denies: their fields are there then
            output_model.denial = z3.And(output_model.failed, _and(output_needs))
    return DecisionModel(version, action, role, rules, decidable, _or(r.violation for r in rules))


def contexts(*versions: PolicyVersion) -> list[tuple[str, str | None, bool]]:
    """The (action, role, any_role) to prove; with any_role, role is free: no rule looks at it."""
    schema = load_schema("request")
    needs_role = set()
    for part in schema.get("allOf", ()):
        allowed = part["if"]["properties"]["action"]
        if "role" in part["then"].get("required", ()):
            needs_role.update(allowed.get("enum", [allowed.get("const")]))
    actions: dict[str, bool] = {}
    for version in versions:
        entries: list[Rule | Output] = [*version.rules, *version.outputs]
        for entry in entries:
            texts = [e.text for e in (entry.applies_when, getattr(entry, "fires_when", None),
                                      getattr(entry, "value", None)) if e is not None]
            by_role = entry.roles is not None or any(re.search(r"\brole\b", t) for t in texts)
            for action in entry.actions:
                actions[action] = actions.get(action, False) or by_role
    out: list[tuple[str, str | None, bool]] = []
    for action in sorted(actions):
        if action in needs_role:
            out += [(action, "official", False), (action, "channel", False)]
        elif actions[action]:
            out += [(action, None, False), (action, "official", False), (action, "channel", False)]
        else:
            out.append((action, None, True))
    return out


def pin_context(domain: Domain, action: str, role: str | None, free_role: bool) -> None:
    """Fix the request's action (and role) for one context."""
    _, value = domain.root.field("action")
    assert isinstance(value, SStr)
    domain.constraints.append(value.id == domain.intern(action))
    present, role_value = domain.root.field("role")
    assert isinstance(role_value, SStr)
    if role is not None:
        domain.constraints += [present, role_value.id == domain.intern(role)]
    elif not free_role:
        domain.constraints.append(z3.Not(present))
    at_present, at = domain.root.field("at")
    domain.constraints.append(at_present)  # always sent in a witness
    assert isinstance(at, STime)
    domain.preferences.append(at.v == int(datetime(2025, 7, 1, tzinfo=UTC).timestamp()))


def list_bound(*versions: PolicyVersion) -> int:
    """One more than every integer that a list's size is compared with in the policies (at least 4)."""
    schema = load_schema("request")
    walker = SchemaWalker(schema)
    most = 3

    def is_list(node: cel.Node) -> bool:
        if isinstance(node, cel.Macro):
            return node.kind in ("filter", "map")
        path: list[str] = []
        while isinstance(node, cel.Select):
            path.insert(0, node.field)
            node = node.base
        if not isinstance(node, cel.Var) or node.name not in schema["properties"]:
            return False
        found: Schema | None = schema
        for name in [node.name, *path]:
            found = walker.child(found, name) if found is not None else None
        return found is not None and "array" in walker.types(found)

    def visit(node: cel.Node) -> None:
        nonlocal most
        if isinstance(node, cel.Binary) and node.op in ("<", "<=", ">", ">=", "==", "!="):
            for side, other in ((node.left, node.right), (node.right, node.left)):
                if isinstance(side, cel.Call) and side.name == "size" and is_list(side.args[0]) \
                        and isinstance(other, cel.Lit) and type(other.value) is int:
                    most = max(most, other.value)
        for child in vars(node).values():
            for item in child if isinstance(child, tuple) else (child,):
                if isinstance(item, cel.Node):
                    visit(item)

    for version in versions:
        entries: list[Rule | Output] = [*version.rules, *version.outputs]
        for entry in entries:
            for expr in (entry.applies_when, getattr(entry, "fires_when", None), getattr(entry, "value", None)):
                if expr is not None and "size" in expr.text:
                    try:
                        visit(cel.parse(expr.text, version.parameters))
                    except Uncovered:
                        continue
    return most + 1
