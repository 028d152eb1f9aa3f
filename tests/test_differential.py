"""Never faster by being wrong: the fast paths decide exactly as the reference paths do.

- native closures (engine/native.py) against cel-python's own evaluator, over every suite
  case, a generated corpus and randomized requests near every threshold;
- the compiled request validator (jsonschema-rs) against jsonschema, on broken requests.
"""

from __future__ import annotations

import copy
import json
import logging
from datetime import UTC, datetime, timedelta
from typing import Any

import celpy
import pytest
from celpy import celtypes
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.checker import validator
from engine.decider import Engine
from engine.errors import RequestError
from engine.evaluator import CEL_PYTHON, FALLBACKS, NATIVE, NATIVE_BUG, NATIVE_WITH_REFERENCE
from engine.generator import generate_requests
from engine.loader import load_policies
from engine.native import CelError, Unsupported, compile_native, to_native
from engine.request import default_checker
from engine.tester import FIXTURES, SUITE_FOLDER, _build, _shared_bases, find_suites
from engine.versions import PolicySet, parse_timestamp
from engine.yamlpos import read_yaml

from .conftest import NOW, POLICIES


@pytest.fixture(scope="module")
def engines(policies: PolicySet) -> tuple[Engine, Engine]:
    return Engine(policies, runtime=NATIVE), Engine(policies, runtime=CEL_PYTHON)


def outcome(engine: Engine, request: dict[str, Any]) -> dict[str, Any]:
    """What a decision says, without what legitimately differs (id, runtime, error wording)."""
    try:
        got = engine.decide(copy.deepcopy(request), now=NOW, decision_id="same", explain=True).to_dict()
    except RequestError as exc:
        return {"rejected": exc.code, "details": [d.to_dict() for d in exc.details]}
    got["policy"].pop("runtime")
    for finding in got["violations"]:
        if "fail closed" in finding["message"]:
            finding["message"] = "<failed>"
    got["rule"] = got["violations"][0] if got["violations"] else None
    for trace in got["explain"]:
        trace.pop("error", None)
    return got


def suite_requests() -> list[dict[str, Any]]:
    requests = []
    fixtures = POLICIES / SUITE_FOLDER / FIXTURES  # the bases every suite may start from
    shared = _shared_bases(read_yaml(fixtures, fixtures.name), []) if fixtures.exists() else {}
    for path in find_suites(POLICIES):
        doc, _ = read_yaml(path, path.name)
        assert doc is not None
        for index, case in enumerate(doc.data["cases"]):
            request = _build(case, {**shared, **doc.data.get("bases", {})}, doc, ("cases", index), ())
            if "policy_version" in case:
                request["policy_version"] = case["policy_version"]
            requests.append(request)
    return requests


def test_every_suite_case_is_decided_alike(engines: tuple[Engine, Engine]) -> None:
    native, reference = engines
    requests = suite_requests()
    assert len(requests) > 150
    for request in requests:
        assert outcome(native, request) == outcome(reference, request), json.dumps(request)


@pytest.mark.slow
def test_a_generated_corpus_is_decided_alike(engines: tuple[Engine, Engine]) -> None:
    native, reference = engines
    seen = set()
    for request in generate_requests(1500, seed=2024, broken=0.03):
        got = outcome(native, request)
        assert got == outcome(reference, request), json.dumps(request)
        seen.update(v["id"] for v in got.get("violations", []) + got.get("warnings", []))
    assert len(seen) >= 39  # the corpus really exercises the rules (of 40)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(min_value=0, max_value=2**32 - 1))
def test_randomized_requests_near_every_threshold(engines: tuple[Engine, Engine], seed: int) -> None:
    native, reference = engines
    for request in generate_requests(5, seed=seed, broken=0.05):
        assert outcome(native, request) == outcome(reference, request), json.dumps(request)


@pytest.mark.slow
@settings(max_examples=200, deadline=None)
@given(age=st.integers(min_value=0, max_value=150), followers=st.integers(min_value=0, max_value=5000),
       points=st.integers(min_value=0, max_value=30), score=st.integers(min_value=-10, max_value=400),
       hours=st.integers(min_value=0, max_value=60), minutes=st.integers(min_value=0, max_value=59),
       unbinds=st.lists(st.integers(min_value=0, max_value=400), max_size=14),
       name_length=st.integers(min_value=1, max_value=40))
