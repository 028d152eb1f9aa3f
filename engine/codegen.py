"""Each decision path, (version, action, role), written out at load as one Python function and compiled once.

The function holds, in policy order, every rule and output that applies to the path: the
presence checks of the fields they need, the reads (and conversions) of only the fields they
read, each condition as inline Python with CEL's semantics, the findings, the outputs and the
Decision. `bindpolicy compile --show VERSION ACTION [ROLE]` prints it.

What the generator writes inline is CEL's meaning on the values a checked request can hold:
a comparison is written as Python's own operator only where the operand types (known from the
request schema, the literals and the parameters) make both agree; elsewhere it calls the
native runtime's helpers (engine/native.py). An expression it cannot write calls the
expression's native closure, and says so in a comment. Three ways out, all explicit:
- a CEL error on the fast path (a null where an object was read, a value of the wrong type,
  an error that `&&` or `||` may absorb): that one rule or output is judged again by its native
  closures, which give CEL's exact answer (`_again_rule`, `_again_output` below);
- a field that the rules need and the request lacks: the function returns None, and the
  evaluator's field-by-field accounting names every missing field (the request is refused);
- Defer from a helper, or any other exception (a bug of the generator): raised to the caller,
  which counts it and decides with the evaluator (engine/decider.py).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from difflib import SequenceMatcher
from functools import cached_property
from types import CodeType
from typing import Any, NamedTuple, cast

from lark import Token, Tree

from engine import native
from engine.evaluator import to_json
from engine.messages import CHINESE, DEFAULT_LANGUAGE, LANGUAGES, PARAMS_ROOT
from engine.model import EACH, OPTIONAL, Decision, Expression, FieldPath, Finding, NeedsPlan, Output, Rule
from engine.native import CelError, Unsupported
from engine.schemas import Schema, SchemaWalker
from engine.versions import format_timestamp, parse_timestamp

SAFE_INTEGER = 2**53  # beyond it int and double comparisons part ways (native compares as doubles)
NONE = type(None)
Kinds = frozenset[type] | None  # the Python types a value may have; None: any
BOOL: frozenset[type] = frozenset({bool})
NUMBERS: frozenset[type] = frozenset({int, float})
_ORDERED_ALIKE = (frozenset({str}), frozenset({datetime}), frozenset({timedelta}))
_CONVERSION_KINDS: dict[str, Kinds] = {
    "duration": frozenset({timedelta}), "timestamp": frozenset({datetime}), "int": frozenset({int}),
    "double": frozenset({float}), "string": frozenset({str}), "bool": BOOL}
_ARITHMETIC = {"addition_add": "_add", "addition_sub": "_sub", "multiplication_mul": "_mul",
               "multiplication_div": "_div", "multiplication_mod": "_mod"}
_ORDER = {"relation_lt": ("<", "_lt"), "relation_le": ("<=", "_le"), "relation_gt": (">", "_gt"),
          "relation_ge": (">=", "_ge")}
_TRANSPARENT = frozenset({"expr", "conditionalor", "conditionaland", "relation", "addition", "multiplication",
                          "unary", "member", "primary", "paren_expr"})


class NotInline(Exception):
    """The generator does not write this expression inline: it calls its native closure."""


@dataclass(frozen=True)
class GeneratedPath:
    """One decision path as Python source and the function compiled from it."""

    action: str
    role: str | None
    source: str
    function: Callable[..., Decision | None]
    native_calls: int  # expressions left to their native closures (zero for the bundled policies)
    # what it was written from: to write it again as its verdict (on first use), or as one joint
    # verdict with another version's path (joint_verdict)
    inputs: PathInputs | None = field(default=None, repr=False, compare=False)

    @cached_property
    def verdict(self) -> Callable[[dict[str, Any], datetime], Verdict | tuple[()] | None]:
        """The path's decision and deciding rule only, `verdict(request, at)`: ('allow', None) or
        ('deny', rule id), or where `function` returns None, LACKING if it hands over for a field
        the rules need that is missing (Engine.decide then refuses the request as missing_field),
        None for any other reason (and it raises where `function` raises). No Decision, no
        messages, no output formatted (an output is still evaluated on an allowed request: one
        that fails denies); on a request with every field the path may read, it returns at the
        first denial (what follows cannot change the first). Written on first use (what
        `bindpolicy impact` calls): loading writes only `function`."""
        if self.inputs is None:
            raise ValueError(f"the path of {self.action!r}, {self.role!r} was not generated to be written again")
        written = generate_path(*self.inputs, verdict=True)
        return cast(Callable[[dict[str, Any], datetime], "Verdict | tuple[()] | None"], written.function)


class PathInputs(NamedTuple):
    """What generate_path writes a path from (its arguments, in order)."""

    version_name: str
    digest: str
    action: str
    role: str | None
    rules: tuple[Rule, ...]
    outputs: tuple[Output, ...]
    plan: NeedsPlan
    schema: Schema
    params: Mapping[str, Any]
    helpers: Mapping[str, Any]
    memo: GenerationMemo | None


@dataclass(frozen=True)
class _Code:
    text: str
    kinds: Kinds
    raw: bool = False  # an object or list as the request holds it (timestamps unparsed): only null-tested


class _Namespace:
    """The constants and callables a generated module refers to, by the names it gives them.

    The paths of one version draw their names from one pool (`shared`): an expression written
    once reads the same names in every path it is copied into; each path's module gets only the
    names its own source reads (`values`)."""

    def __init__(self, shared: _Namespace | None = None) -> None:
        self.values: dict[str, Any] = {}
        self._by_id: dict[int, str] = {}
        self.shared = shared
        self.taken: list[str] | None = None  # while an expression is written: the names it reads

    def add(self, value: Any, prefix: str = "_k") -> str:
        if self.shared is not None:
            pooled = self.shared.add(value, prefix)
            self.use(pooled)
            return pooled
        name = self._by_id.get(id(value))
        if name is None:
            name = f"{prefix}{len(self.values)}"
            self.values[name] = value
            self._by_id[id(value)] = name
        return name

    def use(self, name: str) -> None:
        """Bring a name of the pool into this module."""
        assert self.shared is not None
        self.values[name] = self.shared.values[name]
        if self.taken is not None:
            self.taken.append(name)


def _unwrap(tree: Any) -> Any:
    while isinstance(tree, Tree) and len(tree.children) == 1 and tree.data in _TRANSPARENT:
        tree = tree.children[0]
    return tree


def _args(node: Any) -> list[Any]:
    return list(node.children) if isinstance(node, Tree) else []


def _literal_text(value: Any) -> str | None:
    """Python source for a constant, where repr is exact; None where it must be a named constant."""
    if value is None or type(value) in (bool, str):
        return repr(value)
    if type(value) is int and -SAFE_INTEGER <= value <= SAFE_INTEGER:
        return repr(value)
    if type(value) is float and value == value and value not in (float("inf"), float("-inf")):
        return repr(value)
    return None


def _kinds_of(value: Any) -> Kinds:
    if type(value) is int and not -SAFE_INTEGER <= value <= SAFE_INTEGER:
        return None
    return frozenset({type(value)})


class _ExpressionWriter:
    """Writes one CEL expression of a path as a Python expression over `request` and `at`."""

    def __init__(self, path: _PathWriter, expr: Expression) -> None:
        self.path = path
        self.expr = expr
        self.scope: dict[str, tuple[str, FieldPath, Schema]] = {}  # loop variable -> (local, path, item schema)
        # Paths the presence checks guarantee (has()-guarded prefixes only where has() said so).
        self.present: set[FieldPath] = set()
        for need in expr.needs_for(path.action, path.role):
            plain = tuple(p for p in need if p != OPTIONAL)
            for depth in range(1, len(plain) + 1):
                self.present.add(plain[:depth])

    # --- entry points ---

    def condition(self) -> str:
        code = self.write(self.expr.tree)
        return code.text if code.kinds == BOOL else f"_bool({code.text})"

    def value(self) -> str:
        code = self.write(self.expr.tree)
        if code.kinds is not None and code.kinds <= {str, bool, NONE}:
            return code.text
        if code.kinds == frozenset({datetime}):
            return f"_format_timestamp({code.text})"
        return f"_to_json({code.text})"

    # --- nodes ---

    def write(self, tree: Any, mode: str = "value") -> _Code:
        """`mode`: value (as CEL sees it), compare (numbers as they came), container (read, not copied)."""
        node = _unwrap(tree)
        folded = self.constant(node)
        if folded is not _NO_CONSTANT:
            return self.const(folded)
        if isinstance(node, Token):
            raise NotInline(f"token {node!r}")
        kind, kids = str(node.data), node.children
        if kind == "paren_expr":
            return self.write(kids[0], mode)
        if kind == "expr" and len(kids) == 3:
            return self.ternary(*kids)
        if kind in ("conditionalor", "conditionaland") and len(kids) == 2:
            return self.logical(kind == "conditionalor", kids[0], kids[1])
        if kind == "unary" and len(kids) == 2:
            operand = self.write(kids[1])
            if kids[0].data == "unary_not":
                text = operand.text if operand.kinds == BOOL else f"_bool({operand.text})"
                return _Code(f"(not {text})", BOOL)
            return _Code(f"_negate({operand.text})", operand.kinds if operand.kinds and
                         operand.kinds <= NUMBERS | {timedelta} else None)
        if kind == "relation" and len(kids) == 2:
            return self.relation(str(kids[0].data), kids[0].children[0], kids[1])
        if kind in ("addition", "multiplication") and len(kids) == 2:
            return self.arithmetic(str(kids[0].data), kids[0].children[0], kids[1])
        if kind in ("member_dot", "ident"):
            return self.read(node, mode)
        if kind == "member_dot_arg":
            return self.method(node, mode)
        if kind == "ident_arg":
            return self.function(node)
        if kind == "member_index" and len(kids) == 2:
            base, index = self.write(kids[0]), self.write(kids[1])
            return _Code(f"_index({base.text}, {index.text})", None)
        if kind == "list_lit":
            items = [self.write(k) for k in _args(kids[0] if kids else None)]
            return _Code("[" + ", ".join(i.text for i in items) + "]", frozenset({list}))
        raise NotInline(f"CEL construct {kind!r}")

    def const(self, value: Any) -> _Code:
        text = _literal_text(value)
        if text is None:
            text = self.path.names.add(value)
        return _Code(text, _kinds_of(value))

    def constant(self, node: Any) -> Any:
        """The value of a subtree that reads only literals, `params` and the path's action and role."""
        if isinstance(node, Token):
            try:
                return native.literal_value(node)
            except Unsupported:
                return _NO_CONSTANT
        known = {"params", "action"} | ({"role"} if self.path.role is not None else set())
        names = self.names_below(node)
        if not names <= known or names & set(self.scope):
            return _NO_CONSTANT
        # The value depends on the parameters (one version's, shared by its paths) and on the
        # action and role only where the subtree reads them: worked out once per such key.
        key = (id(node), self.path.action if "action" in names else None, self.path.role if "role" in names else None)
        return self.path.memo.constant(key, node, lambda: self._fold(node))

    def _fold(self, node: Tree[Any]) -> Any:
        try:
            return native.compile_native(node)(self.path.facts)
        except (CelError, native.Defer, Unsupported):
            return _NO_CONSTANT

    def names_below(self, node: Tree[Any]) -> frozenset[str]:
        """The identifiers a subtree reads, worked out for the whole tree in one pass, once."""
        known = self.path.memo.idents(self.expr.tree).get(id(node))
        if known is None:  # a node outside the expression's tree: looked at on its own
            known = frozenset(str(s.children[0]) for s in node.iter_subtrees() if s.data == "ident")
        return known

    def ternary(self, condition: Any, when_true: Any, when_false: Any) -> _Code:
        known = self.constant(_unwrap(condition))
        if known is True or known is False:  # the action or role decides it: only that branch is read
            return self.write(when_true if known else when_false)
        test = self.write(condition)
        yes, no = self.write(when_true), self.write(when_false)
        text = test.text if test.kinds == BOOL else f"_bool({test.text})"
        kinds = yes.kinds | no.kinds if yes.kinds is not None and no.kinds is not None else None
        return _Code(f"({yes.text} if {text} else {no.text})", kinds)

    def logical(self, is_or: bool, left_tree: Any, right_tree: Any) -> _Code:
        """CEL's && and ||, written as Python's where both sides are booleans. An error on the left
        that the right would absorb is a CEL error here: the closures judge the rule again."""
        left, right = self.write(left_tree), self.write(right_tree)
        left_value = self.constant(_unwrap(left_tree))
        right_value = self.constant(_unwrap(right_tree))
        for value, other in ((left_value, right), (right_value, left)):
            if value is is_or:  # true decides an or, false decides an and, whatever the other side
                return _Code(repr(is_or), BOOL)
            if value is (not is_or):
                return _Code(other.text if other.kinds == BOOL else f"_bool({other.text})", BOOL)
        parts = [c.text if c.kinds == BOOL else f"_bool({c.text})" for c in (left, right)]
        return _Code(f"({parts[0]} {'or' if is_or else 'and'} {parts[1]})", BOOL)

    def relation(self, operator: str, left_tree: Any, right_tree: Any) -> _Code:
        if operator in ("relation_eq", "relation_ne"):
            left, right = self.write(left_tree, "compare"), self.write(right_tree, "compare")
            equal = operator == "relation_eq"
            for one, other in ((left, right), (right, left)):
                if one.text == "None":  # x == null: only null equals null
                    return _Code(f"({other.text} is {'' if equal else 'not '}None)", BOOL)
            if left.raw or right.raw:
                raise NotInline("an object or list compared whole")
            if _plain_equality(left.kinds, right.kinds):
                return _Code(f"({left.text} {'==' if equal else '!='} {right.text})", BOOL)
            return _Code(f"{'_eq' if equal else '_ne'}({left.text}, {right.text})", BOOL)
        if operator in _ORDER:
            left, right = self.write(left_tree, "compare"), self.write(right_tree, "compare")
            symbol, helper = _ORDER[operator]
            if left.raw or right.raw:
                raise NotInline("an object or list compared whole")
            if _plain_order(left.kinds, right.kinds):
                return _Code(f"({left.text} {symbol} {right.text})", BOOL)
            return _Code(f"{helper}({left.text}, {right.text})", BOOL)
        if operator == "relation_in":
            item = self.write(left_tree, "compare")
            if item.raw:
                raise NotInline("an object or list looked for whole")
            container_value = self.constant(_unwrap(right_tree))
            if (item.kinds == frozenset({str}) and type(container_value) is list
                    and all(type(v) is str for v in container_value)):
                return _Code(f"({item.text} in {self.path.names.add(frozenset(container_value), '_set')})", BOOL)
            container = self.write(right_tree)
            return _Code(f"_in({item.text}, {container.text})", BOOL)
        raise NotInline(f"operator {operator}")

    def arithmetic(self, operator: str, left_tree: Any, right_tree: Any) -> _Code:
        helper = _ARITHMETIC.get(operator)
        if helper is None:
            raise NotInline(f"operator {operator}")
        left, right = self.write(left_tree), self.write(right_tree)
        kinds: Kinds = None
        if left.kinds is not None and right.kinds is not None and len(left.kinds) == len(right.kinds) == 1:
            a, b = next(iter(left.kinds)), next(iter(right.kinds))
            if (a is b and a in (int, float, timedelta)) or (a is b is str and helper == "_add"):
                kinds = left.kinds
            elif a is datetime and b is datetime and helper == "_sub":
                kinds = frozenset({timedelta})
            elif {a, b} == {datetime, timedelta} and helper in ("_add", "_sub"):
                kinds = frozenset({datetime})
        return _Code(f"{helper}({left.text}, {right.text})", kinds)

    def function(self, node: Tree[Any]) -> _Code:
        name = str(node.children[0])
        args = _args(node.children[1] if len(node.children) > 1 else None)
        if name == "has" and len(args) == 1:
            target = _unwrap(args[0])
            if not (isinstance(target, Tree) and target.data == "member_dot"):
                raise NotInline("has() of something other than a field")
            base = self.write(target.children[0], "container")
            field_name = str(target.children[1])
            if base.kinds == frozenset({dict}):
                return _Code(f"({field_name!r} in {base.text})", BOOL)
            return _Code(f"_has({base.text}, {field_name!r})", BOOL)
        if name == "size" and len(args) == 1:
            return self.size(args[0])
        if name in _CONVERSION_KINDS and len(args) == 1:
            operand = self.write(args[0])
            return _Code(f"{self.path.names.add(native._CONVERSIONS[name], '_to_')}({operand.text})",
                         _CONVERSION_KINDS[name])
        raise NotInline(f"function {name}()")

    def size(self, tree: Any) -> _Code:
        node = _unwrap(tree)
        if isinstance(node, Tree) and node.data == "member_dot_arg" and str(node.children[1]) == "filter":
            return self.count(node)
        operand = self.write(tree, "container")
        if operand.kinds is not None and len(operand.kinds) == 1 and next(iter(operand.kinds)) in (str, list, dict):
            return _Code(f"len({operand.text})", frozenset({int}))
        return _Code(f"_size({operand.text})", frozenset({int}))

    def method(self, node: Tree[Any], mode: str) -> _Code:
        target, name = node.children[0], str(node.children[1])
        args = _args(node.children[2] if len(node.children) > 2 else None)
        if name == "size" and not args:
            return self.size(target)
        if name in ("exists", "all") and len(args) == 2:
            with self.loop(target, args[0]) as (local, items):
                body = self.write(args[1])
                test = body.text if body.kinds == BOOL else f"_bool({body.text})"
            return _Code(f"{'any' if name == 'exists' else 'all'}({test} for {local} in {items})", BOOL)
        if name in ("startsWith", "endsWith", "contains") and len(args) == 1:
            text, other = self.write(target), self.write(args[0])
            if text.kinds == frozenset({str}) and other.kinds == frozenset({str}):
                if name == "contains":
                    return _Code(f"({other.text} in {text.text})", BOOL)
                return _Code(f"{text.text}.{name.lower()}({other.text})", BOOL)
        raise NotInline(f"method .{name}()")

    def count(self, node: Tree[Any]) -> _Code:
        """`list.filter(x, p).size()`: how many items pass, without building the list."""
        args = _args(node.children[2] if len(node.children) > 2 else None)
        if len(args) != 2:
            raise NotInline("filter() with other than two arguments")
        with self.loop(node.children[0], args[0]) as (local, items):
            body = self.write(args[1])
            test = body.text if body.kinds == BOOL else f"_bool({body.text})"
        return _Code(f"sum(1 for {local} in {items} if {test})", frozenset({int}))

    def loop(self, target: Any, variable: Any) -> _Loop:
        items = self.write(target, "container")
        if items.kinds != frozenset({list}):
            raise NotInline("a macro over something other than a list")
        name_node = _unwrap(variable)
        if not (isinstance(name_node, Tree) and name_node.data == "ident"):
            raise NotInline("a macro without a loop variable")
        path = self.path_of(target)
        schema = self.path.walker.child(self.schema_of(path), EACH) if path is not None else None
        if path is None or schema is None:
            raise NotInline("a macro over a list that is not a request field")
        return _Loop(self, str(name_node.children[0]), items.text, (*path, EACH), schema)

    # --- reads ---

    def path_of(self, tree: Any) -> FieldPath | None:
        """The request path a chain reads (through loop variables), or None."""
        node = _unwrap(tree)
        names: list[str] = []
        while isinstance(node, Tree) and node.data == "member_dot":
            names.append(str(node.children[1]))
            node = _unwrap(node.children[0])
        if not (isinstance(node, Tree) and node.data == "ident"):
            return None
        root = str(node.children[0])
        if root in self.scope:
            return (*self.scope[root][1], *reversed(names))
        if root in self.path.variables:
            return (root, *reversed(names))
        return None

    def schema_of(self, path: FieldPath) -> Schema:
        schema: Schema | None = self.path.schema
        for segment in path:
            schema = self.path.walker.child(schema, segment) if schema is not None else None
        if schema is None:
            raise NotInline(f"{'.'.join(path)} is not in the request schema")
        return schema

    def read(self, node: Tree[Any], mode: str) -> _Code:
        names: list[str] = []
        while isinstance(node, Tree) and node.data == "member_dot":
            names.append(str(node.children[1]))
            node = _unwrap(node.children[0])
        if not (isinstance(node, Tree) and node.data == "ident"):
            base = self.write(node, "container")  # a field of something computed: the helper checks it
            text = base.text
            for name in reversed(names):
                text = f"_step({text}, {name!r})"
            return _Code(text, None)
        root = str(node.children[0])
        names.reverse()
        if root in self.scope:
            text, path, schema = self.scope[root]
        elif root == "at" and not names:
            return _Code("at", frozenset({datetime}))
        elif root in self.path.variables:
            path, schema = (root,), self.schema_of((root,))
            if root in self.path.required_at_top:  # read once, at the top of the function
                self.path.hoist(root)
                text = f"_{root}"
            else:
                text = f"request[{root!r}]" if path in self.present else f"_step(request, {root!r})"
        else:
            raise NotInline(f"the name {root!r}")
        for name in names:
            child = self.path.walker.child(schema, name)
            if child is None:
                raise NotInline(f"{'.'.join((*path, name))} is not in the request schema")
            parent_is_object = self.path.types(schema) == {"object"} and not self.path.nullable(schema)
            path = (*path, name)
            text = f"{text}[{name!r}]" if parent_is_object and path in self.present else f"_step({text}, {name!r})"
            schema = child
        return self.finish(text, schema, mode)

    def finish(self, text: str, schema: Schema, mode: str) -> _Code:
        """A read value as CEL sees it: timestamps parsed, numbers as their schema types say."""
        types = self.path.types(schema)
        nullable = {NONE} if self.path.nullable(schema) else set()
        if types == {"timestamp"} or types == {"timestamp", "string"}:
            return _Code(f"_timestamp({text})", frozenset({datetime, *nullable}))
        if types == {"string"}:
            return _Code(text, frozenset({str, *nullable}))
        if types == {"boolean"}:
            return _Code(text, frozenset({bool, *nullable}))
        if types <= {"integer", "number"} and types:
            bounded = all(abs(schema.get(k, SAFE_INTEGER + 1)) <= SAFE_INTEGER for k in ("minimum", "maximum"))
            if mode == "compare" and bounded:
                return _Code(text, frozenset({int, float, *nullable}))
            convert = "_as_int" if types == {"integer"} else "_as_double"
            kind = int if types == {"integer"} else float
            return _Code(f"{convert}({text})", frozenset({kind, *nullable}) if bounded else None)
        if types in ({"object"}, {"array"}) and mode in ("container", "compare"):
            return _Code(text, frozenset({dict if types == {"object"} else list, *nullable}),
                         raw=mode == "compare" and self.path.converts(schema))
        if types in ({"object"}, {"array"}) and not self.path.converts(schema):
            return _Code(text, frozenset({dict if types == {"object"} else list, *nullable}))
        raise NotInline("a whole object or list that holds values to convert")


