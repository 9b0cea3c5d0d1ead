"""The embedded broker: Service Bus queue semantics on one SQLite file (architecture §2, embedded default).

One table holds every message of every queue; a message is *active* (visible, scheduled or locked)
or *dead-lettered* (the queue's dead-letter sub-queue). A lock is a token plus an expiry: a locked
message simply has ``visible_at`` in the future, so lock expiry needs no sweeper — the message is
visible again the moment its lock runs out, exactly as on Service Bus.

Durability: the database runs in WAL mode with ``synchronous=NORMAL``. In WAL mode a committed
transaction is in the WAL file (in the OS page cache) before ``COMMIT`` returns; NORMAL only skips
the fsync at each commit. So a crash — even a SIGKILL — of *any process* loses nothing that was
committed; only an OS crash or power loss can roll back the last transactions. That is the
trade-off the embedded default makes for its per-message cost (a test SIGKILLs a receiver).

Concurrency: several threads and several processes may share one file. Each thread has its own
connection; everything that reads-then-writes runs in ``BEGIN IMMEDIATE`` so two receivers never
lock the same message; ``busy_timeout`` makes writers queue rather than fail. Receivers waiting in
this process are woken at once by senders in this process (a condition per queue); messages sent by
another process, locks that expire and scheduled messages that fall due are seen by a short poll
(every POLL_INTERVAL, by one waiting receiver per queue, so idle cost does not grow with threads).
Call ``close`` after the threads using the broker have stopped.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from shared import datadir
from shared.errors import BrokerClosed, DeadLetterReason
from shared.names import PROP_DEFERRALS, PROP_PUBLISHER_ID, STAGE_QUEUES
from shared.transport.base import LockLost, OutgoingMessage, PropertyValue, QueueStats, ReceivedMessage

logger = logging.getLogger(__name__)

#: How often a waiting receiver looks for messages it cannot be woken for (other processes' sends,
#: expired locks, scheduled messages falling due).
POLL_INTERVAL = 0.05

_ACTIVE = 0
_DEAD = 1

#: Service Bus's own dead-letter descriptions for the reasons the broker sets itself.
TTL_EXPIRED_DESCRIPTION = "The message expired and was dead lettered."
MAX_DELIVERY_DESCRIPTION = "Message could not be consumed after {count} delivery attempts."

_SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    seq            INTEGER PRIMARY KEY AUTOINCREMENT,
    queue          TEXT    NOT NULL,
    state          INTEGER NOT NULL,
    message_id     TEXT    NOT NULL,
    body           BLOB    NOT NULL,
    properties     TEXT    NOT NULL,
    content_type   TEXT,
    enqueued_at    REAL    NOT NULL,
    visible_at     REAL    NOT NULL,
    expires_at     REAL,
    delivery_count INTEGER NOT NULL DEFAULT 0,
    lock_token     TEXT,
    locked_until   REAL,
    dl_reason      TEXT,
    dl_description TEXT
);
CREATE INDEX IF NOT EXISTS messages_visible ON messages (queue, state, visible_at);
CREATE TABLE IF NOT EXISTS dedup (
    queue      TEXT NOT NULL,
    message_id TEXT NOT NULL,
    sent_at    REAL NOT NULL,
    PRIMARY KEY (queue, message_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS dedup_sent_at ON dedup (sent_at);
CREATE TABLE IF NOT EXISTS queues (
    name               TEXT PRIMARY KEY,
    lock_duration      REAL,
    max_delivery_count INTEGER
);
"""

