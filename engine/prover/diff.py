"""`prove diff`: what a new version can change, for every request the contract accepts."""

from __future__ import annotations

import html
import json
import time
from dataclasses import dataclass, field
from typing import Any

import z3

from engine.model import PolicyVersion
from engine.prover import cel
from engine.prover.condition import MAX_ATOMS, Atoms, Skeleton, denial_node, keys, minimal_cover, negate, to_cel
from engine.prover.condition import evaluate as eval_skeleton
from engine.prover.condition import substitute as subst
from engine.prover.encoding import (
    DecisionModel,
    Domain,
    Encoder,
    RuleModel,
    SBool,
    contexts,
    decision_model,
    list_bound,
)
from engine.prover.rules import IMPOSSIBLE, POSSIBLE, UNKNOWN, Context, open_context
from engine.prover.witness import decide
from engine.versions import PolicySet

ALLOW_TO_DENY, DENY_TO_ALLOW = "allow_to_deny", "deny_to_allow"


@dataclass
class DiffProof:
    old: str
    new: str
    bound: int
    allow_to_deny: str = IMPOSSIBLE
    deny_to_allow: str = IMPOSSIBLE
    witnesses: list[dict[str, Any]] = field(default_factory=list)
    condition: str | None = "false"
    within: dict[str, Any] | None = None
    reasons: list[str] = field(default_factory=list)
    bugs: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"old": self.old, "new": self.new, "allow_to_deny": self.allow_to_deny,
                               "deny_to_allow": self.deny_to_allow, "witnesses": self.witnesses,
                               "condition": self.condition}
        if self.within is not None:
            out["within"] = self.within
        out["list_bound"] = self.bound
        if self.reasons:
            out["unknown_because"] = self.reasons
        if self.bugs:
            out["bugs"] = self.bugs
        out["seconds"] = round(self.seconds, 2)
        return out

    @property
    def exit_code(self) -> int:
        """For --within: 0 every difference lies inside, 1 a counterexample, 2 unknown, 4 a bug
        (3 is every command's "the policies do not load")."""
        if self.bugs:
            return 4
        if self.within is None:
            return 0
        holds = self.within.get("holds")
        return 0 if holds is True else 1 if holds is False else 2


def _merge(a: str, b: str) -> str:
    if POSSIBLE in (a, b):
        return POSSIBLE
    return UNKNOWN if UNKNOWN in (a, b) else IMPOSSIBLE


def _guard(action: str, role: str | None) -> cel.Node:
    node: cel.Node = cel.Binary("==", cel.Var("action"), cel.Lit(action))
    if role is not None:
        node = cel.And(node, cel.Binary("==", cel.Var("role"), cel.Lit(role)))
    return node


