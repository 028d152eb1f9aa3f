"""Shared fixtures: the bundled policies, an engine over them, and a policy-folder builder."""

from __future__ import annotations

import textwrap
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest

from engine.decider import Engine
from engine.loader import load_policies
from engine.versions import PolicySet

ROOT = Path(__file__).resolve().parent.parent
POLICIES = ROOT / "policies"
NOW = datetime(2025, 7, 1, tzinfo=UTC)

VERSION_V1 = """\
version: v1
effective_from: "2024-01-01T00:00:00Z"
description: test policy
parameters:
  min_age: 18
"""


@pytest.fixture(scope="session")
def policies() -> PolicySet:
    return load_policies(POLICIES)


@pytest.fixture(scope="session")
def engine(policies: PolicySet) -> Engine:
    return Engine(policies)


WriteFiles = Callable[[dict[str, str]], Path]


@pytest.fixture
def write_policies(tmp_path: Path) -> WriteFiles:
    """Write {relative path: YAML text} into a fresh policy folder and return it."""

    def write(files: dict[str, str]) -> Path:
        root = tmp_path / "policies"
        for name, text in files.items():
            path = root / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(textwrap.dedent(text), encoding="utf-8")
        return root

    return write


def bind_request(**overrides: object) -> dict[str, object]:
    """An allowed bind of a personal account as a US shop's official account."""
    request: dict[str, object] = {
        "action": "bind",
        "role": "official",
        "at": "2025-07-01T00:00:00Z",
        "shop": {"id": "shop-1", "name": "Acme Store", "market": "US", "status": "normal",
                 "official_account": None, "channel_accounts": [], "official_unbinds": [],
                 "channel_unbinds": []},
        "account": {"id": "acct-1", "name": "acme", "type": "personal", "age": 30, "location": "US",
                    "followers": 5000, "ecommerce_revoked": False, "linked_to_revoked": False,
                    "policy_compliant": True, "kyc": {"verified": True}, "bind_history": [],
                    "affiliate_enabled": False},
    }
    request.update(overrides)
    return request