class _Loop:
    """A macro's loop variable in scope while its body is written."""

    def __init__(self, writer: _ExpressionWriter, variable: str, items: str, path: FieldPath,
                 schema: Schema) -> None:
        self.writer, self.variable, self.items = writer, variable, items
        self.local = f"_{variable}{len(writer.scope) + 1}"
        self.entry = (self.local, path, schema)
        self.saved: tuple[str, FieldPath, Schema] | None = None

    def __enter__(self) -> tuple[str, str]:
        self.saved = self.writer.scope.get(self.variable)
        self.writer.scope[self.variable] = self.entry
        return self.local, self.items

    def __exit__(self, *exc: object) -> None:
        if self.saved is None:
            del self.writer.scope[self.variable]
        else:
            self.writer.scope[self.variable] = self.saved


_NO_CONSTANT = object()


def _plain_equality(a: Kinds, b: Kinds) -> bool:
    """Python's == is CEL's for these operand types (no containers, no bool against a number)."""
    if a is None or b is None or {list, dict} & (a | b):
        return False
    scalars = {bool, int, float, str, datetime, timedelta, NONE}
    if not (a <= scalars and b <= scalars):
        return False
    return not ((bool in a and b & NUMBERS) or (bool in b and a & NUMBERS))


def _plain_order(a: Kinds, b: Kinds) -> bool:
    """Python's < is CEL's for these operand types (and neither can be null or another type)."""
    if a is None or b is None:
        return False
    if a <= NUMBERS and b <= NUMBERS:
        return True
    return any(a == same and b == same for same in _ORDERED_ALIKE)