def test_numeric_edges(engines: tuple[Engine, Engine], age: int, followers: int, points: int, score: int,
                       hours: int, minutes: int, unbinds: list[int], name_length: int) -> None:
    native, reference = engines
    at = datetime(2025, 1, 10, 12, tzinfo=UTC)
    stamp = lambda delta: (at - delta).isoformat().replace("+00:00", "Z")  # noqa: E731
    bind = {"action": "bind", "role": "official", "at": stamp(timedelta(0)),
            "shop": {"id": "s", "name": "n" * name_length, "market": "GB", "status": "normal",
                     "official_account": None, "channel_accounts": [], "official_unbinds": [],
                     "channel_unbinds": []},
            "account": {"id": "a", "name": "n" * name_length, "type": "personal", "age": age, "location": "GB",
                        "followers": followers, "ecommerce_revoked": False, "linked_to_revoked": False,
                        "policy_compliant": True, "kyc": {"verified": True}, "bind_history": []}}
    unbind = {"action": "unbind", "role": "channel", "at": stamp(timedelta(0)),
              "shop": {"id": "s", "channel_accounts": [{"account_id": "a",
                                                         "bound_at": stamp(timedelta(hours=hours, minutes=minutes))}],
                       "channel_unbinds": [stamp(timedelta(days=d)) for d in unbinds]},
              "account": {"id": "a", "type": "personal", "violation_points": points, "health_score": score,
                          "recent_serious_violation": False}}
    for request in (bind, unbind):
        assert outcome(native, request) == outcome(reference, request), json.dumps(request)


# --- expression by expression: the native closures against cel-python ----------------------------

ENV = celpy.Environment(runner_class=celpy.InterpretedRunner)
VALUES = {"m": {"a": 1, "s": "x"}, "l": [1, 2, 3], "s": "héllo", "n": None, "i": 7, "d": 2.5, "b": True,
          "t": datetime(2024, 1, 1, tzinfo=UTC), "u": timedelta(hours=1), "e": [], "ls": ["a", "b"]}
EXPRESSIONS = [
    "i == 7", "n == s", "s == n", "n == m", "m == n", "n != s",
    "s < 'z'", "t < t + u", "t - u", "t - t", "u + u", "-i", "-d", "!b", "!i",
    "i / 2", "-i / 2", "i % -2", "-i % 2", "i / 0", "i % 0", "d / 0.0", "9223372036854775807 + 1",
    "i * i", "d * d", "d + d", "s + s", "l + l", "i + d", "b ? i : s", "i ? 1 : 2",
    "m.a", "m.z", "n.a", "i.a", "has(m.a)", "has(m.z)", "has(n.a)", "l[1]", "l[9]", "m['a']", "m['z']",
    "2 in l", "'a' in ls", "'a' in m", "size(s)", "size(l)", "size(m)", "size(i)", "s.size()",
    "s.startsWith('h')", "s.endsWith('o')", "s.contains('ll')", "s.matches('^h.l')", "s.startsWith(1)",
    "l.exists(x, x == 2)", "l.all(x, x > 0)", "l.exists(x, 1 / (x - 2) == 5)", "l.all(x, 1 / (x - 2) == 5)",
    "l.all(x, 1 / (x - 3) < 5)", "l.exists_one(x, x > 2)", "l.exists_one(x, 1 / (x - 2) == 1)",
    "l.filter(x, x > 1)", "l.map(x, x * 2)", "m.exists(k, k == 's')", "e.all(x, false)",
    "(1 / 0 == 1) && false", "false && (1 / 0 == 1)", "(1 / 0 == 1) || true", "(1 / 0 == 1) && true",
    "(1 / 0 == 1) || (2 / 0 == 1)", "i || true", "true || i", "[1, 2] == [1, 2]",
    "{'a': 1} == {'a': 1}", "duration('24h') > duration('23h59m')", "duration(s)",
    "timestamp('2024-01-01T00:00:00Z') == t",
    "zz == 1", "type(i) == int", "m.s == 'x' && m.a == 1",
]

