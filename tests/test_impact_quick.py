"""Impact's short cuts (msgspec's reading of each line, QuickJudge: one check, the generated paths
directly, twin paths decided once) give the report of the plain way, figure for figure: each
side's whole decision through Engine.decide on each line json.loads read."""

from __future__ import annotations

import gc
import json
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.codegen import LACKING, joint_verdict
from engine.decider import Engine
from engine.errors import RequestError
from engine.generator import generate_requests
from engine.impact import (
    CHUNK,
    QuickJudge,
    _judging_text,
    _same_constants,
    judge_engines,
    parse_lines,
    parse_lines_plainly,
    run_impact,
)
from engine.loader import load_policies
from engine.versions import PolicySet, parse_timestamp

from .conftest import NOW, POLICIES, ROOT, bind_request

EXAMPLES = ROOT / "examples" / "requests.jsonl"

ACCOUNT: dict[str, Any] = dict(bind_request()["account"])  # type: ignore[call-overload]
# denied under v1 (personal.min-followers), allowed under v2 (which lifts it for US shops)
FLIPPING = bind_request(account={**ACCOUNT, "followers": 500})
# Lines the plain way rejects in every way it can, or reads in a way msgspec (or orjson) does not.
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
    # what Python cannot read (json.loads raises ValueError, RecursionError): not JSON, no crash
    '{"action": "login", "x": ' + "9" * 5000 + "}", "[" * 5000 + "]" * 5000,
    json.dumps(bind_request(account={**ACCOUNT, "followers": 10**30})),
    '{"action": "login", "account": {"id": "a"}, "login": {"method": "otp", "target": "app"}, "at": 1e999}',
    '{"action":"login","account":{"id":"a","id":"b"},"login":{"method":"otp","target":"app"},"market":null}',
    '{"action": "login", "account": {"id": "a\u0000"}, "login": {"method": "otp", "target": "app"}}',
    '{"action": "login", "account": {"id": "a"}, "login": {"method": "otp", "target": "app"}, "x": 1}',
    '\ufeff{"action": "login"}', '{"action": "login"}\f', '{"a": "tab\tin"}',
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
    login, bind = judge.paths_of("login", None), judge.paths_of("bind", "official")
    assert login and bind and login[1] is None and bind[1] is not None


def near_misses(request: dict[str, Any]) -> list[dict[str, Any]]:
    """The request, and copies with one field of an object inside it taken out or made null: requests
    the schema may still accept on which a path lacks a field it reads (it hands over, or must not
    stop early) or meets a null where it reads an object (a CEL error, the rule judged again)."""
    found = [request]
    for name, value in request.items():
        if isinstance(value, dict):
            for inner in value:
                found.append({**request, name: {k: v for k, v in value.items() if k != inner}})
                found.append({**request, name: {**value, inner: None}})
    return found


def test_each_path_verdict_is_its_decision(policies: PolicySet) -> None:
    """GeneratedPath.verdict (what impact calls: no Decision built, the first denial returned at
    once on a request with every field) answers as the path's whole function, decision and rule,
    on every request the check lets through: complete ones, ones lacking a field, nulls inside;
    where it says LACKING (the function hands over for a missing field), Engine.decide refuses the
    request as missing_field."""
    engine = Engine(policies)
    outcomes: dict[str, int] = {}
    for request in generate_requests(120, seed=9):
        for variant in near_misses(request):
            if not engine.check.usable.is_valid(variant):
                continue
            for name in ("v1", "v2"):
                version = policies.get(name)
                assert version is not None
                path = version.path(variant["action"], variant.get("role"))
                if path is None:
                    continue
                decided = path.function(variant, NOW, "d", "en")
                verdict = path.verdict(variant, NOW)
                if verdict is LACKING:  # the evaluator refuses it, naming what is missing
                    assert decided is None, (name, variant)
                    with pytest.raises(RequestError) as refused:
                        engine.decide({**variant, "policy_version": name}, now=NOW)
                    assert refused.value.code == "missing_field", (name, variant)
                    kind = "lacking"
                else:
                    expected = None if decided is None else (decided.decision,
                                                             decided.rule.id if decided.rule else None)
                    assert verdict == expected, (name, variant)
                    kind = "handed over" if verdict is None else verdict[0]
                outcomes[kind] = outcomes.get(kind, 0) + 1
    assert min(outcomes.get(kind, 0) for kind in ("allow", "deny", "lacking")) >= 20, outcomes


