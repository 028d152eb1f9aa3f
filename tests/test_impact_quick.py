"""Impact's short cuts (orjson's reading of each line, QuickJudge: one check, the generated paths
directly, twin paths decided once) give the report of the plain way, figure for figure: each
side's whole decision through Engine.decide on each line json.loads read."""

from __future__ import annotations

import json
from typing import Any

import pytest

from engine.decider import Engine
from engine.generator import generate_requests
from engine.impact import (
    QuickJudge,
    _judging_text,
    _same_constants,
    judge_engines,
    parse_lines,
    parse_lines_plainly,
)
from engine.loader import load_policies
from engine.versions import PolicySet

from .conftest import NOW, POLICIES, ROOT, bind_request

EXAMPLES = ROOT / "examples" / "requests.jsonl"

ACCOUNT: dict[str, Any] = dict(bind_request()["account"])  # type: ignore[call-overload]
# Lines the plain way rejects in every way it can, or reads in a way orjson does not.
HOSTILE = [
    "not json", "[1, 2]", '"a string"', "1e400", '{"action": "bind", "n": NaN}',
    '{"action": "login", "x": 18446744073709551616}', '{"action": "login", "x": -9223372036854775809}',
    '{"action": "login", "x": "\\ud800"}', '{"action": "login", "action": "bind"}', "{}",
    json.dumps({**bind_request(), "policy_version": ""}), json.dumps({**bind_request(), "policy_version": "v9"}),
    json.dumps({**bind_request(), "at": "2025-06-30T23:59:60Z"}),
    json.dumps({**bind_request(), "at": "0001-01-01T00:00:00+01:00"}),
    json.dumps({**bind_request(), "role": None}), json.dumps({**bind_request(), "invitation": None}),
    json.dumps({"action": "bind", "role": "channel", "shop": {"id": "s"}, "account": {"id": "a"}}),
    json.dumps({"action": "bind", "role": "official", "shop": {"id": "s", "official_account": None},
                "account": {"id": "a", "type": "personal"}}),
    json.dumps(bind_request(account={**ACCOUNT, "age": 2**70})),
    json.dumps({"action": "enable_affiliate", "account": {"id": "a"}, "market": "GB"}),
]


def figures(report: Any) -> dict[str, Any]:
    data: dict[str, Any] = report.to_dict()
    data.pop("seconds"), data.pop("decisions_per_second")
    return data


def both_ways(engines: tuple[Engine, Engine], old: str, new: str, lines: list[str]) -> tuple[dict[str, Any], ...]:
    quick_requests, plain_requests = parse_lines(lines), parse_lines_plainly(lines)
    assert repr(quick_requests) == repr(plain_requests)  # the same values, types and key order
    quick = judge_engines((engines[0], old), (engines[1], new), quick_requests, NOW)
    plain = judge_engines((engines[0], old), (engines[1], new), plain_requests, NOW, quick=False)
    return figures(quick), figures(plain)


@pytest.fixture(scope="module")
def policies() -> PolicySet:
    return load_policies(POLICIES)


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    generated = [json.dumps(r) for r in generate_requests(400, seed=5, broken=0.05)]
    return EXAMPLES.read_text(encoding="utf-8").splitlines() + generated + HOSTILE


@pytest.mark.parametrize(("old", "new", "size"), [("v1", "v2", None), ("v2", "v1", 800), ("v2", "v2", 400)])
def test_the_quick_way_gives_the_plain_report(policies: PolicySet, corpus: list[str], old: str, new: str,
                                              size: int | None) -> None:
    engine = Engine(policies)
    lines = corpus if size is None else corpus[-size:]
    quick, plain = both_ways((engine, engine), old, new, lines)
    assert quick == plain
    assert plain["rejected"] > len(HOSTILE) // 2 and plain["decided"] > len(lines) // 2  # both kinds
    if old != new:
        assert plain["flips"] != {k: 0 for k in plain["flips"]}


def test_the_quick_way_between_two_checkouts_gives_the_plain_report(policies: PolicySet, corpus: list[str]) -> None:
    """Two engines, two policy sets (as `impact --against` compares another checkout)."""
    quick, plain = both_ways((Engine(policies), Engine(load_policies(POLICIES))), "v1", "v2", corpus[-600:])
    assert quick == plain


def test_twin_paths_are_found_and_only_those(policies: PolicySet) -> None:
    """Both versions write the same login path (decided once); v2 adds bind rules (decided twice)."""
    v1, v2 = policies.get("v1"), policies.get("v2")
    assert v1 is not None and v2 is not None

    def twins(action: str, role: str | None) -> bool:
        a, b = v1.path(action, role), v2.path(action, role)
        return bool(_judging_text(a, v1) == _judging_text(b, v2) and _same_constants(a, b))

    assert twins("login", None) and twins("unbind", "channel")
    assert not twins("bind", "official") and not twins("bind", "channel")
    judge = QuickJudge.of((Engine(policies), "v1"), (Engine(policies), "v2"), NOW)
    assert judge is not None
    login, bind = judge._paths("login", None), judge._paths("bind", "official")
    assert login and bind and login[1] is None and bind[1] is not None


def test_a_request_judged_quickly_is_judged_as_engine_decide_judges_it(policies: PolicySet) -> None:
    engine = Engine(policies)
    judge = QuickJudge.of((engine, "v1"), (engine, "v2"), NOW)
    assert judge is not None
    for request in generate_requests(200, seed=9):
        judged = judge(request)
        if judged is None or len(judged) == 1:
            continue
        for (decision, rule), version in ((judged[:2], "v1"), (judged[2:], "v2")):
            made = engine.decide({**request, "policy_version": version}, now=NOW)
            assert (made.decision, made.rule.id if made.rule else None) == (decision, rule)


def test_the_generated_decision_record_has_every_field(policies: PolicySet) -> None:
    """The generated paths build the Decision without its dataclass __init__: the same record."""
    engine = Engine(policies)
    closures = Engine(engine.policies, generated=False)
    request = bind_request()
    generated, evaluated = engine.decide(request, now=NOW, decision_id="d"), closures.decide(request, now=NOW,
                                                                                             decision_id="d")
    assert generated == evaluated and generated.to_dict() == evaluated.to_dict()
    assert vars(generated).keys() == vars(evaluated).keys()
