"""Which request fields an expression needs, in one home: one walker over the CEL tree, the
presence checks written from its paths, the plan of an (action, role), and the accounting that
names the fields a request lacks.

The walker (`walk`) goes over the parse tree once per question: the field chains read (with
the loop variables in scope), which of them only `has()` tests, which a `has()` guard makes
optional, and, with the action and role known, which operands and branches they rule out; the
same pass notes every `chain != null` (cel-python 0.5 raises on it for objects and lists). The
compiler turns the chains into paths against the schema (engine/compiler.py); the loader asks
`needs_plan` for each (action, role); the evaluator and the generated paths
(engine/codegen.py) ask the plan's checks; the prover reads the same paths
(`Expression.needs_for`, engine/model.py, the public way to ask).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any

from lark import Token, Tree

from engine.errors import Detail, RequestError
from engine.model import EACH, OPTIONAL, Expression, FieldPath, NeedsPlan

# Comprehension macros: the first argument names a loop variable bound to each item.
MACROS = frozenset({"all", "exists", "exists_one", "map", "filter"})
# Facts known before evaluation: the request's action and role.
Context = tuple[str, str | None]
Facts = Mapping[str, str | None]
Scope = Mapping[str, FieldPath | None]


def pointer(path: Iterable[str | int]) -> str:
    """A JSON pointer (RFC 6901) for a path of keys and indexes."""
    return "".join("/" + str(p).replace("~", "~0").replace("/", "~1") for p in path)


@dataclass(frozen=True)
class Read:
    """One field chain an expression reads, with the token of each segment for positions."""

    tokens: tuple[Token, ...]
    tested_only: bool  # the last segment is only tested by has()
    guarded: int = 0  # inside `has(a.b) && ...`: the first `guarded` names may be absent

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(str(t.value) for t in self.tokens)



def _token(node: Any) -> Token:
    assert isinstance(node, Token)
    return node


def _tree(node: Any) -> Tree[Any]:
    assert isinstance(node, Tree)
    return node


def _name(node: Any) -> str:
    return str(node.value) if isinstance(node, Token) else ""


def _unwrap(tree: Any) -> Any:
    """Skip the grammar's one-child wrapper nodes (expr -> conditionalor -> ... -> member)."""
    while isinstance(tree, Tree) and len(tree.children) == 1 and tree.data != "ident":
        tree = tree.children[0]
    return tree


def _chain(tree: Any) -> list[Token] | None:
    """The tokens of a plain field chain (a.b.c), or None if the tree is anything else."""
    tree = _unwrap(tree)
    if isinstance(tree, Tree) and tree.data == "ident":
        return [_token(tree.children[0])]
    if isinstance(tree, Tree) and tree.data == "member_dot":
        base = _chain(tree.children[0])
        return None if base is None else [*base, _token(tree.children[1])]
    return None


def _scope_path(tree: Any, scope: Mapping[str, FieldPath | None]) -> FieldPath | None:
    tokens = _chain(tree)
    if tokens is None:
        return None
    names = tuple(str(t.value) for t in tokens)
    if names[0] in scope:
        base = scope[names[0]]
        return None if base is None else (*base, *names[1:])
    return names


def _string_literal(tree: Any) -> str | None:
    tree = _unwrap(tree)
    if isinstance(tree, Tree) and tree.data == "literal":
        tree = tree.children[0]
    if isinstance(tree, Token) and tree.type == "STRING_LIT" and "\\" not in tree.value:
        return str(tree.value)[1:-1]
    return None


def _has_guard(tree: Any, negated: bool) -> list[Token] | None:
    """The chain tested by `has(chain)` (or by `!has(chain)` when `negated`), else None."""
    tree = _unwrap(tree)
    if negated:
        if not (isinstance(tree, Tree) and tree.data == "unary" and len(tree.children) == 2
                and isinstance(tree.children[0], Tree) and tree.children[0].data == "unary_not"):
            return None
        tree = _unwrap(tree.children[1])
    if isinstance(tree, Tree) and tree.data == "ident_arg" and _name(tree.children[0]) == "has":
        args = tree.children[1].children if len(tree.children) > 1 and tree.children[1] else []
        chain = _chain(args[0]) if len(args) == 1 else None
        return chain if chain is not None and len(chain) > 1 else None
    return None