def test_near_misses_give_the_plain_report(policies: PolicySet) -> None:
    """The quick way over requests lacking a field or holding a null where a rule reads an object:
    the plain way's report (rejections by reason, flips and examples), both ways round."""
    engine = Engine(policies)
    flipping = FLIPPING
    lines = [json.dumps(v) for r in [flipping, *generate_requests(60, seed=13)] for v in near_misses(r)]
    for old, new in (("v1", "v2"), ("v2", "v1")):
        quick, plain = both_ways((engine, engine), old, new, lines)
        assert quick == plain
        assert plain["rejected"] > 50 and plain["decided"] > 500 and plain["groups"]


# A third version whose bind paths differ from v2's early and late: an early rule overridden (and a
# parameter it reads), a rule of one role changed, an output's parameter, a warning and a denial added.
V3 = {
    "version.yaml": 'version: v3\nextends: v2\neffective_from: "2026-01-01T00:00:00Z"\n'
                    "description: A test version.\nparameters:\n  min_age: 21\n  unbind_cooldown: 48h\n",
    "bind.yaml": """rules:
  - id: channel.max-four
    override: true
    actions: [bind]
    roles: [channel]
    effect: deny
    fires_when: size(shop.channel_accounts) >= 3 || shop.status != "normal"
    message: {en: Too many., zh: 太多。}
    source: test
  - id: bind.long-name
    actions: [bind]
    effect: warn
    fires_when: size(shop.name) > 8
    message: {en: A long name., zh: 名字长。}
    source: test
  - id: bind.rich
    actions: [bind]
    applies_when: account.type == "personal"
    effect: deny
    fires_when: account.followers > 100000
    message: {en: Too many followers., zh: 粉丝太多。}
    source: test
""",
}


@pytest.fixture(scope="module")
def with_v3(tmp_path_factory: pytest.TempPathFactory) -> PolicySet:
    import shutil

    folder = tmp_path_factory.mktemp("policies")
    shutil.copytree(POLICIES, folder, dirs_exist_ok=True)
    (folder / "v3").mkdir()
    for name, text in V3.items():
        (folder / "v3" / name).write_text(text, encoding="utf-8")
    return load_policies(folder)


def bind_variants(count: int, seed: int) -> list[dict[str, Any]]:
    """Generated bind requests and near misses, with the values the versions' bind rules part on."""
    found: list[dict[str, Any]] = []
    for request in generate_requests(count, seed=seed):
        if request.get("action") != "bind":
            continue
        found += near_misses(request)
        account, shop = request["account"], request["shop"]
        for market, age, followers, verified in (("US", 19, 500, False), ("GB", 20, 200_000, True),
                                                 ("US", 30, 200_000, False), ("DE", 17, 500, False)):
            found.append({**request, "shop": {**shop, "market": market, "status": "frozen" if age == 19 else "normal"},
                          "account": {**account, "type": "personal", "location": market, "age": age,
                                      "followers": followers, "kyc": {"verified": verified}}})
    return found


