"""A small CEL syntax tree for the prover: built from cel-python's parse tree, params inlined, printable.

The prover encodes this tree for the solver and prints conditions back as CEL with it; anything
outside the forms below is `Uncovered`, named by its text, and never guessed.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import celpy
from lark import Token, Tree

MACROS = ("all", "exists", "filter", "map")


class Uncovered(Exception):
    """A CEL form the encoding does not cover; the message names it."""


@dataclass(frozen=True)
class Node:
    pass


# The node shapes. Operators of one shape share it; each operator is a subclass that only names
# it, so that `isinstance(node, And)` reads as the tree does, and the tables below say how each
# one is parsed and printed.


@dataclass(frozen=True)
class Lit(Node):
    value: Any  # bool, int, float, str, None, or a tuple of those (a list literal)


@dataclass(frozen=True)
class Var(Node):
    name: str


@dataclass(frozen=True)
class Member(Node):
    """`base.field`, or a test on it."""

    base: Node
    field: str


class Select(Member):
    """`base.field`"""


class Has(Member):
    """`has(base.field)`"""


@dataclass(frozen=True)
class Unary(Node):
    operand: Node


class Not(Unary):
    """`!operand`"""


class Neg(Unary):
    """`-operand`"""


@dataclass(frozen=True)
class Binary(Node):
    op: str  # == != < <= > >= in + - * / %
    left: Node
    right: Node


@dataclass(frozen=True)
class Logic(Node):
    """A logical operator: CEL's error-absorbing `&&` and `||` (Binary's operators are strict)."""

    left: Node
    right: Node


class And(Logic):
    """`left && right`"""


class Or(Logic):
    """`left || right`"""


@dataclass(frozen=True)
class Cond(Node):
    test: Node
    then: Node
    other: Node


@dataclass(frozen=True)
class Call(Node):
    name: str  # size, duration, timestamp
    args: tuple[Node, ...]


@dataclass(frozen=True)
class ListOf(Node):
    items: tuple[Node, ...]


@dataclass(frozen=True)
class Index(Node):
    base: Node
    index: Node


@dataclass(frozen=True)
class Macro(Node):
    kind: str  # all, exists, filter, map
    target: Node
    variable: str
    body: Node


# cel-python's tree names for each operator, and the node or spelling it becomes.
_LOGIC: dict[str, type[Logic]] = {"conditionalor": Or, "conditionaland": And}
_UNARY: dict[str, type[Unary]] = {"unary_not": Not, "unary_neg": Neg}
_RELATIONS = {"relation_eq": "==", "relation_ne": "!=", "relation_lt": "<", "relation_le": "<=",
              "relation_gt": ">", "relation_ge": ">=", "relation_in": "in", "addition_add": "+",
              "addition_sub": "-", "multiplication_mul": "*", "multiplication_div": "/",
              "multiplication_mod": "%"}

_ENV = celpy.Environment()


@lru_cache(maxsize=4096)
def _parse_tree(text: str) -> Any:
    return _ENV.compile(text)


def parse(text: str, params: Mapping[str, Any] | None = None) -> Node:
    """The tree of a CEL text, with `params.<name>` replaced by its value; Uncovered if outside the subset."""
    return _convert(_parse_tree(text), params or {})


def _unwrap(tree: Any) -> Any:
    while isinstance(tree, Tree) and len(tree.children) == 1 and tree.data not in (
            "ident", "literal", "list_lit", "paren_expr", "ident_arg", "map_lit", "dot_ident"):
        tree = tree.children[0]
    return tree


def _args(node: Any) -> list[Any]:
    return list(node.children) if isinstance(node, Tree) else []


def _value_node(value: Any) -> Node:
    if isinstance(value, list | tuple):
        return ListOf(tuple(_value_node(v) for v in value))
    if value is None or isinstance(value, bool | int | float | str):
        return Lit(value)
    raise Uncovered(f"parameter value {value!r}")


def _literal(token: Token) -> Lit:
    text, kind = str(token.value), token.type
    if kind == "INT_LIT":
        digits = text.lstrip("-")
        value = int(digits, 16) if digits.lower().startswith("0x") else int(digits)
        return Lit(-value if text.startswith("-") else value)
    if kind == "FLOAT_LIT":
        return Lit(float(text))
    if kind == "BOOL_LIT":
        return Lit(text == "true")
    if kind == "NULL_LIT":
        return Lit(None)
    if kind == "STRING_LIT" and text[:1] in "\"'" and "\\" not in text and not text.startswith(("'''", '"""')):
        return Lit(text[1:-1])
    raise Uncovered(f"literal {text}")


