"""The policy model: frozen records for expressions, rules, outputs, versions and decisions."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import orjson

from engine.errors import Location
from engine.messages import DEFAULT_LANGUAGE, Message

# A field path as an expression reads it: ("account", "kyc", "verified");
# "[]" stands for "every item of this list" (a comprehension's loop variable).
FieldPath = tuple[str, ...]

EACH = "[]"
# Marks the end of a has()-guarded prefix in a needed path: absent up to there is fine.
OPTIONAL = "?"


@dataclass(frozen=True)
class Expression:
    """A CEL expression compiled once at load, with the request fields it reads."""

    text: str
    program: Any  # a celpy Runner: the reference semantics
    location: Location
    needs: tuple[FieldPath, ...]  # read outside has(): the request must carry them
    tests: tuple[FieldPath, ...]  # only tested with has(): may be absent
    # The needs once the action and role are known (branches they rule out dropped).
    needs_by_context: Mapping[tuple[str, str | None], tuple[FieldPath, ...]] = field(
        default_factory=dict, compare=False, repr=False)
    # The same expression as native Python closures (engine/native.py); None where the
    # expression uses CEL outside the native subset.
    native: Any = field(default=None, compare=False, repr=False)
    tree: Any = field(default=None, compare=False, repr=False)  # the parse tree (engine/codegen.py writes it out)
    identifiers: frozenset[str] = field(default=frozenset(), compare=False, repr=False)  # every name the tree reads

    def reads(self) -> tuple[FieldPath, ...]:
        return self.needs + self.tests

    def needs_for(self, action: str, role: str | None) -> tuple[FieldPath, ...]:
        """The request fields this expression needs once the action and role are known (the
        public way to ask; worked out by engine/needs.py's walker at load)."""
        return self.needs_by_context.get((action, role), self.needs)


@dataclass(frozen=True)
class Rule:
    """One rule of the catalogue: where it applies, when it fires, and what it says."""

    id: str
    actions: tuple[str, ...]
    roles: tuple[str, ...] | None
    effect: str  # "deny" or "warn"
    applies_when: Expression | None
    fires_when: Expression
    message: str
    source: str  # the section of the source document
    location: Location  # where the rule is written
    defined_in: str  # the version whose files hold it
    # The message in every language, placeholders and all (`message` is the English text).
    messages: Message | None = field(default=None, compare=False)

    def render(self, language: str, params: Mapping[str, Any], request: Mapping[str, Any]) -> str:
        """The message in `language`, its `{params.x}` and `{field}` placeholders filled in."""
        if self.messages is None:
            return self.message
        return self.messages.render(language, params, request)

    @property
    def where(self) -> str:
        return f"{self.location.file}:{self.location.line}"

    def applies_to(self, action: str, role: str | None) -> bool:
        return action in self.actions and (self.roles is None or role in self.roles)


@dataclass(frozen=True)
class Output:
    """A value an allowed decision tells the caller (promotion scope, unbind_not_before...)."""

    name: str
    actions: tuple[str, ...]
    roles: tuple[str, ...] | None
    applies_when: Expression | None
    value: Expression
    source: str
    location: Location
    defined_in: str

    def applies_to(self, action: str, role: str | None) -> bool:
        return action in self.actions and (self.roles is None or role in self.roles)


@dataclass(frozen=True)
class NeedsPlan:
    """How to check, fast, that a request carries the fields the rules of an (action, role) need.

    `everything` checks in one walk every field any of the rules could read: a complete request
    needs no other look. Else `always` checks every field needed whatever the request says
    (the fields of every `applies_when`, and of rules without one); `conditional` has, for each expression
    needed only once its rule applies, a check of its own fields. A check that fails hands
    over to the exact, field-by-field accounting that names each missing field.
    """

    everything: Any  # Callable[[request], bool]: every field any of them could need is there
    always: Any  # Callable[[request], bool]
    conditional: Mapping[int, Any]  # id(expression) -> Callable[[request], bool]
    # The paths behind `everything`, for the generated paths (engine/codegen.py) to write it out.
    everything_paths: tuple[FieldPath, ...] = ()


@dataclass(frozen=True)
class PolicyVersion:
    """A complete, checked and compiled policy version, inheritance already resolved."""

    name: str
    effective_from: datetime
    description: str
    extends: str | None
    parameters: Mapping[str, Any]
    rules: tuple[Rule, ...]
    outputs: tuple[Output, ...]
    files: tuple[str, ...]  # every file that contributes, its own and its ancestors'
    digest: str  # sha256 over those files' names and bytes
    sources: Mapping[str, str] = field(repr=False, compare=False, default_factory=dict)  # name -> text
    cel_parameters: Any = field(repr=False, compare=False, default=None)
    native_parameters: Mapping[str, Any] = field(repr=False, compare=False, default_factory=dict)
    # Rules and outputs by (action, role), so that a decision only looks at what applies.
    _rules_by_action: Mapping[tuple[str, str | None], tuple[Rule, ...]] = field(
        repr=False, compare=False, default_factory=dict)
    _outputs_by_action: Mapping[tuple[str, str | None], tuple[Output, ...]] = field(
        repr=False, compare=False, default_factory=dict)
    _presence: Mapping[tuple[str, str | None], NeedsPlan] = field(repr=False, compare=False,
                                                                   default_factory=dict)
    # One generated function per (action, role) (engine/codegen.py's GeneratedPath), written at load.
    _paths: Mapping[tuple[str, str | None], Any] = field(repr=False, compare=False, default_factory=dict)

    def needs_plan(self, action: str, role: str | None) -> NeedsPlan | None:
        plan: NeedsPlan | None = self._presence.get((action, role))
        return plan

    def path(self, action: str, role: str | None) -> Any:
        """The generated decision path of an action and role (engine/codegen.py), or None."""
        return self._paths.get((action, role))

    def rules_for(self, action: str, role: str | None) -> tuple[Rule, ...]:
        """The rules that apply to an action and role, in policy order (indexed at load)."""
        found = self._rules_by_action.get((action, role))
        if found is None:
            return tuple(r for r in self.rules if r.applies_to(action, role))
        return found

    def outputs_for(self, action: str, role: str | None) -> tuple[Output, ...]:
        found = self._outputs_by_action.get((action, role))
        if found is None:
            return tuple(o for o in self.outputs if o.applies_to(action, role))
        return found

    def rule(self, rule_id: str) -> Rule | None:
        return next((r for r in self.rules if r.id == rule_id), None)


@dataclass(frozen=True)
class Finding:
    """A rule that fired, as the response shows it."""

    id: str
    message: str
    policy: str
    source: str

    def to_dict(self) -> dict[str, str]:
        return {"id": self.id, "message": self.message, "policy": self.policy, "source": self.source}


@dataclass(frozen=True)
class Trace:
    """One rule's evaluation, for explain: outcome and the values it read."""

    id: str
    effect: str
    outcome: str  # not_applicable | passed | fired | error
    values: Mapping[str, Any]
    source: str
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "effect": self.effect, "outcome": self.outcome,
                               "values": dict(self.values), "source": self.source}
        if self.error is not None:
            out["error"] = self.error
        return out


