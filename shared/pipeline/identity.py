"""Lead ids for the ingest endpoint (architecture §3): content-derived ids, ``Idempotency-Key``, and seen ids.

The marketplace's HTTPS-endpoint payload carries no lead id and may be posted again after a timeout,
so a lead posted without ``leadId`` takes an id derived from the publisher id and the lead's
*canonical form* (:func:`canonical_form`): the same lead, however its keys are cased or ordered, always
gets the same id, and the idempotent write (architecture §4) makes it one lead in the CRM.

:class:`SeenIds` is the port that tells the ingest route whether it has answered an id before (the
queue port does not say when its duplicate detection dropped a send); :class:`SqliteSeenIds` keeps
them in the data dir. Everything above it is pure. This module must not import the API, the
transports or the CRM client.
"""

from __future__ import annotations

import hashlib
import json
import math
import sqlite3
import threading
import time
import unicodedata
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Final, Protocol, runtime_checkable

from shared.errors import InvalidInput
from shared.names import TABLE_INGEST_IDS
from shared.state.base import StateConflict, StateNotFound, StatePreconditionFailed, StateStore, safe_key

#: Bumped only if the canonical form ever changes: ids of the old form then stay distinct from the new.
CANONICAL_VERSION: Final = 1
#: Content-derived ids start with this, so they read as what they are next to marketplace lead ids.
CONTENT_ID_PREFIX: Final = f"c{CANONICAL_VERSION}-"
#: The longest ``Idempotency-Key`` accepted (the bound of a ``leadId``, architecture §3).
MAX_IDEMPOTENCY_KEY_LENGTH: Final = 200
IDEMPOTENCY_KEY_HEADER: Final = "Idempotency-Key"

#: How long a seen id is remembered. A marketplace retry comes within minutes; past this, a repost is
#: still one lead in the CRM (the idempotent write), it is only answered as new.
SEEN_RETENTION_SECONDS: Final = 7 * 24 * 3600.0
_PRUNE_INTERVAL = 3600.0


