"""The bindpolicy command: exit codes, JSON answers, JSON Lines, help on every command."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

from engine.cli import main

from .conftest import POLICIES, ROOT, VERSION_V1, WriteFiles, bind_request


def run(args: list[str], capsys: pytest.CaptureFixture[str], stdin: str | None = None,
        monkeypatch: pytest.MonkeyPatch | None = None) -> tuple[int, str, str]:
    if stdin is not None:
        assert monkeypatch is not None
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


def write_json(tmp_path: Path, name: str, request: object) -> str:
    path = tmp_path / name
    path.write_text(json.dumps(request))
    return str(path)


def test_check_passes_on_the_bundled_policies(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(["check", str(POLICIES)], capsys)
    assert code == 0
    assert out.startswith("ok v1: 40 rules") and "ok v2: 40 rules" in out


def test_check_fails_and_lists_every_problem(write_policies: WriteFiles,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    root = write_policies({"v1/version.yaml": VERSION_V1, "v1/rules.yaml": """\
        rules:
          - id: a.rule
            actions: [bind]
            effect: deny
            fires_when: account.folowers < 1
            message: m
            source: s
          - id: b.rule
            actions: [bind]
            effect: deny
            fires_when: account.age <
            message: m
            source: s
        """})
    code, out, _ = run(["check", str(root)], capsys)
    assert code == 1
    assert "2 problems in the policy files" in out
    assert "v1/rules.yaml:5:25: 'folowers' is not a field of account" in out
    assert "v1/rules.yaml:11:30: CEL syntax error" in out


def test_decide_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    allowed = write_json(tmp_path, "allow.json", bind_request())
    code, out, _ = run(["decide", allowed, "--policies", str(POLICIES)], capsys)
    assert code == 0 and json.loads(out)["decision"] == "allow"

    young = bind_request()
    young["account"]["age"] = 17  # type: ignore[index]
    code, out, _ = run(["decide", write_json(tmp_path, "deny.json", young), "--policies", str(POLICIES)], capsys)
    assert code == 1 and json.loads(out)["rule"]["id"] == "personal.min-age"

    code, out, _ = run(["decide", write_json(tmp_path, "bad.json", {"action": "bind"}),
                        "--policies", str(POLICIES)], capsys)
    body = json.loads(out)
    assert code == 2 and body["error"]["code"] == "invalid_request"
    assert [d["path"] for d in body["error"]["details"]] == ["/account", "/role", "/shop"]

    (tmp_path / "broken.json").write_text("{not json")
    code, out, _ = run(["decide", str(tmp_path / "broken.json"), "--policies", str(POLICIES)], capsys)
    assert code == 2 and json.loads(out)["error"]["code"] == "invalid_json"

    code, _, err = run(["decide", allowed, "--policies", str(tmp_path / "none")], capsys)
    assert code == 3 and "does not exist" in err


def test_decide_from_stdin_with_explain_and_a_pinned_version(
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    request = bind_request()
    request["account"]["kyc"] = {"verified": False}  # type: ignore[index]
    code, out, _ = run(["decide", "-", "--policies", str(POLICIES), "--explain", "--policy-version", "v1"],
                       capsys, json.dumps(request), monkeypatch)
    body = json.loads(out)
    assert code == 1 and body["policy"]["version"] == "v1" and body["rule"]["id"] == "personal.kyc"
    assert {t["id"]: t["outcome"] for t in body["explain"]}["personal.kyc"] == "fired"


def test_decide_jsonl_answers_every_line_in_order(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    young = bind_request()
    young["account"]["age"] = 17  # type: ignore[index]
    lines = [json.dumps(bind_request()), "{oops", json.dumps(young), "", json.dumps({"action": "fly"})]
    path = tmp_path / "requests.jsonl"
    path.write_text("\n".join(lines) + "\n")
    code, out, _ = run(["decide", str(path), "--policies", str(POLICIES)], capsys)
    answers = [json.loads(line) for line in out.splitlines()]
    assert code == 2
    assert [a.get("decision") or a["error"]["code"] for a in answers] == [
        "allow", "invalid_json", "deny", "invalid_request"]
    assert [a.get("line") for a in answers] == [None, 2, None, 5]


def test_test_command_runs_the_suites(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(["test", str(POLICIES)], capsys)
    assert code == 0, out
    assert out.rstrip().splitlines()[-1].endswith("passed, 0 failed")


@pytest.mark.parametrize("command", [[], ["check"], ["test"], ["decide"], ["serve"], ["diff"], ["impact"],
                                     ["replay"], ["log"], ["log", "verify"], ["log", "list"], ["generate"]])
def test_help_on_every_command(command: list[str]) -> None:
    result = subprocess.run([sys.executable, "-m", "engine.cli", *command, "--help"],
                            capture_output=True, text=True, cwd=ROOT, check=False)
    assert result.returncode == 0 and "usage: bindpolicy" in result.stdout
