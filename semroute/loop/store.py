"""Where the decision log lives: SQLite (embedded, the default) or PostgreSQL (several replicas).

Both speak the same SQL through ``SqlStore``; only connecting and the parameter style differ.
``open_store(url)`` picks one: ``sqlite:///abs/path.db``, ``sqlite:relative.db`` or a bare path
for SQLite, ``postgresql://user@host:port/db`` for PostgreSQL (needs the ``psycopg`` package:
``pip install 'semroute[postgres]'``). Every method is blocking: callers run them off the event
loop (the log's writer thread, ``asyncio.to_thread``). One connection per store, behind a lock.
"""

from __future__ import annotations

import dataclasses
import sqlite3
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from semroute.errors import ConfigError
from semroute.loop.records import DecisionRecord, Feedback, ShadowRecord

_DECISION_COLUMNS = tuple(f.name for f in dataclasses.fields(DecisionRecord))
_FEEDBACK_COLUMNS = tuple(f.name for f in dataclasses.fields(Feedback))
_SHADOW_COLUMNS = tuple(f.name for f in dataclasses.fields(ShadowRecord))
_BOOL_COLUMNS = {"fallback", "explored"}

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS decisions (
        request_id TEXT PRIMARY KEY, ts DOUBLE PRECISION NOT NULL, route TEXT NOT NULL,
        decided_target TEXT NOT NULL, target TEXT NOT NULL, confidence DOUBLE PRECISION NOT NULL,
        fallback BOOLEAN NOT NULL, status TEXT NOT NULL, tenant TEXT NOT NULL,
        index_version TEXT NOT NULL, cost_usd DOUBLE PRECISION NOT NULL,
        latency_ms DOUBLE PRECISION NOT NULL, ttft_ms DOUBLE PRECISION NOT NULL,
        query_sha256 TEXT NOT NULL, query_chars INTEGER NOT NULL, query_text TEXT,
        shadow_route TEXT, shadow_target TEXT, explored BOOLEAN NOT NULL,
        propensity DOUBLE PRECISION NOT NULL DEFAULT 1)""",
    "CREATE INDEX IF NOT EXISTS decisions_ts ON decisions (ts)",
    """CREATE TABLE IF NOT EXISTS feedback (
        request_id TEXT NOT NULL, score DOUBLE PRECISION NOT NULL, ts DOUBLE PRECISION NOT NULL,
        target TEXT, comment TEXT)""",
    "CREATE INDEX IF NOT EXISTS feedback_request ON feedback (request_id)",
    # Written by a router in shadow mode: decisions of the candidate that differed.
    """CREATE TABLE IF NOT EXISTS shadow_decisions (
        request_id TEXT NOT NULL, ts DOUBLE PRECISION NOT NULL, serving_version TEXT NOT NULL,
        candidate_version TEXT NOT NULL, route TEXT NOT NULL, target TEXT NOT NULL,
        confidence DOUBLE PRECISION NOT NULL, fallback BOOLEAN NOT NULL,
        shadow_route TEXT NOT NULL, shadow_target TEXT NOT NULL,
        shadow_confidence DOUBLE PRECISION NOT NULL, shadow_fallback BOOLEAN NOT NULL,
        query_sha256 TEXT NOT NULL, query_chars INTEGER NOT NULL, query_text TEXT)""",
    "CREATE INDEX IF NOT EXISTS shadow_decisions_ts ON shadow_decisions (ts)",
)
# Columns added to ``decisions`` after its first release: a database made before gets them on
# open, old rows taking the default.
_ADDED_DECISION_COLUMNS = (("propensity", "DOUBLE PRECISION NOT NULL DEFAULT 1"),)


class SqlStore:
    """The decision log's tables over one DB-API connection (see the module docstring)."""

    placeholder = "?"
    add_column = "ALTER TABLE {table} ADD COLUMN {column} {kind}"

    def __init__(self, connection: Any, where: str) -> None:
        self._conn = connection
        self.where = where
        self._lock = threading.Lock()
        with self._lock:
            for statement in _SCHEMA:
                self._conn.execute(statement)
            self._conn.commit()
            self._migrate()

    def _migrate(self) -> None:
        """Add the columns a database created by an older version lacks."""
        cur = self._conn.execute("SELECT * FROM decisions WHERE 1 = 0")
        present = {d[0] for d in cur.description}
        cur.fetchall()
        for column, kind in _ADDED_DECISION_COLUMNS:
            if column not in present:
                self._conn.execute(self.add_column.format(table="decisions", column=column,
                                                          kind=kind))
        self._conn.commit()

    def insert_decisions(self, rows: Sequence[DecisionRecord]) -> None:
        """Insert rows in one transaction; a request id seen before keeps its first row."""
        if not rows:
            return
        values = [tuple(getattr(r, c) for c in _DECISION_COLUMNS) for r in rows]
        marks = ", ".join([self.placeholder] * len(_DECISION_COLUMNS))
        sql = (
            f"INSERT INTO decisions ({', '.join(_DECISION_COLUMNS)}) VALUES ({marks}) "
            "ON CONFLICT (request_id) DO NOTHING"
        )
        with self._lock:
            self._executemany(sql, values)
            self._conn.commit()

    def insert_feedback(self, rows: Sequence[Feedback]) -> None:
        if not rows:
            return
        values = [tuple(getattr(r, c) for c in _FEEDBACK_COLUMNS) for r in rows]
        marks = ", ".join([self.placeholder] * len(_FEEDBACK_COLUMNS))
        sql = f"INSERT INTO feedback ({', '.join(_FEEDBACK_COLUMNS)}) VALUES ({marks})"
        with self._lock:
            self._executemany(sql, values)
            self._conn.commit()

    def insert_shadow(self, rows: Sequence[ShadowRecord]) -> None:
        if not rows:
            return
        values = [tuple(getattr(r, c) for c in _SHADOW_COLUMNS) for r in rows]
        marks = ", ".join([self.placeholder] * len(_SHADOW_COLUMNS))
        sql = f"INSERT INTO shadow_decisions ({', '.join(_SHADOW_COLUMNS)}) VALUES ({marks})"
        with self._lock:
            self._executemany(sql, values)
            self._conn.commit()

    def shadow_decisions(self, since: float = 0.0) -> list[ShadowRecord]:
        """Differing shadow decisions at or after ``since``, oldest first."""
        sql = (
            f"SELECT {', '.join(_SHADOW_COLUMNS)} FROM shadow_decisions "
            f"WHERE ts >= {self.placeholder} ORDER BY ts, request_id"
        )
        out = []
        for row in self._query(sql, (since,)):
            fields = dict(zip(_SHADOW_COLUMNS, row, strict=True))
            fields["fallback"] = bool(fields["fallback"])
            fields["shadow_fallback"] = bool(fields["shadow_fallback"])
            out.append(ShadowRecord(**fields))
        return out

    def has_decision(self, request_id: str) -> bool:
        with self._lock:
            cur = self._conn.execute(
                f"SELECT 1 FROM decisions WHERE request_id = {self.placeholder}", (request_id,)
            )
            found = cur.fetchone() is not None
            self._conn.commit()
        return found

    def decisions(self, since: float = 0.0) -> list[DecisionRecord]:
        """Every decision at or after ``since`` (unix seconds), oldest first."""
        sql = (
            f"SELECT {', '.join(_DECISION_COLUMNS)} FROM decisions "
            f"WHERE ts >= {self.placeholder} ORDER BY ts, request_id"
        )
        return [self._decision(row) for row in self._query(sql, (since,))]

    def with_feedback(self, since: float = 0.0) -> list[tuple[DecisionRecord, Feedback]]:
        """Decisions at or after ``since`` joined with each feedback given on them, oldest
        first (a decision with two feedback rows appears twice)."""
        d_cols = ", ".join(f"d.{c}" for c in _DECISION_COLUMNS)
        f_cols = ", ".join(f"f.{c}" for c in _FEEDBACK_COLUMNS)
        sql = (
            f"SELECT {d_cols}, {f_cols} FROM decisions d JOIN feedback f "
            f"ON f.request_id = d.request_id WHERE d.ts >= {self.placeholder} "
            "ORDER BY d.ts, d.request_id, f.ts"
        )
        n = len(_DECISION_COLUMNS)
        out = []
        for row in self._query(sql, (since,)):
            out.append((self._decision(row[:n]), Feedback(*row[n:])))
        return out

    def purge(self, before: float) -> int:
        """Delete decisions (and their feedback) older than ``before``; returns rows deleted."""
        p = self.placeholder
        with self._lock:
            self._conn.execute(
                f"DELETE FROM feedback WHERE request_id IN "
                f"(SELECT request_id FROM decisions WHERE ts < {p})", (before,)
            )
            self._conn.execute(f"DELETE FROM shadow_decisions WHERE ts < {p}", (before,))
            cur = self._conn.execute(f"DELETE FROM decisions WHERE ts < {p}", (before,))
            deleted = int(cur.rowcount or 0)
            self._conn.commit()
        return deleted

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def _query(self, sql: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        with self._lock:
            rows = list(self._conn.execute(sql, params).fetchall())
            self._conn.commit()
        return rows

    def _executemany(self, sql: str, values: Iterable[tuple[Any, ...]]) -> None:
        self._conn.executemany(sql, list(values))

    @staticmethod
    def _decision(row: Sequence[Any]) -> DecisionRecord:
        fields = dict(zip(_DECISION_COLUMNS, row, strict=True))
        for name in _BOOL_COLUMNS:
            fields[name] = bool(fields[name])
        return DecisionRecord(**fields)


class SqliteStore(SqlStore):
    """SQLite in WAL mode: readers (reports, ``learn``) never block the writer."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            conn = sqlite3.connect(str(path), check_same_thread=False, timeout=5.0)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
        except sqlite3.Error as exc:
            raise ConfigError(f"decision log {path}: cannot open SQLite database: {exc}") from exc
        super().__init__(conn, str(path))


class PostgresStore(SqlStore):
    """PostgreSQL through psycopg 3 (one connection; the writer batches rows)."""

    placeholder = "%s"
    # two replicas may open an old database at once
    add_column = "ALTER TABLE {table} ADD COLUMN IF NOT EXISTS {column} {kind}"

    def __init__(self, url: str) -> None:
        try:
            import psycopg
        except ImportError as exc:
            raise ConfigError(
                f"decision log {redact_url(url)}: PostgreSQL needs the psycopg package "
                "(pip install 'semroute[postgres]')"
            ) from exc
        try:
            conn = psycopg.connect(url, connect_timeout=5)
        except psycopg.Error as exc:
            raise ConfigError(
                f"decision log {redact_url(url)}: cannot connect to PostgreSQL: {exc}"
            ) from exc
        super().__init__(conn, redact_url(url))

    def _executemany(self, sql: str, values: Iterable[tuple[Any, ...]]) -> None:
        with self._conn.cursor() as cur:
            cur.executemany(sql, list(values))


def open_store(url: str) -> SqlStore:
    """The store ``url`` names (see the module docstring). Raises ConfigError naming it."""
    if url.startswith(("postgresql://", "postgres://")):
        return PostgresStore(url)
    if url.startswith("sqlite:"):
        path = url.removeprefix("sqlite:")
        path = path[2:] if path.startswith("//") else path
        return SqliteStore(Path(path))
    if "://" in url:
        raise ConfigError(
            f"decision log {redact_url(url)}: unknown scheme; use sqlite:PATH or postgresql://..."
        )
    return SqliteStore(Path(url))


def redact_url(url: str) -> str:
    """The URL without its password, for messages and logs."""
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return url
    creds, _, host = rest.rpartition("@")
    user = creds.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}" if ":" in creds else url
