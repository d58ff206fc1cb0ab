"""The decision log on both stores: SQLite (a file in a temp dir) and a real PostgreSQL server
started for the test on a free loopback port. Rows are written in batches by the writer thread,
feedback is checked against logged ids, retention purges, and a stalled database never blocks
``record``: a full queue drops rows and counts them."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from semroute.errors import NotFound
from semroute.loop.decision_log import DecisionLog
from semroute.loop.records import DecisionRecord, Feedback, ShadowRecord, query_fields
from semroute.loop.store import SqlStore, open_store
from semroute.testing.postgres import PostgresServer, find_binary, start_postgres

NOW = time.time()


def _row(i: int, ts: float = NOW - 3600, **extra: object) -> DecisionRecord:
    fields: dict[str, object] = {
        "request_id": f"req-{i}", "ts": ts + i, "route": "code", "decided_target": "a",
        "target": "a", "confidence": 0.9, "fallback": False, "status": "ok",
        **query_fields(f"query {i}", keep_text=False), **extra,
    }
    return DecisionRecord(**fields)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def postgres() -> Iterator[PostgresServer]:
    if find_binary("postgres") is None:
        pytest.fail("PostgreSQL binaries missing: `make setup` installs Debian's postgresql")
    server = start_postgres()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(params=["sqlite", "postgres"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:{tmp_path / 'log.db'}"
    server: PostgresServer = request.getfixturevalue("postgres")
    store = open_store(server.url)
    with store._lock:  # a clean slate per test on the shared server
        store._conn.execute("DROP TABLE IF EXISTS decisions")
        store._conn.execute("DROP TABLE IF EXISTS feedback")
        store._conn.execute("DROP TABLE IF EXISTS shadow_decisions")
        store._conn.commit()
    store.close()
    return server.url


def test_rows_and_feedback_round_trip(store_url: str) -> None:
    """Logged rows come back equal; feedback on a logged id is joined to it; text is kept only
    when asked."""
    log = DecisionLog(open_store(store_url), batch=4)
    rows = [_row(i) for i in range(10)] + [_row(10, **query_fields("kept", keep_text=True))]
    for row in rows:
        assert log.record(row)
    log.feedback(Feedback("req-3", 0.25, ts=2_000.0, target="a", comment="meh"))
    assert log.flush()
    assert log.store.decisions() == rows
    joined = log.store.with_feedback()
    assert [(d.request_id, f.score, f.comment) for d, f in joined] == [("req-3", 0.25, "meh")]
    assert rows[0].query_text is None and rows[-1].query_text == "kept"
    assert log.counters.written == 11 and log.counters.dropped == 0
    log.close()


def test_feedback_on_an_unknown_id_is_not_found(store_url: str) -> None:
    """An id that was never logged is refused with NotFound; one still queued is accepted."""
    log = DecisionLog(open_store(store_url))
    with pytest.raises(NotFound, match="no logged decision"):
        log.feedback(Feedback("never", 1.0, ts=1.0))
    log.record(_row(1))
    log.feedback(Feedback("req-1", 1.0, ts=2.0))  # queued or written: either way known
    assert log.flush()
    assert len(log.store.with_feedback()) == 1
    log.close()


def test_retention_purges_old_rows(store_url: str) -> None:
    """Rows older than the retention are deleted with their feedback by the writer."""
    now = 100 * 86400.0
    log = DecisionLog(open_store(store_url), retention_days=1, clock=lambda: now)
    log.record(_row(1, ts=now - 3 * 86400))
    log.record(_row(2, ts=now - 60))
    assert log.flush()
    log.record(_row(3, ts=now - 30))  # the next write runs the purge
    assert log.flush()
    assert [r.request_id for r in log.store.decisions()] == ["req-2", "req-3"]
    assert log.counters.purged == 1
    log.close()


def test_shadow_rows_round_trip_and_are_purged(store_url: str) -> None:
    """Differing shadow decisions (written by a router) come back equal, beside the
    dispatcher's rows and not mixed with them, and age out with the retention."""
    now = 100 * 86400.0
    log = DecisionLog(open_store(store_url), retention_days=1, clock=lambda: now)
    rows = [
        ShadowRecord(f"req-{i}", now - 60 * (3 - i), "v1", "v2", "code", "a", 0.9, False,
                     "math", "b", 0.7, i == 1, **query_fields(f"q{i}", keep_text=i == 2))
        for i in range(3)
    ]
    old = ShadowRecord("old", now - 3 * 86400, "v1", "v2", "code", "a", 0.9, False, "math",
                       "b", 0.7, False)
    assert all(log.record_shadow(r) for r in [old, *rows])
    log.record(_row(1, ts=now - 30))
    assert log.flush() and log.flush()  # the writer purges after a write; the 2nd waits for it
    assert log.store.shadow_decisions() == rows  # "old" is past the retention: purged
    assert [d.request_id for d in log.store.decisions()] == ["req-1"]
    assert rows[2].query_text == "q2" and rows[0].query_text is None
    log.close()


