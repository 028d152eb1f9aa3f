"""The generated decision paths (engine/codegen.py) decide exactly as the native closures and cel-python do."""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Callable
from typing import Any

import pytest

from engine import codegen
from engine.cli import main
from engine.decider import Engine
from engine.errors import RequestError
from engine.evaluator import CEL_PYTHON, FALLBACKS, GENERATED_BUG, NATIVE
from engine.generator import generate_requests
from engine.loader import load_policies
from engine.needs import PresenceChecks
from engine.versions import PolicySet, parse_timestamp

from .conftest import NOW, VERSION_V1, WriteFiles
from .conftest import POLICIES as POLICIES_DIR
from .test_differential import suite_requests
from .test_impact_quick import near_misses


def answer(engine: Engine, request: dict[str, Any]) -> dict[str, Any]:
    """The whole response (the runtime included), or the refusal with every detail."""
    try:
        return engine.decide(copy.deepcopy(request), now=NOW, decision_id="same").to_dict()
    except RequestError as exc:
        return {"rejected": exc.code, "details": [d.to_dict() for d in exc.details]}


def generated_only(engine: Engine, request: dict[str, Any]) -> dict[str, Any] | None:
    """The generated function's own answer, called directly (None: it hands over to the evaluator)."""
    policies = engine.policies
    checked, usable = engine.check.checked(copy.deepcopy(request))
    assert usable, json.dumps(request)
    at = parse_timestamp(checked["at"]) if "at" in checked else NOW  # select: RequestError as in decide
    version = policies.select(at, checked.get("policy_version"))
    path = version.path(checked["action"], checked.get("role"))
    assert path is not None, json.dumps(request)
    decision = path.function(checked, at, "same", "en")
    return None if decision is None else decision.to_dict()


def same_but_error_words(answer: dict[str, Any]) -> dict[str, Any]:
    """cel-python words its errors its own way: the rule that failed closed is what must agree."""
    out = copy.deepcopy(answer)
    for finding in [*out.get("violations", []), *out.get("warnings", []), out.get("rule") or {}]:
        if "fail closed" in finding.get("message", ""):
            finding["message"] = "<failed>"
    return out


def compare_all(policies: PolicySet, requests: list[dict[str, Any]],
                reference: Callable[[dict[str, Any]], dict[str, Any]] | None = None) -> int:
    """Generated path == native closures (== cel-python where asked) on each request; the count decided."""
    closures, generated = Engine(policies, generated=False), Engine(policies)
    decided = 0
    for request in requests:
        try:
            generated.check(copy.deepcopy(request))
        except RequestError:
            continue  # refused at the door, before any path
        expected = answer(closures, request)
        try:
            direct = generated_only(generated, request)
        except RequestError as exc:  # no version for it: refused before any path, by both
            assert expected["rejected"] == exc.code, json.dumps(request)
            continue
        if direct is None:  # a missing field: the evaluator names it
            assert "rejected" in expected, json.dumps(request)
        else:
            assert direct == expected, json.dumps(request)
            decided += 1
        if reference is not None:
            got = reference(request)
            if "rejected" not in got:
                got["policy"]["runtime"] = NATIVE
            assert same_but_error_words(got) == same_but_error_words(expected), json.dumps(request)
    return decided


def test_every_suite_case_generated_closures_and_cel_python_alike(policies: PolicySet) -> None:
    before = dict(FALLBACKS.counts)
    cel_python = Engine(policies, runtime=CEL_PYTHON)
    decided = compare_all(policies, suite_requests(), lambda r: answer(cel_python, r))
    assert decided > 150
    assert dict(FALLBACKS.counts) == before  # zero fallbacks, zero bugs


def test_a_generated_corpus_generated_and_closures_alike(policies: PolicySet) -> None:
    before = dict(FALLBACKS.counts)
    requests = list(generate_requests(1500, seed=2024, broken=0.03))
    decided = compare_all(policies, requests)
    assert decided > 1000
    cel_python = Engine(policies, runtime=CEL_PYTHON)  # and cel-python (slow), on a twentieth
    compare_all(policies, requests[::20], lambda r: answer(cel_python, r))
    assert dict(FALLBACKS.counts) == before


