"""Messages: thresholds from parameters, English and Chinese, the language negotiated per request."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from flask.testing import FlaskClient

from engine.decider import Engine
from engine.loader import load_policies
from engine.messages import CHINESE, ENGLISH, build_message, negotiate
from engine.versions import PolicySet

from .conftest import NOW, POLICIES, ROOT, WriteFiles, bind_request


@pytest.mark.parametrize(("header", "language"), [
    (None, ENGLISH), ("", ENGLISH), ("en-US", ENGLISH), ("zh", CHINESE), ("zh-CN", CHINESE),
    ("zh-Hans-CN", CHINESE), ("ZH-hans", CHINESE), ("fr-FR, zh;q=0.8", CHINESE), ("de", ENGLISH),
    ("en;q=0.5, zh;q=0.9", CHINESE), ("zh;q=0.3, en", ENGLISH), ("zh;q=0", ENGLISH), ("zh;q=abc", ENGLISH),
])
def test_accept_language_picks_chinese_for_zh_and_english_otherwise(header: str | None, language: str) -> None:
    assert negotiate(header) == language


def test_every_bundled_rule_speaks_both_languages_and_no_threshold_is_written_twice(policies: PolicySet) -> None:
    for version in policies:
        parameters = {str(v) for v in version.parameters.values() if isinstance(v, int)}
        for rule in version.rules:
            assert rule.messages is not None and set(rule.messages.templates) == {ENGLISH, CHINESE}, rule.id
            for language in (ENGLISH, CHINESE):
                text = rule.messages.template(language)
                # A figure that is a parameter's value comes from the parameter, never typed in.
                typed = {word for word in parameters if word in text.replace("{params.", "{")}
                assert not typed - {"1", "2"}, (rule.id, language, typed)
    assert not policies.warnings


def test_a_changed_parameter_changes_the_message(write_policies: WriteFiles) -> None:
    files = {p.relative_to(POLICIES).as_posix(): p.read_text() for p in POLICIES.glob("v*/*.yaml")}
    files["v3/version.yaml"] = ('version: v3\nextends: v2\neffective_from: "2026-01-01T00:00:00Z"\n'
                                "description: a higher follower minimum\nparameters:\n  min_followers: 1500\n")
    engine = Engine(load_policies(write_policies(files)))
    request = bind_request()
    request.update(at="2026-02-01T00:00:00Z")
    request["shop"]["market"] = request["account"]["location"] = "GB"  # type: ignore[index]
    request["account"]["followers"] = 1200  # type: ignore[index]
    english = engine.decide(request, now=NOW)
    chinese = engine.decide(request, now=NOW, language=CHINESE)
    assert english.rule is not None and chinese.rule is not None
    assert english.rule.message == "A personal account needs at least 1,500 followers (all markets but the US)."
    assert chinese.rule.message == "个人账号需至少拥有1500粉丝（US商家除外）。"
    assert english.to_dict()["language"] == "en" and chinese.to_dict()["language"] == "zh"


def test_durations_show_in_days_or_hours_and_request_fields_fill_in() -> None:
    message, errors = build_message({"en": "{params.window:days} days, {account.followers} followers, "
                                           "{params.docs}; {{literal}}",
                                     "zh": "{params.window:hours}小时，{account.followers}粉丝，{params.docs}"})
    assert errors == []
    params = {"window": "4320h", "docs": ["passport", "green_card"]}
    request = {"account": {"followers": 12345}}
    assert message.render(ENGLISH, params, request) == "180 days, 12,345 followers, passport, green_card; {literal}"
    assert message.render(CHINESE, params, request) == "4320小时，12345粉丝，passport、green_card"
    assert message.render(CHINESE, params, {}) == "4320小时，（缺失）粉丝，passport、green_card"


def test_a_message_in_english_only_is_a_warning_and_english_serves_both(write_policies: WriteFiles) -> None:
    root = write_policies({
        "v1/version.yaml": 'version: v1\neffective_from: "2024-01-01T00:00:00Z"\ndescription: t\n',
        "v1/rules.yaml": "rules:\n  - id: a.rule\n    actions: [bind]\n    effect: deny\n"
                         "    fires_when: account.age < 18\n    message: too young\n    source: s\n"})
    loaded = load_policies(root)
    assert [(str(w.location), w.code) for w in loaded.warnings] == [("v1/rules.yaml:6:14", "message_untranslated")]
    rule = next(iter(loaded)).rules[0]
    assert rule.render(CHINESE, {}, {}) == "too young"


class TestService:
    def test_the_answer_is_in_the_language_asked_and_says_so(self, client: FlaskClient) -> None:
        young = bind_request()
        young["account"]["age"] = 17  # type: ignore[index]
        zh = client.post("/v1/decisions", json=young, headers={"Accept-Language": "zh-CN,zh;q=0.9,en;q=0.8"})
        en = client.post("/v1/decisions", json=young, headers={"Accept-Language": "fr"})
        assert zh.json["language"] == "zh" and zh.headers["Content-Language"] == "zh"
        assert zh.json["rule"]["message"] == "个人账号必须年满18岁。"
        assert en.json["language"] == "en" and en.json["rule"]["message"].endswith("at least 18 years old.")
        assert "Accept-Language" in zh.headers["Vary"]
        batch = client.post("/v1/decisions/batch", json={"requests": [young]}, headers={"Accept-Language": "zh"})
        assert batch.json["decisions"][0]["rule"]["message"] == "个人账号必须年满18岁。"

    def test_the_policy_shows_both_templates(self, client: FlaskClient) -> None:
        rules = client.get("/v1/policies/v1").json["rules"]
        age = next(r for r in rules if r["id"] == "personal.min-age")
        assert age["messages"] == {
            "en": "The holder of a personal account must be at least {params.min_age} years old.",
            "zh": "个人账号必须年满{params.min_age}岁。"}


def test_the_cli_takes_lang(tmp_path: Path) -> None:
    young = bind_request()
    young["account"]["age"] = 17  # type: ignore[index]
    path = tmp_path / "r.json"
    path.write_text(json.dumps(young))
    done = subprocess.run([sys.executable, "-m", "engine.cli", "decide", str(path), "--lang", "zh",
                           "--policies", str(POLICIES)], capture_output=True, text=True, cwd=ROOT, check=False)
    answer = json.loads(done.stdout)
    assert done.returncode == 1 and answer["language"] == "zh"
    assert answer["rule"]["message"] == "个人账号必须年满18岁。"