def _known(tree: Any, facts: Facts) -> bool | None:
    """The value of a condition on `action`/`role` alone (`action == "bind"`), else None."""
    if not facts:
        return None
    tree = _unwrap(tree)
    if not isinstance(tree, Tree):
        return None
    kids = tree.children
    if tree.data in ("conditionalor", "conditionaland") and len(kids) == 2:
        left, right = _known(kids[0], facts), _known(kids[1], facts)
        decisive = tree.data == "conditionalor"  # true decides an or, false decides an and
        if decisive in (left, right):
            return decisive
        return (not decisive) if left is not None and right is not None else None
    if tree.data == "unary" and len(kids) == 2 and isinstance(kids[0], Tree) \
            and kids[0].data == "unary_not":
        inner = _known(kids[1], facts)
        return None if inner is None else not inner
    if tree.data == "relation" and len(kids) == 2 and isinstance(kids[0], Tree) \
            and kids[0].data in ("relation_eq", "relation_ne"):
        lhs, rhs = _tree(kids[0]).children[0], kids[1]
        for name_side, literal_side in ((lhs, rhs), (rhs, lhs)):
            chain = _chain(name_side)
            literal = _string_literal(literal_side)
            if chain and len(chain) == 1 and str(chain[0].value) in facts and literal is not None:
                if facts[str(chain[0].value)] is None:
                    return None
                equal = facts[str(chain[0].value)] == literal
                return equal if kids[0].data == "relation_eq" else not equal
    return None


def _operands(tree: Any, kind: str) -> list[Any]:
    """The operands of a chain of one logical operator: a && b && c -> [a, b, c]."""
    tree = _unwrap(tree)
    if isinstance(tree, Tree) and tree.data == kind and len(tree.children) == 2:
        return [*_operands(tree.children[0], kind), tree.children[1]]
    return [tree]




@dataclass
class Walk:
    """What one pass of the walker found: every read with its scope, and every `chain != null`."""

    reads: list[tuple[Read, Scope]] = field(default_factory=list)
    null_inequalities: list[tuple[Token, Read]] = field(default_factory=list)


def walk(tree: Any, facts: Facts | None = None) -> Walk:
    """One pass over the parse tree. With `facts` (action and role), operands and branches that
    they rule out are skipped, so that `action == "login" || shop.id == x` needs no shop for a login."""
    found = Walk()
    _visit(tree, {}, found, facts or {})
    return found


def _visit(tree: Any, scope: Scope, out: Walk, facts: Facts) -> None:
    if not isinstance(tree, Tree):
        return
    tokens = _chain(tree)
    if tokens is not None:
        out.reads.append((Read(tuple(tokens), False), dict(scope)))
        return
    tree = _unwrap(tree)
    if not isinstance(tree, Tree):
        return
    kids = tree.children
    if tree.data in ("conditionalor", "conditionaland") and len(kids) == 2:
        _visit_logical(tree, scope, out, facts)
        return
    if facts and tree.data == "expr" and len(kids) == 3:
        condition = _known(kids[0], facts)
        if condition is not None:
            _visit(kids[0], scope, out, facts)
            _visit(kids[1] if condition else kids[2], scope, out, facts)
            return
    if tree.data == "relation" and len(kids) == 2 and isinstance(kids[0], Tree) \
            and kids[0].data == "relation_ne":
        lhs, rhs = _tree(kids[0]).children[0], kids[1]
        for chain_side, null_side in ((lhs, rhs), (rhs, lhs)):
            null = _unwrap(null_side)
            chain = _chain(chain_side)
            if chain and isinstance(null, Token) and null.type == "NULL_LIT":
                out.null_inequalities.append((chain[0], Read(tuple(chain), False)))
    if tree.data == "ident_arg" and _name(tree.children[0]) == "has":
        args = tree.children[1].children if len(tree.children) > 1 and tree.children[1] else []
        inner = _chain(args[0]) if len(args) == 1 else None
        if inner is not None and len(inner) > 1:
            out.reads.append((Read(tuple(inner), True), dict(scope)))
            return
    if tree.data == "member_dot_arg" and _name(tree.children[1]) in MACROS:
        target = tree.children[0]
        args = tree.children[2].children if len(tree.children) > 2 and tree.children[2] else []
        variable = _chain(args[0]) if args else None
        if variable is not None and len(variable) == 1:
            _visit(target, scope, out, facts)
            base = _scope_path(target, scope)
            inner_scope = {**scope, str(variable[0].value): (*base, EACH) if base else None}
            for arg in args[1:]:
                _visit(arg, inner_scope, out, facts)
            return
    for child in kids:
        _visit(child, scope, out, facts)


