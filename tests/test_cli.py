"""The bindpolicy command: exit codes, JSON answers, JSON Lines, help on every command."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

from engine.cli import main
from engine.decider import Engine

from .conftest import NOW, POLICIES, ROOT, VERSION_V1, WriteFiles, bind_request


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
    assert code == 3  # as every command says of policies that do not load
    assert f"the policies in {root} do not load: 2 problems in the policy files" in out
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


def test_decide_jsonl_numbers_lines_as_a_text_file_does(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Lines read as bytes are numbered as universal newlines number them (a lone \\r ends one),
    blank ones (\\x1c, a no-break space) skipped as before; a line that is not UTF-8 is answered
    as bad JSON, and the lines after it are still decided."""
    good = json.dumps(bind_request(), ensure_ascii=False).encode()
    path = tmp_path / "requests.jsonl"
    path.write_bytes(good + b"\r\n\x1c\n \xc2\xa0\n" + good + b"\r" + b'{"a": "\xff"}\n' + good + b"\n")
    code, out, _ = run(["decide", str(path), "--jsonl", "--policies", str(POLICIES)], capsys)
    answers = [json.loads(line) for line in out.splitlines()]
    assert code == 2
    assert [a.get("decision") or (a["error"]["code"], a["line"]) for a in answers] == [
        "allow", "allow", ("invalid_json", 5), "allow"]


class _CountedBytes(io.BytesIO):
    """A bare binary stdout (as PYTHONUNBUFFERED leaves it) that counts its writes."""

    writes = 0

    def write(self, data: object) -> int:
        self.writes += 1
        return super().write(data)  # type: ignore[arg-type]


class _BareStdout:
    def __init__(self) -> None:
        self.buffer = _CountedBytes()

    def isatty(self) -> bool:
        return False

    def flush(self) -> None:
        pass


