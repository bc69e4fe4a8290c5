"""Where ledger rows live: SQLite (embedded default) or PostgreSQL (`DATABASE_URL`).

Schema changes are plain versioned SQL files (`migrations/<dialect>/NNNN_*.sql`)
applied in order at start-up and recorded in `schema_migrations`. Two small
dialects and one append-only table do not need an ORM: alembic would bring
SQLAlchemy into the gateway for one table, while a file per version stays
readable by any operator and is applied under a lock (SQLite `BEGIN
IMMEDIATE`, a PostgreSQL advisory lock), so replicas starting together apply
each version once.

Both stores are synchronous and run in a worker thread (the writer's), never
on the event loop. Inserts are idempotent: by `row_id`, and by `(request_id,
run)` (migration 0002), so a batch retried after an error that hid a commit,
or a row the ledger stream delivers twice (gateway/money/ledger/stream.py), is
written once. One request id can have several rows: an async job's run that
stopped at a shutdown is settled (status 499, what it spent), and so is the
run that took it over; `run` tells them apart (1 for a synchronous request).
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Sequence
from datetime import UTC, datetime
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any, Protocol

from gateway.money.ledger.rows import UsageRow
from gateway.routing.pricing import USD_QUANTUM

MIGRATIONS = Path(__file__).parent / "migrations"
COLUMNS = ("row_id", "at", "request_id", "key_name", "route", "backend", "attempts", "images", "megapixels", "estimated_usd", "billed_usd", "billed_source", "status", "run")


def migrations(dialect: str) -> list[tuple[int, str]]:
    """(version, SQL) for every migration file of `dialect`, in order."""
    found = []
    for path in sorted((MIGRATIONS / dialect).glob("*.sql")):
        found.append((int(path.name.split("_", 1)[0]), path.read_text(encoding="utf-8")))
    return found


class LedgerStore(Protocol):
    dialect: str

    def insert(self, rows: Sequence[UsageRow]) -> None: ...

    def fetch(self, start: datetime, end: datetime, key_name: str | None = None) -> list[UsageRow]: ...

    def close(self) -> None: ...


def _dec(value: Any) -> Decimal | None:
    return None if value is None else Decimal(str(value))


class SqliteLedger:
    dialect = "sqlite"

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._conn = self._connect()
        self._migrate()

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
        if self.path != ":memory:":
            conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA busy_timeout=30000")
        return conn

    def _open(self) -> sqlite3.Connection:
        """The connection, opened again if an earlier shutdown closed it (an app served twice in one process)."""
        if self._closed:
            self._conn, self._closed = self._connect(), False
        return self._conn

    _closed = False

    def _migrate(self) -> None:
        with self._lock:
            c = self._conn
            c.execute("BEGIN IMMEDIATE")
            try:
                c.execute("CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, applied_at TEXT NOT NULL)")
                done = {v for (v,) in c.execute("SELECT version FROM schema_migrations")}
                for version, sql in migrations(self.dialect):
                    if version in done:
                        continue
                    for statement in _statements(sql):
                        c.execute(statement)
                    c.execute("INSERT INTO schema_migrations VALUES (?, ?)", (version, datetime.now(UTC).isoformat()))
                c.execute("COMMIT")
            except BaseException:
                c.execute("ROLLBACK")
                raise

    def insert(self, rows: Sequence[UsageRow]) -> None:
        if not rows:
            return
        values = [
            (
                r.row_id,
                r.at.astimezone(UTC).isoformat(timespec="microseconds"),
                r.request_id,
                r.key_name,
                r.route,
                r.backend,
                r.attempts,
                r.images,
                _text(r.megapixels),
                _text(r.estimated_usd),
                None if r.billed_usd is None else _text(r.billed_usd),
                r.billed_source,
                r.status,
                r.run,
            )
            for r in rows
        ]
        with self._lock:
            conn = self._open()
            conn.execute("BEGIN")
            try:
                conn.executemany(f"INSERT OR IGNORE INTO usage ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})", values)
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise

    def fetch(self, start: datetime, end: datetime, key_name: str | None = None) -> list[UsageRow]:
        sql = f"SELECT {', '.join(COLUMNS)} FROM usage WHERE at >= ? AND at < ?"
        args: list[Any] = [start.astimezone(UTC).isoformat(timespec="microseconds"), end.astimezone(UTC).isoformat(timespec="microseconds")]
        if key_name is not None:
            sql += " AND key_name = ?"
            args.append(key_name)
        with self._lock:
            found = self._open().execute(sql + " ORDER BY at, row_id", args).fetchall()
        return [_row(r, datetime.fromisoformat(r[1])) for r in found]

    def close(self) -> None:
        if self.path == ":memory:":
            return  # closing would drop the rows; nothing on disk to release
        with self._lock:
            if not self._closed:
                self._conn.close()
                self._closed = True


class PostgresLedger:
    dialect = "postgres"
    LOCK_ID = 7_414_726_000  # pg_advisory_xact_lock key for migrations

    def __init__(self, url: str) -> None:
        import psycopg

        self._psycopg = psycopg
        self._url = url
        self._conn = psycopg.connect(url, autocommit=False, connect_timeout=10)
        self._lock = threading.Lock()
        self._migrate()

    def _migrate(self) -> None:
        with self._lock, self._conn.transaction():
            c = self._conn
            c.execute("SELECT pg_advisory_xact_lock(%s)", (self.LOCK_ID,))
            c.execute("CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, applied_at TIMESTAMPTZ NOT NULL DEFAULT now())")
            done = {v for (v,) in c.execute("SELECT version FROM schema_migrations").fetchall()}
            for version, sql in migrations(self.dialect):
                if version not in done:
                    c.execute(sql)  # trusted files shipped with the gateway
                    c.execute("INSERT INTO schema_migrations (version) VALUES (%s)", (version,))

    def _reconnect_if_broken(self) -> None:
        if self._conn.closed or self._conn.broken:
            self._conn = self._psycopg.connect(self._url, autocommit=False, connect_timeout=10)

    def insert(self, rows: Sequence[UsageRow]) -> None:
        if not rows:
            return
        values = [(r.row_id, r.at, r.request_id, r.key_name, r.route, r.backend, r.attempts, r.images, r.megapixels, r.estimated_usd, r.billed_usd, r.billed_source, r.status, r.run) for r in rows]
        with self._lock:
            self._reconnect_if_broken()
            with self._conn.transaction(), self._conn.cursor() as cur:
                cur.executemany(f"INSERT INTO usage ({', '.join(COLUMNS)}) VALUES ({', '.join(['%s'] * len(COLUMNS))}) ON CONFLICT DO NOTHING", values)

    def fetch(self, start: datetime, end: datetime, key_name: str | None = None) -> list[UsageRow]:
        sql = f"SELECT {', '.join(COLUMNS)} FROM usage WHERE at >= %s AND at < %s"
        args: list[Any] = [start, end]
        if key_name is not None:
            sql += " AND key_name = %s"
            args.append(key_name)
        with self._lock:
            self._reconnect_if_broken()
            with self._conn.transaction():
                found = self._conn.execute(sql + " ORDER BY at, row_id", args).fetchall()
        return [_row(r, r[1].astimezone(UTC)) for r in found]

    def close(self) -> None:
        with self._lock:
            self._conn.close()


def _row(r: Sequence[Any], at: datetime) -> UsageRow:
    return UsageRow(
        row_id=r[0],
        at=at,
        request_id=r[2],
        key_name=r[3],
        route=r[4],
        backend=r[5],
        attempts=int(r[6]),
        images=int(r[7]),
        megapixels=_dec(r[8]) or Decimal(0),
        estimated_usd=_dec(r[9]) or Decimal(0),
        billed_usd=_dec(r[10]),
        billed_source=r[11],
        status=int(r[12]),
        run=None if r[13] is None else int(r[13]),
    )


def _text(value: Decimal) -> str:
    """Exact decimal text at the 8 places PostgreSQL's NUMERIC(20, 8) keeps, so both stores hold the same figure."""
    return f"{value.quantize(USD_QUANTUM, rounding=ROUND_HALF_UP):f}"


def _statements(sql: str) -> list[str]:
    """Split a SQLite migration into statements (trigger bodies stay whole)."""
    out, current = [], ""
    for line in sql.splitlines(keepends=True):
        current += line
        if sqlite3.complete_statement(current):
            out.append(current.strip())
            current = ""
    if current.strip() and not all(part.strip().startswith("--") for part in current.splitlines() if part.strip()):
        out.append(current.strip())
    return out


def open_store(database_url: str | None, sqlite_path: str | Path | None) -> LedgerStore:
    """PostgreSQL when `database_url` is set, else SQLite at `sqlite_path` (":memory:" when None)."""
    if database_url:
        url = database_url.replace("postgresql+psycopg://", "postgresql://", 1)
        return PostgresLedger(url)
    return SqliteLedger(sqlite_path or ":memory:")