class GenerationMemo:
    """What the writers of one version's paths work out once and share: the identifiers under
    every subtree of an expression, and the folded value of each constant subtree (under the
    version's parameters, and the action and role where the subtree reads them). An expression
    belongs to up to every path of its actions and roles: without it, each path walked it again."""

    def __init__(self) -> None:
        self._idents: dict[int, tuple[Any, dict[int, frozenset[str]]]] = {}
        self._constants: dict[tuple[int, str | None, str | None], tuple[Any, Any]] = {}
        self._findings: dict[int, tuple[Rule, dict[str, Finding]]] = {}
        self.names = _Namespace()  # the pool the paths' names come from
        self.written: dict[tuple[Any, ...], _Written] = {}  # see _PathWriter.expression
        self._code: dict[str, CodeType] = {}  # see code

    def sharing(self, names: _Namespace) -> GenerationMemo:
        """A memo drawing its names from another pool (a joint verdict's) that shares this one's
        walks and folded constants (the same version's, worked out at load), not its texts
        written (they read this pool's names)."""
        memo = GenerationMemo()
        memo._idents, memo._constants, memo._findings = self._idents, self._constants, self._findings
        memo.names = names
        return memo

    def idents(self, tree: Any) -> dict[int, frozenset[str]]:
        """id(subtree) -> the identifiers read under it, for every subtree of `tree`."""
        held = self._idents.get(id(tree))
        if held is None:
            found: dict[int, frozenset[str]] = {}
            # Children before their parents (a pre-order walked backwards), without recursion (deep
            # expressions stay within the stack); a node of one child (most: the grammar's chains
            # of wrappers) shares its child's set.
            # An ident's only child is its name (a Token); a leaf (a literal) reads nothing.
            order: list[Tree[Any]] = []
            stack: list[Any] = [tree] if isinstance(tree, Tree) else []
            while stack:
                node = stack.pop()
                order.append(node)
                children = node.children
                if len(children) == 1:
                    if isinstance(children[0], Tree):
                        stack.append(children[0])
                else:
                    stack.extend([child for child in children if isinstance(child, Tree)])
            nothing: frozenset[str] = frozenset()
            for node in reversed(order):
                children = node.children
                if len(children) == 1:
                    child = children[0]
                    if isinstance(child, Tree):
                        found[id(node)] = found[id(child)]
                    elif node.data == "ident":
                        found[id(node)] = frozenset((str(child),))
                    else:
                        found[id(node)] = nothing
                else:
                    found[id(node)] = nothing.union(*[found[id(child)] for child in children
                                                      if isinstance(child, Tree)])
            held = self._idents[id(tree)] = (tree, found)  # the tree is held: its ids stay its own
        return held[1]

    def findings(self, rule: Rule, make: Callable[[], dict[str, Finding]]) -> dict[str, Finding]:
        """A rule's findings whose messages read no request field, rendered once per version."""
        held = self._findings.get(id(rule))
        if held is None:
            held = self._findings[id(rule)] = (rule, make())
        return held[1]

    def code(self, lines: list[str], signature: str, function: str, where: str) -> CodeType:
        """A path's module compiled once per distinct text, its role aside: the paths of an action
        whose expressions do not read the role (most) differ only in the function's name and the
        header comment, and Python's compiler takes a fifth of a large load. The code object is
        the same; exec'd in each path's own namespace it binds that path's names and constants,
        and its functions are renamed to the path's own (name and file of tracebacks)."""
        header, at = lines[0], lines.index(signature)
        lines[0], lines[at] = "#", signature.replace(function, _GENERIC_FUNCTION, 1)
        try:
            key = "\n".join(lines)
        finally:
            lines[0], lines[at] = header, signature
        held = self._code.get(key)
        if held is None:
            held = self._code[key] = compile(key, where, "exec")
        return _renamed(held, function, where)

    def constant(self, key: tuple[int, str | None, str | None], node: Any, fold: Callable[[], Any]) -> Any:
        held = self._constants.get(key)
        if held is None:
            held = self._constants[key] = (node, fold())
        return held[1]


