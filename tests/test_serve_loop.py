"""`bindpolicy serve` starts uvicorn on the event loop it is told (uvloop unless said otherwise)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from engine.cli import main

from .conftest import POLICIES

SET_BY_SERVE = ("BINDPOLICY_POLICIES", "BINDPOLICY_DATA", "BINDPOLICY_DATABASE_URL", "BINDPOLICY_THREADS",
                "BINDPOLICY_BIND", "BINDPOLICY_BODY_TIMEOUT", "PROMETHEUS_MULTIPROC_DIR", "BINDPOLICY_HEADER_TIMEOUT",
                "BINDPOLICY_MAX_HEADER_BYTES", "BINDPOLICY_LOOP")


class Started(Exception):
    pass


@pytest.mark.parametrize("given, loop", [([], "uvloop"), (["--loop", "asyncio"], "asyncio")])
def test_serve_runs_uvicorn_on_the_loop_asked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              given: list[str], loop: str) -> None:
    for name in SET_BY_SERVE:  # serve sets them for its workers: as they were after the test
        monkeypatch.setenv(name, "")  # (recorded, so that the test's end takes them away again)
        monkeypatch.delenv(name)
    started: list[list[str]] = []

    def execv(_path: str, argv: list[str]) -> Any:
        started.append(argv)
        raise Started

    monkeypatch.setattr(os, "execv", execv)
    with pytest.raises(Started):
        main(["serve", "--policies", str(POLICIES), "--data", str(tmp_path / "data"), *given])
    argv = started[0]
    # uvicorn's workers under api/supervisor.py (a socket per worker), which serves api.asgi:app
    assert argv[argv.index("--loop") + 1] == loop and argv[1:3] == ["-m", "api.supervisor"]
    if loop == "uvloop":
        import uvloop  # the default must be installed with the project

        assert uvloop.new_event_loop() is not None


def test_serve_refuses_a_loop_it_does_not_know(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["serve", "--policies", str(POLICIES), "--data", str(tmp_path / "data"), "--loop", "trio"])
    assert "--loop: invalid choice: 'trio'" in capsys.readouterr().err
