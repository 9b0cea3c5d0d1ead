"""The Service Bus adapter of the :class:`~shared.transport.base.Transport` port (azure-servicebus, sync).

One :class:`ServiceBusClient` per namespace (identity-based: a ``TokenCredential``, no connection
strings), one cached sender per queue, and per queue a small pool of ``PEEK_LOCK`` receivers for the
queue and for its dead-letter sub-queue. The sync SDK's senders and receivers are not thread-safe,
so every call on one holds that handler's lock. A message must be settled through the receiver it
came from: the SDK message travels in ``ReceivedMessage.raw`` and the adapter remembers which pooled
receiver delivered it. A receive takes a pooled receiver that holds no unsettled lock (or opens a
new one), so a settlement never queues behind another thread's long ``max_wait``.

What was verified, and how: no Service Bus namespace is reachable where this was written. The tests
(tests/test_servicebus_adapter.py) check, with the SDK's own types, the conversion of our
OutgoingMessage into ``ServiceBusMessage`` (id, body, properties, content type, scheduled time, TTL),
an AMQP wire round trip back into ``ServiceBusReceivedMessage`` (bytes property keys and values),
received-message conversion (delivery count, sequence number, lock token from the delivery tag,
locked-until, dead-letter reason and description), and — with a fake client, sender and receiver
at the ``client=`` seam — that sends batch, that settlement, dead-lettering, lock renewal, peeks and
dead-letter receives reach the right receiver with the right arguments, and that the SDK's
lock-lost errors become :class:`LockLost`. The Transport contract suite cannot run against a real
namespace here (it is skipped with that reason); nothing about service-side behaviour (duplicate
detection, TTL, max delivery count, scheduling) was exercised against Service Bus itself — those are
the namespace's and queue's configuration (infra/), not this adapter's.

Releasing scheduled retries early: Service Bus cannot list or move scheduled messages, so
with a ``ledger`` the adapter schedules through ``schedule_messages`` and records each sequence number
(queue, publisher, due) in it — the state store, wired by the composition root. ``release_scheduled``
peeks each recorded message by its sequence number, sends a copy now (a new message id: the deferral
counter + 1, as :func:`shared.pipeline.messages.rescheduled_copy` derives it) and only then cancels the
scheduled original: a crash between the two leaves a duplicate, which the idempotent write absorbs,
never a lost lead. Tested with the fakes at the ``client=`` seam, not against a namespace.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import weakref
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from azure.core.exceptions import ClientAuthenticationError, HttpResponseError
from azure.servicebus import (
    ServiceBusClient,
    ServiceBusMessage,
    ServiceBusMessageState,
    ServiceBusReceivedMessage,
    ServiceBusReceiveMode,
    ServiceBusSubQueue,
)
from azure.servicebus.exceptions import (
    MessageAlreadySettled,
    MessageLockLostError,
    MessageSizeExceededError,
    ServiceBusError,
)
from azure.servicebus.management import ServiceBusAdministrationClient

from shared.errors import LeadWriterError
from shared.names import PROP_DEFERRALS, PROP_PUBLISHER_ID, STAGE_QUEUES
from shared.pipeline.messages import rescheduled_copy
from shared.transport.base import (
    LockLost,
    OutgoingMessage,
    PropertyValue,
    QueueStats,
    ReceivedMessage,
    ScheduledEntry,
    ScheduleLedger,
)

if TYPE_CHECKING:
    from azure.core.credentials import TokenCredential
    from azure.servicebus import ServiceBusReceiver, ServiceBusSender

logger = logging.getLogger(__name__)

#: Service Bus has no non-blocking receive: a shorter ``max_wait`` would often return nothing even
#: with messages waiting, because the link credit round trip to the namespace does not fit.
MIN_RECEIVE_WAIT = 1.0
#: How many dead letters ``stats`` peeks to group them by reason (the counts themselves are exact).
DEAD_LETTER_SCAN_LIMIT = 300
_PEEK_PAGE = 100

#: Application properties Service Bus adds to a dead letter; ReceivedMessage carries them as fields.
_DEAD_LETTER_PROPERTIES = frozenset({"DeadLetterReason", "DeadLetterErrorDescription"})


# -- conversions (pure; tested with the SDK's own message types) -----------------------------------


def to_service_bus_message(message: OutgoingMessage) -> ServiceBusMessage:
    """Our OutgoingMessage as the SDK's ServiceBusMessage (a naive scheduled time is taken as UTC)."""
    scheduled = message.scheduled_enqueue_time
    if scheduled is not None and scheduled.tzinfo is None:
        scheduled = scheduled.replace(tzinfo=UTC)
    # The SDK types its keys as str | bytes; a dict is invariant, so build it with that type.
    properties: dict[str | bytes, Any] = {key: value for key, value in message.application_properties.items()}
    return ServiceBusMessage(
        message.body,
        message_id=message.message_id,
        application_properties=properties,
        content_type=message.content_type,
        scheduled_enqueue_time_utc=scheduled,
        time_to_live=timedelta(seconds=message.time_to_live) if message.time_to_live is not None else None,
    )