# Every statement is a literal (values are bound, never formatted in). Rows read as messages always
# select these columns in this order: see _message().
_PROBE = "SELECT 1 FROM messages WHERE queue = ? AND state = ? AND visible_at <= ? LIMIT 1"
_CANDIDATES = (
    "SELECT seq, message_id, body, properties, content_type, enqueued_at, delivery_count, expires_at,"
    " dl_reason, dl_description FROM messages WHERE queue = ? AND state = ? AND visible_at <= ?"
    " ORDER BY visible_at, seq LIMIT ?"
)
_PEEK_DEAD = (
    "SELECT seq, message_id, body, properties, content_type, enqueued_at, delivery_count, expires_at,"
    " dl_reason, dl_description FROM messages WHERE queue = ? AND state = 1 AND seq >= ?"
    " ORDER BY seq LIMIT ?"
)
# ?2 reason, ?3 JSON path of the publisher id property, ?4 publisher id; NULL means "any".
_FILTER_DEAD = (
    "SELECT seq, message_id, body, properties, content_type, enqueued_at, delivery_count, expires_at,"
    " dl_reason, dl_description FROM messages WHERE queue = ?1 AND state = 1"
    " AND (?2 IS NULL OR dl_reason = ?2) AND (?4 IS NULL OR json_extract(properties, ?3) = ?4)"
    " ORDER BY seq LIMIT ?5"
)
_LOCK = (
    "UPDATE messages SET delivery_count = delivery_count + 1, lock_token = ?, locked_until = ?,"
    " visible_at = ? WHERE seq = ?"
)
_MOVE_TO_DEAD = (
    "UPDATE messages SET state = 1, dl_reason = ?, dl_description = ?, lock_token = NULL,"
    " locked_until = NULL, visible_at = ? WHERE seq = ?"
)
_INSERT = (
    "INSERT INTO messages (queue, state, message_id, body, properties, content_type, enqueued_at,"
    " visible_at, expires_at, publisher) VALUES (?, 0, ?, ?, ?, ?, ?, ?, ?, ?)"
)
# The publisher id property in a column of its own (a healed CRM's scheduled retries are
# found by publisher). Added to files made before it, and filled from the properties, on open.
_ADD_PUBLISHER = "ALTER TABLE messages ADD COLUMN publisher TEXT"
_FILL_PUBLISHER = "UPDATE messages SET publisher = json_extract(properties, ?) WHERE publisher IS NULL"
_INDEX_PUBLISHER = (
    "CREATE INDEX IF NOT EXISTS messages_publisher ON messages (publisher, queue, state, visible_at)"
)
# A retry waiting out the backoff = active, unlocked, not visible yet (a locked message has a lock
# token; an abandoned or expired-lock one is visible already), and not a deferred copy (one that
# carries the deferrals property waits for a penalty or pacing, not for the CRM to heal).
# ?1 now, ?2 publisher, ?3 queue, ?4 limit, ?5 JSON path of the deferrals property.
_RELEASE = (
    "UPDATE messages SET visible_at = ?1 WHERE seq IN (SELECT seq FROM messages WHERE publisher = ?2"
    " AND queue = ?3 AND state = 0 AND lock_token IS NULL AND visible_at > ?1"
    " AND json_extract(properties, ?5) IS NULL ORDER BY visible_at, seq LIMIT ?4)"
)
# ?1 publisher, ?2 now, ?3 the stage queues as a JSON array, ?4 JSON path of the deferrals property.
_SCHEDULED_OF = (
    "SELECT COUNT(*), MIN(visible_at) FROM messages WHERE publisher = ?1"
    " AND queue IN (SELECT value FROM json_each(?3)) AND state = 0 AND lock_token IS NULL AND visible_at > ?2"
    " AND json_extract(properties, ?4) IS NULL"
)
# Accepted when the id is new, or was last accepted before the window began; otherwise no row changes.
_DEDUP = (
    "INSERT INTO dedup (queue, message_id, sent_at) VALUES (?, ?, ?)"
    " ON CONFLICT (queue, message_id) DO UPDATE SET sent_at = excluded.sent_at WHERE dedup.sent_at <= ?"
)
# Settlement holds only while the lock token matches and has not expired: "seq, token, now" last.
_COMPLETE = "DELETE FROM messages WHERE seq = ? AND lock_token = ? AND locked_until > ?"
_ABANDON = (
    "UPDATE messages SET lock_token = NULL, locked_until = NULL, visible_at = ?"
    " WHERE seq = ? AND lock_token = ? AND locked_until > ?"
)
_DEAD_LETTER = (
    "UPDATE messages SET state = 1, dl_reason = ?, dl_description = ?, lock_token = NULL,"
    " locked_until = NULL, visible_at = ? WHERE state = 0 AND seq = ? AND lock_token = ? AND locked_until > ?"
)
_RENEW = (
    "UPDATE messages SET locked_until = ?, visible_at = ?"
    " WHERE seq = ? AND lock_token = ? AND locked_until > ?"
)
_EXPIRED_PROBE = (
    "SELECT 1 FROM messages WHERE queue = ? AND state = 0 AND visible_at <= ? AND expires_at <= ? LIMIT 1"
)
_EXPIRE = (
    "UPDATE messages SET state = 1, dl_reason = ?, dl_description = ?, lock_token = NULL,"
    " locked_until = NULL, visible_at = ?"
    " WHERE queue = ? AND state = 0 AND visible_at <= ? AND expires_at <= ?"
)
_COUNT_HELD = "SELECT COUNT(*) FROM messages WHERE queue = ? AND state = 0"
_COUNT_SCHEDULED = (
    "SELECT COUNT(*) FROM messages WHERE queue = ? AND state = 0 AND visible_at > ? AND delivery_count = 0"
)
_CONFIGURE = (
    "INSERT INTO queues (name, lock_duration, max_delivery_count) VALUES (?, ?, ?)"
    " ON CONFLICT (name) DO UPDATE SET lock_duration = excluded.lock_duration,"
    " max_delivery_count = excluded.max_delivery_count"
)
_COUNT_PUBLISHER = (
    "SELECT COUNT(*) FROM messages WHERE queue = ? AND state = 0 AND json_extract(properties, ?) = ?"
)
_COUNT_DEAD = "SELECT dl_reason, COUNT(*) FROM messages WHERE queue = ? AND state = 1 GROUP BY dl_reason"

