"""Requests are checked before anything is decided; decisions follow docs/contract.md; failures deny."""

from __future__ import annotations

import copy
from functools import partial
from typing import Any

import orjson
import pytest

from engine.decider import Engine
from engine.errors import RequestError
from engine.loader import load_policies

from .conftest import NOW, VERSION_V1, WriteFiles, bind_request


def reject(engine: Engine, request: Any) -> RequestError:
    with pytest.raises(RequestError) as caught:
        engine.decide(request, now=NOW)
    return caught.value


def paths(error: RequestError) -> list[str]:
    return [d.path for d in error.details]


class TestRequestChecks:
    def test_not_an_object(self, engine: Engine) -> None:
        error = reject(engine, ["bind"])
        assert error.code == "invalid_request" and paths(error) == [""]

    def test_every_schema_problem_is_listed_by_pointer(self, engine: Engine) -> None:
        request = bind_request()
        request["account"]["age"] = "thirty"  # type: ignore[index]
        request["shop"]["market"] = "usa"  # type: ignore[index]
        request["colour"] = "blue"
        del request["role"]
        error = reject(engine, request)
        assert error.code == "invalid_request"
        assert sorted(set(paths(error))) == ["/account/age", "/colour", "/role", "/shop/market"]
        problems = {d.path: d.problem for d in error.details}
        assert problems["/account/age"] == "expected an integer, found a string"
        assert problems["/role"] == "'role' is required here but missing"

    def test_unknown_action(self, engine: Engine) -> None:
        error = reject(engine, bind_request(action="merge"))
        assert error.code == "invalid_request" and "/action" in paths(error)

    def test_bad_timestamp(self, engine: Engine) -> None:
        error = reject(engine, bind_request(at="yesterday"))
        assert paths(error) == ["/at"] and "RFC 3339" in error.details[0].problem

    def test_unknown_version(self, engine: Engine) -> None:
        error = reject(engine, bind_request(policy_version="v9"))
        assert error.code == "unknown_version" and paths(error) == ["/policy_version"]

    def test_before_the_first_version(self, engine: Engine) -> None:
        error = reject(engine, bind_request(at="2023-12-31T23:59:59Z"))
        assert error.code == "no_version_in_force" and paths(error) == ["/at"]

    def test_a_field_a_rule_needs_is_never_read_as_false_or_zero(self, engine: Engine) -> None:
        request = bind_request()
        del request["account"]["age"]  # type: ignore[attr-defined]
        del request["account"]["ecommerce_revoked"]  # type: ignore[attr-defined]
        error = reject(engine, request)
        assert error.code == "missing_field"
        assert paths(error) == ["/account/age", "/account/ecommerce_revoked"]
        assert "personal.min-age" in error.details[0].problem

    def test_fields_of_rules_that_do_not_apply_are_not_needed(self, engine: Engine) -> None:
        # An organization account has no holder age: the personal.* rules do not apply.
        request = bind_request()
        request["account"] = {"id": "org-1", "name": "Acme Store", "type": "organization",
                              "created_by_shop": "shop-1", "bind_history": []}
        decision = engine.decide(request, now=NOW)
        assert decision.decision == "allow", decision.to_dict()
        assert decision.outputs["login_method"] == "otp"

    def test_list_items_are_checked_too(self, engine: Engine) -> None:
        request = bind_request()
        request["account"]["bind_history"] = [{"shop_id": "shop-1"}]  # type: ignore[index]
        assert paths(reject(engine, request)) == ["/account/bind_history/0/bound_at"]


