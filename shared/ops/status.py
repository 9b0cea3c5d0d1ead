"""Delivery status per publisher (the status route): what a publisher needs to know its leads are
arriving, and what ops need to spot a publisher whose configuration keeps failing.

Fed by the settlement observer of every runtime and kept in the shared state store (table
``leaddeliveries``, one row per publisher), so every process on a data dir and every Azure instance
adds to — and the API on any instance reads — the same counts. Settlements are counted in memory
and written once a second per publisher (an ETag-conditional read-modify-write, so concurrent
writers lose nothing): a backlog of thousands of deliveries costs a handful of state writes, not one
each. A process killed outright loses at most the last second's counts, never a lead.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from shared.errors import CONFIGURATION_REASONS
from shared.names import PROP_PUBLISHER_ID, TABLE_DELIVERIES
from shared.pipeline.outcomes import SettleAction
from shared.pipeline.settle import Settled
from shared.state.base import StateStore, safe_key

logger = logging.getLogger(__name__)

#: Seconds between writes of the counted settlements.
FLUSH_INTERVAL = 1.0
_ROW = "status"


@dataclass(frozen=True)
class PublisherStatus:
    publisher_id: str
    delivered: int = 0
    last_delivery: str | None = None
    last_error: str | None = None
    last_error_reason: str | None = None
    last_error_at: str | None = None
    consecutive_config_failures: int = 0


@dataclass
class _Pending:
    """Settlements of one publisher not yet written."""

    delivered: int = 0
    last_delivery: str | None = None
    error: tuple[str, str, str] | None = None  # description, reason, at
    #: A delivery came after the last write: the consecutive count starts again from ``failures``.
    reset: bool = False
    #: Configuration failures since the last delivery in this batch (or since the last write).
    failures: int = 0


class StatusBook:
    """Counts deliveries and remembers the last error per publisher. Thread-safe."""

    def __init__(self, store: StateStore, *, flush_interval: float = FLUSH_INTERVAL) -> None:
        self._store = store
        self._lock = threading.Lock()
        self._pending: dict[str, _Pending] = {}
        self._flush_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(flush_interval,), name="lw-status", daemon=True)
        self._thread.start()

    def observe(self, settled: Settled) -> None:
        """The settlement observer: call it with every :class:`~shared.pipeline.settle.Settled`."""
        publisher = str(settled.message.application_properties.get(PROP_PUBLISHER_ID, "") or "")
        if not publisher:
            return
        now = datetime.now(UTC).isoformat()
        with self._lock:
            pending = self._pending.setdefault(publisher, _Pending())
            if settled.action is SettleAction.DELIVERED:
                pending.delivered += 1
                pending.last_delivery = now
                pending.reset = True
                pending.failures = 0
            elif settled.action in (SettleAction.DEAD_LETTERED, SettleAction.RESCHEDULED):
                reason = str(settled.reason or "")
                description = getattr(settled.outcome, "description", reason)
                kind = reason if settled.action is SettleAction.DEAD_LETTERED else "transient"
                pending.error = (str(description), kind, now)
                if reason in CONFIGURATION_REASONS:
                    pending.failures += 1

    def flush(self) -> None:
        """Write what was counted. Raises nothing (a state outage keeps the counts for the next try)."""
        with self._flush_lock:
            with self._lock:
                pending, self._pending = self._pending, {}
            for publisher, counts in pending.items():
                try:
                    self._store.update(TABLE_DELIVERIES, safe_key(publisher), _ROW, _applier(counts, publisher))
                except Exception:  # noqa: BLE001 - status is informational; the counts wait for the next flush
                    logger.warning("delivery status of a publisher could not be written; keeping it for later")
                    with self._lock:
                        self._pending[publisher] = _merge(counts, self._pending.get(publisher))

    def get(self, publisher_id: str) -> PublisherStatus:
        self.flush()
        entity = self._store.get(TABLE_DELIVERIES, safe_key(publisher_id), _ROW)
        return _status(publisher_id, entity.data if entity else {})

    def all(self) -> list[PublisherStatus]:
        self.flush()
        rows = [e for e in self._store.query(TABLE_DELIVERIES) if e.row == _ROW]
        return sorted((_status(str(e.data.get("publisherId", "")), e.data) for e in rows), key=lambda s: s.publisher_id)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.flush()

    def _run(self, interval: float) -> None:
        while not self._stop.wait(interval):
            self.flush()


def _applier(counts: _Pending, publisher: str) -> Callable[[dict[str, Any] | None], dict[str, Any]]:
    return lambda row: _apply(row, counts, publisher)


def _apply(row: dict[str, Any] | None, counts: _Pending, publisher: str) -> dict[str, Any]:
    data = dict(row or {})
    data["publisherId"] = publisher
    data["delivered"] = int(data.get("delivered", 0)) + counts.delivered
    if counts.last_delivery:
        data["lastDelivery"] = counts.last_delivery
    if counts.error is not None:
        data["lastError"], data["lastErrorReason"], data["lastErrorAt"] = counts.error
    before = 0 if counts.reset else int(data.get("consecutiveConfigFailures", 0))
    data["consecutiveConfigFailures"] = before + counts.failures
    return data


def _merge(older: _Pending, newer: _Pending | None) -> _Pending:
    """Counts not written yet (``older``) followed by those counted since (``newer``)."""
    if newer is None:
        return older
    return _Pending(
        delivered=older.delivered + newer.delivered,
        last_delivery=newer.last_delivery or older.last_delivery,
        error=newer.error or older.error,
        reset=older.reset or newer.reset,
        failures=newer.failures if newer.reset else older.failures + newer.failures,
    )


def _status(publisher_id: str, data: dict[str, Any]) -> PublisherStatus:
    return PublisherStatus(
        publisher_id=publisher_id,
        delivered=int(data.get("delivered", 0)),
        last_delivery=data.get("lastDelivery"),
        last_error=data.get("lastError"),
        last_error_reason=data.get("lastErrorReason"),
        last_error_at=data.get("lastErrorAt"),
        consecutive_config_failures=int(data.get("consecutiveConfigFailures", 0)),
    )