def test_joint_verdicts_are_each_versions_verdict(with_v3: PolicySet) -> None:
    """codegen's joint_verdict (impact's bind paths: both versions in one function, the rules they
    share judged once) answers each version's own GeneratedPath.verdict, or None (each version's
    own then judges), or raises where a version's verdict raises: between v1 and v2 (two rules
    changed late), v1 and v3 (an early rule, a parameter, an output's parameter, rules added) and
    v3 and v1, on every bind request the check lets through (fields missing, nulls inside)."""
    engine = Engine(with_v3)
    requests = [r for r in bind_variants(300, seed=21) if engine.check.usable.is_valid(r)]
    for old, new in (("v1", "v2"), ("v1", "v3"), ("v3", "v1")):
        old_version, new_version = with_v3.get(old), with_v3.get(new)
        assert old_version is not None and new_version is not None
        outcomes: dict[str, int] = {}
        for role in ("official", "channel", None):
            old_path, new_path = old_version.path("bind", role), new_version.path("bind", role)
            joint = joint_verdict(old_path.inputs, new_path.inputs)
            assert joint is not None and joint.shared >= 8, (old, new, role)
            for request in (r for r in requests if r.get("role") == role):
                at = parse_timestamp(request["at"]) if "at" in request else NOW
                try:
                    both = joint.function(request, at)
                except Exception:  # then a version's own verdict raises too
                    with pytest.raises(Exception):  # noqa: B017
                        old_path.verdict(request, at), new_path.verdict(request, at)
                    outcomes["raised"] = outcomes.get("raised", 0) + 1
                    continue
                if both is None:
                    outcomes["each its own"] = outcomes.get("each its own", 0) + 1
                    continue
                assert both == (old_path.verdict(request, at), new_path.verdict(request, at)), (old, new, request)
                kind = "same" if both[0] == both[1] else "flip"
                outcomes[kind] = outcomes.get(kind, 0) + 1
        assert outcomes.get("same", 0) > 200 and outcomes.get("flip", 0) > 20, (old, new, outcomes)
        assert outcomes.get("each its own", 0) > 20, (old, new, outcomes)  # the near misses


def test_joint_verdicts_give_the_plain_report(with_v3: PolicySet) -> None:
    """The quick way, with its joint verdicts, between versions that part early and late: the plain
    way's report, both ways round."""
    engine = Engine(with_v3)
    lines = [json.dumps(r) for r in bind_variants(24, seed=23)]
    lines += [json.dumps(r) for r in generate_requests(100, seed=29, broken=0.05)]
    for old, new in (("v1", "v3"), ("v3", "v2")):
        quick, plain = both_ways((engine, engine), old, new, lines)
        assert quick == plain
        assert plain["decided"] > 300 and len(plain["groups"]) >= 3, plain["groups"]


def test_impact_names_each_line_where_it_was_read(policies: PolicySet) -> None:
    """run_impact's chunks carry only their first line's number: blank lines skipped in between and
    (where, text) pairs still name each rejection's and example's line as read."""
    lines = ["", json.dumps(bind_request()), "not json", "   ", json.dumps(bind_request(account={**ACCOUNT, "age": 2})),
             "[1]", ""]
    report = run_impact(policies, "v1", "v1", lines, workers=1, now=NOW).to_dict()
    assert {r["reason"]: r["inputs"] for r in report["rejections"]} == {"not JSON": ["line 3"],
                                                                      "not a JSON object": ["line 6"]}
    pairs = [(f"f.jsonl:{n}", text) for n, text in enumerate(lines, start=7)]
    report = run_impact(policies, "v1", "v1", pairs, workers=1, now=NOW).to_dict()
    assert {r["reason"]: r["inputs"] for r in report["rejections"]} == {"not JSON": ["f.jsonl:9"],
                                                                      "not a JSON object": ["f.jsonl:12"]}
    report = run_impact(policies, "v1", "v2", ["", *[json.dumps(FLIPPING)] * 5], workers=1, now=NOW).to_dict()
    examples = report["groups"][0]["examples"]
    assert [x["input"] for x in examples] == ["line 2", "line 3", "line 4"]
    assert report["groups"][0]["rule"] == "personal.min-followers"
    assert all(x["old"]["decision"] == "deny" and x["new"]["decision"] == "allow" for x in examples)


