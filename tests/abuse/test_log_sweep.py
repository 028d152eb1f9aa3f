"""The running service's sweep of older records and the signed head (issue 8, item 12): a record
far back rewritten while the service runs is found by the sweep, within its CPU budget; records
removed from the end after the last check, or after a graceful stop, are found by `log verify`."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from engine.checkpoints import HEAD, read_checkpoint
from engine.logkeys import MacKey

from ..conftest import make_app
from .test_log_evidence import Evidence, decide, evidence, forged_mac

__all__ = ["evidence"]  # the fixture, shared


def swept(ev: Evidence) -> Evidence:
    """A watch that re-checks only its last 3 records itself: older ones are the sweep's, by 5."""
    ev.watch.tail, ev.watch.RANGE = 3, 5
    ev.watch.step()
    assert ev.watch.breach is None and ev.watch.verified_seq == 30
    return ev


@pytest.mark.parametrize("tamper", ["a MAC forged under a guessed key", "a cell's type changed",
                                    "a record removed and put back in another place"])
def test_the_sweep_finds_a_record_far_back_rewritten_while_the_service_runs(evidence: Evidence,
                                                                            tamper: str) -> None:
    ev = swept(evidence)
    ev.watch.step()  # a second pass: every range is known by its digest now
    assert ev.watch.breach is None and len(ev.watch._digests) == 6
    if tamper.startswith("a MAC"):
        forged_mac(ev, 7, MacKey(b"\x02" * 32))
    elif tamper.startswith("a cell"):
        ev.sql("UPDATE decisions SET request = CAST(request AS BLOB) WHERE seq = 7")  # the same bytes
    else:
        ev.sql("UPDATE decisions SET seq = 1000 WHERE seq = 7")
        ev.sql("UPDATE decisions SET seq = 7 WHERE seq = 1000")
        ev.watch.step()
        assert ev.watch.breach is None  # the same rows, the same digest: nothing changed
        ev.sql("UPDATE decisions SET duration_us = duration_us + 1 WHERE seq = 7")
    ev.watch.budget = 0.0  # one range a step at least: found within one pass
    for _ in range(6):
        ev.watch.step()
    assert ev.watch.breach is not None and ev.watch.breach.seq == 7, ev.watch.breach
    ready = ev.app.test_client().get("/readyz")
    assert ready.status_code == 503 and ready.json["decision_log_chain"].startswith("broken at record 7")


def test_the_sweep_stays_within_its_budget_and_goes_round(evidence: Evidence) -> None:
    ev = swept(evidence)
    ev.watch.budget = 0.0
    before = ev.watch.swept
    ev.watch.step()
    assert ev.watch.swept - before == 5  # one range per step when there is no time for more
    ev.watch.budget = 10.0
    before = ev.watch.swept
    ev.watch.step()
    assert ev.watch.swept - before == 30  # at most one pass per step