class TestDecisions:
    def test_allowed_bind_has_the_contract_shape(self, engine: Engine) -> None:
        got = engine.decide(bind_request(), now=NOW, decision_id="d-1").to_dict()
        assert got == {
            "decision_id": "d-1", "decision": "allow", "rule": None, "violations": [], "warnings": [],
            "outputs": {"promotion_scope": "bound_shop_only", "unbind_not_before": "2025-07-02T00:00:00Z"},
            "policy": {"version": "v2", "digest": got["policy"]["digest"], "runtime": "native"},
            "at": "2025-07-01T00:00:00Z", "language": "en",
        }

    def test_denial_names_the_first_rule_in_policy_order(self, engine: Engine) -> None:
        request = bind_request()
        request["account"].update(age=16, location="GB")  # type: ignore[attr-defined]
        request["shop"]["official_account"] = {  # type: ignore[index]
            "account_id": "other", "account_type": "personal", "bound_at": "2025-01-01T00:00:00Z"}
        got = engine.decide(request, now=NOW).to_dict()
        assert got["decision"] == "deny" and got["outputs"] == {}
        assert [v["id"] for v in got["violations"]] == ["official.single", "personal.min-age",
                                                       "personal.location"]
        assert got["rule"] == got["violations"][0]
        assert got["rule"]["source"].startswith("v1/bind.yaml:") and got["rule"]["policy"] == "v1"

    def test_the_version_in_force_and_a_pinned_one(self, engine: Engine) -> None:
        request = bind_request()
        request["account"]["kyc"] = {"verified": False}  # type: ignore[index]
        assert engine.decide(request, now=NOW).decision == "allow"  # v2: US exempt
        pinned = engine.decide({**request, "policy_version": "v1"}, now=NOW)
        assert pinned.decision == "deny" and pinned.rule is not None and pinned.rule.id == "personal.kyc"
        earlier = engine.decide({**request, "at": "2025-05-31T23:59:59Z"}, now=NOW)
        assert earlier.policy_version == "v1" and earlier.decision == "deny"

    def test_a_missing_at_is_the_callers_now(self, engine: Engine) -> None:
        request = bind_request()
        del request["at"]
        decision = engine.decide(request, now=NOW)
        assert decision.at == "2025-07-01T00:00:00Z" and decision.policy_version == "v2"

    def test_same_request_same_version_same_decision(self, engine: Engine) -> None:
        request = bind_request()
        request["account"]["age"] = 17  # type: ignore[index]
        first = engine.decide(copy.deepcopy(request), now=NOW, decision_id="x").to_dict()
        for _ in range(5):
            assert engine.decide(copy.deepcopy(request), now=NOW, decision_id="x").to_dict() == first

    def test_the_request_is_not_modified(self, engine: Engine) -> None:
        request = bind_request()
        before = copy.deepcopy(request)
        engine.decide(request, now=NOW, explain=True)
        assert request == before

    def test_explain_lists_every_rule_with_outcome_and_values(self, engine: Engine) -> None:
        request = bind_request()
        request["account"]["age"] = 17  # type: ignore[index]
        got = engine.decide(request, now=NOW, explain=True).to_dict()
        traces = {t["id"]: t for t in got["explain"]}
        assert traces["personal.min-age"]["outcome"] == "fired"
        assert traces["personal.min-age"]["values"] == {"account.type": "personal", "account.age": 17}
        assert traces["official.org.name-length"]["outcome"] == "not_applicable"
        assert traces["official.single"]["outcome"] == "passed"
        assert "channel.max-four" not in traces  # a channel-only rule is not evaluated for official
        assert len(traces) == 14

    def test_warnings_do_not_deny(self, engine: Engine) -> None:
        request = {"action": "upgrade_start", "at": "2025-07-01T00:00:00Z",
                   "shop": {"id": "shop-1", "official_account": None},
                   "account": {"id": "acct-1", "type": "personal",
                               "upgrade": {"state": "none", "unwithdrawn_earnings": 12.5}}}
        got = engine.decide(request, now=NOW).to_dict()
        assert got["decision"] == "allow"
        assert [w["id"] for w in got["warnings"]] == ["upgrade.earnings-expire", "upgrade.music-muted"]
        assert got["outputs"] == {"trial_ends_at": "2025-07-16T00:00:00Z"}


    def test_a_json_line_is_the_dicts_writing_byte_for_byte(self, engine: Engine) -> None:
        denied = bind_request()
        denied["account"].update(age=16, location="GB")  # type: ignore[attr-defined]
        warned = {"action": "upgrade_start", "at": "2025-07-01T00:00:00Z",
                  "shop": {"id": "shop-1", "official_account": None},
                  "account": {"id": "acct-1", "type": "personal",
                              "upgrade": {"state": "none", "unwithdrawn_earnings": 12.5}}}
        for request in (bind_request(), denied, warned):
            for explain in (False, True):
                decision = engine.decide(request, now=NOW, explain=explain)
                assert decision.to_json_line() == orjson.dumps(decision.to_dict()) + b"\n"
        # findings of both kinds were among them
        assert engine.decide(denied, now=NOW).violations and engine.decide(warned, now=NOW).warnings