# ``decisions`` as the first release created it, before ``propensity``
OLD_DECISIONS = """CREATE TABLE decisions (
    request_id TEXT PRIMARY KEY, ts DOUBLE PRECISION NOT NULL, route TEXT NOT NULL,
    decided_target TEXT NOT NULL, target TEXT NOT NULL, confidence DOUBLE PRECISION NOT NULL,
    fallback BOOLEAN NOT NULL, status TEXT NOT NULL, tenant TEXT NOT NULL,
    index_version TEXT NOT NULL, cost_usd DOUBLE PRECISION NOT NULL,
    latency_ms DOUBLE PRECISION NOT NULL, ttft_ms DOUBLE PRECISION NOT NULL,
    query_sha256 TEXT NOT NULL, query_chars INTEGER NOT NULL, query_text TEXT,
    shadow_route TEXT, shadow_target TEXT, explored BOOLEAN NOT NULL)"""


def test_a_database_from_before_the_propensity_column_opens(store_url: str) -> None:
    """A log created before decisions had ``propensity`` gains the column on open: its rows
    read back with propensity 1 (nothing was explored with known odds) and new rows keep
    theirs; opening it again changes nothing."""
    store = open_store(store_url)
    with store._lock:
        store._conn.execute("DROP TABLE decisions")
        store._conn.execute(OLD_DECISIONS)
        store._conn.execute(  # within the retention, older than the new row
            f"INSERT INTO decisions VALUES ('old', {NOW - 7200}, 'code', 'a', 'a', 0.9, FALSE, "
            "'ok', '', '', 0, 0, 0, '', 0, NULL, NULL, NULL, TRUE)")
        store._conn.commit()
    store.close()
    log = DecisionLog(open_store(store_url))
    new = _row(1, explored=True, propensity=0.125)
    log.record(new)
    assert log.flush()
    got = {r.request_id: r for r in log.store.decisions()}
    log.close()
    assert got["old"].propensity == 1.0 and got["old"].explored
    assert got["req-1"] == new
    again = open_store(store_url)
    assert [r.propensity for r in again.decisions()] == [1.0, 0.125]
    again.close()


class StalledStore(SqlStore):
    """A store whose inserts wait until released: a database that stopped answering."""

    def __init__(self, path: Path) -> None:
        import sqlite3

        super().__init__(sqlite3.connect(str(path), check_same_thread=False), str(path))
        self.release = threading.Event()

    def insert_decisions(self, rows: object) -> None:  # type: ignore[override]
        self.release.wait(30)
        super().insert_decisions(rows)  # type: ignore[arg-type]


def test_a_stalled_database_never_blocks_record(tmp_path: Path) -> None:
    """With the writer stuck, record() keeps returning at once; past the queue bound rows are
    dropped and counted; once the database answers, what was queued is written."""
    store = StalledStore(tmp_path / "stalled.db")
    log = DecisionLog(store, max_queue=50, batch=10)
    started = time.perf_counter()
    accepted = [log.record(_row(i)) for i in range(500)]
    elapsed = time.perf_counter() - started
    assert elapsed < 5.0  # generous: 500 non-blocking puts; a blocking log would wait 30 s
    assert accepted.count(False) == log.counters.dropped
    assert 400 <= log.counters.dropped < 500
    store.release.set()
    assert log.flush()
    assert log.counters.written == accepted.count(True)
    log.close()
