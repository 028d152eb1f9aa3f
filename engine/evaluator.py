"""Evaluation, and nothing else: a checked request and a compiled version in, a decision out."""

from __future__ import annotations

import logging
import math
import weakref
from collections import Counter
from collections.abc import Callable, Mapping
from datetime import datetime, timedelta
from functools import cache
from typing import Any, Protocol

from celpy import celtypes

from engine.messages import CHINESE, ENGLISH
from engine.model import Decision, Expression, Finding, Output, PolicyVersion, Rule, Trace
from engine.native import CelError, CelType, Defer, format_duration
from engine.needs import MissingFields, absent_fields
from engine.request import NativeConverter, value_at
from engine.versions import format_timestamp

PASSED, FIRED, NOT_APPLICABLE, ERROR = "passed", "fired", "not_applicable", "error"
# What a caller reads when an expression fails (English, Chinese): the rule denies.
_FAILED = ("rule {id} failed to evaluate, so it denies (fail closed): {error}",
           "规则 {id} 无法求值，因此拒绝（失败即拒绝）：{error}")
_OUTPUT_FAILED = ("output {name} failed to evaluate, so the request is denied (fail closed): {error}",
                  "输出 {name} 无法求值，因此请求被拒绝（失败即拒绝）：{error}")


NATIVE, CEL_PYTHON = "native", "cel-python"
RUNTIMES = (NATIVE, CEL_PYTHON)
# What `policy.runtime` says when the native runtime handed an expression of the decision to
# cel-python: the decision was not native alone.
NATIVE_WITH_REFERENCE = "native+cel-python"

# Why the native runtime did not answer an expression: it said so (the expression is outside
# it, or a value is), or it failed in a way it should not (a bug: counted, logged, and the
# reference decides).
UNSUPPORTED, DEFERRED, NATIVE_BUG = "unsupported", "deferred", "native_bug"
# A generated decision path (engine/codegen.py) that raised other than a CEL error: a bug of the
# generator, counted and logged; the evaluator decides the request.
GENERATED_BUG = "generated_bug"

log = logging.getLogger("bindpolicy.runtime")


class EvaluationFailure(Exception):
    """An expression that could not produce a boolean (or a value): its rule fails closed."""


class Activation:
    """A request's variables as plain Python values; the CEL form is built only if needed."""

    __slots__ = ("_build_cel", "_cel", "native", "runtime")

    def __init__(self, native: dict[str, Any], build_cel: Callable[[], dict[str, Any]],
                 runtime: str = NATIVE) -> None:
        self.native = native
        self.runtime = runtime  # the runtime asked for; NATIVE_WITH_REFERENCE once cel-python helped
        self._build_cel = build_cel
        self._cel: dict[str, Any] | None = None

    @property
    def cel(self) -> dict[str, Any]:
        if self._cel is None:
            self._cel = self._build_cel()
        return self._cel


class Runtime(Protocol):
    """One way to evaluate a compiled expression (as cel-python's Runner classes are)."""

    name: str

    def evaluate(self, expr: Expression, activation: Activation) -> Any:
        """The expression's value; EvaluationFailure for a CEL error."""


class ReferenceRuntime:
    """cel-python's evaluator: the reference for whatever the native runtime does not cover."""

    name = CEL_PYTHON

    def evaluate(self, expr: Expression, activation: Activation) -> Any:
        try:
            return expr.program.evaluate(activation.cel)
        except Exception as exc:  # celpy raises CELEvalError, and at times plain Python errors
            raise EvaluationFailure(_describe(exc)) from exc


class NativeRuntime:
    """The native closures (engine/native.py); Defer (or Unsupported at load) is their only way out."""

    name = NATIVE

    def evaluate(self, expr: Expression, activation: Activation) -> Any:
        if expr.native is None:
            raise Defer
        try:
            return expr.native(activation.native)
        except CelError as exc:
            raise EvaluationFailure(str(exc)) from exc