def prove_diff(policies: PolicySet, old: PolicyVersion, new: PolicyVersion, within: str | None = None,
               bound: int | None = None, new_policies: PolicySet | None = None) -> DiffProof:
    """Whether decisions can flip from `old` to `new`, witnesses, the exact condition, and `within`.

    `new_policies`: the set `new` comes from, when not the same as `old`'s (witnesses are decided
    by the engine with each version's own set).
    """
    started = time.perf_counter()
    new_set = new_policies or policies
    bound = bound or list_bound(old, new)
    proof = DiffProof(old.name, new.name, bound)
    within_node = cel.parse(within) if within is not None else None
    literals: dict[str, int] = {"": 0}
    pieces: list[tuple[str, str | None, cel.Node]] = []
    exact = True
    within_holds: bool | None = True
    counterexample: dict[str, Any] | None = None
    checks: list[tuple[Context, DecisionModel, DecisionModel]] = []
    for action, role, any_role in contexts(old, new):
        domain = Domain(bound, literals)
        m_old = decision_model(domain, old, action, role)
        m_new = decision_model(domain, new, action, role)
        if not m_old.rules and not m_new.rules:
            continue
        encoder = Encoder(domain)
        inside = None
        if within_node is not None:
            try:
                value, err = encoder.encode(within_node)
                inside = z3.And(value.v, z3.Not(err)) if isinstance(value, SBool) else z3.BoolVal(False)
            except cel.Uncovered as exc:
                proof.reasons.append(f"--within: {exc}")
                within_holds = None
        ctx = open_context(domain, action, role, any_role, [m_old, m_new])
        if not ctx.sane:
            proof.bugs += ctx.bugs
            proof.allow_to_deny = _merge(proof.allow_to_deny, UNKNOWN)
            proof.deny_to_allow = _merge(proof.deny_to_allow, UNKNOWN)
            exact, within_holds = False, None
            continue
        checks.append((ctx, m_old, m_new))
        uncovered = m_old.uncovered() + m_new.uncovered()
        differ = z3.Xor(m_old.deny, m_new.deny)
        for kind, query in ((ALLOW_TO_DENY, z3.And(z3.Not(m_old.deny), m_new.deny)),
                            (DENY_TO_ALLOW, z3.And(m_old.deny, z3.Not(m_new.deny)))):
            claim = ctx.claim(query, policies, _verify_flip(policies, old.name, new_set, new.name), uncovered,
                              _describe(m_old, m_new, kind))
            if claim.answer == POSSIBLE:
                proof.witnesses.append({"kind": kind, "action": action, "role": role, "request": claim.witness,
                                        "old_rule": claim.info["old_rule"], "new_rule": claim.info["new_rule"]})
            elif claim.reason:
                proof.reasons.append(f"{kind} for {action}{'/' + role if role else ''}: {claim.reason}")
            if kind == ALLOW_TO_DENY:
                proof.allow_to_deny = _merge(proof.allow_to_deny, claim.answer)
            else:
                proof.deny_to_allow = _merge(proof.deny_to_allow, claim.answer)
        if inside is not None and within_holds is not False:
            verify = _verify_flip(policies, old.name, new_set, new.name)
            claim = ctx.claim(z3.And(differ, z3.Not(inside)), policies, verify, uncovered,
                              _describe(m_old, m_new, None))
            if claim.answer == POSSIBLE:
                within_holds, counterexample = False, {**claim.info, "request": claim.witness}
            elif claim.answer == UNKNOWN:
                within_holds = None
                if claim.reason:
                    proof.reasons.append(f"--within for {action}: {claim.reason}")
        proof.bugs += ctx.bugs
        try:
            body = context_condition(ctx, m_old, m_new)
        except cel.Uncovered as exc:
            proof.reasons.append(f"condition for {action}{'/' + role if role else ''}: {exc}")
            exact = False
            continue
        pieces.append((action, role, body))
    if exact:
        condition = _join(pieces)
        text = cel.show(condition)
        wrong = _prove_equal(text, condition, checks)
        if wrong:
            proof.bugs.append(f"the condition printed is not exact: {wrong}")
            proof.condition = None
        else:
            proof.condition = text
    else:
        proof.condition = None
    if within is not None:
        proof.within = {"condition": within, "holds": within_holds, "counterexample": counterexample}
    proof.seconds = time.perf_counter() - started
    return proof


def _describe(m_old: DecisionModel, m_new: DecisionModel, kind: str | None) -> Any:
    def describe(model: Any) -> dict[str, Any]:
        return {"old_rule": m_old.decider(model), "new_rule": m_new.decider(model)}
    return describe


def _verify_flip(policies: PolicySet, old: str, new_set: PolicySet, new: str) -> Any:
    def verify(request: dict[str, Any], info: dict[str, Any]) -> str | None:
        for name, key, pset in ((old, "old_rule", policies), (new, "new_rule", new_set)):
            for runtime, decision in decide(pset, request, name).decisions.items():
                got = decision.rule.id if decision.rule else None
                if got != info[key]:
                    return f"{runtime} under {name}: decided by {got or 'nothing (allow)'}, " \
                           f"the proof says {info[key] or 'nothing (allow)'}"
        return None
    return verify


