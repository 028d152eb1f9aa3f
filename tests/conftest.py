"""Shared fixtures: the bundled policies, an engine over them, and a policy-folder builder."""

from __future__ import annotations

import functools
import shutil
import textwrap
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from api.app import create_app
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


@functools.cache
def _bundled_engine() -> Engine:
    return Engine(load_policies(POLICIES))


@pytest.fixture(autouse=True)
def _bundled_policies_loaded_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Commands run in-process over the bundled policies (eval, decide, explain...) load them once
    per run rather than once per command (seconds each): any other folder, such as a test's
    changed copy, is loaded as the command loads it."""
    from engine import cli

    load = cli._load
    monkeypatch.setattr(cli, "_load", lambda folder: _bundled_engine() if Path(folder).resolve() == POLICIES
                        else load(folder))


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """One real PostgreSQL server for the whole run, started and stopped by the suite."""
    from .postgres import postgres_server

    with postgres_server() as url:
        yield url


# The PostgreSQL side is slow (a real server): marked where `-m "not slow"` sees it, at collection
# (a marker applied by the fixture itself comes after the selection, and `make test-fast` ran it).
@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.slow)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The same tests against both stores of the decision log."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'decisions.db'}"
    from .postgres import fresh_schema

    return fresh_schema(request.getfixturevalue("postgres_url"), f"t_{uuid.uuid4().hex[:12]}")


@pytest.fixture
def policy_copy(tmp_path: Path) -> Path:
    """The bundled policies copied into a folder the test may change."""
    target = tmp_path / "policies"
    shutil.copytree(POLICIES, target)
    return target


def make_app(tmp_path: Path, database_url: str, **config: Any) -> Flask:
    settings = {"POLICY_DIR": str(POLICIES), "DATA_DIR": str(tmp_path / "data"), "DATABASE_URL": database_url,
                "RELOAD_INTERVAL": 0, "LOG_TOKENS": "log-secret", "TESTING": True,
                "LOG_CHECK_INTERVAL": 0}
    settings.update(config)
    return create_app(settings)


@pytest.fixture
def app(tmp_path: Path, database_url: str) -> Flask:
    return make_app(tmp_path, database_url)


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


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


def in_threads(work: Callable[..., None], arguments: Iterable[tuple[Any, ...]], timeout: float = 30) -> None:
    """work(*args) in a thread of its own for each args, all at once; fails with what any of them raised."""
    errors: list[BaseException] = []

    def run(*args: Any) -> None:
        try:
            work(*args)
        except BaseException as exc:  # (reported below)
            errors.append(exc)

    threads = [threading.Thread(target=run, args=args) for args in arguments]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout)
    assert errors == []
