"""The running service's sweep of older records and the signed head (issue 8, item 12): a record
far back rewritten while the service runs is found by the sweep, within its CPU budget; records
removed from the end after the last check, or after a graceful stop, are found by `log verify`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from engine.checkpoints import HEAD, read_checkpoint
from engine.logkeys import MacKey

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


def test_one_worker_of_a_service_sweeps(evidence: Evidence) -> None:
    from engine.logcheck import LogWatch

    ev = swept(evidence)  # this worker took the sweep
    other = LogWatch(ev.watch.store, tail=3, checkpoint_dir=ev.watch.checkpoint_dir)
    other.RANGE = 5
    other.start()
    other.step()
    assert other.swept == 0 and other.verified_seq == 30  # it still checks what is new
    ev.watch._sweep_lock.close()  # the sweeping worker ends: the kernel frees its lock
    other.step()
    assert other.swept > 0


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
    # The new records (after 30), then the last 3 less those just read: record 30 only.
    assert reads == [(30, ev.watch.CHUNK), (29, 1)] and ev.watch.breach is None
    forged_mac(ev, 31, MacKey(b"\x02" * 32))  # verified as new in the step before: the tail finds it
    ev.watch.step()
    assert ev.watch.breach is not None and ev.watch.breach.seq == 31, ev.watch.breach
