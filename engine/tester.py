"""Policy test suites: YAML cases beside the policies, run against the engine, with rule coverage."""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from engine.checker import schema_problems, validator
from engine.decider import Engine
from engine.errors import Location, Problem, RequestError
from engine.evaluator import ERROR, FIRED, PASSED
from engine.model import Decision
from engine.yamlpos import YamlDocument, parse_yaml, read_yaml

SUITE_FOLDER = "tests"
# A case without `at` is judged at this moment, so that suites never depend on the clock.
SUITE_NOW = datetime(2026, 1, 1, tzinfo=UTC)


@dataclass
class CaseResult:
    suite: str
    name: str
    where: str
    failures: list[str]

    @property
    def passed(self) -> bool:
        return not self.failures


@dataclass
class Coverage:
    """Per rule definition (file:line): the cases where it fired and where it passed."""

    rules: dict[str, tuple[str, str]] = field(default_factory=dict)  # where -> (id, effect)
    fired: dict[str, list[str]] = field(default_factory=dict)
    passed: dict[str, list[str]] = field(default_factory=dict)

    def never_fired(self) -> list[str]:
        return [w for w in self.rules if not self.fired.get(w)]

    def never_passed(self) -> list[str]:
        return [w for w in self.rules if not self.passed.get(w)]


@dataclass
class SuiteReport:
    results: list[CaseResult]
    coverage: Coverage
    problems: list[Problem]

    @property
    def ok(self) -> bool:
        return (not self.problems and all(r.passed for r in self.results)
                and not self.coverage.never_fired())


def find_suites(root: Path) -> list[Path]:
    folder = root / SUITE_FOLDER
    return sorted(folder.glob("*.yaml")) + sorted(folder.glob("*.yml"))


def run_suites(engine: Engine, root: Path, paths: list[Path] | None = None) -> SuiteReport:
    """Run every suite under root/tests (or the given files); coverage spans all of them."""
    documents = []
    for path in paths if paths is not None else find_suites(root):
        name = path.relative_to(root).as_posix() if path.is_relative_to(root) else str(path)
        documents.append(read_yaml(path, name))
    return _run_documents(engine, documents)


def run_suite_files(engine: Engine, files: Mapping[str, bytes]) -> SuiteReport:
    """Run the suites among files held in memory (`tests/*.yaml`, by relative path)."""
    documents = []
    for name in sorted(n for n in files if n.startswith(f"{SUITE_FOLDER}/") and n.endswith((".yaml", ".yml"))):
        try:
            documents.append(parse_yaml(files[name].decode("utf-8"), name))
        except UnicodeDecodeError as exc:
            documents.append((None, [Problem(Location(name), "file_unreadable", f"cannot read the file: {exc}")]))
    return _run_documents(engine, documents)


def _run_documents(engine: Engine, documents: list[tuple[YamlDocument | None, list[Problem]]]) -> SuiteReport:
    coverage = Coverage()
    for version in engine.policies:
        for rule in version.rules:
            coverage.rules.setdefault(rule.where, (rule.id, rule.effect))
    results: list[CaseResult] = []
    problems: list[Problem] = []
    for doc, found in documents:
        problems.extend(found)
        if doc is None:
            continue
        checked = [Problem(doc.location(p), "schema", m)
                   for p, m in schema_problems(validator("suite"), doc.data)]
        if checked:
            problems.extend(checked)
            continue
        results.extend(_run_suite(engine, doc, coverage, problems))
    return SuiteReport(results, coverage, sorted(problems))


def _run_suite(engine: Engine, doc: YamlDocument, coverage: Coverage,
               problems: list[Problem]) -> Iterator[CaseResult]:
    suite = doc.data
    bases = suite.get("bases", {})
    for index, case in enumerate(suite["cases"]):
        where = doc.location(("cases", index))
        try:
            request = _build(case, bases, doc, ("cases", index), ())
        except _SuiteError as exc:
            problems.append(exc.problem)
            continue
        version = case.get("policy_version", suite.get("policy_version"))
        if version is not None:
            request.setdefault("policy_version", version)
        label = f"{where.file}:{where.line}"
        yield CaseResult(suite["suite"], case["name"], label,
                         _judge(engine, request, case["expect"], coverage, f"{suite['suite']}: {case['name']}"))


class _SuiteError(Exception):
    def __init__(self, problem: Problem) -> None:
        self.problem = problem
        super().__init__(str(problem))


def _build(spec: dict[str, Any], bases: dict[str, Any], doc: YamlDocument, key: tuple[str | int, ...],
           seen: tuple[str, ...]) -> dict[str, Any]:
    """A request from a base (itself possibly from another base), a request, `set` and `unset`."""
    request: dict[str, Any] = {}
    if "from" in spec:
        name = spec["from"]
        if name not in bases:
            raise _SuiteError(Problem(doc.location((*key, "from")), "unknown_base",
                                      f"no base named '{name}' in this suite"))
        if name in seen:
            raise _SuiteError(Problem(doc.location((*key, "from")), "base_cycle",
                                      f"bases build on each other: {' -> '.join((*seen, name))}"))
        request = _build(bases[name], bases, doc, ("bases", name), (*seen, name))
    if "request" in spec:
        request = _merge(request, copy.deepcopy(spec["request"]))
    for dotted, value in spec.get("set", {}).items():
        target = request
        parts = dotted.split(".")
        for part in parts[:-1]:
            target = target.setdefault(part, {})
            if not isinstance(target, dict):
                raise _SuiteError(Problem(doc.location((*key, "set", dotted)), "bad_path",
                                          f"cannot set '{dotted}': '{part}' is not an object"))
        target[parts[-1]] = copy.deepcopy(value)
    for index, dotted in enumerate(spec.get("unset", [])):
        target = request
        parts = dotted.split(".")
        for part in parts[:-1]:
            target = target.get(part) if isinstance(target, dict) else None  # type: ignore[assignment]
        if not isinstance(target, dict) or parts[-1] not in target:
            raise _SuiteError(Problem(doc.location((*key, "unset", index)), "bad_path",
                                      f"cannot unset '{dotted}': the request has no such field"))
        del target[parts[-1]]
    return request


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for name, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(name), dict):
            out[name] = _merge(out[name], value)
        else:
            out[name] = value
    return out


