"""The condition under which two versions decide differently, as short CEL, proved equal to the encoding.

Rules that both versions share (same id, same denial over the domain) drop out of the
difference except as "none of them denies"; the rest is reduced over its atoms (the comparisons
and tests of the rules) to a small sum of products, using the contract to discard combinations
that no request can have; the shared rules are then simplified under that core. Whatever comes
out is encoded again and proved equal to "the decisions differ" before it is printed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import z3

from engine.prover import cel
from engine.prover.encoding import TS_MAX, Encoder, RuleModel, SBool, parse_duration
from engine.versions import format_timestamp

MAX_ATOMS = 12

# A boolean skeleton over atoms: ("atom", key) | ("const", bool) | ("not", s) | ("and", [s]) | ("or", [s])
Skeleton = tuple[Any, ...]
_FLIP = {"==": "!=", "!=": "==", "<": ">=", ">=": "<", "<=": ">", ">": "<="}


@dataclass
class Atoms:
    encoder: Encoder
    nodes: dict[str, cel.Node]
    truth: dict[str, Any]

    def atom(self, node: cel.Node) -> Skeleton:
        if isinstance(node, cel.Binary) and node.op in ("!=", ">=", ">"):
            return ("not", self.atom(cel.Binary(_FLIP[node.op], node.left, node.right)))
        key = cel.show(node)
        if key not in self.nodes:
            value, err = self.encoder.encode(node)
            if not isinstance(value, SBool):
                raise cel.Uncovered(key)
            self.nodes[key] = node
            self.truth[key] = z3.And(value.v, z3.Not(err))
        return ("atom", key)

    def skeleton(self, node: cel.Node) -> Skeleton:
        if isinstance(node, cel.And):
            return ("and", [self.skeleton(node.left), self.skeleton(node.right)])
        if isinstance(node, cel.Or):
            return ("or", [self.skeleton(node.left), self.skeleton(node.right)])
        if isinstance(node, cel.Not):
            return ("not", self.skeleton(node.operand))
        if isinstance(node, cel.Lit) and isinstance(node.value, bool):
            return ("const", node.value)
        if isinstance(node, cel.Cond):
            test = self.skeleton(node.test)
            return ("or", [("and", [test, self.skeleton(node.then)]),
                           ("and", [("not", test), self.skeleton(node.other)])])
        return self.atom(node)

    def z3(self, s: Skeleton) -> Any:
        kind = s[0]
        if kind == "atom":
            return self.truth[s[1]]
        if kind == "const":
            return z3.BoolVal(s[1])
        if kind == "not":
            return z3.Not(self.z3(s[1]))
        parts = [self.z3(p) for p in s[1]]
        return (z3.And if kind == "and" else z3.Or)(*parts) if parts else z3.BoolVal(kind == "and")


def keys(s: Skeleton) -> list[str]:
    if s[0] == "atom":
        return [s[1]]
    if s[0] == "const":
        return []
    if s[0] == "not":
        return keys(s[1])
    return [k for p in s[1] for k in keys(p)]


def evaluate(s: Skeleton, values: dict[str, bool]) -> bool:
    kind = s[0]
    if kind == "atom":
        return values[s[1]]
    if kind == "const":
        return bool(s[1])
    if kind == "not":
        return not evaluate(s[1], values)
    results = (evaluate(p, values) for p in s[1])
    return all(results) if kind == "and" else any(results)


def substitute(s: Skeleton, known: dict[str, bool]) -> Skeleton:
    """Replace known atoms and fold constants."""
    kind = s[0]
    if kind == "atom":
        return ("const", known[s[1]]) if s[1] in known else s
    if kind == "const":
        return s
    if kind == "not":
        inner = substitute(s[1], known)
        return ("const", not inner[1]) if inner[0] == "const" else ("not", inner)
    parts = [substitute(p, known) for p in s[1]]
    absorbing = kind == "or"
    if any(p == ("const", absorbing) for p in parts):
        return ("const", absorbing)
    parts = [p for p in parts if p[0] != "const"]
    if not parts:
        return ("const", not absorbing)
    return parts[0] if len(parts) == 1 else (kind, parts)


def negate(s: Skeleton) -> Skeleton:
    kind = s[0]
    if kind == "const":
        return ("const", not s[1])
    if kind == "not":
        inner: Skeleton = s[1]
        return inner
    if kind == "atom":
        return ("not", s)
    return ("or" if kind == "and" else "and", [negate(p) for p in s[1]])


def to_cel(s: Skeleton, atoms: Atoms) -> cel.Node:
    kind = s[0]
    if kind == "const":
        return cel.Lit(bool(s[1]))
    if kind == "atom":
        return atoms.nodes[s[1]]
    if kind == "not":
        inner = s[1]
        if inner[0] == "atom":
            node = atoms.nodes[inner[1]]
            # `x != null` on an object raises in cel-python 0.5: `!(x == null)` says the same
            if isinstance(node, cel.Binary) and node.op in _FLIP and cel.Lit(None) not in (node.left, node.right):
                return cel.Binary(_FLIP[node.op], node.left, node.right)
            return cel.Not(node)
        return to_cel(negate(inner), atoms) if inner[0] in ("and", "or") else cel.Not(to_cel(inner, atoms))
    parts = [to_cel(p, atoms) for p in s[1]]
    joined = parts[0]
    for part in parts[1:]:
        joined = cel.And(joined, part) if kind == "and" else cel.Or(joined, part)
    return joined


def denial_node(rule: RuleModel) -> cel.Node | None:
    """CEL that is true exactly when the rule (or output) denies, before checking it against the encoding."""
    if not rule.is_output:
        return rule.denies
    # An output denies only when it fails; `at + duration("…")` fails past the last timestamp CEL holds.
    value = rule.fires.node
    if isinstance(value, cel.Binary) and value.op == "+" and isinstance(value.right, cel.Call) \
            and value.right.name == "duration" and isinstance(value.right.args[0], cel.Lit):
        seconds = parse_duration(str(value.right.args[0].value))
        from datetime import UTC, datetime
        limit = format_timestamp(datetime.fromtimestamp(TS_MAX - seconds, UTC))
        failure: cel.Node = cel.Binary(">", value.left, cel.Call("timestamp", (cel.Lit(limit),)))
    else:
        failure = cel.Lit(False)
    if rule.applies is None:
        return failure
    if rule.applies.node is None:
        return None
    return cel.And(rule.applies.node, failure)


def minimal_cover(on: list[tuple[bool, ...]], off: list[tuple[bool, ...]], k: int) -> list[dict[int, bool]]:
    """A small set of cubes covering every `on` point and no `off` point (unlisted points: don't care)."""
    cubes: list[dict[int, bool]] = []
    for point in on:
        if any(all(point[i] == v for i, v in c.items()) for c in cubes):
            continue
        cube = dict(enumerate(point))
        for i in range(k):
            trial = {j: v for j, v in cube.items() if j != i}
            if not any(all(p[j] == v for j, v in trial.items()) for p in off):
                cube = trial
        cubes.append(cube)
    needed: list[dict[int, bool]] = []
    for index, cube in enumerate(cubes):
        rest = needed + cubes[index + 1:]
        points = [p for p in on if all(p[j] == v for j, v in cube.items())]
        if not all(any(all(p[j] == v for j, v in c.items()) for c in rest) for p in points):
            needed.append(cube)
    return needed