class FallbackListener(Protocol):
    def native_fallback(self, kind: str) -> None: ...


class FallbackEvents:
    """Counts every expression the native runtime did not answer, by why; subscribers (metrics) hear each."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self._listeners: weakref.WeakSet[Any] = weakref.WeakSet()  # an app's metrics go with the app

    def subscribe(self, listener: FallbackListener) -> None:
        self._listeners.add(listener)

    def record(self, kind: str, expr: Expression, exc: BaseException | None = None) -> None:
        self.counts[kind] += 1
        for listener in list(self._listeners):
            listener.native_fallback(kind)
        if kind == NATIVE_BUG:
            log.error("native runtime bug on %r (%s): %s: %s; cel-python decided", expr.text, expr.location,
                      type(exc).__name__, exc)
        else:
            log.info("native runtime %s %r (%s); cel-python decided", kind, expr.text, expr.location)

    def record_path(self, kind: str, where: str, exc: BaseException) -> None:
        """A generated decision path that gave up on a request (Defer) or failed (a bug)."""
        self.counts[kind] += 1
        for listener in list(self._listeners):
            listener.native_fallback(kind)
        if kind == GENERATED_BUG:
            log.error("generated path bug in %s: %s: %s; the evaluator decided", where, type(exc).__name__, exc)
        else:
            log.info("generated path %s %s; the evaluator decided", where, kind)


REFERENCE, FAST = ReferenceRuntime(), NativeRuntime()
FALLBACKS = FallbackEvents()


def run(expr: Expression, activation: Activation) -> Any:
    """Evaluate one compiled expression; any failure becomes EvaluationFailure.

    The native runtime answers; it hands the expression to cel-python only when it says it
    must (Defer, or an expression it could not compile). Any other exception from it is a bug:
    counted and logged, and cel-python decides. Either way the decision's runtime says so.
    """
    if activation.runtime == CEL_PYTHON:
        return REFERENCE.evaluate(expr, activation)
    native = expr.native
    if native is not None:
        try:
            return native(activation.native)
        except CelError as exc:
            raise EvaluationFailure(str(exc)) from exc
        except Defer:
            FALLBACKS.record(DEFERRED, expr)
        except Exception as exc:  # a bug of the native runtime: counted, and the reference decides
            FALLBACKS.record(NATIVE_BUG, expr, exc)
    else:
        FALLBACKS.record(UNSUPPORTED, expr)
    activation.runtime = NATIVE_WITH_REFERENCE
    return REFERENCE.evaluate(expr, activation)


def run_path(path: Any, version: str, request: Mapping[str, Any], at: datetime,
             decision_id: str, language: str) -> Decision | None:
    """A request decided by its generated path (engine/codegen.py GeneratedPath, of the version
    named `version`); None hands it to `evaluate`: a field is missing (the evaluator names it),
    or the path deferred or failed (counted, with where: "VERSION ACTION ROLE")."""
    try:
        return path.function(request, at, decision_id, language)  # type: ignore[no-any-return]
    except Defer as exc:
        FALLBACKS.record_path(DEFERRED, f"{version} {path.action} {path.role}", exc)
    except Exception as exc:  # a bug of the generator: counted and logged; the evaluator decides
        FALLBACKS.record_path(GENERATED_BUG, f"{version} {path.action} {path.role}", exc)
    return None


def run_condition(expr: Expression, activation: Activation) -> bool:
    result = run(expr, activation)
    if type(result) is bool:
        return result
    if not isinstance(result, celtypes.BoolType):
        raise EvaluationFailure(f"expected a boolean, the expression gave {type(result).__name__}")
    return bool(result)


def evaluate(version: PolicyVersion, request: Mapping[str, Any], activation: Activation, *,
             at: datetime, decision_id: str, explain: bool = False, language: str = ENGLISH) -> Decision:
    """Decide a request that already passed its checks; pure: no clock, no I/O.

    A field that an applicable rule needs and the request lacks is a RequestError,
    raised after every rule was looked at, so that all such fields are named at once.
    """
    action, role = request["action"], request.get("role")
    violations: list[Finding] = []
    warnings: list[Finding] = []
    traces: list[Trace] = []
    needs = MissingFields(request, version.needs_plan(action, role))
    for rule in version.rules_for(action, role):
        outcome, error = PASSED, None
        try:
            if needs.lacking(rule.applies_when, rule.id):
                continue
            if rule.applies_when is not None and not run_condition(rule.applies_when, activation):
                outcome = NOT_APPLICABLE
            elif needs.lacking(rule.fires_when, rule.id):
                continue
            elif run_condition(rule.fires_when, activation):
                outcome = FIRED
        except EvaluationFailure as exc:
            outcome, error = ERROR, str(exc)
        _report(rule, outcome, error, language, version.native_parameters, request, violations, warnings)
        if explain:
            traces.append(Trace(rule.id, rule.effect, outcome, _values(rule, request), rule.where, error))
    outputs: dict[str, Any] = {}
    for output in () if violations else version.outputs_for(action, role):  # allowed decisions only
        owner = f"output {output.name}"
        try:
            if needs.lacking(output.applies_when, owner):
                continue
            if output.applies_when is not None and not run_condition(output.applies_when, activation):
                continue
            if needs.lacking(output.value, owner):
                continue
            outputs[output.name] = to_json(run(output.value, activation))
        except EvaluationFailure as exc:
            where = f"{output.location.file}:{output.location.line}"
            message = _OUTPUT_FAILED[language == CHINESE].format(name=output.name, error=exc)
            violations.append(Finding(f"output.{output.name}", message, output.defined_in, where))
    needs.raise_if_any()
    if violations:  # an output that failed denies: a denial carries no outputs
        outputs = {}
    return Decision(
        decision_id=decision_id, decision="deny" if violations else "allow",
        rule=violations[0] if violations else None, violations=tuple(violations),
        warnings=tuple(warnings), outputs=outputs, policy_version=version.name,
        policy_digest=version.digest, runtime=activation.runtime, at=format_timestamp(at),
        explain=tuple(traces) if explain else None, language=language)


def _finding(rule: Rule, message: str) -> Finding:
    return Finding(rule.id, message, rule.defined_in, rule.where)


def _report(rule: Rule, outcome: str, error: str | None, language: str, parameters: Mapping[str, Any],
            request: Mapping[str, Any], violations: list[Finding], warnings: list[Finding]) -> None:
    """A judged rule into the findings: a failed one denies (fail closed), a fired one says its message."""
    if outcome == ERROR:
        violations.append(_finding(rule, _FAILED[language == CHINESE].format(id=rule.id, error=error)))
    elif outcome == FIRED:
        message = rule.render(language, parameters, request)
        (violations if rule.effect == "deny" else warnings).append(_finding(rule, message))


def _values(rule: Rule, request: Mapping[str, Any]) -> dict[str, Any]:
    """The request values a rule's expressions read, by dotted path, for explain."""
    out: dict[str, Any] = {}
    for expr in (rule.applies_when, rule.fires_when):
        if expr is None:
            continue
        for path in expr.reads():
            present, value = value_at(request, path)
            out[".".join(path).replace(".[]", "[]")] = value if present else "<absent>"
    return out


