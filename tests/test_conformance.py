"""Google's CEL conformance data, run through the engine's evaluation path (tests/celspec.py).

A test that passed (tests/data/cel-spec/passing.txt) must keep passing; every skip has a reason.
`python -m tests.celspec --failures --skips` prints the table, the failures and the skip reasons.
"""

from __future__ import annotations

import pytest

from engine.native import CelType

from . import celspec


@pytest.fixture(scope="module")
def outcomes() -> list[celspec.Outcome]:
    return celspec.run_all()


def test_the_vendored_data_is_whole(outcomes: list[celspec.Outcome]) -> None:
    assert (celspec.DATA / "LICENSE").read_text().startswith("\n                                 Apache License")
    assert len((celspec.DATA / "COMMIT").read_text().strip()) == 40
    assert len(list((celspec.DATA / "testdata").glob("*.textproto"))) == 30
    assert len({o.case.file for o in outcomes}) == 29  # unknowns.textproto holds no test yet
    assert len(outcomes) == 2456


def test_every_test_that_passed_still_passes(outcomes: list[celspec.Outcome]) -> None:
    baseline = set(celspec.BASELINE.read_text(encoding="utf-8").split())
    status = {o.case.id: o for o in outcomes}
    lost = sorted(f"{name}: {status[name].status} {status[name].reason}" if name in status else f"{name}: gone"
                  for name in baseline if name not in status or status[name].status != "passed")
    assert not lost, celspec.table(outcomes) + "\n" + "\n".join(lost)
    assert len(baseline) >= 823


def test_no_core_test_fails(outcomes: list[celspec.Outcome]) -> None:
    failed = [f"{o.case.id}: {o.case.expr!r}: {o.reason}" for o in outcomes if o.status == "failed"]
    assert not failed, celspec.table(outcomes) + "\n" + "\n".join(failed)


def test_every_skip_says_why(outcomes: list[celspec.Outcome]) -> None:
    skipped = [o for o in outcomes if o.status == "skipped"]
    assert skipped and all(len(o.reason) > 20 for o in skipped)


def test_the_comparison_of_results_is_strict() -> None:
    assert celspec.same(1, 1) and not celspec.same(1, 1.0) and not celspec.same(True, 1)
    assert celspec.same(float("nan"), float("nan")) and not celspec.same(float("nan"), 1.0)
    assert celspec.same({"a": [1, 2]}, {"a": [1, 2]}) and not celspec.same({"a": [1]}, {"a": [1.0]})
    assert celspec.same({True: 1}, {True: 1}) and not celspec.same({1: 1}, {True: 1})
    assert celspec.same(CelType("int"), CelType("int")) and not celspec.same(CelType("int"), "int")


def test_a_wrong_expectation_fails() -> None:
    case = next(c for c in celspec.load_cases() if c.id == "basic/self_eval_nonzeroish/self_eval_int_nonzero")
    assert celspec.run_case(case).status == "passed"
    case.test.value.int64_value += 1
    assert celspec.run_case(case).status == "failed"


def test_the_native_runtime_answers_every_core_test_itself(outcomes: list[celspec.Outcome]) -> None:
    helped = [f"{o.case.id}: {o.case.expr!r}" for o in outcomes if o.status != "skipped" and o.runtime != "native"]
    assert not helped, "\n".join(helped)
