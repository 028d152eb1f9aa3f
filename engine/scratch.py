"""Scratch policy sets: policy files held in memory for one request, loaded and judged within bounds.

A scratch copy is what an author is editing: it is never written to disk and never serves. Its
size is bounded before anything is parsed, and its work by a deadline checked between units of
work (a file's compile, a suite case, a corpus request), so no copy can hold a worker for long.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from engine.decider import Engine
from engine.differ import diff_versions
from engine.errors import Detail, PolicyLoadError, Problem, RequestError
from engine.impact import Corpus, ImpactReport, judge_engines
from engine.loader import load_policies
from engine.sources import MemorySource
from engine.tester import SuiteReport, run_suite_files
from engine.versions import PolicySet

# A policy or suite file: one folder, one file name, YAML; nothing that could climb out of a folder.
FILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}/[A-Za-z0-9][A-Za-z0-9._-]{0,99}\.ya?ml")


@dataclass(frozen=True)
class ScratchLimits:
    files: int = 64
    bytes: int = 512 * 1024  # all files together, UTF-8
    seconds: float = 10.0  # the work on one copy: loading, suites, corpus


class Deadline:
    """Work on a scratch copy stops once `seconds` have passed; checked between units of work."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.ends = time.monotonic() + seconds

    def check(self, doing: str) -> None:
        if time.monotonic() > self.ends:
            raise RequestError("scratch_too_slow", f"the scratch copy took longer than {self.seconds:g} s",
                               [Detail("/files", f"stopped while {doing}")])

    def through(self, items: Iterable[Any], doing: str) -> Iterator[Any]:
        for item in items:
            self.check(doing)
            yield item


def scratch_files(raw: Any, limits: ScratchLimits) -> dict[str, bytes]:
    """The `files` of a scratch request, checked: names, types and size; RequestError naming each problem."""
    if not isinstance(raw, dict):
        raise RequestError("invalid_request", "the scratch copy is an object of files",
                           [Detail("/files", "expected an object {path: YAML text}")])
    problems = []
    files: dict[str, bytes] = {}
    if len(raw) > limits.files:
        problems.append(Detail("/files", f"has {len(raw)} files; at most {limits.files}"))
    for name, text in raw.items():
        pointer = "/files/" + name.replace("~", "~0").replace("/", "~1")
        if not FILE_NAME.fullmatch(name):
            problems.append(Detail(pointer, "expected a path 'folder/name.yaml' (letters, digits, . _ -)"))
        elif not isinstance(text, str):
            problems.append(Detail(pointer, "expected the file's text as a string"))
        else:
            files[name] = text.encode("utf-8", "surrogatepass")
    size = sum(len(b) for b in files.values())
    if size > limits.bytes:
        problems.append(Detail("/files", f"holds {size} bytes; at most {limits.bytes}"))
    if problems:
        raise RequestError("invalid_scratch", "the scratch copy cannot be taken", problems)
    return files


def load_scratch(files: Mapping[str, bytes], deadline: Deadline) -> tuple[PolicySet | None, list[Problem]]:
    """The scratch set, or None and every problem found in it (sorted, with file, line, column)."""
    try:
        policies = load_policies(MemorySource(files, label="the scratch copy"))
    except PolicyLoadError as exc:
        return None, sorted(exc.problems)
    deadline.check("loading the policies")
    return policies, []


def loaded_scratch(files: Mapping[str, bytes], deadline: Deadline, runtime: str,
                   max_list_items: int | None) -> Engine:
    """An engine over the scratch set; RequestError with the load problems if it does not load."""
    policies, problems = load_scratch(files, deadline)
    if policies is None:
        raise RequestError("policy_load_error", f"the scratch copy does not load: {len(problems)} problem(s)",
                           [Detail("/files/" + p.location.file.replace("/", "~1"), str(p)) for p in problems])
    return Engine(policies, runtime=runtime, max_list_items=max_list_items)


def run_scratch_suites(engine: Engine, files: Mapping[str, bytes], deadline: Deadline) -> SuiteReport:
    """The suites among the scratch files (`tests/*.yaml`) run against the scratch set."""
    checked = _DeadlineEngine(engine, deadline)
    return run_suite_files(checked, files)  # type: ignore[arg-type]


def compare_sets(in_force: Engine, scratch: Engine, corpus: Corpus, now: datetime,
                 deadline: Deadline) -> dict[str, Any]:
    """Per version: the semantic diff from the set in force to the scratch copy; and the impact
    on the corpus of serving the scratch copy instead (each request judged by the version it selects)."""
    old, new = in_force.policies, scratch.policies
    diffs = {}
    for version in new:
        before = old.get(version.name)
        if before is not None:
            diffs[version.name] = diff_versions(before, version).to_dict()
    impact: ImpactReport = judge_engines((in_force, None), (scratch, None),
                                         deadline.through(corpus.requests, "judging the corpus"), now,
                                         labels=("in force", "scratch"), origins=corpus.origins)
    return {"versions": diffs,
            "added": [v.name for v in new if old.get(v.name) is None],
            "removed": [v.name for v in old if new.get(v.name) is None],
            "impact": impact.to_dict()}


def suite_report(report: SuiteReport) -> dict[str, Any]:
    """A suite report as JSON: every case, the problems, and the coverage gaps."""
    cov = report.coverage
    return {
        "ok": report.ok,
        "passed": sum(r.passed for r in report.results), "failed": sum(not r.passed for r in report.results),
        "results": [{"suite": r.suite, "name": r.name, "where": r.where, "passed": r.passed,
                     "failures": r.failures} for r in report.results],
        "problems": [p.to_dict() for p in report.problems],
        "never_fired": [{"id": cov.rules[w][0], "source": w} for w in cov.never_fired()],
        "never_passed": [{"id": cov.rules[w][0], "source": w} for w in cov.never_passed()],
    }


class _DeadlineEngine:
    """An engine whose every decision first checks the deadline (suites call `decide` once per case)."""

    def __init__(self, engine: Engine, deadline: Deadline) -> None:
        self._engine, self._deadline = engine, deadline
        self.policies = engine.policies

    def decide(self, raw: Any, **kwargs: Any) -> Any:
        self._deadline.check("running the suites")
        return self._engine.decide(raw, **kwargs)