def _text(value: object) -> str:
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)


def _property_value(value: object) -> PropertyValue:
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, str | int | float | bool):
        return value
    # UUIDs, datetimes and the like: their text is what a stage can use.
    return str(value)


def decode_properties(properties: Mapping[Any, Any] | None) -> dict[str, PropertyValue]:
    """Application properties with bytes keys and values decoded (as received over AMQP).

    Service Bus's own dead-letter properties are left out: ReceivedMessage carries them as fields.
    """
    decoded: dict[str, PropertyValue] = {}
    for key, value in (properties or {}).items():
        name = _text(key)
        if name not in _DEAD_LETTER_PROPERTIES and value is not None:
            decoded[name] = _property_value(value)
    return decoded


def _body(message: ServiceBusReceivedMessage) -> bytes:
    body = message.body
    if isinstance(body, bytes):
        return body
    if isinstance(body, str):
        return body.encode("utf-8")
    if isinstance(body, Iterable) and not isinstance(body, Mapping):
        # A data body comes as a generator of sections; anything else is not ours to reinterpret.
        parts = list(body)
        if all(isinstance(part, bytes | bytearray) for part in parts):
            return b"".join(parts)
        return str(parts).encode("utf-8")
    return str(body).encode("utf-8")


def from_service_bus_message(
    message: ServiceBusReceivedMessage, queue: str, *, from_dead_letter: bool, peeked: bool
) -> ReceivedMessage:
    """The SDK's received (or peeked) message as our ReceivedMessage; the SDK message goes into ``raw``."""
    lock_token = None if peeked or message.lock_token is None else str(message.lock_token)
    return ReceivedMessage(
        queue=queue,
        body=_body(message),
        message_id=_text(message.message_id) if message.message_id is not None else "",
        application_properties=decode_properties(message.application_properties),
        content_type=message.content_type,
        delivery_count=message.delivery_count or 0,
        enqueued_time=message.enqueued_time_utc or datetime.now(UTC),
        sequence_number=message.sequence_number or 0,
        lock_token=lock_token,
        locked_until=None if lock_token is None else message.locked_until_utc,
        dead_letter_reason=message.dead_letter_reason,
        dead_letter_description=message.dead_letter_error_description,
        from_dead_letter=from_dead_letter,
        raw=message,
    )


# -- handlers --------------------------------------------------------------------------------------


class _PooledReceiver:
    """One SDK receiver, the lock that serialises calls on it, and the locks it holds for callers."""

    def __init__(self, handler: ServiceBusReceiver) -> None:
        self.handler = handler
        self.lock = threading.Lock()
        #: lock token → locked until, for the messages this receiver delivered and nobody settled yet
        #: (guarded by the transport's lock, not this receiver's).
        self.held: dict[str, datetime] = {}

    def holds_locks(self, now: datetime) -> bool:
        # A message nobody settles stops counting once its lock has expired anyway.
        self.held = {key: until for key, until in self.held.items() if until > now}
        return bool(self.held)