_DEFERRALS_PATH = f'$."{PROP_DEFERRALS}"'

#: Prune the duplicate-detection history at most this often (seconds of broker clock).
_DEDUP_PRUNE_INTERVAL = 60.0


@dataclass(frozen=True)
class QueueConfig:
    """Per-queue settings: how long a receive locks a message and how often it may be delivered."""

    lock_duration: float
    max_delivery_count: int


class _Signal:
    """Wakes receivers of one (sub-)queue in this process; ``generation`` closes the lost-wakeup gap.

    Of the receivers waiting here, only the ``poller`` looks at the database every POLL_INTERVAL
    (for other processes' sends, expired locks, due schedules); the others sleep until woken, so
    idle cost does not grow with the number of worker threads. A receiver that leaves while no one
    polls wakes a successor, so messages only the poller could see reach every waiter.
    """

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.generation = 0
        self.poller: int | None = None


def _publisher_of(message: OutgoingMessage) -> str | None:
    value = message.application_properties.get(PROP_PUBLISHER_ID)
    return None if value is None else str(value)


def _utc(timestamp: float) -> datetime:
    return datetime.fromtimestamp(timestamp, UTC)


def _timestamp(moment: datetime) -> float:
    # A naive datetime is taken as UTC, the only zone OutgoingMessage speaks.
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()


