"""The auditor's toolkit: diff, impact, replay, the log's chain and listing, the request generator."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import pytest

from engine.cli import main
from engine.decider import Engine
from engine.differ import diff_versions, render
from engine.generator import generate_requests
from engine.impact import ALLOW_TO_DENY, DENY_TO_ALLOW, OTHER_RULE, run_impact
from engine.loader import load_policies
from engine.replay import BROKEN, CANNOT, REPRODUCED, replay
from engine.versions import PolicySet

from .conftest import NOW, POLICIES, ROOT, bind_request, make_app

GOLDEN = Path(__file__).parent / "data" / "diff"
EXAMPLES = ROOT / "examples" / "requests.jsonl"
LOG = {"Authorization": "Bearer log-secret"}
DIGEST = re.compile(r"sha256:[0-9a-f]{64}")


def normalized(text: str) -> str:
    return DIGEST.sub("sha256:<digest>", text)


class TestDiff:
    @pytest.mark.parametrize("fmt", ["text", "markdown", "json", "html"])
    def test_v1_to_v2_golden(self, policies: PolicySet, fmt: str) -> None:
        v1, v2 = policies.get("v1"), policies.get("v2")
        assert v1 is not None and v2 is not None
        got = normalized(render(diff_versions(v1, v2), fmt))
        golden = GOLDEN / f"v1-v2.{ {'text': 'txt', 'markdown': 'md'}.get(fmt, fmt)}"
        if os.environ.get("UPDATE_GOLDEN"):
            golden.write_text(got)
        assert got == golden.read_text()

    def test_exactly_the_two_rules_change(self, policies: PolicySet) -> None:
        v1, v2 = policies.get("v1"), policies.get("v2")
        assert v1 is not None and v2 is not None
        diff = diff_versions(v1, v2)
        assert [c.id for c in diff.rules_changed] == ["personal.kyc", "personal.min-followers"]
        assert not (diff.rules_added or diff.rules_removed or diff.parameters or diff.outputs_changed)
        kyc = diff.rules_changed[0]
        assert kyc.old_source.startswith("v1/bind.yaml:") and kyc.new_source == "v2/bind.yaml:4"
        assert [f.field for f in kyc.changes] == ["applies_when", "message", "message_zh", "source_section"]

    def test_moving_and_reformatting_is_no_change(self, tmp_path: Path) -> None:
        moved = tmp_path / "moved"
        shutil.copytree(POLICIES / "v1", moved / "v1")
        bind = (moved / "v1" / "bind.yaml").read_text()
        # Reformat an expression (new line, spaces) and move the file's rules to another file, reversed.
        bind = bind.replace("fires_when: account.age < params.min_age",
                            "fires_when: >-\n      account.age   <\n        params.min_age")
        (moved / "v1" / "bind.yaml").unlink()
        head, rules = bind.split("rules:\n", 1)
        blocks = ["  - id:" + b for b in rules.split("  - id:")[1:]]
        (moved / "v1" / "zz-moved.yaml").write_text(head + "rules:\n" + "".join(reversed(blocks)))
        old = load_policies(POLICIES).get("v1")
        new = load_policies(moved).get("v1")
        assert old is not None and new is not None
        assert [r.id for r in new.rules] != [r.id for r in old.rules]  # the order did change
        diff = diff_versions(old, new)
        assert diff.empty, render(diff, "text")
        assert render(diff, "text") == "v1 -> v1: no change in meaning\n"

    def test_one_parameter(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        changed = tmp_path / "changed"
        shutil.copytree(POLICIES, changed)
        version = changed / "v1" / "version.yaml"
        version.write_text(version.read_text().replace("min_age: 18", "min_age: 21"))
        code = main(["diff", "v1", "v1", "--policies", str(POLICIES), "--new-policies", str(changed),
                     "--format", "json"])
        body = json.loads(capsys.readouterr().out)
        assert code == 1
        assert body["parameters"] == [{"name": "min_age", "old": 18, "new": 21}]
        assert body["rules"] == {"added": [], "removed": [], "changed": []} and body["metadata"] == []
        # What the change reaches: both age rules, found by what they read, not by their names.
        reach = body["parameter_reach"]
        assert [r["parameter"] for r in reach] == ["min_age"]
        assert [r.split(" ")[0] for r in reach[0]["reaches"]] == ["affiliate.min-age", "personal.min-age"]
        assert body["newly_needed_fields"] == []

    def test_the_api_serves_the_diff(self, tmp_path: Path) -> None:
        client = make_app(tmp_path, f"sqlite:///{tmp_path / 'log.db'}").test_client()
        body = client.get("/v1/policies/v1/diff/v2").json
        assert [c["id"] for c in body["rules"]["changed"]] == ["personal.kyc", "personal.min-followers"]
        page = client.get("/v1/policies/v1/diff/v2?format=html")
        assert page.mimetype == "text/html" and "<h1>Policy diff: v1 → v2</h1>" in page.get_data(as_text=True)
        proved = body["what_can_change"]  # engine/prover: for every request, not only those seen
        assert (proved["allow_to_deny"], proved["deny_to_allow"]) == ("impossible", "possible")
        assert "<h2>What can change</h2>" in page.get_data(as_text=True)
        assert client.get("/v1/policies/v1/diff/v9").status_code == 404
        assert client.get("/v1/policies/v1/diff/v2?format=pdf").status_code == 400


def expected_flips(engine: Engine, requests: list[dict[str, Any]]) -> tuple[int, int]:
    """Independently of the impact code: the US personal-account binds that v1 denied for KYC or
    followers are allowed by v2 when nothing else denied them, and denied by another rule if not."""
    lifted = other = 0
    exempt = {"personal.kyc", "personal.min-followers"}
    for request in requests:
        account, shop = request.get("account") or {}, request.get("shop") or {}
        if request.get("action") != "bind" or account.get("type") != "personal" or shop.get("market") != "US":
            continue
        try:
            v1 = engine.decide({**request, "policy_version": "v1"}, now=NOW)
        except Exception:
            continue
        ids = [v.id for v in v1.violations]
        if ids and ids[0] in exempt:
            if set(ids) <= exempt:
                lifted += 1
            else:
                other += 1
    return lifted, other


class TestImpact:
    def test_v1_to_v2_flips_exactly_the_us_personal_binds(self, engine: Engine) -> None:
        requests = [json.loads(line) for line in EXAMPLES.read_text().splitlines()]
        report = run_impact(POLICIES, "v1", "v2", EXAMPLES.read_text().splitlines(), workers=2, now=NOW)
        lifted, other = expected_flips(engine, requests)
        assert lifted >= 5
        assert report.total == len(requests) == 2000
        assert report.count(DENY_TO_ALLOW) == lifted
        assert report.count(OTHER_RULE) == other
        assert report.count(ALLOW_TO_DENY) == 0
        assert {g.rule for g in report.groups.values() if g.kind == DENY_TO_ALLOW} <= {"personal.kyc",
                                                                                        "personal.min-followers"}
        for group in report.groups.values():
            assert 1 <= len(group.examples) <= 3
            assert all(e["request"]["shop"]["market"] == "US" for e in group.examples)
            assert all(requests[int(e["input"].split()[-1]) - 1] == e["request"] for e in group.examples)

    def test_one_process_and_many_agree(self) -> None:
        lines = [json.dumps(r) for r in generate_requests(600, seed=3, broken=0.05)]
        one = run_impact(POLICIES, "v1", "v2", lines, workers=1, now=NOW).to_dict()
        many = run_impact(POLICIES, "v1", "v2", lines, workers=2, now=NOW).to_dict()
        read = "".join(f"{line}\n" for line in lines).encode()  # a file opened "rb": its lines' bytes to the workers
        binary = run_impact(POLICIES, "v1", "v2", io.BytesIO(read), workers=2, now=NOW).to_dict()
        for report in (one, many, binary):
            report.pop("seconds"), report.pop("decisions_per_second")
        assert one == many == binary and one["rejected"] > 0

    def test_from_the_log(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        app = make_app(tmp_path, f"sqlite:///{tmp_path / 'data' / 'decisions.db'}")
        client = app.test_client()
        unverified = bind_request()
        unverified["account"]["kyc"] = {"verified": False}  # type: ignore[index]
        for request in (bind_request(), unverified, unverified, {"action": "nope"}):
            client.post("/v1/decisions", json=request)
        code = main(["impact", "v1", "v2", "--from-log", "--data", str(tmp_path / "data"), "--format", "json",
                     "--quiet", "--workers", "1"])
        body = json.loads(capsys.readouterr().out)
        assert code == 0 and body["requests"] == 3  # the rejected request is not a decision
        assert body["flips"][DENY_TO_ALLOW] == 2 and body["groups"][0]["rule"] == "personal.kyc"
        example = body["groups"][0]["examples"][0]
        assert example["input"].startswith("log record 2 (") and example["old"]["rule"] == "personal.kyc"
        assert example["old"]["read"]["account.kyc.verified"] is False and example["new"]["decision"] == "allow"


class TestReplay:
    def test_a_decision_reproduces_after_the_policy_files_change(self, tmp_path: Path, policy_copy: Path) -> None:
        app = make_app(tmp_path, f"sqlite:///{tmp_path / 'data' / 'decisions.db'}", POLICY_DIR=str(policy_copy))
        client = app.test_client()
        young = bind_request()
        young["account"]["age"] = 17  # type: ignore[index]
        ids = [client.post(path, json=request).json["decision_id"]
               for path, request in (("/v1/decisions", bind_request()), ("/v1/decisions?explain=true", young),
                                     ("/v1/decisions", {**young, "policy_version": "v1"}))]
        # Edit the rule that decided, reload, then delete v2 altogether: replay must not care.
        bind = policy_copy / "v1" / "bind.yaml"
        bind.write_text(bind.read_text().replace("account.age < params.min_age", "account.age < 16"))
        assert app.extensions["bindpolicy"].holder.reload_if_changed()
        assert client.post("/v1/decisions", json=young).json["decision"] == "allow"  # the files did change
        shutil.rmtree(policy_copy / "v2")
        store = app.extensions["bindpolicy"].store
        for decision_id in ids:
            result = replay(store, decision_id)
            assert result.status == REPRODUCED, result.to_dict()

    def test_cli_exit_codes(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        app = make_app(tmp_path, f"sqlite:///{tmp_path / 'data' / 'decisions.db'}")
        decision_id = app.test_client().post("/v1/decisions", json=bind_request()).json["decision_id"]
        data = str(tmp_path / "data")
        assert main(["replay", decision_id, "--data", data]) == 0
        assert json.loads(capsys.readouterr().out)["status"] == REPRODUCED
        assert main(["replay", "no-such-id", "--data", data]) == 2
        assert json.loads(capsys.readouterr().out)["status"] == CANNOT
        # A logged request altered in place fails the record's chain check (as `log verify` checks
        # it) before anything is decided again: broken, not a difference of the policies'.
        store = app.extensions["bindpolicy"].store
        conn = store._connect()
        conn.execute("UPDATE decisions SET request = replace(request, '\"age\":30', '\"age\":12') WHERE seq = 1")
        conn.commit()
        conn.close()
        assert main(["replay", decision_id, "--data", data]) == 1
        result = json.loads(capsys.readouterr().out)
        assert result["status"] == BROKEN and "altered" in result["message"] and not result["differences"]


class TestLogCommands:
    def fill(self, tmp_path: Path) -> tuple[Any, str]:
        app = make_app(tmp_path, f"sqlite:///{tmp_path / 'data' / 'decisions.db'}")
        client = app.test_client()
        young = bind_request()
        young["account"]["age"] = 16  # type: ignore[index]
        for request in (bind_request(), young, bind_request(), young, {"action": "nope"}):
            client.post("/v1/decisions", json=request)
        return app.extensions["bindpolicy"].store, str(tmp_path / "data")

    def test_verify_finds_an_altered_a_removed_and_an_inserted_record(self, tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
        store, data = self.fill(tmp_path)
        assert main(["log", "verify", "--data", data]) == 0
        assert "the chain holds over 5 records" in capsys.readouterr().out
        conn = store._connect()
        row = conn.execute("SELECT * FROM decisions WHERE seq = 2").fetchone()
        conn.execute("UPDATE decisions SET response = replace(response, 'deny', 'allow') WHERE seq = 2")
        conn.commit()
        assert main(["log", "verify", "--data", data]) == 1
        assert "BROKEN at record 2" in capsys.readouterr().out
        conn.execute("DELETE FROM decisions WHERE seq = 2")
        conn.commit()
        assert main(["log", "verify", "--data", data]) == 1
        assert "record 2 is missing" in capsys.readouterr().out
        # A record slipped in where 2 was: same seq, made up content, its own (wrong) chain link.
        forged = list(row)
        forged[1], forged[-2] = "forged-id", "f" * 64
        conn.execute(f"INSERT INTO decisions VALUES ({', '.join('?' * len(forged))})", forged)
        conn.commit()
        conn.close()
        assert main(["log", "verify", "--data", data]) == 1
        out = capsys.readouterr().out
        assert "BROKEN at record 2 (forged-id)" in out and "removed or inserted" in out

    def test_the_service_refuses_to_be_ready_on_a_broken_chain(self, tmp_path: Path) -> None:
        store, _ = self.fill(tmp_path)
        conn = store._connect()
        conn.execute("UPDATE decisions SET request = '{}' WHERE seq = 3")
        conn.commit()
        conn.close()
        client = make_app(tmp_path, f"sqlite:///{tmp_path / 'data' / 'decisions.db'}").test_client()
        ready = client.get("/readyz")
        assert ready.status_code == 503 and ready.json["decision_log_chain"].startswith("broken at record 3")

    def test_list_with_filters_as_jsonl_and_csv(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        _, data = self.fill(tmp_path)
        assert main(["log", "list", "--data", data, "--decision", "deny", "--format", "jsonl"]) == 0
        records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        assert [r["rule_id"] for r in records] == ["personal.min-age", "personal.min-age"]
        assert records[0]["request"]["account"]["age"] == 16
        out = tmp_path / "export.csv"
        assert main(["log", "list", "--data", data, "--outcome", "rejected", "--format", "csv", "-o", str(out)]) == 0
        rows = list(csv.DictReader(io.StringIO(out.read_text())))
        assert len(rows) == 1 and rows[0]["status"] == "400" and json.loads(rows[0]["request"]) == {"action": "nope"}
        assert main(["log", "list", "--data", data, "--shop", "shop-1", "--limit", "2"]) == 0
        assert len(capsys.readouterr().out.splitlines()) == 2


class TestGenerate:
    def test_deterministic_for_a_seed_and_over_every_action(self, tmp_path: Path) -> None:
        first, second, other = (tmp_path / n for n in ("a.jsonl", "b.jsonl", "c.jsonl"))
        assert main(["generate", "--count", "300", "--seed", "9", "-o", str(first)]) == 0
        assert main(["generate", "--count", "300", "--seed", "9", "-o", str(second)]) == 0
        assert main(["generate", "--count", "300", "--seed", "10", "-o", str(other)]) == 0
        assert first.read_bytes() == second.read_bytes() != other.read_bytes()
        requests = [json.loads(line) for line in first.read_text().splitlines()]
        assert len(requests) == 300
        assert {r["action"] for r in requests} == {"bind", "unbind", "create_org_account", "upgrade_start",
                                                   "upgrade_confirm", "upgrade_cancel", "enable_affiliate", "login"}
        assert {r.get("role") for r in requests} == {None, "official", "channel"}

    def test_the_shipped_corpus_is_the_generators(self) -> None:
        shipped = EXAMPLES.read_text().splitlines()
        assert [json.dumps(r, ensure_ascii=False) for r in generate_requests(2000, seed=1)] == shipped
