"""The embedded state store: the state port on one SQLite file, ``state.db`` in the data dir.

Several threads and several processes may share the file. Each thread has its own connection
(``isolation_level=None``: we say where transactions begin); the database runs in WAL mode so
readers never block the writer, and ``busy_timeout`` makes writers queue rather than fail. Every
write that depends on what is stored (replace and delete on an etag) checks and writes inside one
``BEGIN IMMEDIATE`` transaction, which takes the write lock up front — so between the check and the
write no other process can get in, exactly the guarantee Table Storage gives with ``If-Match``.

Etags are random tokens: a replace with the value already stored still gets a new etag, as in
Table Storage, so a reader can never mistake "rewritten" for "unchanged".

Durability is the embedded broker's: WAL with ``synchronous=NORMAL`` loses nothing a process crash
can reach; only an OS crash can roll back the last commits.
"""

from __future__ import annotations

import logging
import os
import secrets
import sqlite3
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from shared.names import STATE_FILE
from shared.state.base import (
    DEFAULT_UPDATE_ATTEMPTS,
    Change,
    Entity,
    StateConflict,
    StateNotFound,
    StatePreconditionFailed,
    StateUnavailable,
    decode_data,
    encode_data,
    optimistic_update,
    prefix_upper_bound,
    validate_key,
    validate_table,
)

logger = logging.getLogger(__name__)

DB_FILE_NAME = STATE_FILE
_BUSY_TIMEOUT_S = 30.0

# Table names are case-insensitive in Table Storage, so the key column holds the folded name
# (``tbl``); keys compare in BINARY collation, which for UTF-8 text is code-point order.
_SCHEMA = """
CREATE TABLE IF NOT EXISTS entities (
    tbl       TEXT NOT NULL,
    partition TEXT NOT NULL,
    row       TEXT NOT NULL,
    data      TEXT NOT NULL,
    etag      TEXT NOT NULL,
    PRIMARY KEY (tbl, partition, row)
) WITHOUT ROWID
"""
_GET = "SELECT data, etag FROM entities WHERE tbl = ? AND partition = ? AND row = ?"
_GET_ETAG = "SELECT etag FROM entities WHERE tbl = ? AND partition = ? AND row = ?"
_INSERT = "INSERT INTO entities (tbl, partition, row, data, etag) VALUES (?, ?, ?, ?, ?)"
_UPSERT = (
    "INSERT INTO entities (tbl, partition, row, data, etag) VALUES (?, ?, ?, ?, ?)"
    " ON CONFLICT (tbl, partition, row) DO UPDATE SET data = excluded.data, etag = excluded.etag"
)
_REPLACE = "UPDATE entities SET data = ?, etag = ? WHERE tbl = ? AND partition = ? AND row = ?"
_DELETE = "DELETE FROM entities WHERE tbl = ? AND partition = ? AND row = ?"
# ?1 table, ?2 partition or NULL, ?3 lowest row or NULL, ?4 row bound or NULL, ?5 limit (-1: none).
_QUERY = (
    "SELECT partition, row, data, etag FROM entities WHERE tbl = ?1"
    " AND (?2 IS NULL OR partition = ?2) AND (?3 IS NULL OR row >= ?3) AND (?4 IS NULL OR row < ?4)"
    " ORDER BY partition, row LIMIT ?5"
)


def _new_etag() -> str:
    return secrets.token_hex(12)