def test_the_bundled_policies_are_written_inline(policies: PolicySet) -> None:
    paths = [(v.name, context, v.path(*context)) for v in policies for context in v._paths]
    assert len(paths) > 20
    assert [(name, context) for name, context, path in paths if path.native_calls] == []
    source = policies.get("v2").path("bind", "official").source  # type: ignore[union-attr]
    assert "# rule personal.kyc (deny), v2/bind.yaml:" in source
    assert "_native" not in source and "def decide_bind_official(request, at, decision_id, language):" in source


# A policy whose expressions raise CEL errors on the fast path, some absorbed by && and ||.
ERRORS_V1 = {
    "v1/version.yaml": VERSION_V1,
    "v1/rules.yaml": """\
rules:
  - id: absorbed.or
    actions: [bind]
    effect: deny
    fires_when: 1 / (account.age - account.age) == 1 || account.age > 10
    message: an error on the left, true on the right
    source: test
  - id: absorbed.and
    actions: [bind]
    effect: warn
    fires_when: account.age / 0 == 1 && account.age < 0
    message: an error on the left, false on the right
    source: test
  - id: fails.closed
    actions: [bind]
    effect: warn
    fires_when: account.age / (account.age - account.age) > 1
    message: division by zero
    source: test
  - id: null.object
    actions: [bind]
    effect: deny
    fires_when: shop.official_account.account_id == account.id
    message: a field of null
    source: test
  - id: names.field
    actions: [bind]
    roles: [channel]
    effect: deny
    applies_when: account.age >= params.min_age
    fires_when: account.name.startsWith("x") && size(account.name) > 2
    message:
      en: "{account.name} starts with x"
      zh: "{account.name} 以 x 开头"
    source: test
""",
}


def test_cel_errors_on_the_fast_path_are_judged_by_the_closures(write_policies: WriteFiles) -> None:
    policies = load_policies(write_policies(ERRORS_V1))
    requests = []
    for age, name, official in ((5, "xavier", None), (30, "xavier", {"account_id": "a", "account_type": "personal",
                                                                      "bound_at": "2024-06-01T00:00:00Z"}),
                                (30, "bob", None)):
        requests.append({"action": "bind", "role": "channel", "at": "2024-07-01T00:00:00Z",
                         "shop": {"id": "s", "official_account": official},
                         "account": {"id": "a", "age": age, "name": name}})
    requests.append({**requests[0], "account": {"id": "a", "age": 30}})  # a field missing: refused
    cel_python = Engine(policies, runtime=CEL_PYTHON)
    before = dict(FALLBACKS.counts)
    assert compare_all(policies, requests, lambda r: answer(cel_python, r)) == 3
    assert dict(FALLBACKS.counts) == before
    decision = Engine(policies).decide(copy.deepcopy(requests[1]), now=NOW)
    # a warn rule that fails denies (fail closed)
    assert [v.id for v in decision.violations] == ["absorbed.or", "fails.closed", "null.object", "names.field"]
    assert decision.violations[3].message == "xavier starts with x"
    assert "fail closed" in decision.violations[1].message
    refused = answer(Engine(policies), requests[3])
    assert refused["rejected"] == "missing_field" and refused["details"][0]["path"] == "/account/name"


def test_a_generated_path_that_fails_is_counted_and_the_closures_decide(
        policies: PolicySet, caplog: pytest.LogCaptureFixture) -> None:
    fresh = load_policies(POLICIES_DIR)
    request = next(r for r in suite_requests() if r["action"] == "bind" and r.get("role") == "official")
    version = fresh.select(parse_timestamp(request["at"]), request.get("policy_version"))
    path = version.path("bind", "official")

    def broken(*args: Any) -> Any:
        raise KeyError("a bug")

    object.__setattr__(path, "function", broken)
    before = FALLBACKS.counts[GENERATED_BUG]
    with caplog.at_level(logging.ERROR, logger="bindpolicy.runtime"):
        got = answer(Engine(fresh), request)
    assert FALLBACKS.counts[GENERATED_BUG] == before + 1
    assert any("generated path bug in v" in r.getMessage() and "KeyError" in r.getMessage() for r in caplog.records)
    assert got == answer(Engine(policies, generated=False), request)