def _join(pieces: list[tuple[str, str | None, cel.Node]]) -> cel.Node:
    """One CEL condition: each (action, role) guarded, roles merged where they say the same."""
    by_action: dict[str, list[tuple[str | None, cel.Node]]] = {}
    for action, role, body in pieces:
        by_action.setdefault(action, []).append((role, body))
    parts: list[cel.Node] = []
    for action, bodies in by_action.items():
        texts = {cel.show(b) for _, b in bodies}
        if len(texts) == 1 and len(bodies) > 1 and all(r is not None for r, _ in bodies):
            bodies = [(None, bodies[0][1])]
        for role, body in bodies:
            if body == cel.Lit(False):
                continue
            guard = _guard(action, role)
            parts.append(guard if body == cel.Lit(True) else cel.And(guard, body))
    if not parts:
        return cel.Lit(False)
    joined = parts[0]
    for part in parts[1:]:
        joined = cel.Or(joined, part)
    return joined


def _prove_equal(text: str, condition: cel.Node,
                 checks: list[tuple[Context, DecisionModel, DecisionModel]]) -> str | None:
    """None if the printed condition holds exactly where the decisions differ, in every context.

    The text must read back as the very tree proved; in each context only the disjuncts guarded
    by its action are encoded (`false && x` is false in CEL, even where x fails).
    """
    if cel.parse(text) != condition:
        return "the printed text does not read back as the condition proved"
    disjuncts: list[cel.Node] = []
    node = condition
    while isinstance(node, cel.Or):
        disjuncts.insert(0, node.right)
        node = node.left
    disjuncts.insert(0, node)
    for ctx, m_old, m_new in checks:
        mine = [d for d in disjuncts if _action_of(d) in (None, ctx.action)]
        encoder = Encoder(ctx.domain)
        truths = []
        for part in mine:
            value, err = encoder.encode(part)
            truths.append(z3.And(value.v, z3.Not(err)) if isinstance(value, SBool) else z3.BoolVal(False))
        truth = z3.Or(z3.BoolVal(False), *truths)
        ctx.solver.push()
        ctx.solver.add(*ctx.domain.assertions())
        ctx.solver.add(z3.Xor(truth, z3.Xor(m_old.deny, m_new.deny)))
        result = ctx.check()
        ctx.solver.pop()
        if result != z3.unsat:
            return f"for {ctx.action}{'/' + ctx.role if ctx.role else ''} ({result})"
    return None


def _action_of(node: cel.Node) -> str | None:
    """The action a disjunct's guard names (`action == "bind" && ...`), None if it has none."""
    while isinstance(node, cel.And):
        node = node.left
    if isinstance(node, cel.Binary) and node.op == "==" and node.left == cel.Var("action") \
            and isinstance(node.right, cel.Lit) and isinstance(node.right.value, str):
        return node.right.value
    return None


def context_condition(ctx: Context, m_old: DecisionModel, m_new: DecisionModel) -> cel.Node:
    """The CEL body (without the action/role guard) under which the two decisions differ."""
    solver = ctx.solver

    def never(formula: Any) -> bool:
        solver.push()
        solver.add(formula)
        result = solver.check()
        solver.pop()
        if result == z3.unknown:
            raise cel.Uncovered("the solver gave up simplifying the condition")
        return bool(result == z3.unsat)

    if never(z3.Xor(m_old.deny, m_new.deny)):
        return cel.Lit(False)
    atoms = Atoms(Encoder(ctx.domain), {}, {})

    def denials(model: DecisionModel) -> list[tuple[RuleModel, Skeleton, Any]]:
        """Each rule's denial as a skeleton, proved equal to the encoding (for an output: wherever
        no rule denies, the only place its failure counts)."""
        any_rule = z3.Or(z3.BoolVal(False), *[r.violation for r in model.rules if not r.is_output])
        out = []
        for rule in model.rules:
            node = denial_node(rule)
            if node is None:
                raise cel.Uncovered(f"{rule.id} is outside the encoding")
            scope = z3.Not(any_rule) if rule.is_output else z3.BoolVal(True)
            target = rule.failed if rule.is_output else rule.violation
            for found in (atoms.skeleton(node), atoms.atom(node)):
                truth = atoms.z3(found)
                if never(z3.And(scope, z3.Xor(truth, target))):
                    out.append((rule, found, truth))
                    break
            else:
                raise cel.Uncovered(f"{rule.id} can fail to evaluate, and no CEL says exactly when")
        return out

    olds = {r.id: (r, s, z) for r, s, z in denials(m_old)}
    common: list[tuple[Skeleton, Any]] = []
    matched: set[str] = set()
    news: list[tuple[Skeleton, Any]] = []
    for rule, skeleton, truth in denials(m_new):
        twin = olds.get(rule.id)
        if twin is not None and never(z3.Xor(twin[2], truth)):
            common.append((skeleton, truth))
            matched.add(rule.id)
        else:
            news.append((skeleton, truth))
    gone = [(s, z) for rid, (_, s, z) in olds.items() if rid not in matched]
    solver.add(*ctx.domain.assertions())
    old_s: Skeleton = ("or", [s for s, _ in gone])
    new_s: Skeleton = ("or", [s for s, _ in news])
    core_s: Skeleton = ("or", [("and", [old_s, negate(new_s)]), ("and", [negate(old_s), new_s])])
    core_z = z3.Xor(z3.Or(z3.BoolVal(False), *[z for _, z in gone]),
                    z3.Or(z3.BoolVal(False), *[z for _, z in news]))
    core_s = _reduce(solver, atoms, core_s)
    solver.push()
    solver.add(core_z)
    try:
        kept: list[Skeleton] = [core_s]
        for shared, truth in common:
            if never(truth):
                continue
            known: dict[str, bool] = {}
            for key in dict.fromkeys(keys(shared)):
                if never(atoms.truth[key]):
                    known[key] = False
                elif never(z3.Not(atoms.truth[key])):
                    known[key] = True
            reduced = subst(shared, known)
            if reduced != ("const", False):
                kept.append(negate(reduced))
    finally:
        solver.pop()
    result = kept[0] if len(kept) == 1 else ("and", kept)
    return to_cel(subst(result, {}), atoms)


