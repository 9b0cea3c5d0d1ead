"""The scheduled-retry ledger on the state port: which Service Bus sequence numbers wait.

Service Bus cannot list a queue's scheduled messages by publisher, so the Service Bus adapter records
each one it schedules here (a :class:`~shared.transport.base.ScheduleLedger`): one entity per
message, partition = the publisher, row = queue and sequence number. When the publisher's CRM heals,
the adapter sends the recorded messages again and cancels the scheduled originals. Entries whose due
time has passed are no longer waiting (the message became active); they are read as gone and pruned.
Imports the state port only (no transport, no Azure).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import datetime, timedelta

from shared.names import TABLE_SCHEDULED
from shared.state.base import StateStore, key_text, safe_key
from shared.transport.base import ScheduledEntry

logger = logging.getLogger(__name__)

#: Entries this long past due are deleted when met (their message was delivered as scheduled).
PRUNE_AFTER = timedelta(minutes=10)
#: Stale entries deleted per read at most (a read must stay cheap).
_PRUNE_PER_READ = 50


def _row(queue: str, sequence_number: int) -> str:
    return f"{safe_key(queue)}|{sequence_number:020d}"


class StateScheduledRetries:
    """The ledger on a :class:`StateStore` (table ``scheduledretries``). Raises StateUnavailable."""

    def __init__(self, store: StateStore) -> None:
        self._store = store

    def record(self, entries: Sequence[ScheduledEntry]) -> None:
        for entry in entries:
            self._store.upsert(
                TABLE_SCHEDULED,
                safe_key(entry.publisher_id),
                _row(entry.queue, entry.sequence_number),
                {"queue": entry.queue, "sequenceNumber": entry.sequence_number, "due": entry.due.isoformat()},
            )

    def waiting(self, publisher_id: str, *, queue: str | None = None, after: datetime) -> list[ScheduledEntry]:
        prefix = f"{safe_key(queue)}|" if queue is not None else None
        found: list[ScheduledEntry] = []
        stale: list[str] = []
        for entity in self._store.query(TABLE_SCHEDULED, safe_key(publisher_id), row_prefix=prefix):
            try:
                entry = ScheduledEntry(
                    str(entity.data["queue"]),
                    key_text(entity.partition),
                    int(entity.data["sequenceNumber"]),
                    datetime.fromisoformat(str(entity.data["due"])),
                )
            except (KeyError, TypeError, ValueError):
                stale.append(entity.row)
                continue
            if entry.due > after:
                found.append(entry)
            elif entry.due < after - PRUNE_AFTER:
                stale.append(entity.row)
        for row in stale[:_PRUNE_PER_READ]:
            self._store.delete(TABLE_SCHEDULED, safe_key(publisher_id), row)
        return sorted(found, key=lambda entry: (entry.due, entry.sequence_number))

    def forget(self, entries: Sequence[ScheduledEntry]) -> None:
        for entry in entries:
            self._store.delete(TABLE_SCHEDULED, safe_key(entry.publisher_id), _row(entry.queue, entry.sequence_number))


__all__ = ["PRUNE_AFTER", "StateScheduledRetries"]