def test_unusable_timestamps_take_the_evaluator_and_are_refused_as_before(policies: PolicySet) -> None:
    request = next(r for r in suite_requests() if r["action"] == "bind" and r.get("role") == "official")
    request = copy.deepcopy(request)
    request["account"]["bind_history"] = [{"shop_id": "x", "bound_at": "2024-12-31T23:59:60Z"}]
    _, usable = Engine(policies).check.checked(copy.deepcopy(request))
    assert not usable
    got = answer(Engine(policies), request)
    assert got["rejected"] == "invalid_request"
    assert got["details"][0]["path"] == "/account/bind_history/0/bound_at"


def test_compile_show_prints_the_source(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["compile", "--show", "v2", "bind", "channel", "--policies", str(POLICIES_DIR)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("# v2: action 'bind', role 'channel': 12 rules, 3 outputs.")
    assert "# rule channel.invited (deny)" in out and "outputs['unbind_not_before']" in out
    assert main(["compile", "--show", "v2", "bind", "nobody", "--policies", str(POLICIES_DIR)]) == 2
    assert "no decision path for action 'bind', role 'nobody'" in capsys.readouterr().err


def test_compile_show_joint_prints_what_impact_runs(capsys: pytest.CaptureFixture[str]) -> None:
    """--joint OLD: the one function `impact OLD VERSION` judges a path with where the two write it
    differently (the rules in common once, v2's two changed rules beside v1's), or says it is the
    same path, judged once."""
    policies = ["--policies", str(POLICIES_DIR)]
    assert main(["compile", "--show", "v2", "bind", "channel", "--joint", "v1", *policies]) == 0
    out = capsys.readouterr().out
    assert out.startswith("# v1 and v2: action 'bind', role 'channel': 14 rules, 3 outputs, 13 of them judged once.")
    assert "def both_bind_channel(request, at):" in out
    assert out.count("# rule personal.kyc (deny)") == 2 and "v2 only" in out and "v1 only" in out
    assert main(["compile", "--show", "v2", "login", "--joint", "v1", *policies]) == 0
    assert "write the same path" in capsys.readouterr().out
    assert main(["compile", "--show", "v2", "login", "--joint", "v9", *policies]) == 2
    assert "no policy version 'v9'" in capsys.readouterr().err



# --- how fast the paths are generated must not change what they decide (issue 10 item 3) ---


def test_long_paths_call_their_rules_in_chunks_and_decide_alike(monkeypatch: pytest.MonkeyPatch,
                                                                  write_policies: WriteFiles) -> None:
    """A path of more rules than a chunk holds calls them in chunk functions (Python compiles
    those far faster than one long function); hand-overs from inside a chunk (a missing field,
    a CEL error the closures judge again) still reach the caller."""
    monkeypatch.setattr(codegen, "_CHUNK", 3)
    chunked = load_policies(POLICIES_DIR)
    source = chunked.get("v2").path("bind", "official").source  # type: ignore[union-attr]
    assert "def _rules_0(request, at, language, complete, violations, warnings, _account, _shop):" in source
    assert "    if _rules_1(request, at, language, complete, violations, warnings, _account, _shop):" in source
    before = dict(FALLBACKS.counts)
    assert compare_all(chunked, suite_requests()) > 150
    assert compare_all(chunked, list(generate_requests(300, seed=7, broken=0.03))) > 200
    engine, outcomes = Engine(chunked), set()  # the verdict paths (impact's) chunk alike
    for request in generate_requests(40, seed=9):
        for variant in near_misses(request):
            if not engine.check.usable.is_valid(variant):
                continue
            path = chunked.get("v2").path(variant["action"], variant.get("role"))  # type: ignore[union-attr]
            if path is None:
                continue
            decided = path.function(variant, NOW, "d", "en")
            expected = None if decided is None else (decided.decision, decided.rule.id if decided.rule else None)
            verdict = path.verdict(variant, NOW)
            if verdict is codegen.LACKING:  # a field missing, from inside a chunk too: refused
                assert decided is None and answer(engine, {**variant, "policy_version": "v2"})["rejected"] == \
                    "missing_field", variant
                outcomes.add("lacking")
                continue
            assert verdict == expected, variant
            outcomes.add("handed over" if expected is None else expected[0])
    assert outcomes == {"allow", "deny", "lacking"}
    monkeypatch.setattr(codegen, "_CHUNK", 2)
    errors = load_policies(write_policies(ERRORS_V1))
    assert "def _rules_1(" in errors.get("v1").path("bind", "channel").source  # type: ignore[union-attr]
    requests = [{"action": "bind", "role": "channel", "at": "2024-07-01T00:00:00Z", "shop": {"id": "s",
                 "official_account": None}, "account": {"id": "a", "age": age, "name": "xavier"}} for age in (5, 30)]
    requests.append({**requests[1], "account": {"id": "a", "age": 30}})  # needs account.name: refused
    cel_python = Engine(errors, runtime=CEL_PYTHON)
    assert compare_all(errors, requests, lambda r: answer(cel_python, r)) == 2
    assert answer(Engine(errors), requests[2])["rejected"] == "missing_field"
    assert dict(FALLBACKS.counts) == before


ROLES_V1 = {
    "v1/version.yaml": VERSION_V1,
    "v1/rules.yaml": """\
rules:
  - id: young.official
    actions: [bind]
    effect: deny
    fires_when: role == "official" && account.age < 30
    message: read per role
    source: test
  - id: not.channel
    actions: [bind]
    effect: warn
    applies_when: role != "channel"
    fires_when: account.age > 20
    message: read per role
    source: test
  - id: any.role
    actions: [bind]
    effect: warn
    fires_when: account.age > 25
    message: the same text in every role's path
    source: test
""",
}


def test_an_expression_is_written_once_per_version_unless_it_reads_the_role(
        monkeypatch: pytest.MonkeyPatch, write_policies: WriteFiles) -> None:
    writes: list[str] = []
    original = codegen._PathWriter._write

    def counted(self: codegen._PathWriter, expr: Any, as_condition: bool) -> tuple[str, str]:
        writes.append(expr.text)
        return original(self, expr, as_condition)

    monkeypatch.setattr(codegen._PathWriter, "_write", counted)
    policies = load_policies(write_policies(ROLES_V1))
    # role None, official and channel: the expressions that read the role are written for each
    # role (for no role, `role` is not known, so not folded), the one that does not, once.
    assert sorted(writes) == sorted([*['role == "official" && account.age < 30'] * 3,
                                     *['role != "channel"'] * 3, "account.age > 20", "account.age > 25"])
    version = policies.get("v1")
    assert version is not None
    lines = {role: version.path("bind", role).source for role in (None, "official", "channel")}  # type: ignore[union-attr]
    assert all("if (_account['age'] > 25):" in text for text in lines.values())
    assert "if False:" in lines["channel"] and "if True:" in lines["official"]
    requests = [{"action": "bind", "at": "2024-07-01T00:00:00Z", "shop": {"id": "s"},
                 "account": {"id": "a", "age": age}, "role": role}
                for age in (18, 22, 40) for role in ("official", "channel")]  # a bind names its role
    cel_python = Engine(policies, runtime=CEL_PYTHON)
    assert compare_all(policies, requests, lambda r: answer(cel_python, r)) == len(requests)


def test_presence_checks_are_made_once_per_set_of_paths() -> None:
    checks = PresenceChecks()
    first = checks.get([("account", "age"), ("shop", "id")])
    assert checks.get([("shop", "id"), ("account", "age"), ("shop", "id")]) is first
    both = checks.all([[("account", "name")], [("shop", "id"), ("account", "age")]])
    assert both[1] is first and len(checks) == 2
    assert first({"account": {"age": 1}, "shop": {"id": "s"}}) and not first({"account": {}, "shop": {"id": "s"}})
    assert both[0]({"account": {"name": "x"}}) and not both[0]({"account": {"age": 1}})


def test_paths_of_the_same_text_are_compiled_once_and_keep_their_own_names(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Python's compiler is a fifth of a large load: the paths of an action whose text differs only
    in the role (the function's name, the header) share one compiled module, exec'd in each path's
    own namespace, its function named as each path's source says."""
    compiled: list[str] = []

    def counted(source: str, where: str, mode: str) -> Any:
        compiled.append(source)
        return compile(source, where, mode)

    monkeypatch.setattr(codegen, "compile", counted, raising=False)
    policies = load_policies(POLICIES_DIR)
    paths = [(version.name, path) for version in policies for path in version._paths.values()]
    assert len(set(compiled)) == len(compiled) < len(paths)
    for name, path in paths:
        function = path.function
        assert f"def {function.__name__}(request, at, decision_id, language):" in path.source
        assert function.__code__.co_filename == f"<{name} {path.action} {path.role}>"
        assert function.__globals__[function.__name__] is function
    assert compare_all(policies, suite_requests()) > 150
