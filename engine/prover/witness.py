"""Witnesses: a solver model as a request the contract accepts, and the engine's verdict on it."""

from __future__ import annotations

import itertools
import string
from dataclasses import dataclass
from datetime import UTC, datetime
from fractions import Fraction
from typing import Any

import z3

from engine.decider import Engine
from engine.errors import RequestError
from engine.evaluator import RUNTIMES
from engine.model import Decision
from engine.prover.encoding import (
    COUNTRY,
    Domain,
    ObjectNode,
    SBool,
    SDouble,
    SDur,
    SInt,
    SList,
    SNull,
    SNullable,
    SObj,
    SStr,
    STime,
    Sym,
)
from engine.schemas import Schema
from engine.versions import PolicySet, format_timestamp


class WitnessError(Exception):
    """The engine does not decide a witness as the proof claims: a bug of the prover or the engine."""


# Made-up strings: letters first; CJK characters keep one-character strings from running out.
_ALPHABET = string.ascii_lowercase + string.ascii_uppercase + string.digits + "".join(
    chr(c) for c in range(0x4E00, 0x4E00 + 2000))


class _Strings:
    """Concrete strings for the solver's string identities: literals as written, others made up."""

    def __init__(self, domain: Domain, model: Any) -> None:
        self.model = model
        self.domain = domain
        self.texts = {index: text for text, index in domain.literals.items()}
        self.made: dict[int, str] = {}
        self.used = set(domain.literals)

    def text(self, ident: int, country: bool) -> str:
        if ident >= 0:
            return str(self.texts[ident])
        if ident in self.made:
            return self.made[ident]
        size = self.model.eval(self.domain.slen(z3.IntVal(ident)), model_completion=True).as_long()
        if country:
            candidates: Any = ("".join(p) for p in itertools.product(string.ascii_uppercase, repeat=2))
        else:
            candidates = ("".join(p) for p in itertools.product(_ALPHABET, repeat=size))
        for candidate in candidates:
            if len(candidate) == size and candidate not in self.used:
                self.made[ident] = candidate
                self.used.add(candidate)
                return str(candidate)
        raise WitnessError(f"no string of length {size} is left")


def _default(domain: Domain, schema: Schema) -> Any:
    """A value the contract accepts, for a required field no rule reads."""
    schema = domain.resolve(schema)
    if "oneOf" in schema:
        return None
    if "enum" in schema:
        return schema["enum"][0]
    kind = schema.get("type")
    if kind == "string" and schema.get("format") == "date-time":
        return "2025-01-01T00:00:00Z"
    if kind == "string":
        return "ZZ" if schema.get("pattern") == COUNTRY else "z" * max(1, schema.get("minLength", 0))
    if kind == "integer":
        return max(0, schema.get("minimum", 0))
    if kind == "number":
        return float(max(0, schema.get("minimum", 0)))
    if kind == "boolean":
        return False
    if kind == "array":
        return []
    return {name: _default(domain, schema["properties"][name]) for name in schema.get("required", ())}


def build_request(domain: Domain, model: Any) -> dict[str, Any]:
    """The request a model describes: the fields the rules read, and defaults for other required ones."""
    strings = _Strings(domain, model)

    def value(sym: Sym, schema: Schema) -> Any:
        schema = domain.resolve(schema)
        if isinstance(sym, SNullable):
            if z3.is_true(model.eval(sym.null, model_completion=True)):
                return None
            inner = next(domain.resolve(b) for b in schema["oneOf"] if domain.resolve(b).get("type") != "null")
            return value(sym.inner, inner)
        got: Any = model.eval(getattr(sym, "v", getattr(sym, "id", None)), model_completion=True) \
            if not isinstance(sym, SObj | SList | SNull) else None
        if isinstance(sym, SBool):
            return z3.is_true(got)
        if isinstance(sym, SInt):
            return got.as_long()
        if isinstance(sym, SDouble):
            fraction = Fraction(got.as_fraction())
            return float(fraction)
        if isinstance(sym, STime):
            return format_timestamp(datetime.fromtimestamp(got.as_long(), UTC))
        if isinstance(sym, SDur):
            return f"{got.as_long()}s"
        if isinstance(sym, SStr):
            return strings.text(got.as_long(), schema.get("pattern") == COUNTRY)
        if isinstance(sym, SObj):
            return obj(sym.node)
        if isinstance(sym, SList):
            return [value(item, schema["items"]) for item, member in zip(sym.items, sym.members, strict=True)
                    if z3.is_true(model.eval(member, model_completion=True))]
        return None

    def obj(node: ObjectNode) -> dict[str, Any]:
        out: dict[str, Any] = {}
        props = node.schema.get("properties", {})
        for name in props:
            if name in node.fields:
                present, sym = node.fields[name]
                if z3.is_true(model.eval(present, model_completion=True)):
                    out[name] = value(sym, props[name])
            elif name in node.schema.get("required", ()):
                out[name] = _default(domain, props[name])
        for part in [node.schema, *node.schema.get("allOf", ())]:
            condition, then = part.get("if"), part.get("then")
            if not condition or not then:
                continue
            ((key, spec),) = condition.get("properties", {}).items()
            allowed = spec.get("enum", [spec.get("const")])
            if out.get(key) in allowed:
                for name in then.get("required", ()):
                    if name not in out:
                        out[name] = _default(domain, props[name])
        return out

    return obj(domain.root)


@dataclass
class Verdict:
    """The engine's decisions on one request, one per runtime."""

    decisions: dict[str, Decision]


_ENGINES: dict[tuple[int, str], tuple[PolicySet, Engine]] = {}


def _engine(policies: PolicySet, runtime: str) -> Engine:
    key = (id(policies), runtime)
    found = _ENGINES.get(key)
    if found is None or found[0] is not policies:
        if len(_ENGINES) > 8:
            _ENGINES.clear()
        found = _ENGINES[key] = (policies, Engine(policies, runtime=runtime))
    return found[1]


def decide(policies: PolicySet, request: dict[str, Any], version: str) -> Verdict:
    """Decide a witness under `version` with every runtime; a rejection is a WitnessError."""
    out: dict[str, Decision] = {}
    pinned = {**request, "policy_version": version}
    now = datetime(2025, 1, 1, tzinfo=UTC)
    for runtime in RUNTIMES:
        try:
            out[runtime] = _engine(policies, runtime).decide(pinned, now=now, decision_id="prove",
                                                                    explain=True)
        except RequestError as exc:
            details = "; ".join(f"{d.path}: {d.problem}" for d in exc.details)
            raise WitnessError(f"{runtime} rejects the witness under {version}: {exc.message} {details}".strip()) \
                from exc
    return Verdict(out)


def outcome(decision: Decision, rule_id: str) -> str | None:
    """The trace outcome of one rule (fired, passed, not_applicable, error), None if it was not evaluated."""
    for trace in decision.explain or ():
        if trace.id == rule_id:
            return trace.outcome
    return None