def _visit_logical(tree: Any, scope: Scope, out: Walk, facts: Facts) -> None:
    """An && or || chain: an operand the facts make decisive is the only one needed, and a
    `has(a.b) &&` (or `!has(a.b) ||`) guard makes a.b optional for the operands after it."""
    is_or = tree.data == "conditionalor"
    operands = _operands(tree, tree.data)
    for operand in operands:
        if _known(operand, facts) is is_or:  # true decides an or, false decides an and
            _visit(operand, scope, out, facts)
            return
    guards: list[tuple[str, ...]] = []
    for operand in operands:
        inner = Walk()
        _visit(operand, scope, inner, facts)
        out.null_inequalities.extend(inner.null_inequalities)
        for read, inner_scope in inner.reads:
            for names in guards:
                same_root = inner_scope.get(names[0]) == scope.get(names[0])
                if same_root and read.names[:len(names)] == names:
                    read = replace(read, guarded=max(read.guarded, len(names)))
            out.reads.append((read, inner_scope))
        guard = _has_guard(operand, negated=is_or)
        if guard is not None:
            guards.append(tuple(str(t.value) for t in guard))


def absent_fields(request: Mapping[str, Any], path: FieldPath) -> list[str]:
    """JSON pointers of the places where `path` is missing from the request."""
    if OPTIONAL not in path and EACH not in path:  # the common case, without recursion
        value: Any = request
        for depth, head in enumerate(path):
            if value is None:
                return []
            if type(value) is not dict or head not in value:
                return [pointer(path[: depth + 1])]
            value = value[head]
        return []
    found: list[str] = []

    def walk(value: Any, rest: FieldPath, at: tuple[str | int, ...], optional: bool) -> None:
        if not rest or value is None:  # null on the way is present: the rule must guard it
            return
        head = rest[0]
        if head == OPTIONAL:
            walk(value, rest[1:], at, False)
        elif head == EACH:
            if isinstance(value, list):
                for index, item in enumerate(value):
                    walk(item, rest[1:], (*at, index), optional)
        elif not isinstance(value, dict) or head not in value:
            if not optional:
                found.append(pointer((*at, head)))
        else:
            walk(value[head], rest[1:], (*at, head), optional)

    walk(request, path, (), OPTIONAL in path)
    return found





class PresenceChecks:
    """The presence checks of one load, each written and compiled once: the rules of a large
    policy share their fields' paths (every rule of one shape needs the same ones), and each of
    an action's role paths asks again for the same sets. Keyed by the set of paths (a check is
    the same whatever order its paths come in); the checks a plan asks for are compiled together,
    as one module, which costs a fraction of one compile each."""

    def __init__(self) -> None:
        self._checks: dict[frozenset[FieldPath], Callable[[Mapping[str, Any]], bool]] = {}

    def __len__(self) -> int:
        return len(self._checks)

    def get(self, paths: Iterable[FieldPath]) -> Callable[[Mapping[str, Any]], bool]:
        return self.all([paths])[0]

    def all(self, groups: list[Iterable[FieldPath]]) -> list[Callable[[Mapping[str, Any]], bool]]:
        """One check for each group of paths."""
        keys = [frozenset(paths) for paths in groups]
        new = list(dict.fromkeys(key for key in keys if key not in self._checks))
        if new:
            lines: list[str] = []
            for index, key in enumerate(new):
                lines += presence_source(f"check{index}", sorted(key))
            namespace: dict[str, Any] = {}
            exec(compile("\n".join(lines), "<presence checks>", "exec"), namespace)  # written from the paths
            for index, key in enumerate(new):
                self._checks[key] = namespace[f"check{index}"]
        return [self._checks[key] for key in keys]


def needs_plan(context: Context, pairs: list[tuple[Expression | None, Expression]],
               checks: PresenceChecks | None = None) -> NeedsPlan:
    """Fields needed whatever the request says, in one check; the rest, rule by rule (`pairs`:
    each rule's or output's guard and body, in order). `checks`: those of the load so far."""
    def needs(expr: Expression) -> tuple[FieldPath, ...]:
        return expr.needs_for(*context)

    always: list[FieldPath] = []
    everything: list[FieldPath] = []
    conditional: dict[int, tuple[FieldPath, ...]] = {}
    for guard, body in pairs:
        everything.extend(needs(body))
        if guard is None:
            always.extend(needs(body))
        else:
            always.extend(needs(guard))
            everything.extend(needs(guard))
            conditional[id(body)] = needs(body)
    made = (checks or PresenceChecks()).all([everything, always, *conditional.values()])
    return NeedsPlan(made[0], made[1], MappingProxyType(dict(zip(conditional, made[2:], strict=True))),
                     everything_paths=tuple(dict.fromkeys(everything)))


