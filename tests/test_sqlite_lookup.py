"""A new SQLite log's lookups by time, shop and account: a table filled behind the commits,
right while it lags; logs made before keep their indexes."""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from engine.decisionlog import LogRecord, SQLiteStore, _tables, log_time, new_record, open_store

START = datetime(2025, 3, 1, tzinfo=UTC)


def record(n: int) -> LogRecord:
    """Record n: shop s0-s2, account a0-a4 (none for every 7th), logged n seconds after START."""
    account = None if n % 7 == 0 else {"id": f"a{n % 5}"}
    request = {"action": "bind" if n % 2 else "unbind", "shop": {"id": f"s{n % 3}"}, "account": account}
    return new_record(decision_id=f"d-{n}", outcome="decided" if n % 4 else "rejected", status=200,
                      request=request, response={"decision": "allow"}, duration_us=n,
                      logged_at=START + timedelta(seconds=n))


def at(n: int) -> str:
    return log_time(START + timedelta(seconds=n))  # (as the log writes times: they sort as text)


QUERIES: list[dict[str, Any]] = [
    {"shop_id": "s1"}, {"account_id": "a3"}, {"shop_id": "s2", "account_id": "a1"},
    {"since": at(20), "until": at(55)}, {"since": at(60)}, {"until": at(12)},
    {"shop_id": "s0", "action": "bind", "outcome": "decided"}, {"action": "unbind"},
]


def expected(every: list[Any], filters: dict[str, Any]) -> list[int]:
    def meets(r: Any) -> bool:
        return all(r.logged_at >= value if name == "since" else r.logged_at < value if name == "until"
                   else getattr(r, name) == value for name, value in filters.items())
    return [r.seq for r in every if meets(r)]


def paged(store: SQLiteStore, filters: dict[str, Any], size: int) -> list[int]:
    seqs: list[int] = []
    while page := list(store.scan(limit=size, after_seq=seqs[-1] if seqs else 0, **filters)):
        seqs += [r.seq for r in page]
    return seqs


def reach(path: Path) -> int:
    with sqlite3.connect(path) as conn:
        return int(conn.execute("SELECT coalesce(max(seq), 0) FROM decision_lookup").fetchone()[0])


@pytest.fixture
def no_filling(monkeypatch: pytest.MonkeyPatch) -> None:
    """No filling by the commits: the lookup is filled only at open, at close and when told."""
    monkeypatch.setattr(SQLiteStore, "LOOKUP_EVERY", 10_000)
    monkeypatch.setattr(SQLiteStore, "LOOKUP_GROUP", 10_000)


def test_queries_are_right_while_the_lookup_lags_and_once_it_caught_up(tmp_path: Path, no_filling: None) -> None:
    path = tmp_path / "decisions.db"
    store = SQLiteStore(path)
    store.write_many([record(n) for n in range(1, 41)])
    assert reach(path) == 0 and store.fill_lookup() == 40
    for n in range(41, 71):  # past the lookup's reach
        store.write(record(n))
    assert reach(path) == 40
    every = list(store.query())
    assert [r.seq for r in every] == list(range(1, 71))
    reader = open_store(f"sqlite:///{path}", read_only=True)
    for filters in QUERIES:
        want = expected(every, filters)
        assert want, filters  # (each query finds something, on both sides of the reach)
        assert [r.seq for r in store.scan(**filters)] == want, filters
        assert paged(store, filters, 4) == want, filters  # pages across the reach
        assert [r.seq for r in reader.scan(**filters)] == want, filters
    decided = [r.request_text for r in every if r.outcome == "decided" and at(20) <= r.logged_at < at(55)]
    assert list(store.requests(since=at(20), until=at(55))) == decided
    assert store.get("d-65") is not None and store.get("d-65").seq == 65  # type: ignore[union-attr]
    assert store.fill_lookup() == 30 and reach(path) == 70
    for filters in QUERIES:
        assert [r.seq for r in store.scan(**filters)] == expected(every, filters)
    assert store.verify() is None
    reader.close()
    store.close()