_GENERIC_FUNCTION = "_path_function"  # the path function's name in the text compiled (GenerationMemo.code)


def _renamed(code: CodeType, function: str, where: str) -> CodeType:
    """A compiled path module with its function named `function`, and every code object's file `where`."""
    consts = tuple(_renamed(c, function, where) if isinstance(c, CodeType) else c for c in code.co_consts)
    if code.co_name == _GENERIC_FUNCTION:
        return code.replace(co_consts=consts, co_filename=where, co_name=function, co_qualname=function)
    names = tuple(function if n == _GENERIC_FUNCTION else n for n in code.co_names)
    return code.replace(co_consts=consts, co_filename=where, co_names=names)


class _PathWriter:
    """Writes the module source of one (version, action, role)."""

    def __init__(self, version_name: str, action: str, role: str | None, schema: Schema,
                 params: Mapping[str, Any], memo: GenerationMemo | None = None) -> None:
        self.memo = memo if memo is not None else GenerationMemo()
        self.version_name, self.action, self.role = version_name, action, role
        self.schema = schema
        self.walker = SchemaWalker(schema)
        self.variables = frozenset(schema["properties"])
        self.facts = {"params": dict(params), "action": action, **({"role": role} if role is not None else {})}
        self.names = _Namespace(self.memo.names)
        self.native_calls = 0
        self.required_at_top: set[str] = set()  # fields the schema requires of this action
        self.hoisted: set[str] = set()  # those read: bound to locals first
        self.hoisting: set[str] | None = None  # while an expression is written: those it reads
        self._types: dict[int, set[str]] = {}

    def hoist(self, name: str) -> None:
        """A field the action requires, read by the expression being written: bound once, first."""
        self.hoisted.add(name)
        if self.hoisting is not None:
            self.hoisting.add(name)

    def types(self, schema: Schema) -> set[str]:
        return self.walker.types(schema)

    def nullable(self, schema: Schema) -> bool:
        resolved = self.walker.resolve(schema)
        branches = resolved.get("oneOf") or resolved.get("anyOf") or [resolved]
        for branch in branches:
            branch = self.walker.resolve(branch)
            kind = branch.get("type")
            if kind == "null" or (isinstance(kind, list) and "null" in kind) or None in branch.get("enum", ()):
                return True
        return False

    def converts(self, schema: Schema) -> bool:
        """True if values of this schema, or within it, differ as native values (timestamps, numbers)."""
        types = self.types(schema)
        if types & {"timestamp", "integer", "number"}:
            return True
        children = [self.walker.child(schema, name) for name in self.walker.fields(schema)]
        items = self.walker.child(schema, EACH)
        return any(self.converts(c) for c in [*children, items] if c is not None)

    def expression(self, expr: Expression, as_condition: bool) -> tuple[str, str]:
        """(Python source, a note): the expression inline, or a call of its native closure.

        Written once per version for every path where it reads the same: the text depends on
        the action (the fields it requires, the constants that read it), on the role only where
        the expression reads it, and on the fields its presence checks guarantee."""
        needs = expr.needs_for(self.action, self.role)
        reads_role = "role" in expr.identifiers  # from the parse: no walk of the tree here
        key = (id(expr), as_condition, self.action, self.role if reads_role else "*", needs)
        written = self.memo.written.get(key)
        if written is None:
            self.names.taken, self.hoisting, calls_before = [], set(), self.native_calls
            try:
                text, note = self._write(expr, as_condition)
                written = _Written(expr, text, note, tuple(self.names.taken), frozenset(self.hoisting),
                                   self.native_calls - calls_before)
            finally:
                self.names.taken = self.hoisting = None
            self.memo.written[key] = written
            return text, note
        for name in written.names:
            self.names.use(name)
        self.hoisted |= written.hoisted
        self.native_calls += written.native_calls
        return written.text, written.note

    def _write(self, expr: Expression, as_condition: bool) -> tuple[str, str]:
        writer = _ExpressionWriter(self, expr)
        try:
            if expr.tree is None:
                raise NotInline("no parse tree")
            return (writer.condition() if as_condition else writer.value()), ""
        except NotInline as exc:
            self.native_calls += 1
            closure = self.names.add(expr.native, "_native")
            call = f"{closure}(_activation(request, at))"
            note = f"  # the native closure: {exc}"
            if as_condition:
                return f"_bool({call})", note
            return f"_to_json({call})", note