class EmbeddedBroker:
    """A :class:`~shared.transport.base.Transport` on a SQLite file, safe across threads and processes.

    ``clock`` (seconds since the epoch) decides visibility, locks, schedules, TTL and duplicate
    windows, so tests can drive time; ``max_wait`` waits always use the real monotonic clock.
    Queues are created on first use.
    """

    def __init__(
        self,
        path: Path,
        *,
        lock_duration: float = 60.0,
        max_delivery_count: int = 10,
        duplicate_window: float = 600.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if lock_duration <= 0:
            raise ValueError("lock_duration must be positive")
        if max_delivery_count < 1:
            raise ValueError("max_delivery_count must be at least 1")
        self.path = Path(path)
        # The broker holds leads (names, e-mail addresses): a private directory, a 0600 file (its -wal
        # and -shm files copy the mode), and a read-only directory refused here rather than per lead.
        datadir.prepare(self.path.parent)
        datadir.private_file(self.path)
        self._default = QueueConfig(lock_duration, max_delivery_count)
        self._duplicate_window = duplicate_window
        self._clock = clock
        self._local = threading.local()
        self._lock = threading.Lock()
        self._connections: list[tuple[threading.Thread, sqlite3.Connection]] = []
        self._configs: dict[str, QueueConfig] = {}
        self._signals: dict[tuple[str, int], _Signal] = {}
        self._next_prune = 0.0
        self._closed = False
        # Not executescript: it would commit outside our IMMEDIATE transaction.
        with self._transaction(self._conn()) as conn:
            for statement in filter(str.strip, _SCHEMA.split(";")):
                conn.execute(statement)
            columns = {row[1] for row in conn.execute("PRAGMA table_info(messages)")}
            if "publisher" not in columns:
                conn.execute(_ADD_PUBLISHER)
                conn.execute(_FILL_PUBLISHER, (f'$."{PROP_PUBLISHER_ID}"',))
            conn.execute(_INDEX_PUBLISHER)

    # -- connections -------------------------------------------------------------------------------

    def _conn(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is not None:
            if self._closed:
                raise BrokerClosed("the embedded broker is closed")
            return conn
        with self._lock:
            if self._closed:
                raise BrokerClosed("the embedded broker is closed")
            conn = sqlite3.connect(
                self.path,
                timeout=30.0,
                isolation_level=None,
                check_same_thread=False,
                cached_statements=64,
            )
            conn.execute("PRAGMA journal_mode=WAL")
            # Safe against a crash of any process (see module docstring); only an OS crash can lose
            # the last commits.
            conn.execute("PRAGMA synchronous=NORMAL")
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

    @staticmethod
    @contextmanager
    def _transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
        # Writers, in this process or another, queue through busy_timeout. (Serialising this
        # process's writers on a Python lock first was measured: slower, and more CPU per lead.)
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def close(self) -> None:
        """Close every connection this broker opened and wake its waiting receivers."""
        with self._lock:
            self._closed = True
            connections, self._connections = self._connections, []
            signals = list(self._signals.values())
        for _, conn in connections:
            conn.close()
        for signal in signals:
            with signal.cond:
                signal.generation += 1
                signal.cond.notify_all()

    def __enter__(self) -> EmbeddedBroker:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- queue configuration ---------------------------------------------------------------------

    def configure_queue(
        self, queue: str, *, lock_duration: float | None = None, max_delivery_count: int | None = None
    ) -> None:
        """Override the lock duration and/or max delivery count of one queue (persisted in the file).

        Other processes pick an override up the first time they use the queue. Raises ValueError on
        a non-positive value.
        """
        if lock_duration is not None and lock_duration <= 0:
            raise ValueError("lock_duration must be positive")
        if max_delivery_count is not None and max_delivery_count < 1:
            raise ValueError("max_delivery_count must be at least 1")
        current = self._config(queue)
        config = QueueConfig(
            current.lock_duration if lock_duration is None else lock_duration,
            current.max_delivery_count if max_delivery_count is None else max_delivery_count,
        )
        self._conn().execute(_CONFIGURE, (queue, config.lock_duration, config.max_delivery_count))
        with self._lock:
            self._configs[queue] = config

    def _config(self, queue: str) -> QueueConfig:
        config = self._configs.get(queue)
        if config is None:
            row = self._conn().execute(
                "SELECT lock_duration, max_delivery_count FROM queues WHERE name = ?", (queue,)
            ).fetchone()
            config = self._default
            if row is not None:
                config = QueueConfig(
                    row[0] if row[0] is not None else config.lock_duration,
                    row[1] if row[1] is not None else config.max_delivery_count,
                )
            with self._lock:
                self._configs[queue] = config
        return config

    # -- waking receivers ------------------------------------------------------------------------

    def _signal(self, queue: str, state: int) -> _Signal:
        key = (queue, state)
        signal = self._signals.get(key)
        if signal is None:
            with self._lock:
                signal = self._signals.setdefault(key, _Signal())
        return signal

    def _notify(self, queue: str, state: int, count: int) -> None:
        signal = self._signals.get((queue, state))
        if signal is None or count <= 0:
            return
        with signal.cond:
            signal.generation += 1
            signal.cond.notify(count)

    # -- sending ---------------------------------------------------------------------------------

    def send(self, queue: str, messages: Sequence[OutgoingMessage]) -> None:
        """Send messages in one transaction: all of them are stored, or none.

        A message id already accepted on this queue within the duplicate window is dropped
        silently, as Service Bus does. Raises sqlite3.Error if the database cannot be written.
        """
        if not messages:
            return
        conn = self._conn()
        with self._transaction(conn):
            stored = self._insert(conn, queue, messages)
        self._notify(queue, _ACTIVE, stored)

    def send_and_complete(self, queue: str, messages: Sequence[OutgoingMessage], message: ReceivedMessage) -> None:
        """Send ``messages`` to ``queue`` and complete the locked ``message``, in one transaction: both
        happen, or neither (the message then stays locked and is delivered again; the copies sent then
        are new). What :func:`shared.pipeline.settle.settle` does for a forward or a rescheduled copy:
        one commit instead of two, and no window between the send and the complete.

        Raises LockLost (nothing sent) if the lock expired or the message was settled already;
        ValueError for a peeked message; sqlite3.Error if the database cannot be written.
        """
        token = self._token(message)
        conn = self._conn()
        with self._transaction(conn):
            stored = self._insert(conn, queue, messages)
            self._settle(_COMPLETE, (message.sequence_number, token, self._clock()), message)
        self._notify(queue, _ACTIVE, stored)

    def _insert(self, conn: sqlite3.Connection, queue: str, messages: Sequence[OutgoingMessage]) -> int:
        """Store ``messages`` inside the caller's transaction, dropping duplicates; how many were stored."""
        now = self._clock()
        cutoff = now - self._duplicate_window
        rows: list[tuple[Any, ...]] = []
        for message in messages:
            if self._duplicate_window > 0 and conn.execute(
                _DEDUP, (queue, message.message_id, now, cutoff)
            ).rowcount == 0:
                logger.debug("dropped duplicate message %s on %s", message.message_id, queue)
                continue
            visible_at = now
            if message.scheduled_enqueue_time is not None:
                visible_at = max(now, _timestamp(message.scheduled_enqueue_time))
            # Service Bus counts time to live from the (scheduled) enqueue time.
            expires_at = visible_at + message.time_to_live if message.time_to_live is not None else None
            rows.append(
                (
                    queue,
                    message.message_id,
                    message.body,
                    json.dumps(dict(message.application_properties), separators=(",", ":")),
                    message.content_type,
                    visible_at,
                    visible_at,
                    expires_at,
                    _publisher_of(message),
                )
            )
        if rows:
            conn.executemany(_INSERT, rows)
        if self._duplicate_window > 0 and now >= self._next_prune:
            self._next_prune = now + _DEDUP_PRUNE_INTERVAL
            conn.execute("DELETE FROM dedup WHERE sent_at <= ?", (cutoff,))
        return len(rows)

    # -- releasing scheduled messages ---------------------------------------------------

    def release_scheduled(self, queue: str, publisher_id: str, max_messages: int) -> int:
        """Bring up to ``max_messages`` of the publisher's scheduled retries on ``queue`` forward to
        now (earliest due first) by moving their visible time; returns how many. Deferred copies
        (waiting for a penalty or pacing, not for the CRM) are left alone. The message keeps
        its id and attempt: it is the same message, only due sooner. Raises sqlite3.Error."""
        if max_messages < 1:
            return 0
        conn = self._conn()
        with self._transaction(conn):
            released = conn.execute(
                _RELEASE, (self._clock(), publisher_id, queue, max_messages, _DEFERRALS_PATH)
            ).rowcount
        self._notify(queue, _ACTIVE, released)
        return int(released)

    def scheduled_of(self, publisher_id: str) -> tuple[int, datetime | None]:
        """The publisher's scheduled retries (not deferred copies) on the stage queues, and the
        earliest due time."""
        row = self._conn().execute(
            _SCHEDULED_OF, (publisher_id, self._clock(), json.dumps(STAGE_QUEUES), _DEFERRALS_PATH)
        ).fetchone()
        count = int(row[0] or 0)
        return count, (_utc(row[1]) if count and row[1] is not None else None)

    # -- receiving -------------------------------------------------------------------------------

    def receive(self, queue: str, max_messages: int = 1, max_wait: float = 0.0) -> list[ReceivedMessage]:
        """Peek-lock up to ``max_messages`` visible messages, waiting up to ``max_wait`` seconds for one.

        Expired messages met on the way are dead-lettered ``TTLExpiredException``, messages that
        were delivered ``max_delivery_count`` times ``MaxDeliveryCountExceeded``. Raises ValueError
        when ``max_messages`` < 1 and RuntimeError once the broker is closed.
        """
        return self._receive(queue, _ACTIVE, max_messages, max_wait)

    def receive_dead_letters(
        self, queue: str, max_messages: int = 100, max_wait: float = 0.0
    ) -> list[ReceivedMessage]:
        """Peek-lock dead letters of ``queue``; complete removes one, abandon releases it.

        Raises ValueError when ``max_messages`` < 1 and RuntimeError once the broker is closed.
        """
        return self._receive(queue, _DEAD, max_messages, max_wait)

    def _receive(self, queue: str, state: int, max_messages: int, max_wait: float) -> list[ReceivedMessage]:
        if max_messages < 1:
            raise ValueError("max_messages must be at least 1")
        deadline = time.monotonic() + max(0.0, max_wait)
        signal = self._signal(queue, state)
        me = threading.get_ident()
        try:
            while True:
                seen = signal.generation
                received = self._claim(queue, state, max_messages)
                if received:
                    return received
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return []
                with signal.cond:
                    if signal.generation == seen and not self._closed:
                        if signal.poller is None:
                            signal.poller = me
                        signal.cond.wait(min(remaining, POLL_INTERVAL) if signal.poller == me else remaining)
        finally:
            # Leaving: if nobody polls now, wake a waiter to take over (it also takes what we left).
            with signal.cond:
                if signal.poller == me:
                    signal.poller = None
                if signal.poller is None:
                    signal.cond.notify(1)

    def _claim(self, queue: str, state: int, max_messages: int) -> list[ReceivedMessage]:
        conn = self._conn()
        # A plain read first: an idle receiver must not take the write lock every poll.
        if conn.execute(_PROBE, (queue, state, self._clock())).fetchone() is None:
            return []
        config = self._config(queue)
        claimed: list[ReceivedMessage] = []
        dead_lettered = 0
        with self._transaction(conn):
            now = self._clock()
            locked_until = now + config.lock_duration
            while len(claimed) < max_messages:
                rows = conn.execute(_CANDIDATES, (queue, state, now, max_messages - len(claimed))).fetchall()
                if not rows:
                    break
                moved: list[tuple[str, str, float, int]] = []
                locks: list[tuple[str, float, float, int]] = []
                for row in rows:
                    seq, delivery_count, expires_at = row[0], row[6], row[7]
                    if state == _ACTIVE and expires_at is not None and expires_at <= now:
                        moved.append((DeadLetterReason.TTL_EXPIRED, TTL_EXPIRED_DESCRIPTION, now, seq))
                    elif state == _ACTIVE and delivery_count >= config.max_delivery_count:
                        description = MAX_DELIVERY_DESCRIPTION.format(count=config.max_delivery_count)
                        moved.append((DeadLetterReason.MAX_DELIVERY_COUNT_EXCEEDED, description, now, seq))
                    else:
                        token = str(uuid.uuid4())
                        locks.append((token, locked_until, locked_until, seq))
                        claimed.append(
                            self._message(queue, row, state, token, locked_until, delivery_count + 1)
                        )
                if moved:
                    conn.executemany(_MOVE_TO_DEAD, moved)
                    dead_lettered += len(moved)
                if locks:
                    conn.executemany(_LOCK, locks)
                if not moved:
                    break
        if dead_lettered:
            logger.info("dead-lettered %d expired or undeliverable messages on %s", dead_lettered, queue)
            self._notify(queue, _DEAD, dead_lettered)
        return claimed

    @staticmethod
    def _message(
        queue: str,
        row: Sequence[Any],
        state: int,
        lock_token: str | None,
        locked_until: float | None,
        delivery_count: int,
    ) -> ReceivedMessage:
        properties: dict[str, PropertyValue] = json.loads(row[3])
        return ReceivedMessage(
            queue=queue,
            body=row[2],
            message_id=row[1],
            application_properties=properties,
            content_type=row[4],
            delivery_count=delivery_count,
            enqueued_time=_utc(row[5]),
            sequence_number=row[0],
            lock_token=lock_token,
            locked_until=_utc(locked_until) if locked_until is not None else None,
            dead_letter_reason=row[8],
            dead_letter_description=row[9],
            from_dead_letter=state == _DEAD,
        )

    # -- settling --------------------------------------------------------------------------------

    @staticmethod
    def _token(message: ReceivedMessage) -> str:
        if message.lock_token is None:
            raise ValueError("a peeked message holds no lock and cannot be settled")
        return message.lock_token

    def _settle(self, sql: str, params: tuple[Any, ...], message: ReceivedMessage) -> None:
        if self._conn().execute(sql, params).rowcount == 0:
            raise LockLost(
                f"the lock on message {message.message_id} (sequence {message.sequence_number}) "
                f"on {message.queue} expired or the message was settled already"
            )

    def complete(self, message: ReceivedMessage) -> None:
        """Remove a locked message (or a locked dead letter).

        Raises LockLost if the lock expired or the message was settled already; ValueError for a
        peeked message.
        """
        token = self._token(message)
        self._settle(_COMPLETE, (message.sequence_number, token, self._clock()), message)

    def complete_many(self, messages: Sequence[ReceivedMessage]) -> list[ReceivedMessage]:
        """Remove several locked messages in one transaction (one write instead of one per message);
        returns those whose lock had expired or that were settled already (left as they are, as
        :meth:`complete` would raise LockLost for each). Raises ValueError for a peeked message (before
        anything is removed) and sqlite3.Error if the database cannot be written (then none is removed).
        """
        if not messages:
            return []
        params = [(message.sequence_number, self._token(message)) for message in messages]
        conn = self._conn()
        lost: list[ReceivedMessage] = []
        with self._transaction(conn):
            now = self._clock()
            for message, (seq, token) in zip(messages, params, strict=True):
                if conn.execute(_COMPLETE, (seq, token, now)).rowcount == 0:
                    lost.append(message)
        return lost

    def abandon(self, message: ReceivedMessage) -> None:
        """Release the lock so the message is delivered again at once.

        Raises LockLost if the lock expired or the message was settled already (as Service Bus
        does); ValueError for a peeked message.
        """
        token = self._token(message)
        now = self._clock()
        self._settle(_ABANDON, (now, message.sequence_number, token, now), message)
        message.locked_until = None
        self._notify(message.queue, _DEAD if message.from_dead_letter else _ACTIVE, 1)

    def dead_letter(self, message: ReceivedMessage, reason: str, description: str) -> None:
        """Move a locked message to the dead-letter sub-queue with ``reason`` and ``description``.

        Raises LockLost if the lock expired or the message was settled already; ValueError for a
        peeked message or one that is a dead letter already.
        """
        if message.from_dead_letter:
            raise ValueError("a message from the dead-letter sub-queue cannot be dead-lettered again")
        token = self._token(message)
        now = self._clock()
        self._settle(_DEAD_LETTER, (reason, description, now, message.sequence_number, token, now), message)
        self._notify(message.queue, _DEAD, 1)

    def renew_lock(self, message: ReceivedMessage) -> None:
        """Extend the lock by the queue's lock duration from now; updates ``message.locked_until``.

        Raises LockLost if the lock expired or the message was settled already; ValueError for a
        peeked message.
        """
        token = self._token(message)
        now = self._clock()
        until = now + self._config(message.queue).lock_duration
        self._settle(_RENEW, (until, until, message.sequence_number, token, now), message)
        message.locked_until = _utc(until)

    # -- dead letters and counts -------------------------------------------------------------------

    def peek_dead_letters(
        self, queue: str, max_messages: int = 100, from_sequence: int = 0
    ) -> list[ReceivedMessage]:
        """Read dead letters without locking them, in sequence order from ``from_sequence`` on."""
        rows = self._conn().execute(_PEEK_DEAD, (queue, from_sequence, max_messages)).fetchall()
        return [self._message(queue, row, _DEAD, None, None, row[6]) for row in rows]

    def dead_letters(
        self,
        queue: str,
        *,
        reason: str | None = None,
        publisher_id: str | None = None,
        limit: int | None = None,
    ) -> list[ReceivedMessage]:
        """Peek dead letters of ``queue`` filtered by reason and ``publisherId`` property, in sequence order.

        An ops helper beyond the Transport port (Service Bus cannot filter server-side).
        """
        rows = self._conn().execute(
            _FILTER_DEAD,
            (queue, reason, f'$."{PROP_PUBLISHER_ID}"', publisher_id, -1 if limit is None else limit),
        ).fetchall()
        return [self._message(queue, row, _DEAD, None, None, row[6]) for row in rows]

    def pending_count(self, queue: str, publisher_id: str) -> int:
        """Messages of one publisher (``publisherId`` property) not yet done on ``queue``: visible,
        locked or scheduled; dead letters are not counted. An ops helper beyond the Transport port.
        """
        row = self._conn().execute(_COUNT_PUBLISHER, (queue, f'$."{PROP_PUBLISHER_ID}"', publisher_id)).fetchone()
        return int(row[0])

    def queue_names(self) -> list[str]:
        """Names of the queues that hold any message (active, scheduled or dead-lettered)."""
        rows = self._conn().execute("SELECT DISTINCT queue FROM messages ORDER BY queue").fetchall()
        return [row[0] for row in rows]

    def stats(self, queue: str) -> QueueStats:
        """Exact active, scheduled and dead-lettered counts, dead letters by reason.

        Messages whose time to live ran out are dead-lettered first, so they count where they are.
        """
        conn = self._conn()
        now = self._clock()
        # Only lock-free expired messages: a locked one stays with its receiver until the lock ends.
        if conn.execute(_EXPIRED_PROBE, (queue, now, now)).fetchone() is not None:
            with self._transaction(conn):
                moved = conn.execute(
                    _EXPIRE, (DeadLetterReason.TTL_EXPIRED, TTL_EXPIRED_DESCRIPTION, now, queue, now, now)
                ).rowcount
            self._notify(queue, _DEAD, moved)
        held = conn.execute(_COUNT_HELD, (queue,)).fetchone()[0]
        scheduled = conn.execute(_COUNT_SCHEDULED, (queue, now)).fetchone()[0]
        by_reason = {
            str(reason): count
            for reason, count in conn.execute(_COUNT_DEAD, (queue,))
        }
        return QueueStats(
            queue=queue,
            active=held - scheduled,
            scheduled=scheduled,
            dead_lettered=sum(by_reason.values()),
            dead_lettered_by_reason=by_reason,
        )