# Where cel-python 0.5 departs from the CEL specification, the native runtime follows the spec
# (google/cel-spec's conformance data says so: tests/celspec.py). Each known deviation is named
# here with the spec's answer and cel-python's; "error" stands for an evaluation error.
DEVIATIONS: dict[str, tuple[str, Any, Any]] = {
    "int and double compare as numbers": ("i == 7.0", True, "error"),
    "int and double order as numbers": ("i < d", False, "error"),
    "lists of int and double compare as numbers": ("[1] == [1.0]", True, "error"),
    "values of different types are unequal, not an error": ("i == 's'", False, "error"),
    "null is unequal to a number": ("n == i", False, "error"),
    "null is unequal to a map": ("n != m", True, "error"),
    "a bool is not the int 1 (Python's True == 1)": ("b == 1", False, True),
    "`in` a list of mixed types is false, not an error": ("'a' in l", False, "error"),
    "a duration has no negation": ("-u", "error", timedelta(hours=-1)),
    "filter() needs a boolean, not a truthy value": ("l.filter(x, x)", "error", [1, 2, 3]),
    "NaN is unequal to itself (cel-python's 0.0/0.0 is +inf)": ("0.0 / 0.0 == 0.0 / 0.0", False, True),
    "duration arithmetic stays within +-10,000 years":
        ("duration('200000000000s') - duration('-200000000000s')", "error", "a value"),
    "escape \\? is a question mark": ("'\\?' == '?'", True, False),
    "a duration has no day unit (cel-python reads 1d as 24h)": ("duration('1d')", "error", timedelta(days=1)),
}


def to_cel(value: Any) -> Any:
    if isinstance(value, bool):
        return celtypes.BoolType(value)
    if isinstance(value, datetime):
        return celtypes.TimestampType(value)
    if isinstance(value, timedelta):
        return celtypes.DurationType(value)
    if isinstance(value, dict):
        return celtypes.MapType({celtypes.StringType(k): to_cel(v) for k, v in value.items()})
    if isinstance(value, list):
        return celtypes.ListType([to_cel(v) for v in value])
    return celpy.json_to_cel(value)


def reference_result(text: str) -> tuple[str, Any]:
    try:
        value = ENV.program(ENV.compile(text)).evaluate({k: to_cel(v) for k, v in VALUES.items()})
    except Exception:
        return "error", None
    return "value", to_native(value)


def native_result(text: str) -> tuple[str, Any]:
    closure = compile_native(ENV.compile(text))  # Unsupported fails the test: all of these are native
    try:
        return "value", closure(dict(VALUES))
    except CelError:
        return "error", None


def same(a: tuple[str, Any], b: tuple[str, Any]) -> bool:
    return a[0] == b[0] and (a[0] == "error" or (type(a[1]) is type(b[1]) and a[1] == b[1]))


@pytest.mark.parametrize("text", EXPRESSIONS)
def test_native_agrees_with_cel_python(text: str) -> None:
    assert same(native_result(text), reference_result(text))


@pytest.mark.parametrize("name", DEVIATIONS)
def test_each_known_deviation_of_cel_python(name: str) -> None:
    text, spec, cel_python = DEVIATIONS[name]
    assert same(native_result(text), ("error", None) if spec == "error" else ("value", spec))
    reference = reference_result(text)
    if cel_python == "error":
        assert reference[0] == "error", reference
    elif cel_python == "a value":
        assert reference[0] == "value", reference
    else:
        assert same(reference, ("value", cel_python)), reference


def test_outside_the_native_runtime_is_unsupported_not_guessed() -> None:
    for text in ("1u == 1", "uint(i) == 1", "b'abc' == b'abc'"):
        with pytest.raises(Unsupported):
            compile_native(ENV.compile(text))


def test_no_fallback_and_no_native_bug_over_every_suite_case_and_the_corpus(engines: tuple[Engine, Engine]) -> None:
    native, _ = engines
    before = dict(FALLBACKS.counts)
    decided = 0
    for request in [*suite_requests(), *generate_requests(1500, seed=2024, broken=0.03)]:
        try:
            decision = native.decide(copy.deepcopy(request), now=NOW, explain=True)
        except RequestError:
            continue
        assert decision.runtime == NATIVE, json.dumps(request)
        decided += 1
    assert decided > 1000
    assert dict(FALLBACKS.counts) == before  # not one expression handed to cel-python


