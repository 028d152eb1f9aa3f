"""`prove rules`: for every rule and (action, role), whether it can fire, decide and pass, with witnesses."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import z3

from engine.model import PolicyVersion
from engine.prover.encoding import DecisionModel, Domain, RuleModel, contexts, decision_model, list_bound, pin_context
from engine.prover.witness import Verdict, WitnessError, build_request, decide, outcome
from engine.versions import PolicySet

POSSIBLE, IMPOSSIBLE, UNKNOWN = "possible", "impossible", "unknown"
TIMEOUT_MS = 20_000


@dataclass
class Claim:
    answer: str
    witness: dict[str, Any] | None = None
    reason: str | None = None
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class Context:
    """One (action, role) of one or two versions over one request's variables, with a solver."""

    domain: Domain
    action: str
    role: str | None
    solver: Any
    bugs: list[str]
    sane: bool = True  # some request of this (action, role) is decided: else the encoding is wrong

    def check(self, *assumptions: Any) -> Any:
        return self.solver.check(*assumptions)

    def claim(self, query: Any, policies: PolicySet, verify: Callable[..., str | None],
              uncovered: list[str], describe: Callable[[Any], dict[str, Any]] | None = None) -> Claim:
        """Whether `query` can hold; a witness the engine must confirm (`verify` says what is wrong).

        With `describe`, what the model claims (which rules decide) goes to `verify` and the claim.
        """
        if not self.sane:
            return Claim(UNKNOWN, reason="BUG: no request of this action and role fits the encoding")
        self.solver.push()
        try:
            self.solver.add(query)
            result = self.solver.check()
            if result == z3.unsat:
                return Claim(IMPOSSIBLE)
            if result != z3.sat:
                return Claim(UNKNOWN, reason=f"the solver gave up ({self.solver.reason_unknown()})")
            if self.domain.preferences and self.solver.check(*self.domain.preferences) != z3.sat:
                self.solver.check()
            model = self.solver.model()
            request = build_request(self.domain, model)
            info = describe(model) if describe is not None else {}
        finally:
            self.solver.pop()
        try:
            wrong = verify(request, info) if describe is not None else verify(request)
        except WitnessError as exc:
            wrong = str(exc)
        if wrong is None:
            return Claim(POSSIBLE, request, info=info)
        if uncovered:
            return Claim(UNKNOWN, reason="depends on CEL the encoding does not cover: " + "; ".join(uncovered))
        self.bugs.append(f"{wrong}; witness {request}")
        return Claim(UNKNOWN, request, reason=f"BUG: {wrong}")


def open_context(domain: Domain, action: str, role: str | None, any_role: bool,
                 models: Iterable[DecisionModel]) -> Context:
    pin_context(domain, action, role, any_role)
    solver = z3.Solver()
    solver.set(timeout=TIMEOUT_MS)
    solver.add(*domain.assertions())
    for model in models:
        solver.add(model.decidable)
    ctx = Context(domain, action, role, solver, [])
    if solver.check() != z3.sat:
        ctx.sane = False
        ctx.bugs.append(f"no request for {action}{'/' + role if role else ''} fits the encoding: "
                        "the contract or the rules are encoded wrong")
    return ctx


@dataclass
class RuleAnswer:
    id: str
    where: str
    effect: str
    action: str
    role: str | None
    fires: Claim
    decides: Claim
    passes: Claim
    shadowed_by: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        witnesses = {k: c.witness for k, c in (("fires", self.fires), ("decides", self.decides),
                                                ("passes", self.passes)) if c.answer == POSSIBLE}
        out: dict[str, Any] = {
            "id": self.id, "source": self.where, "effect": self.effect, "action": self.action, "role": self.role,
            "fires": self.fires.answer, "decides": self.decides.answer, "passes": self.passes.answer,
            "shadowed_by": self.shadowed_by,
            "witness": witnesses.get("decides") or witnesses.get("fires") or witnesses.get("passes"),
            "witnesses": witnesses,
        }
        reasons = {k: c.reason for k, c in (("fires", self.fires), ("decides", self.decides),
                                             ("passes", self.passes)) if c.reason}
        if reasons:
            out["unknown_because"] = reasons
        return out


@dataclass
class RulesReport:
    version: str
    bound: int
    rules: list[RuleAnswer]
    bugs: list[str]
    seconds: float

    def findings(self) -> list[tuple[str, str, str]]:
        """(kind, rule id, file:line): rules that fire in no context, or decide in none."""
        out = []
        by_rule: dict[str, list[RuleAnswer]] = {}
        for answer in self.rules:
            by_rule.setdefault(answer.id, []).append(answer)
        for rule_id, answers in by_rule.items():
            where = answers[0].where
            if all(a.fires.answer == IMPOSSIBLE for a in answers):
                out.append(("dead", rule_id, where))
            elif all(a.decides.answer == IMPOSSIBLE for a in answers):
                shadows = sorted({s for a in answers for s in a.shadowed_by})
                out.append((f"shadowed by {', '.join(shadows) or 'other rules'}", rule_id, where))
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"version": self.version, "list_bound": self.bound, "rules": [r.to_dict() for r in self.rules],
                "findings": [{"kind": k, "id": i, "source": w} for k, i, w in self.findings()],
                "bugs": self.bugs, "seconds": round(self.seconds, 2)}


