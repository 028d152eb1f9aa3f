"""The policy test runner: the bundled suites pass and cover every rule; failures are reported."""

from __future__ import annotations

import textwrap
from pathlib import Path

from engine.decider import Engine
from engine.loader import load_policies
from engine.tester import describe, run_suites

from .conftest import POLICIES, VERSION_V1, WriteFiles

RULES = """\
    rules:
      - id: adult
        actions: [bind]
        effect: deny
        fires_when: account.age < params.min_age
        message: too young
        source: test
      - id: never-tested
        actions: [unbind]
        effect: deny
        fires_when: "false"
        message: m
        source: test
    """

SUITE = """\
    suite: small
    bases:
      bind:
        request:
          action: bind
          role: official
          at: "2025-01-01T00:00:00Z"
          shop: {id: s}
          account: {id: a, age: 30}
    cases:
      - name: adult passes
        from: bind
        expect: {decision: allow}
      - name: a wrong expectation is reported
        from: bind
        set: {account.age: 17}
        expect: {decision: allow, rule: null}
      - name: an unknown base is a problem of the suite
        from: nope
        expect: {decision: allow}
    """


def test_the_bundled_suites_pass_and_cover_every_rule_both_ways(engine: Engine) -> None:
    report = run_suites(engine, POLICIES)
    assert not report.problems, report.problems
    failed = [(r.where, r.failures) for r in report.results if not r.passed]
    assert failed == []
    assert report.coverage.never_fired() == []
    # upgrade.music-muted warns on every upgrade_start (fires_when: "true"): it cannot pass.
    assert [report.coverage.rules[w][0] for w in report.coverage.never_passed()] == ["upgrade.music-muted"]
    assert len(report.coverage.rules) == 42  # 40 of v1, and v2's two overrides
    assert report.ok


def test_failures_gaps_and_suite_problems_are_reported(write_policies: WriteFiles) -> None:
    root = write_policies({"v1/version.yaml": VERSION_V1, "v1/rules.yaml": RULES, "tests/small.yaml": SUITE})
    report = run_suites(Engine(load_policies(root)), root)
    assert not report.ok
    assert [r.passed for r in report.results] == [True, False]
    assert report.results[1].failures == ["decision: expected allow, got deny (by adult)",
                                          "rule: expected None, got adult",
                                          '  fired adult (v1/rules.yaml:2) read {"account.age": 17}']
    assert [str(p) for p in report.problems] == [
        "tests/small.yaml:19:11: no base named 'nope' in this suite or in tests/fixtures.yaml [unknown_base]"]
    assert [report.coverage.rules[w][0] for w in report.coverage.never_fired()] == ["never-tested"]
    text = describe(report)
    assert "FAIL tests/small.yaml:14" in text
    assert "no case fires  never-tested (v1/rules.yaml:8)" in text
    assert text.splitlines()[-2] == "1 passed, 1 failed"
    # The last line says why the run failed: cases, suite problems and coverage alike.
    assert text.splitlines()[-1] == "FAILED: 1 case failed; 1 problem in the suites; coverage: 1 gap (listed above)"


def test_a_rule_without_a_denying_case_fails_the_run(write_policies: WriteFiles, tmp_path: Path) -> None:
    suite = SUITE.split("      - name: a wrong")[0]
    root = write_policies({"v1/version.yaml": VERSION_V1, "v1/rules.yaml": RULES, "tests/small.yaml": suite})
    report = run_suites(Engine(load_policies(root)), root)
    assert all(r.passed for r in report.results) and not report.problems
    assert not report.ok  # every case passed, yet 'adult' and 'never-tested' never fire


def test_a_rule_that_fails_at_run_time_fails_its_case_even_when_it_denies(write_policies: WriteFiles) -> None:
    rules = RULES.replace("fires_when: account.age < params.min_age", "fires_when: account.age / 0 < 1")
    suite = SUITE.split("      - name: a wrong")[0].replace("expect: {decision: allow}",
                                                            "expect: {decision: deny, rule: adult}")
    root = write_policies({"v1/version.yaml": VERSION_V1, "v1/rules.yaml": rules, "tests/small.yaml": suite})
    report = run_suites(Engine(load_policies(root)), root)
    assert [r.failures for r in report.results] == [
        ["adult failed to evaluate (v1/rules.yaml:2): modulus or divide by zero",
         '  error adult (v1/rules.yaml:2) read {"account.age": 30}']]


