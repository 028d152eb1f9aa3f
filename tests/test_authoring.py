"""What authors and auditors see of a change: fields a version newly needs, whole rule bodies in
`diff`, and the same clear error (never a traceback) from every command on policies that do not load."""

from __future__ import annotations

import shutil
import textwrap
from pathlib import Path
from typing import Any

import pytest

from engine.cli import EXIT_BAD_POLICY, main
from engine.differ import diff_versions, render
from engine.loader import load_policies

from .conftest import POLICIES

NEW_RULE = """\
  - id: personal.health
    actions: [bind]
    roles: [official]
    applies_when: account.type == "personal"
    effect: deny
    fires_when: account.health_score < params.min_health && (!has(account.upgrade) || account.upgrade.state != "trial")
    message: {en: "needs a health score of {params.min_health}", zh: "健康分需达到{params.min_health}"}
    source: test
"""


@pytest.fixture
def changed(tmp_path: Path) -> Path:
    """The bundled policies, with a v2 that adds a rule reading a field v1 never needed and
    changes a parameter."""
    root = tmp_path / "policies"
    shutil.copytree(POLICIES, root, ignore=shutil.ignore_patterns("tests"))
    (root / "v2" / "bind.yaml").write_text((root / "v2" / "bind.yaml").read_text() + NEW_RULE)
    version = root / "v2" / "version.yaml"
    version.write_text(version.read_text() + "parameters:\n  min_health: 300\n  min_age: 21\n")
    return root