def test_decide_jsonl_long_run_answers_as_each_request_alone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             engine: Engine) -> None:
    """Many lines (generated requests, some broken, some not JSON) are answered in order, each as
    the engine decides that request alone from its strict reading; the answers go out in blocks
    even where stdout is the bare file, not one system call per line."""
    from engine.cli import ANSWERS_PER_WRITE
    from engine.errors import RequestError
    from engine.generator import generate_requests
    from engine.request import parse_json

    texts = [json.dumps(r, ensure_ascii=False) for r in generate_requests(200, seed=7, broken=0.2)]
    texts[10], texts[150] = "{oops", texts[150].replace('"action"', '"action" ', 1)
    path = tmp_path / "many.jsonl"
    path.write_text("\n".join(texts) + "\n", encoding="utf-8")
    stdout = _BareStdout()
    monkeypatch.setattr(sys, "stdout", stdout)
    code = main(["decide", str(path), "--policies", str(POLICIES), "--now", "2025-07-01T00:00:00Z"])
    answers = [json.loads(line) for line in stdout.buffer.getvalue().decode().splitlines()]
    expected = []
    for number, text in enumerate(texts, start=1):
        try:
            expected.append(engine.decide(parse_json(text), now=NOW).to_dict())
        except RequestError as exc:
            expected.append({**exc.to_dict(), "line": number})
    for answer in (*answers, *expected):
        answer.pop("decision_id", None)
    assert answers == expected
    assert {"allow", "deny"} <= {a.get("decision") for a in answers} and any("error" in a for a in answers)
    assert code == max(0 if a.get("decision") == "allow" else 1 if "decision" in a else 2 for a in answers)
    assert stdout.buffer.writes == -(-len(texts) // ANSWERS_PER_WRITE)


_WRITES_OF_MAIN = """
import sys
from pathlib import Path
from engine.cli import main
def writes():  # write system calls of this process so far (Linux)
    return int(next(l for l in Path("/proc/self/io").read_text().splitlines() if l.startswith("syscw")).split()[1])
before = writes()
code = main(sys.argv[1:])
print(code, writes() - before, file=sys.stderr)
"""


@pytest.mark.skipif(not Path("/proc/self/io").exists(), reason="counts write system calls in /proc/self/io")
def test_generate_writes_stdout_in_blocks_under_pythonunbuffered(tmp_path: Path) -> None:
    """The many lines of a command (generate, log list) reach a pipe in blocks, not one write
    each, even where PYTHONUNBUFFERED makes sys.stdout write through; the same bytes as -o FILE."""
    from engine.cli import OUT_BLOCK

    written = tmp_path / "requests.jsonl"
    assert main(["generate", "--count", "300", "--seed", "4", "-o", str(written)]) == 0
    done = subprocess.run([sys.executable, "-c", _WRITES_OF_MAIN, "generate", "--count", "300", "--seed", "4"],
                          cwd=ROOT, capture_output=True, check=True,
                          env={"PYTHONUNBUFFERED": "1", "PYTHONDONTWRITEBYTECODE": "1", "PATH": ""})  # no .pyc
    code, writes = map(int, done.stderr.split()[-2:])
    assert code == 0 and done.stdout == written.read_bytes()
    assert writes <= -(-len(done.stdout) // OUT_BLOCK) + 1 < 300  # one write per line before


def test_decide_jsonl_reads_in_blocks_the_lines_a_line_by_line_reading_gives(monkeypatch: pytest.MonkeyPatch) -> None:
    """The lines cut from blocks (short ones here, ends such as \r|\n split between two) are the
    bytes and numbers that reading the stream line by line gives, blank ones skipped alike."""
    import random

    from engine import lines

    def line_by_line(data: bytes) -> list[tuple[int, bytes]]:
        found, number = [], 0
        for chunk in io.BytesIO(data):
            for line in chunk.splitlines() if b"\r" in chunk else (chunk,):
                number += 1
                if line.decode("utf-8", "replace").strip():
                    found.append((number, line))
        return found

    class Trickle(io.BytesIO):
        def read1(self, size: int = -1) -> bytes:  # what a pipe gives: less than asked for
            return super().read1(random.randint(1, max(1, size)))

    random.seed(3)
    pieces = [b"{}", b'{"a": 1}', b"x", b"\r", b"\n", b"\r\n", b" ", b"\x1c", b"\xc2\xa0", b"\xff", b"\n\n"]
    monkeypatch.setattr(lines, "READ_SIZE", 5)
    for _ in range(300):
        data = b"".join(random.choices(pieces, k=random.randint(0, 30)))
        got = [line for block in lines.line_blocks(Trickle(data)) for line in block]
        assert got == line_by_line(data), data


def test_decide_jsonl_answers_what_it_read_before_it_waits_for_more(monkeypatch: pytest.MonkeyPatch) -> None:
    """Lines that come one at a time (a pipe fed slowly) are each answered before the next read."""
    line = json.dumps(bind_request()).encode() + b"\n"
    stdout, written_at_each_read = _BareStdout(), []

    class OneLineAtATime(io.BytesIO):
        def read1(self, size: int = -1) -> bytes:
            written_at_each_read.append(stdout.buffer.getvalue().count(b"\n"))
            return self.readline()

    monkeypatch.setattr(sys, "stdin", type("Stdin", (), {"buffer": OneLineAtATime(line * 3)})())
    monkeypatch.setattr(sys, "stdout", stdout)
    assert main(["decide", "-", "--jsonl", "--policies", str(POLICIES)]) == 0
    assert written_at_each_read == [0, 1, 2, 3]


def test_test_command_runs_the_suites(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(["test", str(POLICIES)], capsys)
    assert code == 0, out
    assert out.rstrip().splitlines()[-2].endswith("passed, 0 failed")
    assert out.rstrip().splitlines()[-1] == "OK"


@pytest.mark.parametrize("command", [[], ["check"], ["test"], ["decide"], ["serve"], ["diff"], ["impact"],
                                     ["replay"], ["log"], ["log", "verify"], ["log", "list"], ["generate"],
                                     ["eval"]])
def test_help_on_every_command(command: list[str]) -> None:
    result = subprocess.run([sys.executable, "-m", "engine.cli", *command, "--help"],
                            capture_output=True, text=True, cwd=ROOT, check=False)
    assert result.returncode == 0 and "usage: bindpolicy" in result.stdout


# --- eval: one expression, its value and CEL type ------------------------------------------------


def eval_json(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, object]:
    code, out, _ = run(["eval", *args, "--policies", str(POLICIES), "--format", "json"], capsys)
    return code, json.loads(out)


@pytest.mark.parametrize(("expr", "value", "kind"), [
    ("account.age >= params.min_age", True, "bool"),
    ("account.age", 30, "int"),
    ("dyn(account.age) + 0.5", "error", None),  # int + double: no such overload, as CEL says
    ("double(account.age) / 4.0", 7.5, "double"),
    ("shop.channel_accounts", [], "list"),
    ("{'age': account.age, 'kyc': account.kyc}", {"age": 30, "kyc": {"verified": True}}, "map"),
    ("at", "2025-07-01T00:00:00Z", "google.protobuf.Timestamp"),
    ("at - timestamp('2025-06-30T23:59:58.5Z')", "1.5s", "google.protobuf.Duration"),
    ("type(shop)", "map", "type"),
    ("account.name.startsWith('ac') && dyn(account.age) == 30.0", True, "bool"),  # checked: dyn() to mix
])
def test_eval_prints_value_and_type(tmp_path: Path, capsys: pytest.CaptureFixture[str], expr: str,
                                    value: object, kind: str | None) -> None:
    request = write_json(tmp_path, "r.json", bind_request())
    code, body = eval_json([expr, "--request", request], capsys)
    if value == "error":
        assert code == 1 and body["error"]["code"] == "evaluation_error"  # type: ignore[index]
    elif value == "check":  # refused before evaluation by the type checker (engine/typecheck.py)
        assert code == 2 and body["error"]["code"] == "mismatch"  # type: ignore[index]
    else:
        assert (code, body) == (0, {"value": value, "type": kind})


def test_eval_without_a_request_and_with_a_pinned_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert eval_json(["[dyn(1), dyn('a'), null, dyn(dyn(1.0) == 1)]"], capsys) == (
        0, {"value": [1, "a", None, True], "type": "list"})
    code, body = eval_json(["1.0 == 1"], capsys)  # the checker, as for a rule: exit 2
    assert code == 2 and body["error"]["code"] == "mismatch"  # type: ignore[index]
    assert eval_json(["null"], capsys) == (0, {"value": None, "type": "null_type"})
    assert eval_json(["params.min_age", "--policy-version", "v1"], capsys) == (0, {"value": 18, "type": "int"})
    code, body = eval_json(["params.min_age", "--policy-version", "v9"], capsys)
    assert code == 2 and "v9" in json.dumps(body)


def test_eval_exit_codes_and_text_format(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert eval_json(["1 / 0"], capsys) == (1, {"error": {"code": "evaluation_error",
                                                          "message": "modulus or divide by zero"}})
    code, body = eval_json(["1 +"], capsys)
    assert code == 2 and body["error"]["code"] == "cel_syntax"  # type: ignore[index]
    code, body = eval_json(["account.agee > 1"], capsys)
    assert code == 2 and "did you mean 'age'" in body["error"]["message"]  # type: ignore[index]
    code, out, _ = run(["eval", "0.0 / 0.0 != 0.0 / 0.0", "--policies", str(POLICIES)], capsys)
    assert (code, out) == (0, "true (bool)\n")
    code, _, err = run(["eval", "account.age", "--policies", str(POLICIES)], capsys)  # no request: no account
    assert code == 1 and err.startswith("evaluation_error: ")
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    code, body = eval_json(["true", "--request", str(bad)], capsys)
    assert code == 2 and "error" in body  # type: ignore[operator]