CHILD = """\
    version: v2
    extends: v1
    effective_from: "2025-06-01T00:00:00Z"
    description: a stricter age
    """

CHILD_RULES = """\
    rules:
      - id: adult
        override: true
        actions: [bind]
        effect: deny
        fires_when: account.age < params.min_age + 1
        message: {en: "too young", zh: "太年轻"}
        source: test
    """

MODEL_SUITE = """\
    suite: model
    cases:
      - name: an adult under v1
        from: bind
        expect: {decision: allow}
      - name: an adult under v1
        from: bind
        expect: {decision: allow}
      - name: a minor under v1
        from: bind
        set: {account.age: 17}
        expect: {rule: adult, message: {en: "too young", zh: "太年轻"}}
      - name: nothing asserted
        from: bind
        expect: {}
    """

FIXTURES = """\
    bases:
      bind:
        request:
          action: bind
          role: official
          at: "2025-01-01T00:00:00Z"
          shop: {id: s}
          account: {id: a, age: 30}
    """


def test_the_test_model_shared_bases_versions_duplicates_and_empty_expectations(write_policies: WriteFiles) -> None:
    root = write_policies({
        "v1/version.yaml": VERSION_V1,
        "v1/rules.yaml": RULES.replace("message: too young", 'message: {en: "too young", zh: "太年轻"}'),
        "v2/version.yaml": CHILD, "v2/rules.yaml": CHILD_RULES,
        "tests/fixtures.yaml": FIXTURES, "tests/model_test.yaml": MODEL_SUITE,
    })
    report = run_suites(Engine(load_policies(root)), root)
    text = describe(report)
    # `expect: {}` asserts nothing: the schema refuses the suite, naming the case.
    assert [str(p) for p in report.problems] == [
        "tests/model_test.yaml:15:13: this `expect` asserts nothing, so the case could never fail: say what the "
        "decision must be (decision, rule, violations, warnings, outputs, message or error) [schema]"]
    fixed = MODEL_SUITE.replace("expect: {}", "expect: {decision: allow}")
    (root / "tests" / "model_test.yaml").write_text(textwrap.dedent(fixed))
    report = run_suites(Engine(load_policies(root)), root)
    text = describe(report)
    assert [p.code for p in report.problems] == ["duplicate_case"]
    # The bases come from tests/fixtures.yaml; messages are asserted in both languages.
    assert all(r.passed for r in report.results), text
    # v2 overrides `adult`, yet no case is judged under v2: the run fails, saying what is missing.
    assert "no case is judged under v2" in text
    assert text.splitlines()[-1] == "FAILED: 1 problem in the suites; coverage: 3 gaps (listed above)"


def test_the_bundled_suites_start_from_the_shared_fixtures_and_a_suite_overrides_them(
        engine: Engine, tmp_path: Path) -> None:
    import yaml

    shared = yaml.safe_load((POLICIES / "tests" / "fixtures.yaml").read_text())["bases"]
    for path in sorted((POLICIES / "tests").glob("*_test.yaml")):
        bases = yaml.safe_load(path.read_text()).get("bases", {})
        starts = {base.get("from") for base in bases.values()}
        # login's one small request is its own: a suite may keep a base that shares nothing.
        assert starts & set(shared) or path.name == "login_test.yaml", f"{path.name} uses no shared base"
    # A suite's own base replaces the shared one of that name, also where another shared base
    # starts from it (bind-channel is `from: bind-official`).
    suite = tmp_path / "override_test.yaml"
    suite.write_text(textwrap.dedent("""\
        suite: override
        bases:
          bind-official:
            from: us-shop
            request:
              action: bind
              role: official
              at: "2025-07-01T00:00:00Z"
              account: {id: a, type: personal, age: 30}
        cases:
          - name: the suite's own base is the one used (the shared one has every field)
            from: bind-channel
            expect: {error: {code: missing_field, paths: [/account/location]}}
        """))
    report = run_suites(engine, POLICIES, [suite])
    assert not report.problems and [r.failures for r in report.results] == [[]], describe(report)