class InvalidIdempotencyKey(InvalidInput):
    """The ``Idempotency-Key`` header is empty, too long or not printable (answered 422)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, field=IDEMPOTENCY_KEY_HEADER)


# --------------------------------------------------------------------------------------------------
# Canonical form and ids (pure)
# --------------------------------------------------------------------------------------------------


def _text(value: str) -> str:
    return unicodedata.normalize("NFC", value).strip()


def _key(value: str) -> str:
    # Case folding after NFC can leave a string that is not NFC ("ǰ" folds to "ǰ"): normalise again.
    return unicodedata.normalize("NFC", _text(value).casefold())


def _encode(value: Any) -> str:
    """The canonical JSON text of one value. Raises ValueError for what JSON cannot hold."""
    if value is None or isinstance(value, bool):
        return json.dumps(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError("NaN and Infinity have no canonical form (JSON does not allow them)")
        # JSON has one number type: 1.0 and 1 are the same number.
        return str(int(value)) if value.is_integer() else repr(value)
    if isinstance(value, str):
        # ASCII escapes: the canonical text is plain ASCII, lone surrogates included.
        return json.dumps(_text(value), ensure_ascii=True)
    if isinstance(value, Mapping):
        members = []
        for key, member in value.items():
            if member is None:
                continue  # a null member is a missing one, as the lead parser reads it
            if not isinstance(key, str):
                raise ValueError(f"object keys must be strings, got {type(key).__name__}")
            members.append((json.dumps(_key(key), ensure_ascii=True), _encode(member)))
        # Sorting whole members (key, then value) keeps keys that fold to the same text in an order
        # that does not depend on the order they arrived in.
        members.sort()
        return "{" + ",".join(f"{key}:{member}" for key, member in members) + "}"
    if isinstance(value, list | tuple):
        return "[" + ",".join(_encode(item) for item in value) + "]"
    raise ValueError(f"{type(value).__name__} has no JSON form")


def canonical_form(lead: Mapping[str, Any]) -> str:
    """The canonical JSON text of a marketplace lead object.

    Object keys are NFC-normalised, trimmed and case-folded (so ``UserDetails`` and ``userDetails`` are
    one key); members with a null value are left out; strings are NFC-normalised and trimmed; numbers
    are written as JSON numbers with ``1.0`` equal to ``1``; members are sorted, so key order does not
    matter; array order does. The text is ASCII.

    Raises ValueError for a value JSON cannot hold (NaN, Infinity, a non-string key, a Python object).
    """
    if not isinstance(lead, Mapping):
        raise ValueError(f"a lead is a JSON object, got {type(lead).__name__}")
    return _encode(lead)


def content_lead_id(publisher_id: str, lead: Mapping[str, Any]) -> str:
    """The lead id of a lead posted without one: ``c1-`` and the SHA-256 (hex) of the publisher id and
    :func:`canonical_form` of ``lead``. Same publisher and same canonical form ⇔ same id.

    Raises ValueError like :func:`canonical_form`.
    """
    digest = hashlib.sha256()
    # The publisher id is length-prefixed, so no (publisher, lead) pair can be read as another.
    digest.update(f"leadwriter/lead/v{CANONICAL_VERSION}\n{len(publisher_id)}:{publisher_id}\n".encode())
    digest.update(canonical_form(lead).encode("ascii"))
    return CONTENT_ID_PREFIX + digest.hexdigest()


def check_idempotency_key(value: str) -> str:
    """``value`` when it is a usable ``Idempotency-Key``: 1 to 200 printable characters after trimming.

    Raises InvalidIdempotencyKey (field ``Idempotency-Key``) otherwise.
    """
    key = value.strip()
    if not key:
        raise InvalidIdempotencyKey(f"the {IDEMPOTENCY_KEY_HEADER} header is empty")
    if len(key) > MAX_IDEMPOTENCY_KEY_LENGTH:
        raise InvalidIdempotencyKey(
            f"the {IDEMPOTENCY_KEY_HEADER} header is {len(key)} characters long; "
            f"at most {MAX_IDEMPOTENCY_KEY_LENGTH} are allowed"
        )
    if not key.isprintable():
        raise InvalidIdempotencyKey(f"the {IDEMPOTENCY_KEY_HEADER} header must hold printable characters only")
    return key


# --------------------------------------------------------------------------------------------------
# Seen ids (the port and its SQLite adapter)
# --------------------------------------------------------------------------------------------------


@runtime_checkable
class SeenIds(Protocol):
    """Which (publisher, lead id) pairs the ingest endpoint has accepted before.

    ``first_time`` records the pair and answers True exactly once per pair, even when two callers ask
    at the same moment (the write is conditional); every later call answers False.
    """

    def first_time(self, publisher_id: str, lead_id: str) -> bool: ...


class SqliteSeenIds:
    """:class:`SeenIds` in a SQLite file (the data dir on the embedded default), shared by the
    processes of one machine. Pairs older than ``retention`` seconds are forgotten.

    The file is created on first use.
    """

    def __init__(
        self,
        path: Path,
        *,
        retention: float = SEEN_RETENTION_SECONDS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = Path(path)
        self._retention = retention
        self._clock = clock
        self._lock = threading.Lock()
        self._next_prune = 0.0
        self._ready = False

    def _ensure_table(self) -> None:
        # On first use, not in __init__: building the API must not touch the disk.
        with self._lock:
            if self._ready:
                return
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = self._connect()
            try:
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute(
                    "CREATE TABLE IF NOT EXISTS seen_ids (publisher_id TEXT NOT NULL, lead_id TEXT NOT NULL, "
                    "seen_at REAL NOT NULL, PRIMARY KEY (publisher_id, lead_id)) WITHOUT ROWID"
                )
                conn.execute("CREATE INDEX IF NOT EXISTS seen_ids_by_time ON seen_ids (seen_at)")
            finally:
                conn.close()
            self._ready = True

    def _connect(self) -> sqlite3.Connection:
        # A connection per call: one small write per ingest, and no connection left to any thread.
        return sqlite3.connect(self.path, timeout=30.0, isolation_level=None)

    def first_time(self, publisher_id: str, lead_id: str) -> bool:
        """True when the pair was not seen within the retention (and records it).

        Raises sqlite3.Error (or OSError) when the file cannot be written.
        """
        self._ensure_table()
        now = self._clock()
        cutoff = now - self._retention
        conn = self._connect()
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.execute(
                    "DELETE FROM seen_ids WHERE publisher_id = ? AND lead_id = ? AND seen_at <= ?",
                    (publisher_id, lead_id, cutoff),
                )
                inserted = conn.execute(
                    "INSERT OR IGNORE INTO seen_ids (publisher_id, lead_id, seen_at) VALUES (?, ?, ?)",
                    (publisher_id, lead_id, now),
                ).rowcount
                with self._lock:
                    prune, self._next_prune = now >= self._next_prune, max(self._next_prune, now + _PRUNE_INTERVAL)
                if prune:
                    conn.execute("DELETE FROM seen_ids WHERE seen_at <= ?", (cutoff,))
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
        finally:
            conn.close()
        return inserted == 1


class StateSeenIds:
    """:class:`SeenIds` in the shared state store (table ``ingestids``, a row per publisher and lead
    id): every process and every Azure instance answers the same. The first record is a conditional
    insert, so two POSTs at the same moment get one "first time"; a pair older than ``retention`` is
    taken over by an ETag-conditional replace."""

    def __init__(
        self,
        state: StateStore,
        *,
        retention: float = SEEN_RETENTION_SECONDS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._state = state
        self._retention = retention
        self._clock = clock

    def first_time(self, publisher_id: str, lead_id: str) -> bool:
        """True when the pair was not seen within the retention (and records it). Raises what the
        state store raises (StateUnavailable: the caller answers 503)."""
        partition, row, now = safe_key(publisher_id), safe_key(lead_id), self._clock()
        try:
            self._state.insert(TABLE_INGEST_IDS, partition, row, {"seenAt": now})
            return True
        except StateConflict:
            pass
        entity = self._state.get(TABLE_INGEST_IDS, partition, row)
        if entity is None or float(entity.data.get("seenAt", now)) > now - self._retention:
            return False
        try:
            self._state.replace(TABLE_INGEST_IDS, partition, row, {"seenAt": now}, etag=entity.etag)
        except (StatePreconditionFailed, StateNotFound):
            return False
        return True