@dataclass(frozen=True)
class _Written:
    """An expression as one path wrote it, for the version's other paths where it reads the same."""

    expr: Expression  # held: its id stays its own
    text: str
    note: str
    names: tuple[str, ...]  # the pool's names the text reads
    hoisted: frozenset[str]  # the top-level fields it reads from locals bound first
    native_calls: int


class _Presence:
    """Presence checks written for requests the schema accepted (engine/needs.py's presence_source
    reads any value): a field the schema requires is there, and a present field has its type."""

    def __init__(self, writer: _PathWriter, action: str) -> None:
        self.writer = writer
        self.top_required: set[str] = set(writer.schema.get("required", ()))
        for clause in writer.schema.get("allOf", ()):  # {"if": action is one of..., "then": required}
            wanted = clause.get("if", {}).get("properties", {}).get("action", {})
            if action in wanted.get("enum", ()) or wanted.get("const") == action:
                self.top_required.update(clause.get("then", {}).get("required", ()))

    def required(self, schema: Schema, top: bool) -> set[str]:
        if top:
            return self.top_required
        alternatives = self.writer.walker.alternatives(schema)
        found = [set(a.get("required", ())) for a in alternatives]
        return set.intersection(*found) if found else set()

    def source(self, name: str, paths: Any) -> list[str]:
        tree: dict[str, Any] = {}  # segment -> (subtree, required)
        for path in paths:
            optional_until = path.index(OPTIONAL) if OPTIONAL in path else 0
            node = tree
            for depth, segment in enumerate(p for p in path if p != OPTIONAL):
                entry = node.setdefault(segment, [{}, False])
                entry[1] = entry[1] or depth >= optional_until
                node = entry[0]
        lines = [f"def {name}(v0):"]
        self.emit(tree, "v0", self.writer.schema, True, "    ", lines, [0])
        lines.append("    return True")
        return lines

    def emit(self, tree: dict[str, Any], var: str, schema: Schema, top: bool, pad: str, lines: list[str],
             counter: list[int]) -> None:
        """The checks of `tree` below the object in `var`; nothing where the schema already says so."""
        walker = self.writer.walker
        required = self.required(schema, top)
        for segment, (children, needed) in tree.items():
            counter[0] += 1
            name = f"v{counter[0]}"
            child = walker.child(schema, segment)
            if child is None:  # not in the schema (the compiler refuses it): cannot be vouched for
                lines.append(f"{pad}return False")
                return
            if segment == EACH:
                below = self.below(children, name, child, pad + "    ", counter)
                if below:
                    lines += [f"{pad}for {name} in {var}:", *below]
                continue
            inner = pad
            if segment not in required and needed:
                lines += [f"{pad}if {segment!r} not in {var}:", f"{pad}    return False"]
            below = self.below(children, name, child, pad + ("    " if segment not in required and not needed
                                                            else ""), counter)
            if not below:
                continue
            if segment not in required and not needed:
                lines.append(f"{pad}if {segment!r} in {var}:")
                inner = pad + "    "
            lines += [f"{inner}{name} = {var}[{segment!r}]", *below]

    def below(self, children: dict[str, Any], var: str, schema: Schema, pad: str, counter: list[int]) -> list[str]:
        """The checks below a present value (null on the way is present: the rule must guard it)."""
        if not children:
            return []
        lines: list[str] = []
        if self.writer.nullable(schema):
            self.emit(children, var, schema, False, pad + "    ", lines, counter)
            return [f"{pad}if {var} is not None:", *lines] if lines else []
        self.emit(children, var, schema, False, pad, lines, counter)
        return lines


def _comment(text: str, indent: str) -> list[str]:
    return [f"{indent}# {line}".rstrip() for line in text.strip().splitlines()]


