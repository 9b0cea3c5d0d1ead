"""Delivery status per publisher (DESIGN §6 status route): what a publisher needs to know its leads
are arriving, and what ops need to spot a publisher whose configuration keeps failing.

Fed by the settlement observer of every stage worker; kept in SQLite in the data dir so the API
process and worker processes share it and it survives restarts.
"""

from __future__ import annotations

import sqlite3
import threading
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from shared import datadir
from shared.errors import CONFIGURATION_REASONS
from shared.names import PROP_PUBLISHER_ID
from shared.pipeline.settle import Settled

_SCHEMA = """
CREATE TABLE IF NOT EXISTS publisher_status (
    publisher_id TEXT PRIMARY KEY,
    delivered INTEGER NOT NULL DEFAULT 0,
    last_delivery TEXT,
    last_error TEXT,
    last_error_reason TEXT,
    last_error_at TEXT,
    consecutive_config_failures INTEGER NOT NULL DEFAULT 0
)
"""


@dataclass(frozen=True)
class PublisherStatus:
    publisher_id: str
    delivered: int = 0
    last_delivery: str | None = None
    last_error: str | None = None
    last_error_reason: str | None = None
    last_error_at: str | None = None
    consecutive_config_failures: int = 0


class StatusBook:
    """Counts deliveries and remembers the last error per publisher."""

    def __init__(self, path: Path) -> None:
        # Names and e-mail addresses in the last errors: a private directory and a 0600 file.
        datadir.prepare(path.parent)
        datadir.private_file(path)
        self._path = path
        self._local = threading.local()
        with self._db() as db:
            db.execute(_SCHEMA)

    def _db(self) -> sqlite3.Connection:
        db: sqlite3.Connection | None = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self._path, timeout=30, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            self._local.db = db
        return db

    def observe(self, settled: Settled) -> None:
        """The settlement observer: call it with every :class:`~shared.pipeline.settle.Settled`."""
        publisher = str(settled.message.application_properties.get(PROP_PUBLISHER_ID, "") or "")
        if not publisher:
            return
        now = datetime.now(UTC).isoformat()
        db = self._db()
        if settled.action == "delivered":
            db.execute(
                "INSERT INTO publisher_status (publisher_id, delivered, last_delivery, consecutive_config_failures)"
                " VALUES (?, 1, ?, 0) ON CONFLICT(publisher_id) DO UPDATE SET delivered = delivered + 1,"
                " last_delivery = excluded.last_delivery, consecutive_config_failures = 0",
                (publisher, now),
            )
        elif settled.action in ("dead-lettered", "rescheduled"):
            reason = str(settled.reason or "")
            description = getattr(settled.outcome, "description", reason)
            config = 1 if reason in CONFIGURATION_REASONS else 0
            db.execute(
                "INSERT INTO publisher_status (publisher_id, last_error, last_error_reason, last_error_at,"
                " consecutive_config_failures) VALUES (?, ?, ?, ?, ?) ON CONFLICT(publisher_id) DO UPDATE SET"
                " last_error = excluded.last_error, last_error_reason = excluded.last_error_reason,"
                " last_error_at = excluded.last_error_at,"
                " consecutive_config_failures = CASE WHEN ? THEN consecutive_config_failures + 1"
                " ELSE consecutive_config_failures END",
                (
                    publisher,
                    description,
                    reason if settled.action == "dead-lettered" else "transient",
                    now,
                    config,
                    config,
                ),
            )

    def get(self, publisher_id: str) -> PublisherStatus:
        row = (
            self._db()
            .execute(
                "SELECT publisher_id, delivered, last_delivery, last_error, last_error_reason, last_error_at,"
                " consecutive_config_failures FROM publisher_status WHERE publisher_id = ?",
                (publisher_id,),
            )
            .fetchone()
        )
        return PublisherStatus(*row) if row else PublisherStatus(publisher_id)

    def all(self) -> list[PublisherStatus]:
        rows = (
            self._db()
            .execute(
                "SELECT publisher_id, delivered, last_delivery, last_error, last_error_reason, last_error_at,"
                " consecutive_config_failures FROM publisher_status ORDER BY publisher_id"
            )
            .fetchall()
        )
        return [PublisherStatus(*row) for row in rows]