def test_the_generated_decision_record_has_every_field(policies: PolicySet) -> None:
    """The generated paths build the Decision without its dataclass __init__: the same record."""
    engine = Engine(policies)
    closures = Engine(engine.policies, generated=False)
    request = bind_request()
    generated, evaluated = engine.decide(request, now=NOW, decision_id="d"), closures.decide(request, now=NOW,
                                                                                             decision_id="d")
    assert generated == evaluated and generated.to_dict() == evaluated.to_dict()
    assert vars(generated).keys() == vars(evaluated).keys()


def test_judging_leaves_no_cycles_for_the_collector(policies: PolicySet) -> None:
    """A request rejected the plain way leaves no cycle behind (its error's traceback would hold the
    frames, the request and its activation): a worker's chunk ends with one collection, which
    would walk them all."""
    engine = Engine(policies)
    lines = [json.dumps(bind_request(account={k: v for k, v in ACCOUNT.items() if k != "age"}))] * 40
    gc.collect()
    gc.disable()
    try:
        report = judge_engines((engine, "v1"), (engine, "v2"), parse_lines(lines), NOW)
        found = gc.collect()
    finally:
        gc.enable()
    assert report.rejected == 40 and [r.reason for r in report.rejections.values()] == ["missing_field"]
    assert found < 40, found


def test_a_binary_stream_gives_the_report_of_its_text_lines(policies: PolicySet, corpus: list[str],
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """run_impact over a file opened "rb" (read in blocks, each line handed to orjson as bytes, judged
    in this process) reports as over the file's text lines: counts, rejections, flips, examples and
    the line each was read on, across blank lines, \\r\\n and lone \\r endings, bytes that are not
    UTF-8 (read as a text file with errors="replace" reads them) and chunks' edges."""
    import io

    from engine import impact

    def no_pool(method: str) -> None:
        raise AssertionError("workers=1 starts no process")

    monkeypatch.setattr(impact.multiprocessing, "get_context", no_pool)
    lines = [json.dumps(FLIPPING), *corpus[-1200:], *([json.dumps(FLIPPING)] * 4)]
    odd = ["", "  \t", "\u3000", json.dumps(FLIPPING) + "\r", "{\"action\": \"login\", \"x\": \"\xe9\"}"]
    for index, extra in enumerate(odd):
        lines.insert(300 * index + 7, extra)
    text = "\n".join(lines) + "\r\n" + json.dumps(FLIPPING) + "\r" + "[1]"
    data = text.encode() + b"\n{\"action\": \"login\", \"x\": \"\xff\"}\n" + json.dumps(FLIPPING).encode()
    as_text = io.TextIOWrapper(io.BytesIO(data), encoding="utf-8", errors="replace", newline=None)
    expected = figures(run_impact(policies, "v1", "v2", list(as_text), workers=1, now=NOW))
    got = figures(run_impact(policies, "v1", "v2", io.BytesIO(data), workers=1, now=NOW))
    assert got == expected
    assert expected["rejected"] > len(HOSTILE) // 2 and sum(expected["flips"].values()) > 5
    inputs = [x["input"] for g in expected["groups"] for x in g["examples"]]
    assert "line 1" in inputs and len(expected["groups"][0]["examples"]) == 3
    assert {r["reason"] for r in expected["rejections"]} >= {"not JSON", "not a JSON object"}
    assert expected["requests"] == sum(1 for line in io.StringIO(data.decode("utf-8", "replace"), newline=None)
                                       if line.strip())


def test_bytes_are_read_as_their_replaced_text(corpus: list[str]) -> None:
    """parse_lines reads a line's bytes as json.loads reads its text (undecodable bytes replaced)."""
    raw = [line.encode() for line in corpus] + [b'{"a": "\xff\xfe"}', b"\xef\xbb\xbf{}", b'{"n": 1}\r\n', b"\xc3",
                                                 b'{"a": "tab\tin"}', b'{"a": 1}\x0c', b'"\xed\xa0\x80"']
    assert repr(parse_lines(raw)) == repr(parse_lines_plainly([r.decode("utf-8", "replace") for r in raw]))


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=3), inner, max_size=4),
                    max_leaves=12),
       st.sampled_from([(", ", ": "), (",", ":")]), st.booleans())