Verdict = tuple[str, str | None]  # (decision, the deciding rule's id or None)
ALLOWED: Verdict = ("allow", None)
# A verdict path's answer where its function hands over because a field the rules need is missing
# (a presence check failed): the evaluator then refuses the request as missing_field, naming the
# fields. Falsy, as None (any other hand-over) is.
LACKING: tuple[()] = ()


def generate_path(version_name: str, digest: str, action: str, role: str | None, rules: tuple[Rule, ...],
                  outputs: tuple[Output, ...], plan: NeedsPlan, schema: Schema, params: Mapping[str, Any],
                  helpers: Mapping[str, Any], memo: GenerationMemo | None = None, *,
                  verdict: bool = False) -> GeneratedPath:
    """The decision path's Python source and its compiled function.

    `helpers` holds what the generated code calls that depends on the whole version
    (engine/evaluator.py's `path_helpers`): `_again_rule` and `_again_output` (one rule or
    output judged by the native closures, after a CEL error), `_activation` (the request as
    native values, for an expression left to its closure) and `_render` (a message that shows
    request fields). `memo` is shared by the paths of one version (same parameters). `verdict`:
    the path's GeneratedPath.verdict instead (the same checks and conditions in the same order;
    a finding is its rule's verdict, the first one returned as soon as the request is complete).
    """
    writer = _PathWriter(version_name, action, role, schema, params, memo)
    names = writer.names
    function = f"{'verdict' if verdict else 'decide'}_{_identifier(action)}_{_identifier(role or 'any')}"
    signature = f"def {function}(request, at):" if verdict else f"def {function}(request, at, decision_id, language):"
    lines = [f"# {version_name}: action {action!r}, role {role!r}: {len(rules)} rules, {len(outputs)} outputs.",
             "# Generated at load by engine/codegen.py; what runs is this text, compiled once.", ""]
    # Presence checks (engine/needs.py). The rules' guards, and the bodies of rules without one,
    # are needed whatever the request says; a rule's body once its guard holds; an output's
    # fields only for an allowed decision (so they are checked where it is evaluated).
    def needs(expr: Expression | None) -> tuple[FieldPath, ...]:
        return () if expr is None else expr.needs_for(action, role)

    always = [p for r in rules
              for p in (needs(r.applies_when) if r.applies_when is not None else needs(r.fires_when))]
    presence = _Presence(writer, action)
    writer.required_at_top = presence.top_required
    lines += ["# Presence checks (the paths of engine/needs.py over a request the schema accepted: fields it",
              "# requires, and the types it fixes, are not looked at again). False: a field may be missing.",
              *presence.source("_always", dict.fromkeys(always)), "",
              *presence.source("_everything", plan.everything_paths), ""]
    checks: dict[tuple[FieldPath, ...], str] = {}
    always_set = set(always)

    def check(paths: tuple[FieldPath, ...], indent: str) -> list[str]:
        """The lines that hand over to the evaluator when one of `paths` may be missing."""
        paths = tuple(p for p in paths if p not in always_set)  # those were checked first
        if not paths:
            return []
        name = checks.get(paths)
        if name is None:
            name = checks[paths] = f"_needs_{len(checks)}"
            lines[insert_at:insert_at] = [*presence.source(name, paths), ""]
        return [f"{indent}if not complete and not {name}(request):", f"{indent}    return {lacking}"]

    insert_at = len(lines)
    lacking = "_LACKING" if verdict else "None"  # a field missing: the evaluator would refuse the request
    said = f"    language = {DEFAULT_LANGUAGE!r}  # for a rule judged again: its findings' words unread"
    lines += [signature, *([said] if verdict else []),
              "    complete = _everything(request)",
              "    if not complete and not _always(request):",
              f"        return {lacking}  # a field needed whatever the request says is missing: the evaluator"
              " names it",
              "    violations = []",
              "    warnings = []"]
    blocks: list[list[str]] = []  # each rule's lines, placed below once the hoisted fields are known
    for rule in rules:
        block: list[str] = []
        blocks.append(block)
        rule_name = names.add(rule, "_rule")
        if not verdict:
            findings = writer.memo.findings(rule, lambda rule=rule: {  # type: ignore[misc]
                language: Finding(rule.id, rule.render(language, params, {}), rule.defined_in, rule.where)
                for language in LANGUAGES if _static_message(rule, language)})
            found = names.add(findings, "_found")
        into = "violations" if rule.effect == "deny" else "warnings"
        block += ["", f"    # rule {rule.id} ({rule.effect}), {rule.where}, defined in {rule.defined_in}"]
        body_indent = "        "
        block.append("    try:")
        if rule.applies_when is not None:
            block += _comment(f"applies_when: {rule.applies_when.text}", "        ")
            text, note = writer.expression(rule.applies_when, True)
            block.append(f"        if {text}:{note}")
            body_indent = "            "
            block += check(needs(rule.fires_when), body_indent)
        block += _comment(f"fires_when: {rule.fires_when.text}", body_indent)
        text, note = writer.expression(rule.fires_when, True)
        block.append(f"{body_indent}if {text}:{note}")
        if not verdict:
            finding = f"{found}.get(language) or _render({rule_name}, language, request)"
            block.append(f"{body_indent}    {into}.append({finding})")
        elif rule.effect == "deny":
            denied = names.add(("deny", rule.id), "_verdict")
            block += [f"{body_indent}    if complete:", f"{body_indent}        return {denied}",
                      f"{body_indent}    violations.append({denied})"]
        else:
            block.append(f"{body_indent}    pass  # a warning: no part of the verdict")
        block.append("    except CelError:  # judged again by the native closures, which absorb errors as CEL does")
        block.append(f"        if _again_rule({rule_name}, request, at, language, violations, warnings):")
        block.append("            return None")
        if verdict:
            block += ["        if complete and violations:", "            return _first_verdict(violations)"]
    lines.append(_RULES_HERE)
    lines += ["", "    outputs = {}"]
    if outputs:
        lines.append("    if not violations:  # allowed decisions only")
    for output in outputs:
        output_name = names.add(output, "_output")
        lines += ["", f"        # output {output.name}, {output.location.file}:{output.location.line}"]
        lines.append("        try:")
        indent = "            "
        if output.applies_when is not None:
            lines += check(needs(output.applies_when), indent)
            lines += _comment(f"applies_when: {output.applies_when.text}", indent)
            text, note = writer.expression(output.applies_when, True)
            lines.append(f"{indent}if {text}:{note}")
            indent += "    "
        lines += check(needs(output.value), indent)
        lines += _comment(f"value: {output.value.text}", indent)
        text, note = writer.expression(output.value, False)
        lines.append(f"{indent}outputs[{output.name!r}] = {text}{note}")
        lines.append("        except CelError:")
        lines.append(f"            if _again_output({output_name}, request, at, language, outputs, violations):")
        lines.append("                return None")
    if outputs:
        lines += ["        if violations:  # an output that failed denies: a denial carries no outputs",
                  "            outputs = {}"]
    hoisted = sorted(writer.hoisted)
    here = lines.index(_RULES_HERE)
    if len(blocks) <= _CHUNK:
        lines[here:here + 1] = [line for block in blocks for line in block]
    else:
        # Python's compiler slows more than in proportion to a function's length (a path of 4,000
        # rules, 2.5 MB: 4.8 s as one function, 0.85 s as chunks of 250): a long path calls its
        # rules in chunks, each a function of its own (one call per chunk per decision), which
        # returns True where the path would hand over (None), False to go on, and a verdict
        # path's early verdict as it is.
        shared = ", ".join(["request", "at", "language", "complete", "violations", "warnings",
                            *(f"_{name}" for name in hoisted)])
        calls: list[str] = []
        defined: list[str] = []
        for first in range(0, len(blocks), _CHUNK):
            chunk = f"_rules_{first // _CHUNK}"
            part = blocks[first:first + _CHUNK]
            calls += ["", f"    # rules {first + 1} to {first + len(part)}"]
            calls += ([f"    if {chunk}({shared}):", "        return None"] if not verdict else
                      [f"    found = {chunk}({shared})", "    if found is not False:",
                       "        return None if found is True else found"])
            defined += [f"def {chunk}({shared}):",
                        *(line.replace("return None", "return True") if line.strip() == "return None" else line
                          for block in part for line in block),
                        "    return False", ""]
        lines[here:here + 1] = calls
        lines[insert_at:insert_at] = defined
    start = lines.index(signature) + 1
    lines[start:start] = [f"    _{name} = request[{name!r}]  # required for {action!r}: there" for name in hoisted]
    if verdict:
        lines += ["", "    return _first_verdict(violations) if violations else _ALLOWED", ""]
    else:
        lines += ["",
              "    return _Decision(",
              "        decision_id=decision_id, decision='deny' if violations else 'allow',",
              "        rule=violations[0] if violations else None, violations=tuple(violations),",
              f"        warnings=tuple(warnings), outputs=outputs, policy_version={version_name!r},",
              f"        policy_digest={digest!r}, runtime='native', at=_format_timestamp(at),",
              "        explain=None, language=language)", ""]
    source = "\n".join(lines)
    namespace: dict[str, Any] = {**_RUNTIME, **helpers, **names.values}
    where = f"<{version_name} {action} {role}{' verdict' if verdict else ''}>"
    exec(writer.memo.code(lines, signature, function, where), namespace)  # written above, from the policy

    inputs = PathInputs(version_name, digest, action, role, rules, outputs, plan, schema, params, helpers, memo)
    return GeneratedPath(action, role, source, namespace[function], writer.native_calls,
                         None if verdict else inputs)


