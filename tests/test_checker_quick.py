"""jsonschema-rs vouches for valid rule files at load (engine/checker.py quickly_valid); Python's
jsonschema still finds and words every problem. Whatever jsonschema-rs calls valid, Python's must too:
over every bundled rule file and each of many broken variants."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from engine.checker import _quick_validator, quickly_valid, schema_problems, validator

ROOT = Path(__file__).resolve().parent.parent
RULE_FILES = sorted(p for p in (ROOT / "policies").glob("v*/*.yaml") if p.name != "version.yaml")
RULE = next(rule for path in RULE_FILES for rule in yaml.safe_load(path.read_text(encoding="utf-8")).get("rules", []))


def _variants() -> list[Any]:
    def rule(**changes: Any) -> dict[str, Any]:
        changed = {**copy.deepcopy(RULE), **changes}
        return {k: v for k, v in changed.items() if v is not None}

    drop = [rule(**{k: None}) for k in RULE]
    return [
        *[{"rules": [r]} for r in drop],
        {"rules": [rule(extra=1)]}, {"rules": [rule(id="Bad Id")]}, {"rules": [rule(id="ok.id\n")]},
        {"rules": [rule(id="")]}, {"rules": [rule(id=3)]}, {"rules": [rule(effect="allow")]},
        {"rules": [rule(actions=[])]}, {"rules": [rule(actions=["bind", "bind"])]},
        {"rules": [rule(actions="bind")]}, {"rules": [rule(roles=["official", "official"])]},
        {"rules": [rule(roles=["owner"])]}, {"rules": [rule(override="yes")]}, {"rules": [rule(override=1)]},
        {"rules": [rule(fires_when=True)]}, {"rules": [rule(fires_when="")]}, {"rules": [rule(message={"en": "x"})]},
        {"rules": [rule(message={"en": "x", "zh": "y", "fr": "z"})]}, {"rules": [rule(message=["x"])]},
        {"rules": [rule(source="")]}, {"rules": [rule(source="字" * 200)]}, {"rules": [rule(source="字" * 201)]},
        {"rules": [rule(source="x" * 201)]}, {"rules": [rule(message="é" * 5000)]},
        {"rules": [rule(actions=[1, True])]}, {"rules": [rule(roles=[1.0])]},
        {"rules": [RULE, RULE]}, {"rules": []}, {"rules": None}, {"rules": {}}, {"outputs": [{"name": "x"}]},
        {"description": 1}, {"description": "d"}, {"other": 1}, {1: "a"}, {"rules": [rule(id=None, name="x")]},
    ]


@pytest.mark.parametrize("path", RULE_FILES, ids=lambda p: p.name)
def test_bundled_rule_files_are_vouched_for(path: Path) -> None:
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert quickly_valid("policy", "ruleFile", data)
    assert schema_problems(validator("policy", "ruleFile"), data) == []


def test_whatever_jsonschema_rs_takes_python_takes() -> None:
    python = validator("policy", "ruleFile")
    vouched = 0
    for variant in _variants():
        if quickly_valid("policy", "ruleFile", variant):
            vouched += 1
            assert schema_problems(python, variant) == [], variant
    assert vouched >= 3  # the valid variants are taken: the quick path is in use


def test_definitions_with_formats_get_no_quick_path() -> None:
    assert _quick_validator("policy", "versionFile") is None  # a leap second: the two libraries differ
    assert not quickly_valid("policy", "versionFile", {"version": "v1"})