class MissingFields:
    """Collects the fields that applicable rules need and the request lacks (the evaluator's accounting)."""

    def __init__(self, request: Mapping[str, Any], plan: NeedsPlan | None) -> None:
        self.request = request  # read only: never copied
        # A complete request needs no look at all; with the `always` fields there, only the
        # expressions of rules that apply need one, and a fast one; otherwise every expression
        # is accounted for field by field.
        self.complete = plan is not None and bool(plan.everything(self.request))
        self.plan = plan if plan is not None and not self.complete and plan.always(self.request) else None
        self.context = (request["action"], request.get("role"))
        self.missing: dict[str, list[str]] = {}
        self._absent: dict[tuple[str, ...], list[str]] = {}  # rules share paths: look once

    def lacking(self, expr: Expression | None, owner: str) -> bool:
        """True if the request lacks a field `expr` needs (and note it against `owner`)."""
        if expr is None or self.complete:
            return False
        if self.plan is not None:
            check = self.plan.conditional.get(id(expr))
            if check is None or check(self.request):
                return False
        found = False
        for path in expr.needs_for(*self.context):
            absent = self._absent.get(path)
            if absent is None:
                absent = self._absent[path] = absent_fields(self.request, path)
            for place in absent:
                self.missing.setdefault(place, []).append(owner)
                found = True
        return found

    def raise_if_any(self) -> None:
        if self.missing:
            details = [Detail(place, f"required by {', '.join(dict.fromkeys(owners))} but missing")
                       for place, owners in self.missing.items()]
            raise RequestError("missing_field", f"the request lacks {len(details)} field"
                               f"{'s' if len(details) != 1 else ''} that the rules need", details)


class _Node:
    __slots__ = ("children", "required")

    def __init__(self) -> None:
        self.children: dict[str, _Node] = {}
        self.required = False


def presence_check(paths: Iterable[FieldPath]) -> Callable[[Mapping[str, Any]], bool]:
    """One function that says whether a request carries every path (as absent_fields reads them).

    The paths share prefixes (account.type, account.age...), so they are merged into a tree,
    and the tree is written out as one Python function of nested lookups (no recursion, no
    loop over the tree at run time): a complete request costs one lookup per distinct field.
    False means "something may be missing": absent_fields then says what.
    """
    namespace: dict[str, Any] = {}
    source = "\n".join(presence_source("check", paths))
    exec(compile(source, "<presence check>", "exec"), namespace)  # source written from the paths
    check: Callable[[Mapping[str, Any]], bool] = namespace["check"]
    return check


def presence_source(name: str, paths: Iterable[FieldPath]) -> list[str]:
    """The lines of `def name(v0)`, presence_check's function, as Python source."""
    root = _Node()
    for path in paths:
        optional_until = path.index(OPTIONAL) if OPTIONAL in path else 0
        node = root
        for depth, segment in enumerate(p for p in path if p != OPTIONAL):
            node = node.children.setdefault(segment, _Node())
            node.required = node.required or depth >= optional_until
    lines = [f"def {name}(v0):"]
    _emit(root, "v0", 1, lines, [0])
    lines.append("    return True")
    return lines


def _emit(node: _Node, var: str, depth: int, lines: list[str], counter: list[int]) -> None:
    """The source of the checks below `node` for the value in `var` (null on the way is present:
    the rule must guard it; a required field that is absent, or under a non-object, is missing)."""
    pad = "    " * depth
    if not node.children:
        return
    lines.append(f"{pad}if {var} is not None:")
    inner = pad + "    "
    for segment, child in node.children.items():
        counter[0] += 1
        name = f"v{counter[0]}"
        if segment == EACH:
            lines.append(f"{inner}if isinstance({var}, list):")
            lines.append(f"{inner}    for {name} in {var}:")
            body = len(lines)
            _emit(child, name, depth + 3, lines, counter)
            if len(lines) == body:
                lines.append(f"{inner}        pass")
            continue
        lines.append(f"{inner}if isinstance({var}, dict) and {segment!r} in {var}:")
        if child.children:
            lines.append(f"{inner}    {name} = {var}[{segment!r}]")
            _emit(child, name, depth + 2, lines, counter)
        else:
            lines.append(f"{inner}    pass")
        if child.required:
            lines.append(f"{inner}else:")
            lines.append(f"{inner}    return False")
