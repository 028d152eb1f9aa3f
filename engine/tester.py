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
from engine.messages import ENGLISH
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
    # Per version: the rules it adds or changes (where -> id), and what cases judged under it did.
    own: dict[str, dict[str, str]] = field(default_factory=dict)
    always_fires: set[str] = field(default_factory=set)  # `fires_when: "true"`: it cannot pass
    judged: dict[str, int] = field(default_factory=dict)  # version -> cases judged under it
    fired_in: set[tuple[str, str]] = field(default_factory=set)  # (version, where)
    passed_in: set[tuple[str, str]] = field(default_factory=set)
    required: bool = True  # False with --suite: one suite need not cover every rule

    def version_gaps(self) -> list[str]:
        """What each version lacks: a case judged under it, and cases that fire and pass its rules."""
        gaps: list[str] = []
        for version, rules in self.own.items():
            if not self.judged.get(version):
                gaps.append(f"no case is judged under {version} (pin it with policy_version, or set `at`)")
                continue
            for where, rule_id in rules.items():
                if (version, where) not in self.fired_in:
                    gaps.append(f"no case judged under {version} fires {rule_id} ({where}), which {version} "
                                "adds or changes")
                elif (version, where) not in self.passed_in and where not in self.always_fires:
                    gaps.append(f"no case judged under {version} passes {rule_id} ({where}), which {version} "
                                "adds or changes")
        return gaps

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
        return self.cases_ok and self.coverage_ok

    @property
    def cases_ok(self) -> bool:
        return not self.problems and all(r.passed for r in self.results)

    @property
    def coverage_ok(self) -> bool:
        cov = self.coverage
        return not cov.required or not (cov.never_fired() or cov.version_gaps())


FIXTURES = "fixtures.yaml"


def find_suites(root: Path) -> list[Path]:
    folder = root / SUITE_FOLDER
    found = sorted(folder.glob("*.yaml")) + sorted(folder.glob("*.yml"))
    return [p for p in found if p.name != FIXTURES]


def _plain(path: Any, message: str) -> str:
    if path and path[-1] == "expect" and "non-empty" in message:
        return ("this `expect` asserts nothing, so the case could never fail: say what the decision "
                "must be (decision, rule, violations, warnings, outputs, message or error)")
    return message


def _shared_bases(parsed: tuple[YamlDocument | None, list[Problem]] | None,
                  problems: list[Problem]) -> dict[str, Any]:
    """The bases every suite may start from (tests/fixtures.yaml); a suite's own bases override them."""
    if parsed is None:
        return {}
    doc, found = parsed
    problems.extend(found)
    if doc is None:
        return {}
    if not isinstance(doc.data, dict) or not isinstance(doc.data.get("bases"), dict) or set(doc.data) - {"bases"}:
        problems.append(Problem(doc.location(), "schema", "a fixtures file holds one key, `bases:`, a mapping "
                                "of names to base requests"))
        return {}
    bases: dict[str, Any] = doc.data["bases"]
    return bases


def run_suites(engine: Engine, root: Path, paths: list[Path] | None = None) -> SuiteReport:
    """Run every suite under root/tests (or the given files); coverage spans all of them."""
    documents = []
    for path in paths if paths is not None else find_suites(root):
        name = path.relative_to(root).as_posix() if path.is_relative_to(root) else str(path)
        documents.append(read_yaml(path, name))
    problems: list[Problem] = []
    shared = _shared_bases(read_yaml(root / SUITE_FOLDER / FIXTURES, f"{SUITE_FOLDER}/{FIXTURES}")
                           if (root / SUITE_FOLDER / FIXTURES).exists() else None, problems)
    return _run_documents(engine, documents, shared, problems, required=paths is None)


