"""Where publishers' mappings are kept: the :class:`MappingStore` port and its SQLite adapter in the data
dir, and :class:`StateMappingStore` on the shared state store (SQLite / Azure Tables), which a running
service uses: a mapping is not a secret, and every instance's write stage must read the same one.
"""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path
from typing import Protocol, runtime_checkable

from shared.names import TABLE_PUBLISHER_SETTINGS
from shared.pipeline.mapping import ValidatedMapping
from shared.state.base import StateStore, safe_key

_MAPPING_ROW = "mapping"


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


class StateMappingStore:
    """:class:`MappingStore` in the shared state store (table ``publishersettings``, row ``mapping``):
    what every instance's write stage and API read."""

    def __init__(self, state: StateStore) -> None:
        self._state = state

    def get(self, publisher_id: str) -> ValidatedMapping | None:
        entity = self._state.get(TABLE_PUBLISHER_SETTINGS, safe_key(publisher_id), _MAPPING_ROW)
        body = entity.data.get("mapping") if entity is not None else None
        return ValidatedMapping.model_validate_json(body) if isinstance(body, str) else None

    def put(self, publisher_id: str, mapping: ValidatedMapping) -> None:
        self._state.upsert(
            TABLE_PUBLISHER_SETTINGS, safe_key(publisher_id), _MAPPING_ROW, {"mapping": mapping.model_dump_json()}
        )

    def delete(self, publisher_id: str) -> bool:
        return self._state.delete(TABLE_PUBLISHER_SETTINGS, safe_key(publisher_id), _MAPPING_ROW)
