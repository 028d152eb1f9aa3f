"""Replicas: two `bindpolicy serve` instances on one PostgreSQL database write one intact chain, even
when one is killed under load."""

from __future__ import annotations

import signal
import threading
import urllib.error
from pathlib import Path

import pytest

from engine.cli import main
from engine.decisionlog import open_store
from engine.logkeys import generate_keys, read_mac_keys

from .conftest import bind_request
from .test_server import call, postgres_server_url, start_server  # noqa: F401 - the fixture too

pytestmark = pytest.mark.slow

PER_THREAD = 40


def test_two_replicas_one_chain_one_killed(tmp_path: Path, postgres_server_url: str,  # noqa: F811
                                           capsys: pytest.CaptureFixture[str]) -> None:
    generate_keys(tmp_path / "keys")  # one MAC key for every replica: one keyed chain
    mac = str(tmp_path / "keys" / "log-mac.key")
    env = {"BINDPOLICY_LOG_MAC_KEY_FILE": mac}
    first = start_server(tmp_path / "a", policies=None, database_url=postgres_server_url, workers=1, env=env)
    second = start_server(tmp_path / "b", policies=None, database_url=postgres_server_url, workers=1, env=env)
    answered: list[str] = []
    lock = threading.Lock()
    killed = threading.Event()

    def load(url: str, seed: int) -> None:
        for index in range(PER_THREAD):
            request = bind_request(**({"role": "channel"} if (seed + index) % 3 == 0 else {}))
            try:
                status, body = call(url + "/v1/decisions", request, timeout=10)
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                continue  # the killed replica: nothing answered, so nothing promised
            if status in (200, 400):
                with lock:
                    answered.append(body["decision_id"])
            if seed == 0 and index == PER_THREAD // 2:
                first.stop(signal.SIGKILL)  # mid-load, with its writes in flight
                killed.set()

    try:
        threads = [threading.Thread(target=load, args=(server.url, seed))
                   for seed, server in enumerate([first, second, first, second])]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        assert killed.is_set() and len(answered) > PER_THREAD * 2
        store = open_store(postgres_server_url, keys=read_mac_keys(mac))
        logged = {r.decision_id for r in store.query()}
        assert set(answered) <= logged  # every answered decision is in the log
        assert store.verify() is None
        assert main(["log", "verify", "--database-url", postgres_server_url, "--mac-key-file", mac,
                     "--data", str(tmp_path / "b")]) == 0  # (not the working directory's data/)
        said = capsys.readouterr().out
        assert "ok: the chain holds" in said and f"{len(logged)} with a keyed MAC" in said
        # the surviving replica still serves and extends the same chain
        status, body = call(second.url + "/v1/decisions", bind_request())
        assert status == 200 and store.get(body["decision_id"]) is not None and store.verify() is None
    finally:
        first.stop(signal.SIGKILL)
        second.stop()