def run_suite_files(engine: Engine, files: Mapping[str, bytes]) -> SuiteReport:
    """Run the suites among files held in memory (`tests/*.yaml`, by relative path)."""
    documents = []
    fixtures = None
    for name in sorted(n for n in files if n.startswith(f"{SUITE_FOLDER}/") and n.endswith((".yaml", ".yml"))):
        try:
            parsed = parse_yaml(files[name].decode("utf-8"), name)
        except UnicodeDecodeError as exc:
            parsed = (None, [Problem(Location(name), "file_unreadable", f"cannot read the file: {exc}")])
        if name == f"{SUITE_FOLDER}/{FIXTURES}":
            fixtures = parsed
        else:
            documents.append(parsed)
    problems: list[Problem] = []
    return _run_documents(engine, documents, _shared_bases(fixtures, problems), problems)


def _run_documents(engine: Engine, documents: list[tuple[YamlDocument | None, list[Problem]]],
                   shared: dict[str, Any], problems: list[Problem], required: bool = True) -> SuiteReport:
    coverage = Coverage(required=required)
    for version in engine.policies:
        coverage.own[version.name] = {}
        for rule in version.rules:
            coverage.rules.setdefault(rule.where, (rule.id, rule.effect))
            # A root version's rules are covered by any case (they are every version's base);
            # what a child adds or changes must fire and pass in cases judged under that child.
            if rule.defined_in == version.name and version.extends is not None:
                coverage.own[version.name][rule.where] = rule.id
            if rule.fires_when.text.strip() == "true":
                coverage.always_fires.add(rule.where)
    results: list[CaseResult] = []
    for doc, found in documents:
        problems.extend(found)
        if doc is None:
            continue
        checked = [Problem(doc.location(p), "schema", _plain(p, m))
                   for p, m in schema_problems(validator("suite"), doc.data)]
        if checked:
            problems.extend(checked)
            continue
        results.extend(_run_suite(engine, doc, coverage, problems, shared))
    return SuiteReport(results, coverage, sorted(problems))


def _run_suite(engine: Engine, doc: YamlDocument, coverage: Coverage,
               problems: list[Problem], shared: dict[str, Any]) -> Iterator[CaseResult]:
    suite = doc.data
    bases = {**shared, **suite.get("bases", {})}
    names: dict[str, int] = {}
    for index, case in enumerate(suite["cases"]):
        where = doc.location(("cases", index))
        if case["name"] in names:
            problems.append(Problem(doc.location(("cases", index, "name")), "duplicate_case",
                                    f"the case name '{case['name']}' is also used at line {names[case['name']]}; "
                                    "give each case its own name"))
            continue
        names[case["name"]] = where.line
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
                                      f"no base named '{name}' in this suite or in {SUITE_FOLDER}/{FIXTURES}"))
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
    coverage.judged[decision.policy_version] = coverage.judged.get(decision.policy_version, 0) + 1
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
            if got["decision"] == "deny":
                why = f"absent: a denied decision has no outputs (denied by {got['rule']['id']})"
            elif name not in got["outputs"]:
                known = [o for o in engine.policies.get(decision.policy_version).outputs  # type: ignore[union-attr]
                         if o.name == name]
                why = ("absent: its applies_when was false for this request" if known
                       else f"absent: {decision.policy_version} has no output '{name}'")
            else:
                why = f"got {got['outputs'][name]!r}"
            failures.append(f"outputs.{name}: expected {value!r}, {why}")
    for language, text in expect.get("message", {}).items():
        if got["rule"] is None:
            failures.append(f"message ({language}): expected {text!r}, but no rule decided")
            continue
        said = got["rule"]["message"] if language == ENGLISH else engine.decide(
            request, now=SUITE_NOW, decision_id="suite", language=language).to_dict()["rule"]["message"]
        if said != text:
            failures.append(f"message ({language}): expected {text!r}, got {said!r}")
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
            coverage.fired_in.add((version.name, trace.source))
        elif trace.outcome == PASSED:
            coverage.passed.setdefault(trace.source, []).append(label)
            coverage.passed_in.add((version.name, trace.source))


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
    gaps = cov.version_gaps()
    lines.append("")
    lines.append(f"coverage: {len(cov.rules) - len(never_fired)}/{len(cov.rules)} rule definitions "
                 f"fire in some case, {len(cov.rules) - len(never_passed)}/{len(cov.rules)} pass in some case")
    for where in never_fired:
        lines.append(f"  no case fires  {cov.rules[where][0]} ({where}): every rule needs one")
    for where in never_passed:
        lines.append(f"  no case passes {cov.rules[where][0]} ({where})")
    lines.extend(f"  {gap}" for gap in gaps)
    failed = sum(not r.passed for r in report.results)
    lines.append(f"{len(report.results) - failed} passed, {failed} failed")
    lines.append(verdict(report))
    return "\n".join(lines)


