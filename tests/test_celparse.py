"""engine/celparse.py builds the very trees cel-python's lark parser builds (rule names, children,
token types and positions, every node's meta), or refuses and lets lark parse: over every bundled
expression, the bench's generated ones, hand-picked corners and drawn expressions."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import celpy
import pytest
import yaml
from lark import Token, Tree

from engine.celparse import parse, parse_named
from engine.compiler import plain_names

ROOT = Path(__file__).resolve().parent.parent
LARK = celpy.Environment()


def _shape(node: Any) -> Any:
    if isinstance(node, Tree):
        return ("tree", str(node.data), sorted(vars(node.meta).items()), [_shape(c) for c in node.children])
    assert isinstance(node, Token), node
    return ("token", node.type, str(node), node.start_pos, node.line, node.column, node.end_line,
            node.end_column, node.end_pos)


def _lark(text: str) -> Any:
    try:
        return LARK.compile(text)
    except celpy.CELParseError:
        return None


def _bundled() -> list[str]:
    texts: set[str] = set()
    for path in (ROOT / "policies").rglob("*.yaml"):
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        for entry in [*data.get("rules", []), *data.get("outputs", [])] if isinstance(data, dict) else []:
            texts.update(entry[k] for k in ("applies_when", "fires_when", "value") if isinstance(entry.get(k), str))
    return sorted(texts)


BUNDLED = _bundled()
CORNERS = [
    "a ? b : c ? d : e", "(a ? b : c) ? d : e", '{"a": 1, 2: [x, y]}', "T{a: 1, b: x}.a", "T{}", "{}", "[]",
    "f()", "a.b()", "x[1][2].c(d, e)", "!!-x", "- x", "a - b", "a -b", "a <= b == c in d",
    "1.5 * 2 / 3 % 4 - 5 + 6", "null == x", "nullx == x", "true || false && !true", "in_x in [1]",
    "x.exists(y, y > 1)", "x.all(y, y.z.exists(w, w == y))", "x.filter(y, y > 0).size()",
    "'single' + \"double\"", "a &&\n  b ||\n\tc", "a.b.c.d == \"x\" ? 1 : 2", "size(a) > 2",
    "timestamp(\"2024-01-01T00:00:00Z\") + duration(\"1h\")", "\"日本\" == x && y == \"é\"",
    "a\r\n&& b", "((((a))))", "[1, [2, [3]]][0]",
    # refused here, parsed by lark (or refused by both)
    "-1", "x - -1", ".5", "a.5", "1.", "1e3", "0x1F", "3u", "b\"x\"", "r\"x\"", "\"a\\\"b\"", "\"\"\"x\"\"\"",
    "a // note", "a.in", "a.true", "if", "a ? b ? c : d : e", "[1,]", "f(a,)", "", "   ", "a b", "a ==",
    "(a", "a)", "a = b", "a & b", "#", "\"open",
]

ATOMS = ["a", "b.c", "x.y.z", "params.p", "1", "42", "2.5", "\"s\"", "'t'", "true", "false", "null", "[]", "{}",
         "[1, 2]", "{\"k\": v}", "f(a)", "g()", "m.n(1, 2)", "l[0]", "T{f: 1}"]
METHODS = ["size()", "exists(q, q == 1)", "k", "startsWith('a')"]
BINARY = ["&&", "||", "==", "!=", "<", "<=", ">", ">=", "in", "+", "-", "*", "/", "%"]


def _draw(chance: random.Random, depth: int) -> str:
    if depth <= 0 or chance.random() < 0.3:
        return chance.choice(ATOMS)
    form = chance.randrange(7)
    inner = _draw(chance, depth - 1)
    if form == 0:
        space = chance.choice([" ", "", "\n  "])
        return f"{inner} {chance.choice(BINARY)}{space}{_draw(chance, depth - 1)}"
    if form == 1:
        return f"{chance.choice(['!', '-', '!!'])}{inner}"
    if form == 2:
        return f"({inner})"
    if form == 3:
        return f"{inner} ? {_draw(chance, depth - 1)} : {_draw(chance, depth - 1)}"
    if form == 4:
        return f"[{inner}, {_draw(chance, depth - 1)}]"
    if form == 5:
        return f"({inner}).{chance.choice(METHODS)}"
    return f"{{{inner}: {_draw(chance, depth - 1)}}}[{_draw(chance, 0)}]"


def _same(text: str) -> bool:
    """True if the hand parser took `text`; either way, never a tree other than lark's."""
    mine, theirs = parse(text), _lark(text)
    if mine is None:
        return False
    assert theirs is not None, f"accepted what lark refuses: {text!r}"
    assert _shape(mine) == _shape(theirs), text
    return True


def test_every_bundled_expression_parses_alike() -> None:
    assert len(BUNDLED) > 40
    assert all(_same(text) for text in BUNDLED)  # and none is left to lark


def test_generated_expressions_parse_alike() -> None:
    texts = []  # as bench/bench_check.py writes its 4,000 conditions
    for index, text in enumerate(BUNDLED[:20]):
        texts.append(f"({text}) && at > timestamp(\"2000-01-01T00:00:00Z\") + duration(\"{index}s\")")
    assert all(_same(text) for text in texts)


@pytest.mark.parametrize("text", CORNERS)
def test_corners(text: str) -> None:
    _same(text)


def test_drawn_expressions_parse_alike() -> None:
    chance = random.Random(20261128)
    taken = sum(_same(_draw(chance, 4)) for _ in range(400))
    assert taken > 300  # most drawn expressions are taken by the hand parser (others go to lark)


def test_the_identifiers_are_gathered_as_the_walk_after_lark_finds_them() -> None:
    """parse_named's names (gathered while parsing) are those plain_names finds walking lark's tree."""
    chance = random.Random(11)
    texts = [*BUNDLED, *CORNERS, *(_draw(chance, 4) for _ in range(200))]
    named = 0
    for text in texts:
        parsed = parse_named(text)
        if parsed is None:
            continue
        tree, names = parsed
        assert names == plain_names(LARK.compile(text)), text
        assert all(type(node.data) is str for node in tree.iter_subtrees())
        named += 1
    assert named > 200