class ServiceBusTransport:
    """The Transport port on an Azure Service Bus namespace.

    ``client`` and ``admin_client`` may be injected (tests, custom retry or transport options);
    otherwise they are built from the namespace and credential. Settlement errors for a lost or
    settled lock raise :class:`LockLost`; any other SDK failure propagates as
    ``azure.servicebus.exceptions.ServiceBusError`` (transient: the caller retries later).
    """

    def __init__(
        self,
        fully_qualified_namespace: str,
        credential: TokenCredential,
        *,
        client: ServiceBusClient | None = None,
        admin_client: ServiceBusAdministrationClient | None = None,
        dead_letter_scan_limit: int = DEAD_LETTER_SCAN_LIMIT,
        ledger: ScheduleLedger | None = None,
    ) -> None:
        self.fully_qualified_namespace = fully_qualified_namespace
        self._credential = credential
        if client is None:
            client = ServiceBusClient(fully_qualified_namespace, credential)
        self._client = client
        self._admin = admin_client
        self._scan_limit = dead_letter_scan_limit
        #: Where scheduled sequence numbers are kept (None: scheduled messages cannot be released).
        self._ledger = ledger
        self._lock = threading.Lock()
        self._senders: dict[str, tuple[ServiceBusSender, threading.Lock]] = {}
        self._pools: dict[tuple[str, bool], list[_PooledReceiver]] = {}
        self._owners: weakref.WeakKeyDictionary[ServiceBusReceivedMessage, _PooledReceiver] = (
            weakref.WeakKeyDictionary()
        )

    def __repr__(self) -> str:
        return f"ServiceBusTransport({self.fully_qualified_namespace!r})"

    # -- sending ---------------------------------------------------------------------------------

    def _sender(self, queue: str) -> tuple[ServiceBusSender, threading.Lock]:
        with self._lock:
            entry = self._senders.get(queue)
            if entry is None:
                entry = (self._client.get_queue_sender(queue), threading.Lock())
                self._senders[queue] = entry
            return entry

    def send(self, queue: str, messages: Sequence[OutgoingMessage]) -> None:
        """Send messages as one batch (atomic on Service Bus) or, beyond the batch size, several.

        Raises ServiceBusError when the namespace refuses or cannot be reached, and
        MessageSizeExceededError for a single message larger than a batch can hold.
        """
        if not messages:
            return
        if self._ledger is not None and any(m.scheduled_enqueue_time is not None for m in messages):
            self._schedule(queue, [m for m in messages if m.scheduled_enqueue_time is not None])
            messages = [m for m in messages if m.scheduled_enqueue_time is None]
            if not messages:
                return
        converted = [to_service_bus_message(message) for message in messages]
        sender, lock = self._sender(queue)
        with lock:
            if len(converted) == 1:
                sender.send_messages(converted[0])
                return
            batch = sender.create_message_batch()
            for message in converted:
                try:
                    batch.add_message(message)
                except MessageSizeExceededError:
                    if len(batch) == 0:
                        raise
                    # The batch is full: what was added goes now, atomically; the rest follows.
                    sender.send_messages(batch)
                    batch = sender.create_message_batch()
                    batch.add_message(message)
            sender.send_messages(batch)

    # -- scheduled messages, and releasing them early -----------------------------------

    def _schedule(self, queue: str, messages: Sequence[OutgoingMessage]) -> None:
        """Schedule through ``schedule_messages`` (which answers the sequence numbers) and record them.

        A failed record is logged, not raised: the message is scheduled either way and is delivered
        when due; it only cannot be released early.
        """
        assert self._ledger is not None
        sender, lock = self._sender(queue)
        entries: list[ScheduledEntry] = []
        for message in messages:
            converted = to_service_bus_message(message)
            due = converted.scheduled_enqueue_time_utc
            assert due is not None
            with lock:
                numbers = sender.schedule_messages(converted, due)
            publisher = message.application_properties.get(PROP_PUBLISHER_ID)
            # Retries only: a deferred copy waits for a penalty or pacing, not for the CRM to heal.
            if publisher is not None and not message.application_properties.get(PROP_DEFERRALS):
                entries += [ScheduledEntry(queue, str(publisher), int(n), due) for n in numbers]
        try:
            self._ledger.record(entries)
        except LeadWriterError as exc:  # StateUnavailable: the ledger is best effort; the schedule stands
            logger.warning("could not record %d scheduled messages on %s: %s", len(entries), queue, exc)

    def release_scheduled(self, queue: str, publisher_id: str, max_messages: int) -> int:
        """Send up to ``max_messages`` of the publisher's recorded scheduled messages on ``queue`` again
        now (earliest due first), each as a copy with a new id, then cancel the scheduled original.
        Entries whose message is no longer scheduled (it fell due, or was cancelled) are forgotten.
        Without a ledger nothing can be released (0). Raises ServiceBusError."""
        if self._ledger is None or max_messages < 1:
            return 0
        now = datetime.now(UTC)
        released = 0
        gone: list[ScheduledEntry] = []
        for entry in self._ledger.waiting(publisher_id, queue=queue, after=now):
            if released >= max_messages:
                break
            receiver = self._checkout(queue, False)
            try:
                peeked = receiver.handler.peek_messages(1, sequence_number=entry.sequence_number)
            finally:
                receiver.lock.release()
            original = next((m for m in peeked if m.sequence_number == entry.sequence_number), None)
            if original is None or original.state != ServiceBusMessageState.SCHEDULED:
                gone.append(entry)
                continue
            message = from_service_bus_message(original, queue, from_dead_letter=False, peeked=True)
            # A new id (deferrals + 1, same attempt): the original's id would be dropped as a duplicate.
            copy = dataclasses.replace(rescheduled_copy(message, 0.0, deferred=True), scheduled_enqueue_time=None)
            sender, lock = self._sender(queue)
            with lock:
                sender.send_messages(to_service_bus_message(copy))  # send first, then cancel
                sender.cancel_scheduled_messages(entry.sequence_number)
            gone.append(entry)
            released += 1
        if gone:
            self._ledger.forget(gone)
        return released

    def scheduled_of(self, publisher_id: str) -> tuple[int, datetime | None]:
        """From the ledger: the publisher's recorded messages still due on the stage queues, and the
        earliest due time ((0, None) without a ledger). Raises what the ledger raises."""
        if self._ledger is None:
            return 0, None
        waiting = [
            entry
            for entry in self._ledger.waiting(publisher_id, after=datetime.now(UTC))
            if entry.queue in STAGE_QUEUES
        ]
        return len(waiting), min((entry.due for entry in waiting), default=None)

    # -- receiving -------------------------------------------------------------------------------

    def _checkout(self, queue: str, dead_letter: bool) -> _PooledReceiver:
        """A pooled receiver, returned with its lock held; the caller releases it."""
        now = datetime.now(UTC)
        with self._lock:
            pool = self._pools.setdefault((queue, dead_letter), [])
            for receiver in pool:
                if not receiver.holds_locks(now) and receiver.lock.acquire(blocking=False):
                    return receiver
            handler = self._client.get_queue_receiver(
                queue,
                sub_queue=ServiceBusSubQueue.DEAD_LETTER if dead_letter else None,
                receive_mode=ServiceBusReceiveMode.PEEK_LOCK,
            )
            receiver = _PooledReceiver(handler)
            receiver.lock.acquire()
            pool.append(receiver)
            logger.debug("opened receiver %d for %s (dead letters: %s)", len(pool), queue, dead_letter)
            return receiver

    def _receive(
        self, queue: str, dead_letter: bool, max_messages: int, max_wait: float
    ) -> list[ReceivedMessage]:
        if max_messages < 1:
            raise ValueError("max_messages must be at least 1")
        receiver = self._checkout(queue, dead_letter)
        try:
            received = receiver.handler.receive_messages(
                max_message_count=max_messages, max_wait_time=max(max_wait, MIN_RECEIVE_WAIT)
            )
        finally:
            receiver.lock.release()
        converted = [
            from_service_bus_message(message, queue, from_dead_letter=dead_letter, peeked=False)
            for message in received
        ]
        far_future = datetime.max.replace(tzinfo=UTC)
        with self._lock:
            for delivered, message in zip(received, converted, strict=True):
                self._owners[delivered] = receiver
                if message.lock_token is not None:
                    receiver.held[message.lock_token] = message.locked_until or far_future
        return converted

    def receive(self, queue: str, max_messages: int = 1, max_wait: float = 0.0) -> list[ReceivedMessage]:
        """Peek-lock up to ``max_messages`` messages, waiting up to ``max_wait`` (at least 1 s) for one.

        Raises ValueError when ``max_messages`` < 1, ServiceBusError on a service failure.
        """
        return self._receive(queue, False, max_messages, max_wait)

    def receive_dead_letters(
        self, queue: str, max_messages: int = 100, max_wait: float = 0.0
    ) -> list[ReceivedMessage]:
        """Peek-lock dead letters from the queue's dead-letter sub-queue.

        Raises ValueError when ``max_messages`` < 1, ServiceBusError on a service failure.
        """
        return self._receive(queue, True, max_messages, max_wait)

    # -- settling --------------------------------------------------------------------------------

    def _owner(self, message: ReceivedMessage) -> tuple[_PooledReceiver, ServiceBusReceivedMessage, str]:
        raw = message.raw
        if message.lock_token is None or not isinstance(raw, ServiceBusReceivedMessage):
            raise ValueError("a peeked message holds no lock and cannot be settled")
        with self._lock:
            receiver = self._owners.get(raw)
        if receiver is None:
            raise ValueError("the message was not received through this transport")
        return receiver, raw, message.lock_token

    def _settle(
        self,
        message: ReceivedMessage,
        action: Callable[[ServiceBusReceiver, ServiceBusReceivedMessage], object],
        *,
        renews: bool = False,
    ) -> None:
        receiver, raw, token = self._owner(message)
        with receiver.lock:
            try:
                result = action(receiver.handler, raw)
            except (MessageLockLostError, MessageAlreadySettled) as exc:
                with self._lock:
                    receiver.held.pop(token, None)
                raise LockLost(
                    f"the lock on message {message.message_id} (sequence {message.sequence_number}) "
                    f"on {message.queue} expired or the message was settled already"
                ) from exc
        with self._lock:
            if not renews:
                receiver.held.pop(token, None)
            elif isinstance(result, datetime):
                receiver.held[token] = result
                message.locked_until = result

    def complete(self, message: ReceivedMessage) -> None:
        """Complete the message on the receiver it came from.

        Raises LockLost if the lock expired or the message was settled; ValueError for a peeked
        message; ServiceBusError on another service failure.
        """
        self._settle(message, lambda receiver, raw: receiver.complete_message(raw))

    def abandon(self, message: ReceivedMessage) -> None:
        """Abandon the message: Service Bus delivers it again at once (delivery count + 1).

        Raises LockLost if the lock expired or the message was settled; ValueError for a peeked
        message; ServiceBusError on another service failure.
        """
        self._settle(message, lambda receiver, raw: receiver.abandon_message(raw))

    def dead_letter(self, message: ReceivedMessage, reason: str, description: str) -> None:
        """Move the message to the dead-letter sub-queue with ``reason`` and ``description``.

        Raises LockLost if the lock expired or the message was settled; ValueError for a peeked
        message or a dead letter; ServiceBusError on another service failure.
        """
        if message.from_dead_letter:
            raise ValueError("a message from the dead-letter sub-queue cannot be dead-lettered again")
        self._settle(
            message,
            lambda receiver, raw: receiver.dead_letter_message(
                raw, reason=reason, error_description=description
            ),
        )

    def renew_lock(self, message: ReceivedMessage) -> None:
        """Renew the lock by the queue's lock duration; updates ``message.locked_until``.

        Raises LockLost if the lock expired or the message was settled; ValueError for a peeked
        message; ServiceBusError on another service failure.
        """
        self._settle(message, lambda receiver, raw: receiver.renew_message_lock(raw), renews=True)

    # -- dead letters and counts -------------------------------------------------------------------

    def peek_dead_letters(
        self, queue: str, max_messages: int = 100, from_sequence: int = 0
    ) -> list[ReceivedMessage]:
        """Browse dead letters in sequence order from ``from_sequence`` without locking them.

        Raises ServiceBusError on a service failure.
        """
        receiver = self._checkout(queue, True)
        try:
            # An explicit start: with 0 the SDK would continue from the receiver's last peek instead.
            peeked = receiver.handler.peek_messages(max_messages, sequence_number=max(from_sequence, 1))
        finally:
            receiver.lock.release()
        return [from_service_bus_message(m, queue, from_dead_letter=True, peeked=True) for m in peeked]

    def _admin_client(self) -> ServiceBusAdministrationClient:
        with self._lock:
            if self._admin is None:
                self._admin = ServiceBusAdministrationClient(self.fully_qualified_namespace, self._credential)
            return self._admin

    def stats(self, queue: str) -> QueueStats:
        """Counts from the queue's runtime properties; dead letters by reason from a peek of up to
        ``dead_letter_scan_limit`` of them (so the by-reason counts may sum to less than the total).

        The runtime properties need the *Manage* right, which the least-privilege deployment does not
        grant (infra/app/rbac.bicep gives Data Sender/Receiver only). Refused with 401/403, the counts
        come from peeking instead — exact up to the scan limit, a lower bound beyond it.

        Raises azure.core.exceptions.HttpResponseError (e.g. ResourceNotFoundError) from the
        administration API for anything but an authorisation refusal.
        """
        by_reason: Counter[str] = Counter(m.dead_letter_reason or "unknown" for m in self._scan(queue, True))
        try:
            properties = self._admin_client().get_queue_runtime_properties(queue)
        except (ClientAuthenticationError, HttpResponseError) as exc:
            status = getattr(exc, "status_code", None)
            if not isinstance(exc, ClientAuthenticationError) and status not in (401, 403):
                raise
            logger.warning("queue %s: no Manage right for runtime counts; counting by peek instead", queue)
            states = Counter(getattr(m.raw, "state", ServiceBusMessageState.ACTIVE) for m in self._scan(queue, False))
            return QueueStats(
                queue=queue,
                active=states[ServiceBusMessageState.ACTIVE],
                scheduled=states[ServiceBusMessageState.SCHEDULED],
                dead_lettered=sum(by_reason.values()),
                dead_lettered_by_reason=dict(by_reason),
            )
        return QueueStats(
            queue=queue,
            active=properties.active_message_count or 0,
            scheduled=properties.scheduled_message_count or 0,
            dead_lettered=properties.dead_letter_message_count or 0,
            dead_lettered_by_reason=dict(by_reason),
        )

    def _scan(self, queue: str, dead_letter: bool) -> list[ReceivedMessage]:
        """Peek up to ``dead_letter_scan_limit`` messages of the queue or its dead-letter sub-queue."""
        found: list[ReceivedMessage] = []
        next_sequence = 1
        while len(found) < self._scan_limit:
            count = min(_PEEK_PAGE, self._scan_limit - len(found))
            receiver = self._checkout(queue, dead_letter)
            try:
                peeked = receiver.handler.peek_messages(count, sequence_number=next_sequence)
            finally:
                receiver.lock.release()
            if not peeked:
                break
            page = [from_service_bus_message(m, queue, from_dead_letter=dead_letter, peeked=True) for m in peeked]
            found.extend(page)
            next_sequence = page[-1].sequence_number + 1
        return found

    def close(self) -> None:
        """Close every sender, receiver and client this transport opened."""
        with self._lock:
            handlers: list[Any] = [sender for sender, _ in self._senders.values()]
            handlers += [receiver.handler for pool in self._pools.values() for receiver in pool]
            handlers += [self._client] + ([self._admin] if self._admin is not None else [])
            self._senders.clear()
            self._pools.clear()
        for handler in handlers:
            try:
                handler.close()
            except ServiceBusError as exc:
                logger.warning("closing %s failed: %s", type(handler).__name__, type(exc).__name__)