def test_check_and_diff_name_the_fields_a_version_newly_needs(changed: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", str(changed)]) == 0
    out = capsys.readouterr().out
    assert ("v2 needs 1 request field that v1 did not (requests without them are refused, 400 missing_field):\n"
            "  account.health_score  (in bind/official requests; read by personal.health)\n") in out
    policies = load_policies(changed)
    v1, v2 = policies.get("v1"), policies.get("v2")
    assert v1 is not None and v2 is not None
    diff = diff_versions(v1, v2)
    # has(account.upgrade) guards the upgrade: v2 needs its state only where it is present, as v1 did.
    assert [(n.field, n.contexts, n.readers) for n in diff.new_needs] == [
        ("account.health_score", ("bind/official",), ("personal.health",))]
    assert diff_versions(v2, v1).new_needs == []  # removing a rule needs nothing new
    text, markdown = render(diff, "text"), render(diff, "markdown")
    assert "  ! account.health_score  (in bind/official requests; read by personal.health)" in text
    assert "| `account.health_score` | bind/official | `personal.health` |" in markdown
    # The whole body of the added rule, both messages included, in text and Markdown.
    body = ["effect: deny", 'applies_when: account.type == "personal"',
            'fires_when: account.health_score < params.min_health && (!has(account.upgrade) || '
            'account.upgrade.state != "trial")', "message: needs a health score of {params.min_health}",
            "message_zh: 健康分需达到{params.min_health}", "source_section: test"]
    start = text.index("  + personal.health")
    assert text[start:].splitlines()[3:9] == [f"      {line}" for line in body]
    assert all(f"  {line}" in markdown for line in body)
    # Both bodies of a changed rule; and what a changed parameter reaches, by what reads it.
    assert "      before (v1/bind.yaml:" in text and "      after (v2/bind.yaml:4):" in text
    assert [(r.name, [x.split(" ")[0] for x in r.rules]) for r in diff.parameter_reach] == [
        ("min_age", ["affiliate.min-age", "personal.min-age"]), ("min_health", ["personal.health"])]
    assert "what the changed parameters reach:\n  params.min_age:\n    affiliate.min-age (v1/affiliate.yaml:" in text
    removed = render(diff_versions(v2, v1), "markdown")
    assert "- **removed** `personal.health`" in removed and "  message_zh: 健康分需达到{params.min_health}" in removed


def test_no_command_prints_a_traceback_on_policies_that_do_not_load(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    # A small copy (the README's example policies) keeps ten loads cheap; one mistake in it.
    from .authors_readme import FILES, example_files

    broken = tmp_path / "broken"
    for name, text in example_files("v1/rules.yaml", "account.age < params.min_age",
                                    "account.agee < params.min_age").items():
        (broken / name).parent.mkdir(parents=True, exist_ok=True)
        (broken / name).write_text(textwrap.dedent(text))
    good = tmp_path / "good"
    for name, text in FILES.items():
        (good / name).parent.mkdir(parents=True, exist_ok=True)
        (good / name).write_text(textwrap.dedent(text))
    bind = broken / "v1" / "rules.yaml"
    requests = tmp_path / "requests.jsonl"
    requests.write_text('{"action": "login"}\n')
    monkeypatch.setattr("os.execv", lambda *a: pytest.fail("serve went on to start a server"))
    folder = str(broken)
    commands = {
        "check": ["check", folder], "test": ["test", folder],
        "diff": ["diff", "v1", "v2", "--policies", folder],
        "diff --new-policies": ["diff", "v1", "v2", "--policies", str(good), "--new-policies", folder],
        "impact": ["impact", "v1", "v2", "--policies", folder, "--requests", str(requests)],
        "eval": ["eval", "1 + 1", "--policies", folder],
        "decide": ["decide", str(requests), "--policies", folder],
        "prove rules": ["prove", "rules", "--policies", folder],
        "prove diff": ["prove", "diff", "v1", "v2", "--policies", folder],
        "serve": ["serve", "--policies", folder, "--data", str(tmp_path / "data")],
    }
    said = {}
    for name, argv in commands.items():
        code = main(argv)
        out, err = capsys.readouterr()
        assert "Traceback" not in out + err, name
        assert code == EXIT_BAD_POLICY, (name, code, out, err)
        said[name] = (out + err).strip()
    expected = (f"the policies in {folder} do not load: 1 problem in the policy files\n"
                f"  v1/rules.yaml:{_line(bind, 'account.agee')}:25: 'agee' is not a field of account; "
                "did you mean 'age'? [unknown_field]")
    assert set(said.values()) == {expected}, said


def _line(path: Path, text: str) -> int:
    return next(i for i, line in enumerate(path.read_text().splitlines(), 1) if text in line)


def test_a_logged_decision_is_rendered_later_in_either_language(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import json
    from collections import OrderedDict

    from engine import replay

    from .conftest import bind_request, make_app

    log_headers = {"Authorization": "Bearer log-secret"}
    # The set a rendering needs is built from the log's archive once, then kept (a bounded LRU).
    builds: list[str] = []
    build = replay._engine

    def counted(source: Any, runtime: str) -> Any:
        builds.append(source.version)
        return build(source, runtime)

    monkeypatch.setattr(replay, "_engine", counted)
    monkeypatch.setattr(replay, "_LOADED", OrderedDict({("sha256:older", "v0", "native"): None}))
    monkeypatch.setattr(replay, "LOADED_KEPT", 1)

    app = make_app(tmp_path, f"sqlite:///{tmp_path / 'data' / 'decisions.db'}")
    client = app.test_client()
    young = bind_request()
    young["account"]["age"] = 17  # type: ignore[index]
    english = client.post("/v1/decisions", json=young).json
    chinese = client.post("/v1/decisions", json=young, headers={"Accept-Language": "zh-CN"}).json
    said = {"en": english["rule"]["message"], "zh": chinese["rule"]["message"]}
    assert said["en"] != said["zh"] and "18" in said["en"] and "18" in said["zh"]
    # English logged, asked with ?lang=zh; Chinese logged, asked with Accept-Language: en-GB.
    for logged, other, asked in ((english, "zh", {"query_string": {"lang": "zh"}, "headers": log_headers}),
                                 (chinese, "en", {"headers": {**log_headers, "Accept-Language": "en-GB"}})):
        path = f"/v1/decisions/{logged['decision_id']}"
        got = client.get(path, **asked)  # type: ignore[arg-type]
        rendered = got.json["rendered"]
        assert got.headers["Content-Language"] == other and rendered["language"] == other
        assert rendered["response"]["rule"] == {**logged["rule"], "message": said[other]}
        assert [v["message"] for v in rendered["response"]["violations"]] == [said[other]]
        assert rendered["response"]["decision_id"] == logged["decision_id"]
        assert got.json["record"]["response"]["rule"] == logged["rule"]  # the record stays as logged
        assert client.get(path, **asked).json == got.json  # type: ignore[arg-type]
    assert builds == ["v2"] and list(replay._LOADED) == [(english["policy"]["digest"], "v2", "native")]
    plain = client.get(f"/v1/decisions/{english['decision_id']}", headers=log_headers).json
    assert "rendered" not in plain and plain["record"]["response"]["rule"] == english["rule"]
    assert client.get(f"/v1/decisions/{english['decision_id']}?lang=fr", headers=log_headers).status_code == 400
    # The CLI: bindpolicy log show ID --lang zh|en.
    data = str(tmp_path / "data")
    assert main(["log", "show", chinese["decision_id"], "--data", data, "--lang", "en"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["rendered"]["response"]["rule"]["message"] == said["en"]
    assert shown["response"]["rule"]["message"] == said["zh"]  # the record as logged
    assert builds == ["v2"]
    assert main(["log", "show", "no-such-id", "--data", data]) == 2


def test_the_readme_shows_what_check_and_test_really_say() -> None:
    from . import authors_readme

    made = authors_readme.section()
    assert authors_readme.current() == made, "run: python -m tests.authors_readme --write"
    # Every kind of message the issue names is shown once.
    for code in ("[mismatch]", "[unknown_function]", "[not_boolean]", "[not_in_enum]", "[bad_literal]",
                 "[constant]", "[unused_parameter]", "[parameter_type]", "[parameter_value]", "[message_placeholder]",
                 "[duplicate_case]", "no case is judged under v2", "asserts nothing"):
        assert code in made, code
