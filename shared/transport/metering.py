"""Counting what a transport is asked to do: the Service Bus operations a lead costs.

:class:`MeteredTransport` wraps any :class:`~shared.transport.base.Transport` and counts each
operation by the kind Azure Service Bus bills it as (Standard tier: per million operations; a send,
a receive, a complete, an abandon, a dead-letter and a lock renewal of a message up to 64 KB are one
operation each). It changes nothing it passes on. The bench wraps the embedded broker with it, so a
run reports the operations the same flow would cost on Service Bus; see BENCHMARKS.md for what
drives the counts and what the Functions host does on its own side.

Must not import a broker: it only sees the port.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

from shared.transport.base import OutgoingMessage, QueueStats, ReceivedMessage, Transport, complete_all


@dataclass(frozen=True)
class OperationCounts:
    """Operations by kind. ``sends`` are messages sent to be visible at once, ``schedules`` messages
    sent with a scheduled enqueue time (retries, deferrals), ``received`` messages delivered by a
    receive (peek-lock), ``empty_receives`` receive calls that returned nothing (a poll: what it
    costs on Service Bus depends on the receiver, so it is not in :attr:`total`)."""

    sends: int = 0
    schedules: int = 0
    received: int = 0
    completes: int = 0
    abandons: int = 0
    dead_letters: int = 0
    renewals: int = 0
    empty_receives: int = 0

    @property
    def total(self) -> int:
        """Billable operations: every message sent, received and settled, and every lock renewal."""
        return (
            self.sends
            + self.schedules
            + self.received
            + self.completes
            + self.abandons
            + self.dead_letters
            + self.renewals
        )

    def as_dict(self) -> dict[str, int]:
        return {**asdict(self), "total": self.total}

    def per(self, leads: int) -> dict[str, float]:
        """Each kind and the total divided by ``leads`` (at least 1), rounded to 3 places."""
        count = max(leads, 1)
        return {kind: round(value / count, 3) for kind, value in self.as_dict().items()}

    def __sub__(self, other: OperationCounts) -> OperationCounts:
        mine, theirs = asdict(self), asdict(other)
        return OperationCounts(**{kind: mine[kind] - theirs[kind] for kind in mine})


class MeteredTransport:
    """A :class:`Transport` that counts the operations it passes on to ``inner``.

    Thread-safe (one lock around the counters). Anything beyond the port (an adapter's own helpers)
    is passed through uncounted.
    """

    def __init__(self, inner: Transport) -> None:
        self.inner = inner
        self._lock = threading.Lock()
        self._counts: dict[str, int] = dict.fromkeys(asdict(OperationCounts()), 0)

    def counts(self) -> OperationCounts:
        """The operations counted so far."""
        with self._lock:
            return OperationCounts(**self._counts)

    def _add(self, kind: str, n: int = 1) -> None:
        with self._lock:
            self._counts[kind] += n

    def _count_sent(self, messages: Sequence[OutgoingMessage]) -> None:
        scheduled = sum(1 for m in messages if m.scheduled_enqueue_time is not None)
        with self._lock:
            self._counts["schedules"] += scheduled
            self._counts["sends"] += len(messages) - scheduled

    # -- the port ----------------------------------------------------------------------------------

    def send(self, queue: str, messages: Sequence[OutgoingMessage]) -> None:
        self.inner.send(queue, messages)
        self._count_sent(messages)

    def send_and_complete(self, queue: str, messages: Sequence[OutgoingMessage], message: ReceivedMessage) -> None:
        """Send ``messages`` and complete ``message``; counted as the sends plus one complete (Service Bus
        bills the operations of a transaction one by one). Atomic where ``inner`` offers it, else the
        send first, then the complete (the safe order)."""
        combined = getattr(self.inner, "send_and_complete", None)
        if combined is not None:
            combined(queue, messages, message)
            self._count_sent(messages)
            self._add("completes")
            return
        self.send(queue, messages)
        self.complete(message)

    def receive(self, queue: str, max_messages: int = 1, max_wait: float = 0.0) -> list[ReceivedMessage]:
        received = self.inner.receive(queue, max_messages, max_wait)
        if received:
            self._add("received", len(received))
        else:
            self._add("empty_receives")
        return received

    def complete(self, message: ReceivedMessage) -> None:
        self.inner.complete(message)
        self._add("completes")

    def complete_many(self, messages: Sequence[ReceivedMessage]) -> list[ReceivedMessage]:
        """Complete ``messages``; one complete each (Service Bus settles lock tokens one by one, so a
        group written in one broker transaction here is as many operations there). Returns those whose
        lock was lost, which are not counted."""
        lost = complete_all(self.inner, messages)
        self._add("completes", len(messages) - len(lost))
        return lost

    def abandon(self, message: ReceivedMessage) -> None:
        self.inner.abandon(message)
        self._add("abandons")

    def dead_letter(self, message: ReceivedMessage, reason: str, description: str) -> None:
        self.inner.dead_letter(message, reason, description)
        self._add("dead_letters")

    def renew_lock(self, message: ReceivedMessage) -> None:
        self.inner.renew_lock(message)
        self._add("renewals")

    def peek_dead_letters(
        self, queue: str, max_messages: int = 100, from_sequence: int = 0
    ) -> list[ReceivedMessage]:
        return self.inner.peek_dead_letters(queue, max_messages, from_sequence)

    def receive_dead_letters(
        self, queue: str, max_messages: int = 100, max_wait: float = 0.0
    ) -> list[ReceivedMessage]:
        received = self.inner.receive_dead_letters(queue, max_messages, max_wait)
        if received:
            self._add("received", len(received))
        else:
            self._add("empty_receives")
        return received

    def stats(self, queue: str) -> QueueStats:
        return self.inner.stats(queue)

    def release_scheduled(self, queue: str, publisher_id: str, max_messages: int) -> int:
        return self.inner.release_scheduled(queue, publisher_id, max_messages)

    def scheduled_of(self, publisher_id: str) -> tuple[int, datetime | None]:
        return self.inner.scheduled_of(publisher_id)

    def close(self) -> None:
        self.inner.close()

    def __getattr__(self, name: str) -> Any:
        # Only reached for names not defined here: an adapter's helpers beyond the port.
        return getattr(self.inner, name)
