"""The queue port (architecture §2): Service Bus semantics, whatever the broker.

Adapters: :mod:`shared.transport.embedded` (SQLite) and :mod:`shared.transport.servicebus`
(azure-servicebus). Both pass ``tests/test_transport_contract.py``.

Semantics every adapter keeps:

- ``receive`` peek-locks: a message is invisible to other receivers until its lock expires, it is
  completed, abandoned or dead-lettered. ``delivery_count`` counts receives (1 on first delivery).
- A message whose delivery count would exceed the queue's max delivery count is dead-lettered with
  reason ``MaxDeliveryCountExceeded`` instead of being delivered again.
- ``send`` with ``scheduled_enqueue_time`` keeps the message invisible until that time.
- Duplicate detection: a message id sent again within the window is accepted and silently dropped.
- Dead letters keep body, message id and application properties, plus ``dead_letter_reason`` and
  ``dead_letter_description``; they are read from the queue's dead-letter sub-queue.
- ``release_scheduled`` brings a publisher's scheduled (not yet visible) messages forward to now,
  earliest due first (when its CRM heals); ``scheduled_of`` counts what still waits.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol, runtime_checkable

from shared.errors import LockLost as LockLost  # re-exported: the port names what settling raises

PropertyValue = str | int | float | bool


@dataclass(frozen=True)
class OutgoingMessage:
    """A message to send."""

    body: bytes
    message_id: str
    application_properties: Mapping[str, PropertyValue] = field(default_factory=dict)
    content_type: str = "application/json"
    #: When set, the message becomes visible only at this (timezone-aware, UTC) time.
    scheduled_enqueue_time: datetime | None = None
    #: Time to live in seconds; expired messages are dead-lettered ``TTLExpiredException``.
    time_to_live: float | None = None


@dataclass
class ReceivedMessage:
    """A peek-locked (or peeked) message. ``lock_token`` identifies the lock for settlement."""

    queue: str
    body: bytes
    message_id: str
    application_properties: dict[str, PropertyValue]
    content_type: str | None
    delivery_count: int
    enqueued_time: datetime
    sequence_number: int
    lock_token: str | None = None
    locked_until: datetime | None = None
    dead_letter_reason: str | None = None
    dead_letter_description: str | None = None
    #: True for a message received from the dead-letter sub-queue (settle it there).
    from_dead_letter: bool = False
    #: The adapter's own message object (e.g. the SDK's ServiceBusReceivedMessage), for settlement.
    raw: object | None = field(default=None, repr=False, compare=False)


@dataclass(frozen=True)
class QueueStats:
    """Counts for one queue."""

    queue: str
    active: int
    scheduled: int
    dead_lettered: int
    #: Dead letters grouped by reason (embedded: exact; Service Bus: from a peek of the DLQ).
    dead_lettered_by_reason: Mapping[str, int] = field(default_factory=dict)


@runtime_checkable
class Transport(Protocol):
    """The queue port. All methods are thread-safe."""

    def send(self, queue: str, messages: Sequence[OutgoingMessage]) -> None:
        """Send messages (atomically, as one batch, where the broker can)."""

    def receive(self, queue: str, max_messages: int = 1, max_wait: float = 0.0) -> list[ReceivedMessage]:
        """Peek-lock up to ``max_messages`` visible messages, waiting up to ``max_wait`` seconds for one."""
        ...

    def complete(self, message: ReceivedMessage) -> None:
        """Remove a locked message. Raises LockLost if the lock is gone."""

    def abandon(self, message: ReceivedMessage) -> None:
        """Release the lock so the message is delivered again at once."""

    def dead_letter(self, message: ReceivedMessage, reason: str, description: str) -> None:
        """Move a locked message to the dead-letter sub-queue. Raises LockLost if the lock is gone."""

    def renew_lock(self, message: ReceivedMessage) -> None:
        """Extend the lock by the queue's lock duration. Raises LockLost if the lock is gone."""

    def peek_dead_letters(
        self, queue: str, max_messages: int = 100, from_sequence: int = 0
    ) -> list[ReceivedMessage]:
        """Read dead letters without locking them, in sequence order starting at ``from_sequence``."""
        ...

    def receive_dead_letters(
        self, queue: str, max_messages: int = 100, max_wait: float = 0.0
    ) -> list[ReceivedMessage]:
        """Peek-lock dead letters (to complete them after a replay or purge)."""
        ...

    def stats(self, queue: str) -> QueueStats:
        """Active, scheduled and dead-lettered counts of a queue."""
        ...

    def release_scheduled(self, queue: str, publisher_id: str, max_messages: int) -> int:
        """Make up to ``max_messages`` of the publisher's scheduled retries on ``queue`` visible now,
        earliest due first; returns how many were released. Deferred copies (``deferrals`` set:
        waiting for a penalty or pacing) are not retries and stay. Raises what the broker raises."""
        ...

    def scheduled_of(self, publisher_id: str) -> tuple[int, datetime | None]:
        """How many of the publisher's messages wait scheduled (for a retry) on the stage queues, and
        when the next one is due (None: none waits). Raises what the broker raises."""
        ...

    def close(self) -> None:
        """Release connections."""


@dataclass(frozen=True)
class ScheduledEntry:
    """A scheduled message as the Service Bus adapter records it (Service Bus cannot list them)."""

    queue: str
    publisher_id: str
    sequence_number: int
    due: datetime


class ScheduleLedger(Protocol):
    """Where the Service Bus adapter keeps the sequence numbers of what it scheduled, so they can be
    released (sent again, then cancelled) when the CRM heals. Wired to the state store by the
    composition root (``shared.state.scheduled``)."""

    def record(self, entries: Sequence[ScheduledEntry]) -> None:
        """Remember scheduled messages. Raises StateUnavailable."""

    def waiting(self, publisher_id: str, *, queue: str | None = None, after: datetime) -> list[ScheduledEntry]:
        """The publisher's entries due after ``after`` (on ``queue`` when given), earliest first."""
        ...

    def forget(self, entries: Sequence[ScheduledEntry]) -> None:
        """Drop entries (released, cancelled, or found gone)."""


class Completes(Protocol):
    """What :func:`complete_all` needs of a broker."""

    def complete(self, message: ReceivedMessage) -> None: ...


def complete_all(settler: Completes, messages: Sequence[ReceivedMessage]) -> list[ReceivedMessage]:
    """Complete ``messages``: in one write where the broker offers ``complete_many``, else one by one.
    Returns those whose lock was lost (left as they are, to be redelivered)."""
    together = getattr(settler, "complete_many", None)
    if together is not None:
        return list(together(messages))
    lost: list[ReceivedMessage] = []
    for message in messages:
        try:
            settler.complete(message)
        except LockLost:
            lost.append(message)
    return lost