def to_json(value: Any) -> Any:
    """A CEL result as plain JSON: timestamps in RFC 3339, durations in seconds ('86400s')."""
    if isinstance(value, celtypes.TimestampType | datetime):
        return format_timestamp(value)
    if isinstance(value, celtypes.DurationType | timedelta):
        return format_duration(timedelta(days=value.days, seconds=value.seconds, microseconds=value.microseconds))
    if isinstance(value, celtypes.BoolType | bool):
        return bool(value)
    if isinstance(value, celtypes.IntType | celtypes.UintType | int):
        return int(value)
    if isinstance(value, celtypes.DoubleType | float):
        number = float(value)
        if number != number or number in (math.inf, -math.inf):  # as protobuf's JSON mapping writes them
            return "NaN" if number != number else ("Infinity" if number > 0 else "-Infinity")
        return number
    if isinstance(value, str):
        return str(value)
    if isinstance(value, CelType):
        return value.name
    if isinstance(value, Mapping):
        return {(("true" if k else "false") if isinstance(k, bool) else str(k)): to_json(v)
                for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_json(v) for v in value]
    return value


def _describe(exc: Exception) -> str:
    args = getattr(exc, "args", ())
    text = str(args[0]) if args else type(exc).__name__
    return text.replace("\n", " ").strip()