@dataclass(frozen=True)
class JointVerdict:
    """Two versions' verdicts of one (action, role) written as one function (joint_verdict)."""

    action: str
    role: str | None
    source: str
    function: Callable[[dict[str, Any], datetime], tuple[Verdict, Verdict] | None]
    shared: int  # rules and outputs judged once for both versions


def joint_verdict(old: PathInputs, new: PathInputs) -> JointVerdict | None:
    """Both versions' verdicts of one path in one function, `both(request, at)`: (old verdict, new
    verdict), each what its own GeneratedPath.verdict answers, or None where it does not judge the
    request (then each version's own verdict does). It judges a request carrying every field
    either path may read (each path's `_everything`), where a verdict returns at its first denial:
    the rules both versions write alike (the same id, effect and Python text, the same constants)
    are judged once, those of one version only while that version has no denial yet, in each
    version's own order; a rule both write alike that fires decides both versions still open. The
    outputs (which can only deny, by failing) are evaluated while a version is still open. A CEL
    error anywhere returns None (each version's verdict judges the rule again, as the closures
    do); any other exception is raised, as the verdicts raise it. None where the two cannot be
    written so (another action or schema, an expression left to its native closure) or would
    share no rule."""
    action, role = old.action, old.role
    if (new.action, new.role) != (action, role) or new.schema != old.schema:
        return None
    if max(len(old.rules), len(new.rules)) > _CHUNK:  # one function: Python's compiler slows on long ones
        return None
    pool, memos = _joint_memos(old.memo or GenerationMemo(), new.memo or GenerationMemo())
    writers: list[_PathWriter] = []
    steps: list[tuple[list[tuple[Any, Rule]], list[tuple[Any, Output]]]] = []
    for inputs, memo in zip((old, new), memos, strict=True):
        writer = _PathWriter(inputs.version_name, action, role, inputs.schema, inputs.params, memo)
        writer.required_at_top = _Presence(writer, action).top_required

        def text(expr: Expression | None, as_condition: bool, writer: _PathWriter = writer) -> str | None:
            return None if expr is None else writer.expression(expr, as_condition)[0]

        rules = [(("rule", r.id, r.effect, text(r.applies_when, True), text(r.fires_when, True)), r)
                 for r in inputs.rules]
        outputs = [(("output", o.name, text(o.applies_when, True), text(o.value, False)), o) for o in inputs.outputs]
        if writer.native_calls:
            return None
        writers.append(writer)
        steps.append((rules, outputs))
    rule_steps = _merged(steps[0][0], steps[1][0])
    output_steps = _merged(steps[0][1], steps[1][1])
    shared = sum(1 for _, _, side in rule_steps + output_steps if side == "both")
    if not any(side == "both" for _, _, side in rule_steps):
        return None
    function = f"both_{_identifier(action)}_{_identifier(role or 'any')}"
    lines = [f"# {old.version_name} and {new.version_name}: action {action!r}, role {role!r}: "
             f"{len(rule_steps)} rules, {len(output_steps)} outputs, {shared} of them judged once.",
             "# Generated by engine/codegen.py's joint_verdict (what `bindpolicy impact` calls).", ""]
    presence = _Presence(writers[0], action)
    everything = [old.plan.everything_paths, new.plan.everything_paths]
    if set(everything[0]) == set(everything[1]):
        lines += [*presence.source("_everything", everything[0]), ""]
        complete = "_everything(request)"
    else:
        lines += [*presence.source("_everything_old", everything[0]), "",
                  *presence.source("_everything_new", everything[1]), ""]
        complete = "_everything_old(request) and _everything_new(request)"
    hoisted = sorted(writers[0].hoisted | writers[1].hoisted)
    lines += [f"def {function}(request, at):",
              f"    if not ({complete}):",
              "        return None  # a field may be missing: each version's own verdict judges the request",
              *(f"    _{name} = request[{name!r}]  # required for {action!r}: there" for name in hoisted),
              "    old = new = None  # each version's verdict once found: its first denial",
              "    try:"]
    split = False  # whether a rule of one version only may have found a denial
    for (_, applies, fires), rule, side in ((key[2:], rule, side) for key, rule, side in rule_steps):
        whose = {"both": "both versions", "old": f"{old.version_name} only", "new": f"{new.version_name} only"}[side]
        lines += ["", f"        # rule {rule.id} ({rule.effect}), {rule.where}: {whose}"]
        indent = "        "
        if side != "both":
            lines.append(f"{indent}if {side} is None:")
            indent += "    "
        if applies is not None:
            lines += _comment(f"applies_when: {_text_of(rule.applies_when)}", indent)
            lines.append(f"{indent}if {applies}:")
            indent += "    "
        lines += _comment(f"fires_when: {_text_of(rule.fires_when)}", indent)
        lines.append(f"{indent}if {fires}:")
        indent += "    "
        denied = pool.add(("deny", rule.id), "_verdict")
        if rule.effect != "deny":
            lines.append(f"{indent}pass  # a warning: no part of the verdict")
        elif side == "both":
            lines.append(f"{indent}return {pool.add((('deny', rule.id),) * 2, '_pair')}" if not split else
                         f"{indent}return (old or {denied}, new or {denied})")
        else:
            other = "new" if side == "old" else "old"
            pair = f"({denied}, new)" if side == "old" else f"(old, {denied})"
            lines += [f"{indent}if {other} is not None:", f"{indent}    return {pair}", f"{indent}{side} = {denied}"]
            split = True
    for (applies, value), output, side in ((key[2:], output, side) for key, output, side in output_steps):
        whose = {"both": "both versions", "old": f"{old.version_name} only", "new": f"{new.version_name} only"}[side]
        lines += ["", f"        # output {output.name} (only its failure counts), {output.location.file}:"
                  f"{output.location.line}: {whose}"]
        indent = "        "
        if side != "both":  # (one version at least is still open here: both decided returned)
            lines.append(f"{indent}if {side} is None:")
            indent += "    "
        if applies is not None:
            lines.append(f"{indent}if {applies}:")
            indent += "    "
        lines.append(f"{indent}{value}")
    lines += ["    except CelError:",
              "        return None  # each version's verdict judges that rule again, as CEL does",
              "    return (old or _ALLOWED, new or _ALLOWED)", ""]
    source = "\n".join(lines)
    namespace: dict[str, Any] = {**_RUNTIME, **pool.values}
    exec(compile(source, f"<{old.version_name}+{new.version_name} {action} {role} both>", "exec"), namespace)
    return JointVerdict(action, role, source, namespace[function], shared)


