"""A lead's journey: every settlement of a lead, kept where every instance can read it.

Fed by the settlement observer of every runtime (:meth:`shared.services.Services.observe`) and kept in
the shared state store, table ``leadjourneys``: partition = ``safe_key(publisherId)``, row =
``safe_key(leadId)`` + ``!-`` + a sortable suffix (the flush time in nanoseconds and a random tag, so
two instances never write the same row). ``safe_key`` never leaves a bare ``!`` followed by ``-``, so
the row prefix of one lead is never the prefix of another lead's rows.

Like :mod:`shared.ops.status`, settlements are buffered in memory and written about once a second:
one insert per lead per flush holding that lead's events of the second (a lead crossing the three
stages within a second costs one write), and never a read. A row holds at most
:data:`MAX_EVENTS_PER_ROW` events, each with bounded text, so it always fits the state port's 64 KiB.
A process killed outright loses at most the last second's events, never a lead.

This module imports nothing from the API and nothing from Azure.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from shared.names import PROP_ATTEMPT, PROP_DEFERRALS, PROP_REPLAY_COUNT, TABLE_LEAD_JOURNEYS
from shared.ops.deadletters import lead_id_of, publisher_id_of
from shared.pipeline.outcomes import Delivered, Reject, Retry, SettleAction
from shared.pipeline.settle import Settled
from shared.state.base import Entity, StateStore, key_text, safe_key

logger = logging.getLogger(__name__)

#: Seconds between writes of the buffered events.
FLUSH_INTERVAL = 1.0
#: Events one row holds; more (a lead deferred many times within a second) go to further rows.
MAX_EVENTS_PER_ROW = 50
#: Characters of a description kept per event (50 events of this size stay far below 64 KiB).
MAX_DESCRIPTION = 400
#: Events kept in memory while the store is down; beyond this the oldest are dropped (logged).
MAX_BUFFERED = 100_000
#: Separates a lead's key from the event suffix; ``safe_key`` output never contains it.
_SEPARATOR = "!-"


@dataclass(frozen=True)
class JourneyEvent:
    """One settlement of a lead."""

    at: str
    stage: str
    #: What settling did: a :class:`~shared.pipeline.outcomes.SettleAction` value.
    action: str
    attempt: int
    replay_count: int = 0
    deferrals: int = 0
    reason: str | None = None
    description: str | None = None
    message_id: str | None = None
    #: The Dataverse record id, once the lead is written (or found there).
    record_id: str | None = None
    #: True when this settlement created the record, False when it was there already.
    created: bool | None = None
    #: Seconds a rescheduled copy waits.
    delay: float | None = None

    def to_json(self) -> dict[str, Any]:
        """camelCase keys; absent values left out."""
        data = {
            "at": self.at,
            "stage": self.stage,
            "action": self.action,
            "attempt": self.attempt,
            "replayCount": self.replay_count,
            "deferrals": self.deferrals,
            "reason": self.reason,
            "description": self.description,
            "messageId": self.message_id,
            "recordId": self.record_id,
            "created": self.created,
            "delay": self.delay,
        }
        return {key: value for key, value in data.items() if value is not None}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> JourneyEvent:
        """Inverse of :meth:`to_json`; tolerant of missing keys (an older row)."""
        delay = data.get("delay")
        created = data.get("created")
        return cls(
            at=str(data.get("at", "")),
            stage=str(data.get("stage", "")),
            action=str(data.get("action", "")),
            attempt=_int(data.get("attempt"), 1),
            replay_count=_int(data.get("replayCount"), 0),
            deferrals=_int(data.get("deferrals"), 0),
            reason=_opt_str(data.get("reason")),
            description=_opt_str(data.get("description")),
            message_id=_opt_str(data.get("messageId")),
            record_id=_opt_str(data.get("recordId")),
            created=created if isinstance(created, bool) else None,
            delay=float(delay) if isinstance(delay, int | float) and not isinstance(delay, bool) else None,
        )


@dataclass(frozen=True)
class Journey:
    """Every recorded settlement of one lead, oldest first."""

    publisher_id: str
    lead_id: str
    events: list[JourneyEvent]

    @property
    def record_id(self) -> str | None:
        """The Dataverse record id once a settlement wrote (or found) the lead."""
        return next((e.record_id for e in reversed(self.events) if e.record_id), None)

    @property
    def state(self) -> str:
        """Where the lead is now, in one word: ``delivered``, ``dead-lettered``, ``waiting`` or ``in-flight``."""
        if not self.events:
            return "unknown"
        last = self.events[-1].action
        if last == SettleAction.DELIVERED:
            return "delivered"
        if last == SettleAction.DEAD_LETTERED:
            return "dead-lettered"
        if last == SettleAction.RESCHEDULED:
            return "waiting"
        return "in-flight"

    def to_json(self) -> dict[str, Any]:
        return {
            "publisherId": self.publisher_id,
            "leadId": self.lead_id,
            "state": self.state,
            "recordId": self.record_id,
            "events": [event.to_json() for event in self.events],
        }


def _int(value: Any, default: int) -> int:
    if isinstance(value, bool):
        return default
    if isinstance(value, int):
        return value
    try:
        return int(str(value))
    except (TypeError, ValueError):
        return default


def _opt_str(value: Any) -> str | None:
    return None if value is None or value == "" else str(value)


def lead_prefix(lead_id: str) -> str:
    """The row prefix of every row of ``lead_id`` (unique: no other lead's rows start with it)."""
    return safe_key(lead_id) + _SEPARATOR


def event_of(settled: Settled, *, now: datetime | None = None) -> JourneyEvent:
    """The journey event of one settlement. Raises nothing for any well-formed :class:`Settled`."""
    message = settled.message
    props = message.application_properties
    outcome = settled.outcome
    record_id: str | None = None
    created: bool | None = None
    description: str | None = None
    if isinstance(outcome, Delivered):
        record_id, created = str(outcome.record_id), outcome.created
    elif isinstance(outcome, Reject | Retry):
        description = outcome.description[:MAX_DESCRIPTION]
    reason = settled.reason
    if settled.action is SettleAction.RESCHEDULED:
        reason = None  # the rescheduled Settled carries the description as its reason
    return JourneyEvent(
        at=(now or datetime.now(UTC)).isoformat().replace("+00:00", "Z"),
        stage=str(settled.stage),
        action=str(settled.action),
        attempt=_int(props.get(PROP_ATTEMPT), 1),
        replay_count=_int(props.get(PROP_REPLAY_COUNT), 0),
        deferrals=_int(props.get(PROP_DEFERRALS), 0),
        reason=None if reason is None else str(reason)[:MAX_DESCRIPTION],
        description=description,
        message_id=message.message_id[:200] or None,
        record_id=record_id,
        created=created,
        delay=None if settled.delay is None else round(float(settled.delay), 3),
    )


class JourneyBook:
    """Records settlements per lead and reads a lead's journey back. Thread-safe."""

    def __init__(self, store: StateStore, *, flush_interval: float = FLUSH_INTERVAL) -> None:
        self._store = store
        self._lock = threading.Lock()
        #: (publisher, lead) → events not written yet, oldest first.
        self._pending: dict[tuple[str, str], list[dict[str, Any]]] = {}
        self._buffered = 0
        self._flush_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(flush_interval,), name="lw-journey", daemon=True)
        self._thread.start()

    def observe(self, settled: Settled) -> None:
        """The settlement observer: call it with every :class:`~shared.pipeline.settle.Settled`."""
        publisher = publisher_id_of(settled.message)
        lead = lead_id_of(settled.message) or settled.message.message_id
        if not publisher or not lead:
            return  # nothing to file it under: a body that names neither (its dead letter says why)
        event = event_of(settled).to_json()
        with self._lock:
            if self._buffered >= MAX_BUFFERED:
                logger.warning("journey buffer full (state store down?); dropping an event")
                return
            self._pending.setdefault((publisher, lead), []).append(event)
            self._buffered += 1

    def flush(self) -> None:
        """Write what was buffered. Raises nothing (a state outage keeps the events for the next try)."""
        with self._flush_lock:
            with self._lock:
                pending, self._pending = self._pending, {}
                self._buffered = 0
            for (publisher, lead), events in pending.items():
                written = 0
                try:
                    for start in range(0, len(events), MAX_EVENTS_PER_ROW):
                        chunk = events[start : start + MAX_EVENTS_PER_ROW]
                        self._store.insert(
                            TABLE_LEAD_JOURNEYS,
                            safe_key(publisher),
                            _row(lead),
                            {"publisherId": publisher, "leadId": lead, "events": chunk},
                        )
                        written += len(chunk)
                except Exception:  # noqa: BLE001 - the journey is informational; events wait for the next flush
                    logger.warning("journey events of a lead could not be written; keeping them for later")
                    with self._lock:
                        rest = events[written:]
                        self._pending[(publisher, lead)] = rest + self._pending.get((publisher, lead), [])
                        self._buffered += len(rest)

    def get(self, publisher_id: str, lead_id: str, *, limit: int = 1000) -> Journey:
        """The journey of ``lead_id`` of ``publisher_id``, oldest event first, at most ``limit`` events
        (the newest). Raises StateUnavailable when the store cannot answer; InvalidStateKey for keys
        the store refuses (an id over 1 KiB)."""
        self.flush()
        rows = self._store.query(TABLE_LEAD_JOURNEYS, safe_key(publisher_id), row_prefix=lead_prefix(lead_id))
        return _journey(publisher_id, lead_id, rows, limit)

    def find(self, lead_id: str, *, limit: int = 1000) -> list[Journey]:
        """The journeys of ``lead_id`` under every publisher that has one (usually one), by publisher.

        Reads across partitions (a scan of the table in Table Storage): for the CLI, not for a route.
        Raises StateUnavailable, InvalidStateKey as :meth:`get` does."""
        self.flush()
        rows = self._store.query(TABLE_LEAD_JOURNEYS, None, row_prefix=lead_prefix(lead_id))
        by_publisher: dict[str, list[Entity]] = {}
        for entity in rows:
            by_publisher.setdefault(key_text(entity.partition), []).append(entity)
        return [_journey(publisher, lead_id, found, limit) for publisher, found in sorted(by_publisher.items())]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.flush()

    def _run(self, interval: float) -> None:
        while not self._stop.wait(interval):
            self.flush()


def _journey(publisher_id: str, lead_id: str, rows: list[Entity], limit: int) -> Journey:
    events = [
        JourneyEvent.from_json(item)
        for entity in rows
        for item in entity.data.get("events", [])
        if isinstance(item, dict)
    ]
    events.sort(key=lambda event: event.at)  # stable: events of one row keep their order
    return Journey(publisher_id=publisher_id, lead_id=lead_id, events=events[-limit:] if limit else [])


def _row(lead_id: str) -> str:
    # Nanoseconds since the epoch, zero-padded so rows sort by time; the tag keeps two instances (or two
    # chunks of one flush) apart.
    return f"{lead_prefix(lead_id)}{time.time_ns():020d}-{secrets.token_hex(4)}"