def path_helpers(version_name: str, parameters: Mapping[str, Any]) -> dict[str, Any]:
    """What a generated decision path (engine/codegen.py) calls that depends on its version: one rule
    or output judged again by its native closures after a CEL error on the fast path, the request
    as native values for an expression left to its closure, and a message that shows request fields.

    The closures answer here, or raise Defer (or a bug raises): then the caller decides the whole
    request with `evaluate`, which counts it. A field the rule needs and the request lacks returns
    True: the caller hands over to `evaluate`, whose accounting names every missing field."""
    to_native = _native_converter()

    def activation(request: Mapping[str, Any], at: datetime) -> dict[str, Any]:
        values: dict[str, Any] = to_native(dict(request))
        values["at"] = at
        values["params"] = parameters
        return values

    def condition(expr: Expression, env: dict[str, Any]) -> bool:
        value = _native_value(expr, env)
        if type(value) is bool:
            return value
        raise EvaluationFailure(f"expected a boolean, the expression gave {type(value).__name__}")

    def lacking(expr: Expression, request: Mapping[str, Any]) -> bool:
        context = (request["action"], request.get("role"))
        return any(absent_fields(request, path) for path in expr.needs_for(*context))

    def again_rule(rule: Rule, request: Mapping[str, Any], at: datetime, language: str,
                   violations: list[Finding], warnings: list[Finding]) -> bool:
        env = activation(request, at)
        outcome, error = PASSED, None
        try:
            if rule.applies_when is not None and not condition(rule.applies_when, env):
                outcome = NOT_APPLICABLE
            elif rule.applies_when is not None and lacking(rule.fires_when, request):
                return True
            elif condition(rule.fires_when, env):
                outcome = FIRED
        except EvaluationFailure as exc:
            outcome, error = ERROR, str(exc)
        _report(rule, outcome, error, language, parameters, request, violations, warnings)
        return False

    def again_output(output: Output, request: Mapping[str, Any], at: datetime, language: str,
                     outputs: dict[str, Any], violations: list[Finding]) -> bool:
        env = activation(request, at)
        try:
            if output.applies_when is not None and not condition(output.applies_when, env):
                return False
            if output.applies_when is not None and lacking(output.value, request):
                return True
            outputs[output.name] = to_json(_native_value(output.value, env))
        except EvaluationFailure as exc:
            where = f"{output.location.file}:{output.location.line}"
            message = _OUTPUT_FAILED[language == CHINESE].format(name=output.name, error=exc)
            violations.append(Finding(f"output.{output.name}", message, output.defined_in, where))
        return False

    def render(rule: Rule, language: str, request: Mapping[str, Any]) -> Finding:
        return _finding(rule, rule.render(language, parameters, request))

    return {"_again_rule": again_rule, "_again_output": again_output, "_activation": activation,
            "_render": render}


def _native_value(expr: Expression, env: dict[str, Any]) -> Any:
    if expr.native is None:
        raise Defer
    try:
        return expr.native(env)
    except CelError as exc:
        raise EvaluationFailure(str(exc)) from exc


@cache
def _native_converter() -> NativeConverter:
    return NativeConverter()