def _reduce(solver: Any, atoms: Atoms, core: Skeleton) -> Skeleton:
    """A small sum of products equal to `core` on every combination of atoms a request can have."""
    names = list(dict.fromkeys(keys(core)))
    if len(names) > MAX_ATOMS:
        return core
    truths = [atoms.truth[n] for n in names]
    on: list[tuple[bool, ...]] = []
    off: list[tuple[bool, ...]] = []
    solver.push()
    try:
        while solver.check() == z3.sat:
            model = solver.model()
            point = tuple(z3.is_true(model.eval(t, model_completion=True)) for t in truths)
            (on if eval_skeleton(core, dict(zip(names, point, strict=True))) else off).append(point)
            solver.add(z3.Or(*[t != z3.BoolVal(v) for t, v in zip(truths, point, strict=True)]))
            if len(on) + len(off) > 4096:
                return core
    finally:
        solver.pop()
    if not on:
        return ("const", False)
    cubes = minimal_cover(on, off, len(names))
    common = set(cubes[0].items())
    for cube in cubes[1:]:
        common &= set(cube.items())

    def literal(i: int, v: bool) -> Skeleton:
        return ("atom", names[i]) if v else ("not", ("atom", names[i]))

    shared = [literal(i, v) for i, v in sorted(common)]
    rest = [[literal(i, v) for i, v in sorted(c.items()) if (i, v) not in common] for c in cubes]
    if any(not r for r in rest):
        return ("and", shared) if shared else ("const", True)
    alternatives: Skeleton = ("or", [r[0] if len(r) == 1 else ("and", r) for r in rest])
    if len(rest) == 1:
        alternatives = alternatives[1][0]
    return ("and", [*shared, alternatives]) if shared else alternatives


_CACHE: dict[tuple[str, str, str | None], DiffProof] = {}


def cached_proof(policies: PolicySet, old: PolicyVersion, new: PolicyVersion,
                 new_policies: PolicySet | None = None) -> DiffProof:
    """prove_diff, kept by the two versions' digests (the service's diff endpoint asks again and again)."""
    key = (old.digest, new.digest, None)
    if key not in _CACHE:
        if len(_CACHE) > 64:
            _CACHE.clear()
        try:
            _CACHE[key] = prove_diff(policies, old, new, new_policies=new_policies)
        except Exception as exc:  # the semantic diff still answers; the failure is shown as a bug
            failed = DiffProof(old.name, new.name, 0, UNKNOWN, UNKNOWN, condition=None)
            failed.bugs.append(f"the prover failed: {type(exc).__name__}: {exc}")
            return failed
    return _CACHE[key]