class EmbeddedStateStore:
    """The state port on a SQLite file (created 0600 with its directory if missing)."""

    def __init__(self, path: Path, *, sleep: Callable[[float], None] | None = None) -> None:
        """Open (or create) the store at ``path``. ``sleep`` paces ``update``'s retries (tests pin
        it). Raises StateUnavailable when the file cannot be opened."""
        self.path = Path(path)
        self._sleep = sleep
        self._local = threading.local()
        self._lock = threading.Lock()
        self._connections: list[tuple[threading.Thread, sqlite3.Connection]] = []
        self._closed = False
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if not self.path.exists():
                # SQLite would create the file with the umask's mode; the -wal and -shm files copy the
                # database's mode, so creating it 0600 keeps all three private.
                os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o600))
            self._conn().execute(_SCHEMA)
        except (OSError, sqlite3.Error) as exc:
            raise StateUnavailable(f"the embedded state store {self.path} cannot be opened: {exc}") from exc

    def __repr__(self) -> str:
        return f"EmbeddedStateStore({str(self.path)!r})"

    # -- connections -------------------------------------------------------------------------------

    def _conn(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is not None and not self._closed:
            return conn
        with self._lock:
            if self._closed:
                raise StateUnavailable("the embedded state store is closed")
            conn = sqlite3.connect(self.path, timeout=_BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False)
            conn.execute(f"PRAGMA busy_timeout = {int(_BUSY_TIMEOUT_S * 1000)}")
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = NORMAL")
            # A thread that ended cannot use its connection again: close it rather than leak it.
            alive = []
            for thread, old in self._connections:
                if thread.is_alive():
                    alive.append((thread, old))
                else:
                    old.close()
            alive.append((threading.current_thread(), conn))
            self._connections = alive
        self._local.conn = conn
        return conn

    @contextmanager
    def _immediate(self) -> Iterator[sqlite3.Connection]:
        """A write transaction that holds the write lock from its first statement."""
        conn = self._conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
            conn.execute("COMMIT")
        except BaseException:
            # Also when COMMIT itself failed: a connection left inside a transaction could never
            # begin another one.
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    @contextmanager
    def _errors(self, action: str) -> Iterator[None]:
        """SQLite's failures (locked past the busy timeout, I/O errors) as the port's."""
        try:
            yield
        except sqlite3.Error as exc:
            raise StateUnavailable(f"the embedded state store failed to {action}: {exc}") from exc

    # -- the port ----------------------------------------------------------------------------------

    def get(self, table: str, partition: str, row: str) -> Entity | None:
        key = _key(table, partition, row)
        with self._errors("read"):
            found = self._conn().execute(_GET, key).fetchone()
        if found is None:
            return None
        return Entity(table, partition, row, decode_data(found[0]), found[1])

    def insert(self, table: str, partition: str, row: str, data: Mapping[str, Any]) -> Entity:
        key = _key(table, partition, row)
        text, etag = encode_data(data), _new_etag()
        with self._errors("insert"):
            try:
                self._conn().execute(_INSERT, (*key, text, etag))
            except sqlite3.IntegrityError as exc:
                raise StateConflict(f"state entity {table}/{partition}/{row} exists already") from exc
        return Entity(table, partition, row, decode_data(text), etag)

    def replace(self, table: str, partition: str, row: str, data: Mapping[str, Any], *, etag: str) -> Entity:
        key = _key(table, partition, row)
        text, new_etag = encode_data(data), _new_etag()
        with self._errors("replace"), self._immediate() as conn:
            found = conn.execute(_GET_ETAG, key).fetchone()
            if found is None:
                raise StateNotFound(f"state entity {table}/{partition}/{row} does not exist")
            if found[0] != etag:
                raise StatePreconditionFailed(f"state entity {table}/{partition}/{row} changed since it was read")
            conn.execute(_REPLACE, (text, new_etag, *key))
        return Entity(table, partition, row, decode_data(text), new_etag)

    def upsert(self, table: str, partition: str, row: str, data: Mapping[str, Any]) -> Entity:
        key = _key(table, partition, row)
        text, etag = encode_data(data), _new_etag()
        with self._errors("upsert"):
            self._conn().execute(_UPSERT, (*key, text, etag))
        return Entity(table, partition, row, decode_data(text), etag)

    def delete(self, table: str, partition: str, row: str, *, etag: str | None = None) -> bool:
        key = _key(table, partition, row)
        with self._errors("delete"):
            if etag is None:
                return self._conn().execute(_DELETE, key).rowcount > 0
            with self._immediate() as conn:
                found = conn.execute(_GET_ETAG, key).fetchone()
                if found is None:
                    return False
                if found[0] != etag:
                    raise StatePreconditionFailed(f"state entity {table}/{partition}/{row} changed since it was read")
                conn.execute(_DELETE, key)
                return True

    def query(
        self,
        table: str,
        partition: str | None = None,
        *,
        row_prefix: str | None = None,
        limit: int | None = None,
    ) -> list[Entity]:
        folded = validate_table(table).lower()
        if partition is not None:
            validate_key(partition, "partition")
        if row_prefix is not None:
            validate_key(row_prefix, "row_prefix")
        if limit is not None and limit < 0:
            raise ValueError("limit must not be negative")
        if limit == 0:
            return []
        low = row_prefix or None
        high = prefix_upper_bound(row_prefix) if row_prefix else None
        with self._errors("query"):
            rows = self._conn().execute(_QUERY, (folded, partition, low, high, -1 if limit is None else limit))
            found = rows.fetchall()
        # BINARY collation is code-point order, so the range is exact; startswith is belt and braces.
        return [
            Entity(table, p, r, decode_data(d), e)
            for p, r, d, e in found
            if row_prefix is None or r.startswith(row_prefix)
        ]

    def update(
        self,
        table: str,
        partition: str,
        row: str,
        change: Change,
        *,
        attempts: int = DEFAULT_UPDATE_ATTEMPTS,
    ) -> dict[str, Any] | None:
        # The same etag loop as Table Storage's (rather than one IMMEDIATE transaction around
        # ``change``), so both adapters run the code path the contract tests check.
        if self._sleep is None:
            return optimistic_update(self, table, partition, row, change, attempts=attempts)
        return optimistic_update(self, table, partition, row, change, attempts=attempts, sleep=self._sleep)

    def health(self) -> None:
        with self._errors("answer"):
            self._conn().execute("SELECT 1 FROM entities LIMIT 1").fetchall()

    def close(self) -> None:
        """Close every connection this store opened."""
        with self._lock:
            self._closed = True
            connections, self._connections = self._connections, []
        for _, conn in connections:
            conn.close()

    def __enter__(self) -> EmbeddedStateStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _key(table: str, partition: str, row: str) -> tuple[str, str, str]:
    return validate_table(table).lower(), validate_key(partition, "partition"), validate_key(row, "row")