def test_lines_are_read_as_json_loads_reads_them(value: Any, separators: tuple[str, str], ascii_only: bool) -> None:
    """msgspec's reading is json.loads's over any JSON text: integers of any size (orjson's read
    those beyond 64 bits as floats), floats to the last bit, NaN and Infinity, escapes, key order."""
    text = json.dumps(value, separators=separators, ensure_ascii=ascii_only)
    lines = [text, text.encode("utf-8", "surrogatepass")]
    assert repr(parse_lines(lines)) == repr(parse_lines_plainly([text, text]))


@settings(max_examples=100, deadline=None)
@given(st.from_regex(r"\A-?(0|[1-9][0-9]{0,40})(\.[0-9]{1,40})?([eE][-+]?[0-9]{1,3})?\Z"))
def test_numbers_are_read_as_json_loads_reads_them(number: str) -> None:
    """Any JSON number's text, as json.loads reads it: the same int, or the same double."""
    lines = [number, f'{{"n": {number}}}'.encode()]
    assert repr(parse_lines(lines)) == repr(parse_lines_plainly([number, f'{{"n": {number}}}']))


def test_the_command_reads_its_files_as_bytes_as_it_read_their_text(policies: PolicySet, corpus: list[str],
                                                                   tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """`bindpolicy impact --requests FILE...` hands each JSON Lines file's lines to orjson as bytes
    (engine/inputs.py's request_blocks), and reports as its reading of text lines did
    (engine/inputs.py's numbered_lines): counts, rejections, flips, examples and the `FILE:N` each
    was read at, across files, blank lines, \\r\\n, bytes that are not UTF-8 and a Parquet file
    read as before; standard input likewise, as `stdin:N`."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    from engine import impact
    from engine.cli import main
    from engine.inputs import numbered_lines

    first = "\n".join([json.dumps(FLIPPING), "", *corpus[:700], "  ", json.dumps(FLIPPING)]).encode() \
        + b"\r\n" + b'{"action": "login", "x": "\xff"}\r\n\n' + json.dumps(FLIPPING).encode() + b"\r\n"
    second = b"\n\n" + "\n".join([*corpus[-500:], json.dumps(FLIPPING)]).encode() + b"\n\xc3\n[1]"
    paths = [tmp_path / "first.jsonl", tmp_path / "second.jsonl", tmp_path / "rows.parquet"]
    paths[0].write_bytes(first)
    paths[1].write_bytes(second)
    pq.write_table(pa.table({"request": [json.dumps(FLIPPING), "not json"]}), paths[2])
    read: list[type] = []

    def parsed_seen(lines: list[Any]) -> Any:
        read.extend(type(line) for line in lines)
        return parse(lines)

    parse = impact.read_values
    monkeypatch.setattr(impact, "read_values", parsed_seen)
    locations = [str(path) for path in paths]
    expected = figures(run_impact(policies, "v1", "v2", numbered_lines(locations), workers=1))
    read.clear()
    assert main(["impact", "v1", "v2", "--policies", str(POLICIES), "--requests", *locations, "--workers", "1",
                 "--format", "json", "--quiet"]) == 0
    got = json.loads(capsys.readouterr().out)
    got.pop("seconds"), got.pop("decisions_per_second")
    assert got == expected
    assert read.count(bytes) == expected["requests"] - 2 and read.count(str) == 2  # the Parquet rows as text
    origins = [x["input"] for g in got["groups"] for x in g["examples"]] + \
        [i for r in got["rejections"] for i in r["inputs"]]
    assert {o.split(":")[0].rsplit("/", 1)[-1] for o in origins} >= {"first.jsonl", "second.jsonl"}
    assert sum(got["flips"].values()) > 5 and {r["reason"] for r in got["rejections"]} >= {"not JSON"}

    text = "\n".join(["", *corpus[-300:], json.dumps(FLIPPING), "", json.dumps(FLIPPING)]) + "\r\n[2]\n"
    monkeypatch.setattr(sys, "stdin", io.StringIO(text))
    expected = figures(run_impact(policies, "v1", "v2", [(f"stdin:{number}", line) for number, line in
                                                         enumerate(io.StringIO(text, newline="\n"), start=1)],
                                  workers=1))
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(text.encode()), encoding="utf-8", newline="\n"))
    read.clear()
    assert main(["impact", "v1", "v2", "--policies", str(POLICIES), "--requests", "-", "--workers", "1",
                 "--format", "json", "--quiet"]) == 0
    got = json.loads(capsys.readouterr().out)
    got.pop("seconds"), got.pop("decisions_per_second")
    assert got == expected and set(read) == {bytes}
    assert any(i.startswith("stdin:") for r in got["rejections"] for i in r["inputs"])


def test_chunks_name_every_line_as_read() -> None:
    """_chunks over text lines, (where, text) pairs and named blocks of bytes mixed, in chunks of
    every size: each chunk full but the last, each line named where it was read (a chunk of
    consecutive lines only by its first: the others as _Numbered counts on from it)."""
    import random

    from engine.impact import _chunks, _Numbered
    from engine.lines import NamedLines

    pick = random.Random(7)
    items: list[Any] = []
    expected: list[tuple[str, Any]] = []
    number = 0
    for _ in range(60):
        kind = pick.choice(("text", "pair", "block", "block"))
        if kind == "block":
            name = pick.choice(("a.jsonl", "b.jsonl"))
            at = pick.randint(1, 50)
            lines = []
            for _ in range(pick.randint(0, 9)):
                at += pick.choice((1, 1, 1, 2))  # blank lines skipped now and then
                lines.append((at, f"{name} {at}".encode()))
            items.append(NamedLines(name, lines))
            expected += [(f"{name}:{n}", text) for n, text in lines]
            continue
        number += 1
        text = pick.choice(("x", "  ")) + str(number)
        items.append(text if kind == "text" else (f"where {number}", text))
        expected.append((f"line {number}" if kind == "text" else f"where {number}", text))
    for size in (1, 2, 3, 7, 500):
        chunks = list(_chunks(items, size))
        assert all(len(texts) == size for _, texts in chunks[:-1]) and 0 < len(chunks[-1][1]) <= size
        got = [((_Numbered(*where) if isinstance(where, tuple) else where)[index], text)
               for where, texts in chunks for index, text in enumerate(texts)]
        assert got == expected
    following = [NamedLines("c", [(n, b"x") for n in range(3, 9)]), NamedLines("c", [(n, b"x") for n in range(9, 13)])]
    assert [where for where, _ in _chunks(following, 4)] == [("c:", 3), ("c:", 7), ("c:", 11)]


def test_the_checker_schema_is_checked_by_jsonschema_rs_as_by_jsonschema() -> None:
    """RequestChecker no longer runs jsonschema's check_schema (about 50 ms a process): jsonschema-rs
    checks the schema against the same meta-schema when it builds its validator, and accepts and
    refuses as check_schema does, the shipped schema and one with a bound that breaks it."""
    import jsonschema
    import jsonschema_rs

    from engine.request import bounded_schema

    for max_items in (1, 1000):
        jsonschema.Draft202012Validator.check_schema(bounded_schema(max_items))
        jsonschema_rs.validator_for(bounded_schema(max_items), validate_formats=True)
    with pytest.raises(jsonschema.SchemaError):
        jsonschema.Draft202012Validator.check_schema(bounded_schema(-1))
    with pytest.raises(jsonschema_rs.ValidationError):
        jsonschema_rs.validator_for(bounded_schema(-1), validate_formats=True)


def test_a_file_run_gives_the_plain_report(policies: PolicySet, corpus: list[str]) -> None:
    """run_impact (the lines read by read_values, each text without a backslash checked without the
    NUL patterns) reports as the plain way does over the same lines, escapes and NUL included."""
    nul = json.dumps(bind_request(account={**ACCOUNT, "name": "a\u0000b"}))
    escaped = json.dumps(bind_request(account={**ACCOUNT, "name": "caf\u00e9 \"x\""}))
    lines = [*corpus[-700:], nul, escaped, json.dumps(FLIPPING).replace('"US"', '"U\\u0053"')]
    got = figures(run_impact(policies, "v1", "v2", lines, workers=1, now=NOW))
    engine = Engine(policies)
    plain = figures(judge_engines((engine, "v1"), (engine, "v2"), parse_lines_plainly(lines), NOW, quick=False))
    assert got == plain
    alone = figures(run_impact(policies, "v1", "v2", [nul, escaped], workers=1, now=NOW))
    assert alone["rejected"] == 1 and alone["rejections"][0]["inputs"] == ["line 1"]  # the NUL, refused


def test_the_leaner_schemas_judge_as_the_contract() -> None:
    """RequestChecker's `usable` (oneOf of null as anyOf, capital letters as an enum) judges every
    value as jsonschema-rs does over the schema as written; `usable_unescaped` too, where the
    value's JSON text has no backslash (no NUL in it)."""
    import random

    import jsonschema_rs

    from engine.request import RequestChecker, _usable_timestamps

    checker = RequestChecker()
    written = jsonschema_rs.validator_for(_usable_timestamps(checker.schema), validate_formats=True).is_valid
    pick = random.Random(3)
    odd = [None, "", "a", "ab", "AB", "ABC", "A", "ZZ", "Zz", "É", 5, 1.5, True, [], {}, "a\u0000", "\u0000",
           "2025-06-01T00:00:00Z", {"shop_id": "s", "status": "pending"}]
    values = []
    for request in generate_requests(300, seed=9, broken=0.1):
        values.append(request)
        for _ in range(3):  # a field here and there put to an odd value
            mutated = json.loads(json.dumps(request))
            holder = mutated
            for _ in range(pick.randint(0, 2)):
                inner = [v for v in holder.values() if isinstance(v, dict)]
                holder = pick.choice(inner) if inner else holder
            holder[pick.choice([*holder, "market", "region", "invitation", "location"])] = pick.choice(odd)
            values.append(mutated)
    accepted = 0
    for value in values:
        expected = written(value)
        accepted += expected
        assert checker.usable.is_valid(value) == expected, value
        if "\\" not in json.dumps(value, ensure_ascii=False):
            assert checker.usable_unescaped.is_valid(value) == expected, value
    assert 300 < accepted < len(values) - 300  # both kinds, many of each


def test_each_chunk_says_what_it_decided_and_its_cpu_time(policies: PolicySet, corpus: list[str]) -> None:
    """run_impact's chunk_cpu (bench_impact's figure of the judging alone): one entry per chunk, in
    one process or in workers, their decisions adding up to the report's and their CPU time part
    of the run's."""
    for workers in (1, 2):
        report = run_impact(policies, "v1", "v2", corpus, workers=workers, now=NOW)
        chunks = -(-sum(1 for line in corpus if line.strip()) // CHUNK)
        assert len(report.chunk_cpu) == chunks > 1
        assert sum(decided for decided, _ in report.chunk_cpu) == report.decided > 0
        assert all(cpu > 0 for _, cpu in report.chunk_cpu)
        assert sum(cpu for _, cpu in report.chunk_cpu) <= report.cpu_seconds
        assert "chunk_cpu" not in report.to_dict()  # the report itself is the same
