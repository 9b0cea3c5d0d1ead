"""Where publishers' mappings are kept: the :class:`MappingStore` port and its SQLite adapter in the data
dir (the embedded default). A mapping is not a secret; it moves onto the shared state store (SQLite /
Azure Tables) with the other per-publisher state.
"""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path
from typing import Protocol, runtime_checkable

from shared.pipeline.mapping import ValidatedMapping


@runtime_checkable
class MappingStore(Protocol):
    """Each publisher's mapping (with what its validation learnt), by publisher id."""

    def get(self, publisher_id: str) -> ValidatedMapping | None: ...

    def put(self, publisher_id: str, mapping: ValidatedMapping) -> None: ...


class SqliteMappingStore:
    """:class:`MappingStore` in a SQLite file, created on first use. Raises sqlite3.Error / OSError when
    the file cannot be read or written."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._ready = False

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
        with self._lock:
            if not self._ready:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("CREATE TABLE IF NOT EXISTS mappings (publisher_id TEXT PRIMARY KEY, body TEXT NOT NULL)")
                self._ready = True
        return conn

    def get(self, publisher_id: str) -> ValidatedMapping | None:
        conn = self._connect()
        try:
            row = conn.execute("SELECT body FROM mappings WHERE publisher_id = ?", (publisher_id,)).fetchone()
        finally:
            conn.close()
        return None if row is None else ValidatedMapping.model_validate_json(row[0])

    def put(self, publisher_id: str, mapping: ValidatedMapping) -> None:
        conn = self._connect()
        try:
            conn.execute(
                "INSERT INTO mappings (publisher_id, body) VALUES (?, ?) "
                "ON CONFLICT (publisher_id) DO UPDATE SET body = excluded.body",
                (publisher_id, mapping.model_dump_json()),
            )
        finally:
            conn.close()

    def delete(self, publisher_id: str) -> bool:
        """Remove a publisher's mapping; whether there was one."""
        conn = self._connect()
        try:
            return conn.execute("DELETE FROM mappings WHERE publisher_id = ?", (publisher_id,)).rowcount > 0
        finally:
            conn.close()