def _joint_memos(old: GenerationMemo, new: GenerationMemo) -> tuple[_ValuePool, tuple[GenerationMemo, GenerationMemo]]:
    """The pool of names and the two memos the joint verdicts of two versions are written with: one
    pool (a constant of equal value has one name in both versions' texts), each version's walks
    and folded constants shared with its own memo; the same for every path of the two versions
    (an expression written once for all of them)."""
    key = (id(old), id(new))
    held = _JOINT_MEMOS.get(key)
    if held is None or held[0] is not old or held[1] is not new:
        if len(_JOINT_MEMOS) >= 8:
            _JOINT_MEMOS.clear()
        pool = _ValuePool()
        held = _JOINT_MEMOS[key] = (old, new, pool, (old.sharing(pool), new.sharing(pool)))
    return held[2], held[3]


# (old memo, new memo, pool, the two memos sharing it) by the ids of the versions' memos (held)
_JOINT_MEMOS: dict[tuple[int, int], tuple[GenerationMemo, GenerationMemo, _ValuePool,
                                          tuple[GenerationMemo, GenerationMemo]]] = {}


def _merged(old: list[tuple[Any, Any]], new: list[tuple[Any, Any]]) -> list[tuple[Any, Any, str]]:
    """Two versions' (key, rule or output) in one order that keeps each version's own: those with
    the same key in both (the longest such run, difflib's) once, as "both", the others as "old" or
    "new"."""
    steps: list[tuple[Any, Any, str]] = []
    matcher = SequenceMatcher(None, [key for key, _ in old], [key for key, _ in new], autojunk=False)
    for tag, i1, i2, j1, j2 in matcher.get_opcodes():
        if tag == "equal":
            steps += [(key, item, "both") for key, item in old[i1:i2]]
        else:
            steps += [(key, item, "old") for key, item in old[i1:i2]]
            steps += [(key, item, "new") for key, item in new[j1:j2]]
    return steps


def _text_of(expr: Expression | None) -> str:
    return "" if expr is None else str(expr.text)


class _ValuePool(_Namespace):
    """A pool of names where constants of equal value and type (strings, integers, durations,
    tuples and sets of those) share one name: two versions' texts of a rule then read alike where
    their constants are equal, though each version folded its own."""

    def __init__(self) -> None:
        super().__init__()
        self._by_value: dict[Any, str] = {}

    def add(self, value: Any, prefix: str = "_k") -> str:
        key = _value_key(value)
        if key is None:
            return super().add(value, prefix)
        name = self._by_value.get(key)
        if name is None:
            name = self._by_value[key] = super().add(value, prefix)
        return name


def _value_key(value: Any) -> Any:
    """What identifies a constant by value (its type and value, all the way down), or None."""
    kind = type(value)
    if kind in (str, int, bool, timedelta, NONE):
        return (kind, value)
    if kind in (tuple, frozenset):
        keys = [_value_key(item) for item in value]
        if None in keys:
            return None
        return (kind, tuple(keys) if kind is tuple else frozenset(keys))
    return None


_RULES_HERE = "\0rules"  # where the rules' lines go, in the function or in calls of chunks
_CHUNK = 200  # rules in a chunk function, where a path has more (a few compile fastest: see generate_path)


def _static_message(rule: Rule, language: str) -> bool:
    """True if the rule's message in `language` reads no request field (it can be built once)."""
    if rule.messages is None:
        return True
    return all(placeholder.path[0] == PARAMS_ROOT for lang, placeholder in rule.messages.placeholders()
               if lang == language or (language == CHINESE and lang not in rule.messages.templates))


def _identifier(text: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in text)


def _bool(value: Any) -> bool:
    if type(value) is bool:
        return value
    raise native._no_overload("bool", value)


def _has(value: Any, name: str) -> bool:
    if type(value) is dict:
        return name in value
    if value is None:
        return False
    raise native._no_overload("has", value)


def _timestamp(value: Any) -> datetime | None:
    if value is None:
        return None
    try:
        return parse_timestamp(value)
    except ValueError as exc:  # checked at the door; a caller that skipped the check gets a CEL error
        raise CelError(str(exc)) from None


def _as_int(value: Any) -> Any:
    return int(value) if type(value) is float else value


def _as_double(value: Any) -> Any:
    return float(value) if type(value) is int else value


_FORMATTED: dict[datetime, str] = {}


def _format_timestamp(value: datetime) -> str:
    """format_timestamp, remembered: requests of one second share their `at` (and so their outputs)."""
    text = _FORMATTED.get(value)
    if text is None:
        if len(_FORMATTED) >= 4096:
            _FORMATTED.clear()
        text = _FORMATTED[value] = format_timestamp(value)
    return text


def _first_verdict(violations: list[Any]) -> Verdict:
    """A verdict path's denial: its first finding's rule (a verdict it wrote, or a Finding that
    a rule judged again by the native closures reported)."""
    first = violations[0]
    return first if type(first) is tuple else ("deny", first.id)


_new_object, _set_attribute = object.__new__, object.__setattr__


def _decision(**fields: Any) -> Decision:
    """A Decision at about a third of the dataclass's cost (whose frozen __init__ sets each field
    through object.__setattr__): the generated call names every field, and the dict of its
    keywords becomes the record's own."""
    made: Decision = _new_object(Decision)
    _set_attribute(made, "__dict__", fields)
    return made


_RUNTIME: dict[str, Any] = {
    "CelError": CelError, "_Decision": _decision, "_bool": _bool, "_has": _has, "_timestamp": _timestamp,
    "_as_int": _as_int, "_as_double": _as_double, "_step": native._step, "_format_timestamp": _format_timestamp,
    "_eq": native._eq, "_ne": native._ne, "_lt": native._lt, "_le": native._le, "_gt": native._gt,
    "_ge": native._ge, "_in": native._in, "_add": native._add, "_sub": native._sub, "_mul": native._mul,
    "_div": native._div, "_mod": native._mod, "_negate": native._negate, "_size": native._size,
    "_index": native._index, "_to_json": to_json, "_first_verdict": _first_verdict, "_ALLOWED": ALLOWED,
    "_LACKING": LACKING,
}