def test_a_native_bug_is_counted_logged_and_said_and_the_reference_decides(
        engines: tuple[Engine, Engine], caplog: pytest.LogCaptureFixture) -> None:
    from api.metrics import Metrics

    broken_policies = load_policies(POLICIES)
    broken, reference = Engine(broken_policies), engines[1]
    request = next(r for r in suite_requests() if r["action"] == "bind" and r.get("role") == "channel")
    version = broken_policies.select(parse_timestamp(request["at"]), request.get("policy_version"))
    rules = version.rules_for("bind", "channel")

    def raises(env: dict[str, Any]) -> Any:
        raise KeyError("a bug")

    for rule in rules:  # as if the native runtime were wrong everywhere
        for expr in (rule.applies_when, rule.fires_when):
            if expr is not None:
                object.__setattr__(expr, "native", raises)
    metrics = Metrics()
    before = FALLBACKS.counts[NATIVE_BUG]
    with caplog.at_level(logging.ERROR, logger="bindpolicy.runtime"):
        decision = broken.decide(copy.deepcopy(request), now=NOW, decision_id="same", explain=True)
    bugs = FALLBACKS.counts[NATIVE_BUG] - before
    assert bugs >= len(rules) > 5  # every rule's fires_when at least
    assert decision.runtime == NATIVE_WITH_REFERENCE
    logged = [r.getMessage() for r in caplog.records if "native runtime bug" in r.getMessage()]
    assert len(logged) == bugs and all("KeyError: 'a bug'; cel-python decided" in line for line in logged)
    assert metrics.native_fallbacks.labels(NATIVE_BUG)._value.get() == bugs
    assert outcome(broken, request) == outcome(reference, request)  # still decided, by the reference


def test_the_bundled_policies_are_all_native(policies: PolicySet) -> None:
    for version in policies:
        for rule in version.rules:
            for expr in (rule.applies_when, rule.fires_when):
                assert expr is None or expr.native is not None, (rule.id, expr.text)


# --- the compiled request validator against jsonschema -------------------------------------------

REPLACEMENTS = [None, "x", "", 1, -1, 1.5, 18.0, True, [], {}, "2024-13-01T00:00:00Z", "2024-01-01t00:00:00z",
                "2024-01-01T00:00:00+02:00", "US", "us", ["2024-01-01T00:00:00Z"], {"state": "trial"}]


def paths_of(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix] if prefix else []
    if isinstance(value, dict):
        for key, item in value.items():
            out.extend(paths_of(item, (*prefix, key)))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            out.extend(paths_of(item, (*prefix, index)))
    return out


@pytest.mark.slow
@settings(max_examples=300, deadline=None)
@given(seed=st.integers(min_value=0, max_value=10**6), pick=st.integers(min_value=0, max_value=10**6),
       replacement=st.sampled_from(REPLACEMENTS), delete=st.booleans())
def test_the_fast_validator_agrees_with_jsonschema(seed: int, pick: int, replacement: Any, delete: bool) -> None:
    request = next(generate_requests(1, seed=seed))
    paths = paths_of(request)
    path = paths[pick % len(paths)]
    holder: Any = request
    for key in path[:-1]:
        holder = holder[key]
    if delete and isinstance(holder, dict):
        del holder[path[-1]]
    else:
        holder[path[-1]] = copy.deepcopy(replacement)
    reference_valid = not any(True for _ in validator("request").iter_errors(request))
    assert default_checker().fast.is_valid(request) == reference_valid, json.dumps(request)



# --- the merged presence checks against the field-by-field accounting -------------------------------


def test_presence_checks_agree_with_absent_fields(policies: PolicySet) -> None:
    from engine.needs import absent_fields, presence_check

    version = policies.get("v2")
    assert version is not None
    contexts = {(r.actions[0], role) for r in version.rules for role in (None, "official", "channel")}
    plans = []
    for action, role in sorted(contexts, key=str):
        paths = [p for r in version.rules_for(action, role) for e in (r.applies_when, r.fires_when)
                 if e is not None for p in e.needs_for(action, role)]
        plans.append((paths, presence_check(paths)))
    checked = 0
    for request in generate_requests(400, seed=8, broken=0.3):
        for paths, check in plans:
            expected = all(not absent_fields(request, path) for path in paths)
            assert check(request) == expected, (paths, json.dumps(request))
            checked += 1
    assert checked > 1000