FAILING = {
    "v1/version.yaml": VERSION_V1,
    "v1/rules.yaml": """\
        rules:
          - id: divides.by-zero
            actions: [bind]
            effect: warn
            fires_when: 100 / (account.age - account.age) > 1
            message: never shown
            source: test
          - id: adult
            actions: [bind]
            effect: deny
            fires_when: account.age < params.min_age
            message: too young
            source: test
          - id: not-a-boolean
            actions: [login]
            effect: deny
            fires_when: dyn(account.id)  # dyn: past the type checker, so it fails at run time
            message: never shown
            source: test
        """,
}


class TestFailClosed:
    def test_an_expression_that_fails_denies_and_names_its_rule(self, write_policies: WriteFiles) -> None:
        engine = Engine(load_policies(write_policies(FAILING)))
        got = engine.decide({"action": "bind", "role": "channel", "at": "2025-01-01T00:00:00Z",
                             "shop": {"id": "s"}, "account": {"id": "a", "age": 30}}, now=NOW).to_dict()
        assert got["decision"] == "deny"
        assert got["rule"]["id"] == "divides.by-zero"
        assert "fail closed" in got["rule"]["message"] and "divide by zero" in got["rule"]["message"]
        assert got["rule"]["source"] == "v1/rules.yaml:2"
        assert [v["id"] for v in got["violations"]] == ["divides.by-zero"]

    def test_a_non_boolean_result_fails_closed(self, write_policies: WriteFiles) -> None:
        engine = Engine(load_policies(write_policies(FAILING)))
        got = engine.decide({"action": "login", "at": "2025-01-01T00:00:00Z", "account": {"id": "a"},
                             "login": {"method": "otp", "target": "app"}}, now=NOW)
        assert got.decision == "deny" and got.rule is not None
        assert "expected a boolean" in got.rule.message


def test_line_decider_answers_each_line_as_decide_bytes_alone(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    """`decide --jsonl`'s decider (Engine.line_decider: each `at`'s time and version kept, a seen
    one's request straight to its generated path) answers every line as decide_bytes does alone:
    generated requests, some broken, under several `at`s and pinned versions (an unknown one, a
    time before the first version), over and over so that kept pairs are used and the kept ones
    cleared (CHOSEN_KEPT 3 here), with a generated path that gives some requests back to the
    evaluator, in two languages and with explain."""
    import engine.decider as decider
    from engine.generator import generate_requests

    monkeypatch.setattr(decider, "CHOSEN_KEPT", 3)
    given_back = iter(range(10**6))
    path_run = decider.run_path
    monkeypatch.setattr(decider, "run_path", lambda *a: None if next(given_back) % 4 == 0 else path_run(*a))
    times = [None, "2025-07-01T12:00:00Z", "2025-07-01T12:00:00+08:00", "2023-01-01T00:00:00Z", "1999-01-01T00:00:00Z"]
    texts = []
    for index, request in enumerate(generate_requests(60, seed=11, broken=0.2)):
        if isinstance(request, dict):
            at = times[index % len(times)]
            if at is not None:
                request["at"] = at
            if index % 7 == 3:
                request["policy_version"] = ("v1", "v2", "v9")[index % 3]
        texts.append(orjson.dumps(request))
    texts += [b"{oops", texts[5] + b" {}", *texts]

    def answer(decide: Any, text: bytes) -> Any:
        try:
            found = decide(text).to_dict()
        except RequestError as exc:
            return exc.to_dict()
        found.pop("decision_id")
        return found

    for explain, language in ((False, "en"), (False, "zh"), (True, "en")):
        decide = engine.line_decider(now=NOW, explain=explain, language=language)
        alone = [answer(partial(engine.decide_bytes, now=NOW, explain=explain, language=language), t) for t in texts]
        assert [answer(decide, t) for t in texts] == alone
        assert {"allow", "deny"} <= {a.get("decision") for a in alone}
        assert {"invalid_json", "unknown_version", "no_version_in_force"} <= {
            a.get("error", {}).get("code") for a in alone}