def verdict(report: SuiteReport) -> str:
    """The last line: ok, or why the run failed (cases, coverage, or both)."""
    why: list[str] = []
    failed = sum(not r.passed for r in report.results)
    if failed:
        why.append(f"{failed} case{'s' if failed != 1 else ''} failed")
    if report.problems:
        why.append(f"{len(report.problems)} problem{'s' if len(report.problems) != 1 else ''} in the suites")
    cov = report.coverage
    if cov.required:
        missing = len(cov.never_fired()) + len(cov.version_gaps())
        if missing:
            why.append(f"coverage: {missing} gap{'s' if missing != 1 else ''} (listed above)")
    if why:
        return "FAILED: " + "; ".join(why)
    return "OK" + ("" if cov.required else " (coverage counted within these suites only, not required)")


def report_json(report: SuiteReport) -> dict[str, Any]:
    cov = report.coverage
    return {
        "ok": report.ok, "verdict": verdict(report),
        "problems": [p.to_dict() for p in report.problems],
        "cases": [{"suite": r.suite, "name": r.name, "where": r.where, "passed": r.passed,
                   "failures": r.failures} for r in report.results],
        "coverage": {"rules": len(cov.rules), "never_fired": [cov.rules[w][0] + f" ({w})" for w in cov.never_fired()],
                     "never_passed": [cov.rules[w][0] + f" ({w})" for w in cov.never_passed()],
                     "version_gaps": cov.version_gaps(), "required": cov.required},
    }


def report_junit(report: SuiteReport) -> str:
    """JUnit XML, one testsuite per policy suite, coverage gaps as one more failing suite."""
    from xml.sax.saxutils import quoteattr

    suites: dict[str, list[CaseResult]] = {}
    for result in report.results:
        suites.setdefault(result.suite, []).append(result)
    out = ['<?xml version="1.0" encoding="UTF-8"?>', "<testsuites>"]
    for name, results in suites.items():
        failed = sum(not r.passed for r in results)
        out.append(f"  <testsuite name={quoteattr(name)} tests=\"{len(results)}\" failures=\"{failed}\">")
        for r in results:
            out.append(f"    <testcase classname={quoteattr(name)} name={quoteattr(r.name)} file={quoteattr(r.where)}>")
            if not r.passed:
                text = "\n".join(r.failures)
                out.append(f"      <failure message={quoteattr(r.failures[0])}>{_xml(text)}</failure>")
            out.append("    </testcase>")
        out.append("  </testsuite>")
    gaps = [str(p) for p in report.problems]
    cov = report.coverage
    if cov.required:
        gaps += [f"no case fires {cov.rules[w][0]} ({w})" for w in cov.never_fired()] + cov.version_gaps()
    out.append(f"  <testsuite name=\"coverage\" tests=\"1\" failures=\"{1 if gaps else 0}\">")
    out.append("    <testcase classname=\"coverage\" name=\"every rule and version covered\">")
    if gaps:
        out.append(f"      <failure message={quoteattr(gaps[0])}>{_xml(chr(10).join(gaps))}</failure>")
    out.append("    </testcase>\n  </testsuite>\n</testsuites>")
    return "\n".join(out) + "\n"


def _xml(text: str) -> str:
    from xml.sax.saxutils import escape

    return escape(text)