def test_the_signed_head_finds_records_removed_after_the_last_check(evidence: Evidence,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    ev = evidence
    ev.watch.step()  # the head is signed at every check: 30 records
    assert read_checkpoint(ev.data / "checkpoints" / HEAD).tree_size == 30
    ev.sql("DELETE FROM decisions WHERE seq > 27")
    assert ev.verify() == 1
    assert "covers 30 records but the log ends at record 27" in capsys.readouterr().out


def test_a_graceful_stop_signs_the_head(evidence: Evidence, capsys: pytest.CaptureFixture[str]) -> None:
    ev = evidence
    decide(ev.app.test_client(), 4)  # 34 records, none checked yet
    ev.watch.close()
    assert read_checkpoint(ev.data / "checkpoints" / HEAD).tree_size == 34
    assert ev.verify() == 0
    ev.sql("DELETE FROM decisions WHERE seq > 31")  # while the service is stopped
    assert ev.verify() == 1 and "truncated" in capsys.readouterr().out


def test_an_altered_head_is_named(evidence: Evidence, capsys: pytest.CaptureFixture[str]) -> None:
    evidence.watch.step()
    head: Path = evidence.data / "checkpoints" / HEAD
    head.write_text(head.read_text().replace('"tree_size": 30', '"tree_size": 31'))
    assert evidence.verify() == 1 and "head.json" in capsys.readouterr().out


def second_worker(ev: Evidence) -> Any:
    """Another worker of the same service: an app on the same data folder and keys."""
    return make_app(ev.data.parent, f"sqlite:///{ev.db}", LOG_MAC_KEY_FILE=str(ev.keys / "log-mac.key"),
                    CHECKPOINT_KEY_FILE=str(ev.keys / "checkpoint.key"), CHECKPOINT_INTERVAL=0)


def test_one_worker_checks_for_all_and_every_worker_reports_a_rewritten_record(evidence: Evidence) -> None:
    ev = swept(evidence)  # this worker checked first: it is the watcher
    other = second_worker(ev)
    watch = other.extensions["bindpolicy"].watch
    watch.RANGE = 5
    reads: list[int] = []
    scan = watch.store.scan_stored
    watch.store.scan_stored = lambda **kw: reads.append(1) or scan(**kw)  # type: ignore[method-assign]
    decide(other.test_client(), 2)  # records 31, 32
    ev.watch.step()
    watch.step()
    assert not watch.watching and reads == [] and watch.swept == 0  # it read no record: it follows
    ready = other.test_client().get("/readyz").json
    assert ready["status"] == "ready" and ready["decision_log_integrity"]["verified_through"] == 32
    assert ready["decision_log_integrity"]["checked_by"].startswith("the worker of pid")
    integrity = ready["decision_log_integrity"]
    assert integrity["checkpoints"]["latest_tree_size"] == ev.watch.last_checkpoint.tree_size == 32
    forged_mac(ev, 31, MacKey(b"\x02" * 32))
    ev.watch.step()
    watch.step()
    for app in (ev.app, other):
        client = app.test_client()
        ready = client.get("/readyz")
        assert ready.status_code == 503 and ready.json["decision_log_chain"].startswith("broken at record 31")
        assert "bindpolicy_decision_log_broken_record 31.0" in client.get("/metrics").get_data(as_text=True)
    assert reads == []


def test_another_worker_takes_over_when_the_watcher_ends(evidence: Evidence) -> None:
    ev = swept(evidence)
    other = second_worker(ev)
    watch = other.extensions["bindpolicy"].watch
    watch.RANGE = 5
    watch.step()
    assert not watch.watching and watch.verified_through == 30
    decide(other.test_client(), 3)  # records 31..33, after the signed head of 30 the watcher wrote
    ev.watch._watch_lock.close()  # the watcher ends: the kernel frees its lock
    watch.step()
    assert watch.watching and watch.verified_seq == 33 and watch.swept > 0  # from the signed head on
    assert other.test_client().get("/readyz").json["decision_log_integrity"]["checked_by"] == "this worker"
    forged_mac(ev, 32, MacKey(b"\x02" * 32))
    watch.step()
    assert watch.breach is not None and watch.breach.seq == 32, watch.breach


def test_a_silent_watcher_is_said_in_readyz(evidence: Evidence) -> None:
    ev = swept(evidence)
    other = second_worker(ev)
    watch = other.extensions["bindpolicy"].watch
    watch.interval = 5.0  # a running service's
    watch.step()
    assert "decision_log_watch" not in other.test_client().get("/readyz").json
    state = ev.data / "checkpoints" / watch.STATE
    shared = json.loads(state.read_text())
    state.write_text(json.dumps({**shared, "checked_at": shared["checked_at"] - 60}))  # the watcher stuck
    watch.step()  # the lock is still held: it cannot take over
    ready = other.test_client().get("/readyz")
    assert ready.status_code == 200 and ready.json["decision_log_watch"].startswith("stale: the log's watch has not")
    state.write_text("{not json")  # an unreadable verdict is ignored, never a crash
    watch.step()
    assert other.test_client().get("/readyz").status_code == 200


def test_the_tail_checks_again_what_earlier_steps_verified_not_what_it_just_read(evidence: Evidence) -> None:
    ev = swept(evidence)  # records 1..30 verified; the tail is the last 3, no range complete for the sweep
    ev.watch.RANGE = 1000
    reads: list[tuple[int, int | None]] = []
    scan = ev.watch.store.scan_stored

    def counted(*, limit: int | None = None, after_seq: int = 0) -> Any:
        reads.append((after_seq, limit))
        return scan(limit=limit, after_seq=after_seq)

    ev.watch.store.scan_stored = counted  # type: ignore[method-assign]
    decide(ev.app.test_client(), 2)  # records 31, 32
    ev.watch.step()
    # The new records (after 30, a piece of PIECE at a time: one), then the last 3 less those just
    # read: record 30 only.
    assert reads == [(30, ev.watch.PIECE), (29, 1)] and ev.watch.breach is None
    forged_mac(ev, 31, MacKey(b"\x02" * 32))  # verified as new in the step before: the tail finds it
    ev.watch.step()
    assert ev.watch.breach is not None and ev.watch.breach.seq == 31, ev.watch.breach


def paused(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The pauses the watch takes (in this thread; the others, such as the log's checkpoint thread, sleep)."""
    pauses: list[float] = []
    sleep, here = time.sleep, threading.current_thread()
    monkeypatch.setattr("engine.logcheck.time.sleep",
                        lambda s: pauses.append(s) if threading.current_thread() is here else sleep(s))
    return pauses


def test_a_paced_step_pauses_between_pieces_and_still_finds_a_rewritten_record(
        evidence: Evidence, monkeypatch: pytest.MonkeyPatch) -> None:
    """The background thread's steps read and check PIECE records at a time and sleep between
    pieces (the serving threads then have the interpreter's lock); what they find is what a step
    in one go finds, and a step at shutdown does not pause."""
    ev = swept(evidence)
    ev.watch.step()
    pauses = paused(monkeypatch)
    ev.watch.PIECE, ev.watch.paced, ev.watch.budget = 2, True, 0.25
    forged_mac(ev, 9, MacKey(b"\x02" * 32))
    decide(ev.app.test_client(), 2)  # 2 new records: one piece; the tail: record 30, one piece
    ev.watch.step()
    assert ev.watch.breach is not None and ev.watch.breach.seq == 9, ev.watch.breach
    assert len(pauses) >= 2 + 3  # and the sweep's: ranges of 5 in pieces of 2 (3 a range)
    ev.watch.breach, ev.watch._closing = None, True
    pauses.clear()
    ev.watch.step()
    assert pauses == [] and ev.watch.breach is not None and ev.watch.breach.seq == 9


@pytest.mark.parametrize(("duty", "pause"), [(0.5, 0.01), (0.1, 0.09), (1.0, 0.0)])
def test_a_pause_keeps_the_pieces_within_their_share_of_a_core(evidence: Evidence, monkeypatch: pytest.MonkeyPatch,
                                                               duty: float, pause: float) -> None:
    pauses = paused(monkeypatch)
    monkeypatch.setattr("engine.logcheck.time.thread_time", lambda: 5.01)
    evidence.watch.paced, evidence.watch._piece_started = True, 5.0  # a piece of 10 ms of CPU
    evidence.watch._pause(duty)
    assert pauses == [pytest.approx(pause)] and evidence.watch._piece_started == 5.01
    evidence.watch.paced = False  # steps called directly (tests, `log` commands): no pauses
    evidence.watch._pause(duty)
    assert len(pauses) == 1