def test_a_commit_writes_the_table_and_the_id_index_only_and_lookups_use_the_lookup(
        tmp_path: Path, no_filling: None) -> None:
    path = tmp_path / "decisions.db"
    store = SQLiteStore(path)
    store.write(record(1))
    with sqlite3.connect(path) as conn:
        on_table = [row[1] for row in conn.execute("PRAGMA index_list(decisions)")]
        assert on_table == ["sqlite_autoindex_decisions_1"]  # decision_id UNIQUE, nothing else
        plan = " ".join(row[3] for row in conn.execute(
            "EXPLAIN QUERY PLAN SELECT d.seq FROM decision_lookup l JOIN decisions d ON d.seq = l.seq "
            "WHERE l.seq > 0 AND l.shop_id = 's1' AND d.seq > 0 AND d.shop_id = 's1' ORDER BY l.seq LIMIT 5"))
    assert "USING COVERING INDEX decision_lookup_shop_id" in plan and "TEMP B-TREE" not in plan
    store.close()


def test_the_commits_fill_the_lookup_every_so_many_records(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(SQLiteStore, "LOOKUP_EVERY", 16)
    path = tmp_path / "decisions.db"
    store = SQLiteStore(path)
    for n in range(1, 16):
        store.write(record(n))
    assert reach(path) == 0  # (a single record's commit writes no lookup entry)
    store.write(record(16))
    assert reach(path) == 16  # the commit that took the log 16 past the lookup's reach filled it
    assert store.write_many([]) == []  # (an empty batch: nothing to look up, and it commits)
    store.write(record(17))
    store.write_many([record(n) for n in range(18, 58)])  # a batch: its own entries, after the one before it
    assert reach(path) == 57
    store.write_many([record(n) for n in range(58, 60)])
    store.write_many([record(n) for n in range(60, 100)])
    assert reach(path) == 99
    other = SQLiteStore(path)  # another worker's store: its commits fill it too
    for n in range(100, 116):
        (store if n % 2 else other).write(record(n))
    assert reach(path) == 115
    with sqlite3.connect(path) as conn:  # every entry as the table holds its cells
        assert conn.execute("SELECT seq, logged_at, shop_id, account_id FROM decision_lookup ORDER BY seq").fetchall() \
            == conn.execute("SELECT seq, logged_at, shop_id, account_id FROM decisions ORDER BY seq").fetchall()
    every = list(store.query())
    for filters in QUERIES:
        assert [r.seq for r in store.scan(**filters)] == expected(every, filters), filters
    other.close()
    store.close()


def test_a_killed_writer_leaves_a_lag_the_next_one_fills_at_open(tmp_path: Path, no_filling: None) -> None:
    path = tmp_path / "decisions.db"
    killed = SQLiteStore(path)
    killed.write_many([record(n) for n in range(1, 26)])  # never closed, never filled: as if killed
    assert reach(path) == 0
    assert [r.seq for r in open_store(f"sqlite:///{path}", read_only=True).scan(shop_id="s2")] == \
        [n for n in range(1, 26) if n % 3 == 2]
    SQLiteStore(path).close()
    assert reach(path) == 25


def test_records_removed_by_hand_make_the_lookup_again(tmp_path: Path, no_filling: None) -> None:
    path = tmp_path / "decisions.db"
    store = SQLiteStore(path)
    store.write_many([record(n) for n in range(1, 31)])
    store.fill_lookup()
    with sqlite3.connect(path) as conn:
        conn.execute("DELETE FROM decisions WHERE seq > 20")  # then others written in their place
    store.write_many([record(n) for n in range(100, 115)])
    every = list(store.scan())
    assert [r.seq for r in every] == list(range(1, 36))
    assert store.fill_lookup() == 35  # the lookup's last entry was a removed record: made again
    for filters in QUERIES:
        assert [r.seq for r in store.scan(**filters)] == expected(every, filters), filters
    store.close()


def test_a_log_made_before_keeps_its_indexes_and_answers_the_same(tmp_path: Path) -> None:
    path = tmp_path / "decisions.db"
    with sqlite3.connect(path) as conn:  # the schema every log had until the lookup came
        conn.execute("PRAGMA journal_mode=WAL")
        for statement in _tables("INTEGER"):
            conn.execute(statement)
    store = SQLiteStore(path)
    store.write_many([record(n) for n in range(1, 31)])
    every = list(store.scan())
    for filters in QUERIES:
        assert [r.seq for r in store.scan(**filters)] == expected(every, filters), filters
    store.close()
    with sqlite3.connect(path) as conn:
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master")}
    assert "decision_lookup" not in tables and {"decisions_shop_id", "decisions_logged_at"} <= tables
    assert open_store(f"sqlite:///{path}", read_only=True).verify() is None