def _verify_outcome(policies: PolicySet, version: str, rule_id: str,
                    want: Callable[[Verdict], str | None]) -> Callable[[dict[str, Any]], str | None]:
    def verify(request: dict[str, Any]) -> str | None:
        return want(decide(policies, request, version))
    return verify


def prove_rules(policies: PolicySet, version: PolicyVersion, bound: int | None = None) -> RulesReport:
    """Every rule of `version`, for every (action, role) it applies to."""
    started = time.perf_counter()
    bound = bound or list_bound(version)
    literals: dict[str, int] = {"": 0}
    answers: list[RuleAnswer] = []
    bugs: list[str] = []
    for action, role, any_role in contexts(version):
        domain = Domain(bound, literals)
        model = decision_model(domain, version, action, role)
        if not any(not r.is_output for r in model.rules):
            continue
        ctx = open_context(domain, action, role, any_role, [model])
        uncovered = model.uncovered()
        for index, rule in enumerate(model.rules):
            if rule.is_output:
                continue
            answers.append(_prove_rule(ctx, policies, version, model, index, rule, uncovered))
        bugs += ctx.bugs
    return RulesReport(version.name, bound, answers, bugs, time.perf_counter() - started)


def _prove_rule(ctx: Context, policies: PolicySet, version: PolicyVersion, model: DecisionModel, index: int,
                rule: RuleModel, uncovered: list[str]) -> RuleAnswer:
    name = version.name
    earlier = model.rules[:index]
    others = [r for r in model.rules if r is not rule]

    def fired(verdict: Verdict) -> str | None:
        for runtime, decision in verdict.decisions.items():
            if outcome(decision, rule.id) != "fired":
                return f"{runtime}: {rule.id} is {outcome(decision, rule.id)}, not fired, under {name}"
        return None

    def decided(verdict: Verdict) -> str | None:
        wrong = fired(verdict)
        if wrong:
            return wrong
        for runtime, decision in verdict.decisions.items():
            if rule.effect == "deny" and (decision.rule is None or decision.rule.id != rule.id):
                return f"{runtime}: decided by {decision.rule.id if decision.rule else 'nothing (allow)'}, " \
                       f"not {rule.id}, under {name}"
            if rule.effect == "warn" and decision.decision != "allow":
                return f"{runtime}: {rule.id} warns but {decision.rule.id if decision.rule else '?'} denies"
        return None

    def passed(verdict: Verdict) -> str | None:
        for runtime, decision in verdict.decisions.items():
            if outcome(decision, rule.id) != "passed":
                return f"{runtime}: {rule.id} is {outcome(decision, rule.id)}, not passed, under {name}"
        return None

    mine = rule.uncovered or uncovered
    fires = ctx.claim(rule.fired, policies, _verify_outcome(policies, name, rule.id, fired), mine)
    blockers = earlier if rule.effect == "deny" else others
    decides_query = z3.And(rule.fired, *[z3.Not(r.violation) for r in blockers])
    decides = ctx.claim(decides_query, policies, _verify_outcome(policies, name, rule.id, decided), mine) \
        if fires.answer != IMPOSSIBLE else Claim(IMPOSSIBLE)
    passes = ctx.claim(rule.passed, policies, _verify_outcome(policies, name, rule.id, passed), mine)
    answer = RuleAnswer(rule.id, rule.where, rule.effect, ctx.action, ctx.role, fires, decides, passes)
    if fires.answer == POSSIBLE and decides.answer == IMPOSSIBLE:
        answer.shadowed_by = _shadows(ctx, rule, blockers)
    return answer


def _shadows(ctx: Context, rule: RuleModel, blockers: list[RuleModel]) -> list[str]:
    """A smallest set of other rules that deny whenever `rule` fires (greedy over an unsat core)."""
    ctx.solver.push()
    try:
        ctx.solver.add(rule.fired)
        marks = {}
        for other in blockers:
            mark = z3.Bool(f"shadow:{other.id}")
            marks[other.id] = mark
            ctx.solver.add(z3.Implies(mark, z3.Not(other.violation)))
        if ctx.check(*marks.values()) != z3.unsat:
            return []
        core = {str(m) for m in ctx.solver.unsat_core()}
        chosen = [rid for rid, m in marks.items() if str(m) in core]
        for rid in list(chosen):
            trial = [marks[r] for r in chosen if r != rid]
            if ctx.check(*trial) == z3.unsat:
                chosen.remove(rid)
        return chosen
    finally:
        ctx.solver.pop()