def _judge(engine: Engine, request: dict[str, Any], expect: dict[str, Any], coverage: Coverage,
           label: str) -> list[str]:
    """Decide the case and list every way the decision differs from what was expected."""
    try:
        decision = engine.decide(request, now=SUITE_NOW, decision_id="suite", explain=True)
    except RequestError as exc:
        return _judge_error(exc, expect)
    if "error" in expect:
        return [f"expected the request to be rejected ({expect['error']}), "
                f"but it was decided: {decision.decision}"]
    _record(decision, engine, coverage, label)
    assert decision.explain is not None
    # A rule that fails at run time denies (fail closed); in a suite that is always a bug,
    # even where the case expected that rule to deny.
    failures: list[str] = [f"{t.id} failed to evaluate ({t.source}): {t.error}"
                           for t in decision.explain if t.outcome == ERROR]
    got = decision.to_dict()
    if "decision" in expect and got["decision"] != expect["decision"]:
        rule = got["rule"]["id"] if got["rule"] else None
        failures.append(f"decision: expected {expect['decision']}, got {got['decision']}"
                        + (f" (by {rule})" if rule else ""))
    if "rule" in expect:
        rule = got["rule"]["id"] if got["rule"] else None
        if rule != expect["rule"]:
            failures.append(f"rule: expected {expect['rule']}, got {rule}")
    for name in ("violations", "warnings"):
        if name in expect:
            ids = [f["id"] for f in got[name]]
            if ids != expect[name]:
                failures.append(f"{name}: expected {expect[name]}, got {ids}")
    for name, value in expect.get("outputs", {}).items():
        if got["outputs"].get(name) != value:
            failures.append(f"outputs.{name}: expected {value!r}, got {got['outputs'].get(name)!r}")
    if "policy_version" in expect and got["policy"]["version"] != expect["policy_version"]:
        failures.append(f"policy version: expected {expect['policy_version']}, "
                        f"got {got['policy']['version']}")
    if failures:  # what the author needs to see why: the rules that fired, and what they read
        failures.extend(f"  {t.outcome} {t.id} ({t.source}) read {json.dumps(dict(t.values), default=str)}"
                        for t in decision.explain if t.outcome in (FIRED, ERROR))
    return failures


def _judge_error(exc: RequestError, expect: dict[str, Any]) -> list[str]:
    wanted = expect.get("error")
    if wanted is None:
        details = "; ".join(f"{d.path}: {d.problem}" for d in exc.details)
        return [f"the request was rejected ({exc.code}): {exc.message}: {details}"]
    failures = []
    if "code" in wanted and wanted["code"] != exc.code:
        failures.append(f"error code: expected {wanted['code']}, got {exc.code}")
    paths = {d.path for d in exc.details}
    for path in wanted.get("paths", []):
        if path not in paths:
            failures.append(f"error paths: expected {path} among {sorted(paths)}")
    return failures


def _record(decision: Decision, engine: Engine, coverage: Coverage, label: str) -> None:
    version = engine.policies.get(decision.policy_version)
    assert version is not None and decision.explain is not None
    for trace in decision.explain:
        if trace.outcome in (FIRED, ERROR):
            coverage.fired.setdefault(trace.source, []).append(label)
        elif trace.outcome == PASSED:
            coverage.passed.setdefault(trace.source, []).append(label)


def describe(report: SuiteReport, verbose: bool = False) -> str:
    """The report as text: failures, the coverage gaps, and a closing count line."""
    lines: list[str] = [str(p) for p in report.problems]
    for result in report.results:
        if not result.passed:
            lines.append(f"FAIL {result.where} {result.suite}: {result.name}")
            lines.extend(f"     {f}" for f in result.failures)
        elif verbose:
            lines.append(f"ok   {result.where} {result.suite}: {result.name}")
    cov = report.coverage
    never_fired, never_passed = cov.never_fired(), cov.never_passed()
    lines.append("")
    lines.append(f"coverage: {len(cov.rules) - len(never_fired)}/{len(cov.rules)} rule definitions "
                 f"fire in some case, {len(cov.rules) - len(never_passed)}/{len(cov.rules)} pass in some case")
    for where in never_fired:
        lines.append(f"  no case fires  {cov.rules[where][0]} ({where}): every rule needs one")
    for where in never_passed:
        lines.append(f"  no case passes {cov.rules[where][0]} ({where})")
    failed = sum(not r.passed for r in report.results)
    lines.append(f"{len(report.results) - failed} passed, {failed} failed")
    return "\n".join(lines)