def _convert(tree: Any, params: Mapping[str, Any]) -> Node:
    tree = _unwrap(tree)
    if isinstance(tree, Token):
        return _literal(tree)
    kind, kids = str(tree.data), list(tree.children)
    if kind == "literal":
        return _literal(kids[0])
    if kind == "ident":
        return Var(str(kids[0].value))
    if kind == "paren_expr":
        return _convert(kids[0], params)
    if kind == "expr" and len(kids) == 3:
        return Cond(*(_convert(k, params) for k in kids))
    if kind in _LOGIC and len(kids) == 2:
        return _LOGIC[kind](_convert(kids[0], params), _convert(kids[1], params))
    if kind in ("relation", "addition", "multiplication") and len(kids) == 2:
        op = _RELATIONS.get(str(kids[0].data))
        if op is None:
            raise Uncovered(f"operator {kids[0].data}")
        return Binary(op, _convert(kids[0].children[0], params), _convert(kids[1], params))
    if kind == "unary" and len(kids) == 2:
        if str(kids[0].data) not in _UNARY:
            raise Uncovered(f"operator {kids[0].data}")
        return _UNARY[str(kids[0].data)](_convert(kids[1], params))
    if kind == "member_dot":
        base = _convert(kids[0], params)
        name = str(kids[1].value)
        if base == Var("params"):
            if name not in params:
                raise Uncovered(f"params.{name}")
            return _value_node(params[name])
        return Select(base, name)
    if kind == "member_index":
        return Index(_convert(kids[0], params), _convert(kids[1], params))
    if kind == "list_lit":
        return ListOf(tuple(_convert(k, params) for k in _args(kids[0] if kids else None)))
    if kind == "ident_arg":
        name = str(kids[0].value)
        args = _args(kids[1] if len(kids) > 1 else None)
        if name == "has" and len(args) == 1:
            target = _convert(args[0], params)
            if not isinstance(target, Select):
                raise Uncovered("has() of something other than a field")
            return Has(target.base, target.field)
        if name in ("size", "duration", "timestamp") and len(args) == 1:
            return Call(name, (_convert(args[0], params),))
        raise Uncovered(f"{name}()")
    if kind == "member_dot_arg":
        name = str(kids[1].value)
        args = _args(kids[2] if len(kids) > 2 else None)
        if name in MACROS and len(args) == 2:
            variable = _unwrap(args[0])
            if not (isinstance(variable, Tree) and variable.data == "ident"):
                raise Uncovered(f"{name}() without a loop variable")
            loop = variable.children[0]
            return Macro(name, _convert(kids[0], params), str(getattr(loop, "value", loop)),
                         _convert(args[1], params))
        if name == "size" and not args:
            return Call("size", (_convert(kids[0], params),))
        raise Uncovered(f".{name}()")
    raise Uncovered(f"CEL construct {kind}")


# --- printing -----------------------------------------------------------------------------------

# How each operator prints: its spelling and its precedence (higher binds tighter).
_PRECEDENCE = {"?:": 0, "||": 1, "&&": 2, "==": 3, "!=": 3, "<": 3, "<=": 3, ">": 3, ">=": 3, "in": 3,
               "+": 4, "-": 4, "*": 5, "/": 5, "%": 5}
_TOP = 6  # unary, member, primary
_SPELLING: dict[type[Node], str] = {And: "&&", Or: "||", Not: "!", Neg: "-"}


def _operator(node: Node) -> str | None:
    """The infix operator of a node (`&&`, `==`, `?:`...), None for a unary, member or primary."""
    if isinstance(node, Binary):
        return node.op
    if isinstance(node, Cond):
        return "?:"
    return _SPELLING[type(node)] if isinstance(node, Logic) else None


def _level(node: Node) -> int:
    op = _operator(node)
    return _TOP if op is None else _PRECEDENCE[op]


def show(node: Node) -> str:
    """CEL text for a tree, parenthesized only where precedence needs it."""
    def wrap(child: Node, least: int) -> str:
        text = show(child)
        return f"({text})" if _level(child) < least else text

    if isinstance(node, Lit):
        return _show_value(node.value)
    if isinstance(node, Var):
        return node.name
    if isinstance(node, Member):
        text = f"{wrap(node.base, _TOP)}.{node.field}"
        return f"has({text})" if isinstance(node, Has) else text
    if isinstance(node, Unary):
        return f"{_SPELLING[type(node)]}{wrap(node.operand, _TOP)}"
    if isinstance(node, Binary | Logic):  # left-associative: the right side binds one level tighter
        level = _level(node)
        return f"{wrap(node.left, level)} {_operator(node)} {wrap(node.right, level + 1)}"
    if isinstance(node, Cond):
        return f"{wrap(node.test, 1)} ? {wrap(node.then, 1)} : {wrap(node.other, 0)}"
    if isinstance(node, Call):
        if node.name == "size" and len(node.args) == 1 and not isinstance(node.args[0], Macro):
            return f"size({show(node.args[0])})"
        if node.name == "size":
            return f"{wrap(node.args[0], _TOP)}.size()"
        return f"{node.name}({', '.join(show(a) for a in node.args)})"
    if isinstance(node, ListOf):
        return f"[{', '.join(show(i) for i in node.items)}]"
    if isinstance(node, Index):
        return f"{wrap(node.base, _TOP)}[{show(node.index)}]"
    if isinstance(node, Macro):
        return f"{wrap(node.target, _TOP)}.{node.kind}({node.variable}, {show(node.body)})"
    raise TypeError(node)


def _show_value(value: Any) -> str:
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, float):
        return repr(value)
    return str(value)