@dataclass(frozen=True)
class Decision:
    """The answer to one request, shaped as the response of docs/contract.md."""

    decision_id: str
    decision: str
    rule: Finding | None
    violations: tuple[Finding, ...]
    warnings: tuple[Finding, ...]
    outputs: Mapping[str, Any]
    policy_version: str
    policy_digest: str
    runtime: str  # which evaluator decided: part of the policy identity
    at: str
    explain: tuple[Trace, ...] | None = None
    language: str = DEFAULT_LANGUAGE  # the language of every message in it


    @property
    def allowed(self) -> bool:
        return self.decision == "allow"

    def to_dict(self) -> dict[str, Any]:
        out = self._shape(self.rule.to_dict() if self.rule else None, [v.to_dict() for v in self.violations],
                          [w.to_dict() for w in self.warnings], dict(self.outputs))
        if self.explain is not None:
            out["explain"] = [t.to_dict() for t in self.explain]
        return out

    def to_json_line(self) -> bytes:
        """orjson's writing of to_dict(), byte for byte, and a newline: without explain, the
        findings are handed to orjson as the dataclasses they are (it writes their fields in
        order, the keys of Finding.to_dict) instead of a dict built for each (`decide --jsonl`),
        and the outputs as they are (orjson writes a dict without a copy)."""
        if self.explain is not None:
            return orjson.dumps(self.to_dict(), option=orjson.OPT_APPEND_NEWLINE)
        outputs = self.outputs
        return orjson.dumps(self._shape(self.rule, self.violations, self.warnings,
                                        outputs if type(outputs) is dict else dict(outputs)),
                            option=orjson.OPT_APPEND_NEWLINE)

    def _shape(self, rule: Any, violations: Any, warnings: Any, outputs: dict[str, Any]) -> dict[str, Any]:
        """The response of docs/contract.md around its findings and outputs, as given."""
        return {
            "decision_id": self.decision_id,
            "decision": self.decision,
            "rule": rule,
            "violations": violations,
            "warnings": warnings,
            "outputs": outputs,
            "policy": {"version": self.policy_version, "digest": self.policy_digest, "runtime": self.runtime},
            "at": self.at,
            "language": self.language,
        }