# --- rendering ---------------------------------------------------------------------------------------


def render(proof: DiffProof, fmt: str) -> str:
    data = proof.to_dict()
    if fmt == "json":
        return json.dumps(data, indent=2, ensure_ascii=False) + "\n"
    if fmt == "markdown":
        return "\n".join(markdown_lines(proof)) + "\n"
    if fmt == "html":
        return (f"<!doctype html><html lang=en><head><meta charset=utf-8><title>What can change: "
                f"{html.escape(proof.old)} → {html.escape(proof.new)}</title></head><body>"
                f"{html_section(proof)}</body></html>\n")
    return "\n".join(text_lines(proof)) + "\n"


def _rule(rule_id: str | None) -> str:
    return rule_id or "allowed"


def split_condition(condition: str | None) -> list[str]:
    """The condition one (action, role) a line (still CEL: line breaks are spaces to it)."""
    if condition is None:
        return ["unknown"]
    return condition.replace(' || action == "', '\n|| action == "').splitlines()


def text_lines(proof: DiffProof) -> list[str]:
    lines = [f"what can change, {proof.old} -> {proof.new}, for every request the contract accepts "
             f"(lists up to {proof.bound} items):",
             f"  allow -> deny: {proof.allow_to_deny}",
             f"  deny -> allow: {proof.deny_to_allow}"]
    lines.append("  decisions differ exactly when:")
    lines += [f"    {line}" for line in split_condition(proof.condition)]
    for w in proof.witnesses:
        lines.append(f"  witness {w['kind'].replace('_', ' ')} ({_rule(w['old_rule'])} -> {_rule(w['new_rule'])}): "
                     f"{json.dumps(w['request'], ensure_ascii=False)}")
    if proof.within is not None:
        holds = proof.within["holds"]
        verdict = "holds" if holds is True else "does not hold" if holds is False else "unknown"
        lines.append(f"  within {proof.within['condition']}: {verdict}")
        if proof.within["counterexample"]:
            lines.append(f"    counterexample: {json.dumps(proof.within['counterexample'], ensure_ascii=False)}")
    lines += [f"  unknown because: {r}" for r in proof.reasons]
    lines += [f"  BUG: {b}" for b in proof.bugs]
    return lines


def markdown_lines(proof: DiffProof) -> list[str]:
    lines = ["## What can change", "",
             f"For every request the contract accepts (lists up to {proof.bound} items):", "",
             f"- allow → deny: **{proof.allow_to_deny}**", f"- deny → allow: **{proof.deny_to_allow}**", "",
             "Decisions differ exactly when:", "", "```cel", *split_condition(proof.condition), "```"]
    for w in proof.witnesses:
        lines += ["", f"Witness, {w['kind'].replace('_', ' ')} (`{_rule(w['old_rule'])}` → `{_rule(w['new_rule'])}`):",
                  "", f"```json\n{json.dumps(w['request'], ensure_ascii=False)}\n```"]
    lines += [f"- unknown because: {r}" for r in proof.reasons]
    lines += [f"- **BUG**: {b}" for b in proof.bugs]
    return lines


def html_section(proof: DiffProof) -> str:
    e = html.escape
    witnesses = "".join(
        f"<h3>Witness, {e(w['kind'].replace('_', ' '))} ({e(_rule(w['old_rule']))} → {e(_rule(w['new_rule']))})</h3>"
        f"<pre>{e(json.dumps(w['request'], indent=1, ensure_ascii=False))}</pre>" for w in proof.witnesses)
    notes = "".join(f"<p>unknown because: {e(r)}</p>" for r in proof.reasons) + \
        "".join(f"<p><strong>BUG</strong>: {e(b)}</p>" for b in proof.bugs)
    condition = "\n".join(split_condition(proof.condition))
    return (f"<section><h2>What can change</h2><p>For every request the contract accepts (lists up to "
            f"{proof.bound} items):</p><ul><li>allow → deny: <strong>{e(proof.allow_to_deny)}</strong></li>"
            f"<li>deny → allow: <strong>{e(proof.deny_to_allow)}</strong></li></ul>"
            f"<p>Decisions differ exactly when:</p><pre>{e(condition)}</pre>{witnesses}{notes}</section>")
