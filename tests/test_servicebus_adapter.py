"""The Service Bus adapter, without a namespace (none is reachable here).

Conversions are tested with the SDK's own message types, received messages are built the way the
SDK builds them (a decoded AMQP message plus the transfer frame whose delivery tag is the lock
token), after a real AMQP encode/decode so properties come back as bytes as they do off the wire.
Routing is tested with a small fake client, sender and receiver injected at the ``client=`` seam:
they record calls and raise the SDK's own exceptions; they do not pretend to be Service Bus.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import pytest
from azure.core.credentials import AccessToken, TokenCredential
from azure.core.exceptions import ClientAuthenticationError
from azure.servicebus import (
    ServiceBusClient,
    ServiceBusMessage,
    ServiceBusMessageBatch,
    ServiceBusReceivedMessage,
    ServiceBusReceiveMode,
    ServiceBusSubQueue,
)
from azure.servicebus._pyamqp._encode import encode_payload
from azure.servicebus._transport._pyamqp_transport import PyamqpTransport
from azure.servicebus.exceptions import MessageAlreadySettled, MessageLockLostError
from azure.servicebus.management import ServiceBusAdministrationClient

from shared.settings import Settings
from shared.transport import (
    LockLost,
    OutgoingMessage,
    ReceivedMessage,
    Transport,
    make_transport,
)
from shared.transport.base import ScheduledEntry
from shared.transport.servicebus import (
    MIN_RECEIVE_WAIT,
    ServiceBusTransport,
    decode_properties,
    from_service_bus_message,
    to_service_bus_message,
)
from tests.fixtures.servicebus import NAMESPACE, PROPERTIES, QUEUE, sdk_message

# -- fakes at the client= seam ---------------------------------------------------------------------


class FakeReceiver:
    """Hands out the messages queued on it and records what the adapter asks of it."""

    def __init__(self, queue: str, sub_queue: object, receive_mode: object) -> None:
        self.queue, self.sub_queue, self.receive_mode = queue, sub_queue, receive_mode
        self.calls: list[tuple[Any, ...]] = []
        self.inbox: list[ServiceBusReceivedMessage] = []
        self.dead_letters: list[ServiceBusReceivedMessage] = []
        self.settled: set[int] = set()
        self.lock_lost: set[int] = set()
        self.closed = False

    def receive_messages(
        self, max_message_count: int, max_wait_time: float
    ) -> list[ServiceBusReceivedMessage]:
        self.calls.append(("receive", max_message_count, max_wait_time))
        taken, self.inbox = self.inbox[:max_message_count], self.inbox[max_message_count:]
        return taken

    def peek_messages(
        self, max_message_count: int, *, sequence_number: int
    ) -> list[ServiceBusReceivedMessage]:
        self.calls.append(("peek", max_message_count, sequence_number))
        later = [m for m in self.dead_letters if (m.sequence_number or 0) >= sequence_number]
        return later[:max_message_count]

    def _settle(self, name: str, message: ServiceBusReceivedMessage, *extra: object) -> None:
        self.calls.append((name, message, *extra))
        if id(message) in self.settled:
            raise MessageAlreadySettled(action=name)
        if id(message) in self.lock_lost:
            raise MessageLockLostError()
        self.settled.add(id(message))

    def complete_message(self, message: ServiceBusReceivedMessage) -> None:
        self._settle("complete", message)

    def abandon_message(self, message: ServiceBusReceivedMessage) -> None:
        self._settle("abandon", message)

    def dead_letter_message(
        self,
        message: ServiceBusReceivedMessage,
        reason: str | None = None,
        error_description: str | None = None,
    ) -> None:
        self._settle("dead_letter", message, reason, error_description)

    def renew_message_lock(self, message: ServiceBusReceivedMessage) -> datetime:
        self.calls.append(("renew", message))
        if id(message) in self.lock_lost or id(message) in self.settled:
            raise MessageLockLostError()
        return datetime(2026, 11, 20, 10, 5, tzinfo=UTC)

    def close(self) -> None:
        self.closed = True


class FakeSender:
    def __init__(self, queue: str, batch_size: int) -> None:
        self.queue, self.batch_size = queue, batch_size
        self.sent: list[ServiceBusMessage | ServiceBusMessageBatch] = []
        self.closed = False

    def send_messages(self, message: ServiceBusMessage | ServiceBusMessageBatch) -> None:
        self.sent.append(message)

    def create_message_batch(self) -> ServiceBusMessageBatch:
        return ServiceBusMessageBatch(max_size_in_bytes=self.batch_size)

    def close(self) -> None:
        self.closed = True


class FakeClient:
    def __init__(self, batch_size: int = 256 * 1024) -> None:
        self.batch_size = batch_size
        self.senders: list[FakeSender] = []
        self.receivers: list[FakeReceiver] = []
        #: Each new receiver starts with these messages (built for it by the factory).
        self.prepare: Callable[[FakeReceiver], None] = lambda receiver: None
        self.closed = False

    def get_queue_sender(self, queue: str) -> FakeSender:
        self.senders.append(FakeSender(queue, self.batch_size))
        return self.senders[-1]

    def get_queue_receiver(
        self, queue: str, *, sub_queue: object = None, receive_mode: object = None
    ) -> FakeReceiver:
        receiver = FakeReceiver(queue, sub_queue, receive_mode)
        self.prepare(receiver)
        self.receivers.append(receiver)
        return receiver

    def close(self) -> None:
        self.closed = True


class FakeCredential:
    def get_token(self, *scopes: str, **kwargs: Any) -> AccessToken:
        raise AssertionError("no token may be requested in these tests")


@dataclass
class Setup:
    transport: ServiceBusTransport
    client: FakeClient


@pytest.fixture
def setup() -> Setup:
    client = FakeClient()
    transport = ServiceBusTransport(
        NAMESPACE, cast(TokenCredential, FakeCredential()), client=cast(ServiceBusClient, client)
    )
    return Setup(transport, client)


def deliver(setup: Setup, count: int = 1, **options: Any) -> None:
    """Every receiver the transport opens from now on holds ``count`` fresh messages."""

    def prepare(receiver: FakeReceiver) -> None:
        number = len(setup.client.receivers)
        receiver.inbox = [
            sdk_message(receiver, message_id=f"lead-{number}-{i}", sequence_number=i + 1, **options)
            for i in range(count)
        ]

    setup.client.prepare = prepare


# -- conversions -----------------------------------------------------------------------------------


def test_outgoing_message_becomes_a_service_bus_message_with_every_field() -> None:
    due = datetime(2026, 11, 20, 10, 5, tzinfo=UTC)
    outgoing = OutgoingMessage(
        body=b'{"leadId": "L1"}',
        message_id="L1",
        application_properties=PROPERTIES,
        content_type="application/json",
        scheduled_enqueue_time=due,
        time_to_live=90.0,
    )

    converted = to_service_bus_message(outgoing)

    assert b"".join(converted.body) == outgoing.body
    assert converted.message_id == "L1"
    assert converted.application_properties == PROPERTIES
    assert converted.content_type == "application/json"
    assert converted.scheduled_enqueue_time_utc == due
    assert converted.time_to_live == timedelta(seconds=90)


def test_outgoing_message_without_schedule_or_ttl_sets_neither() -> None:
    converted = to_service_bus_message(OutgoingMessage(body=b"{}", message_id="m"))

    assert converted.scheduled_enqueue_time_utc is None
    assert converted.time_to_live is None


def test_a_naive_scheduled_time_is_sent_as_utc() -> None:
    converted = to_service_bus_message(
        OutgoingMessage(body=b"{}", message_id="m", scheduled_enqueue_time=datetime(2026, 11, 20, 10, 5))
    )

    assert converted.scheduled_enqueue_time_utc == datetime(2026, 11, 20, 10, 5, tzinfo=UTC)


def test_properties_sent_as_text_come_back_as_text_after_an_amqp_wire_round_trip() -> None:
    outgoing = to_service_bus_message(
        OutgoingMessage(body=b'{"a": 1}', message_id="L1", application_properties=PROPERTIES)
    )
    amqp = PyamqpTransport.to_outgoing_amqp_message(outgoing.raw_amqp_message)
    wire = bytes(encode_payload(bytearray(), amqp))

    received = ServiceBusReceivedMessage.from_bytes(wire)
    assert received.application_properties is not None
    assert b"publisherId" in received.application_properties  # the SDK hands back bytes keys
    converted = from_service_bus_message(received, QUEUE, from_dead_letter=False, peeked=False)

    assert converted.application_properties == PROPERTIES
    assert (converted.body, converted.message_id) == (b'{"a": 1}', "L1")


def test_received_message_carries_delivery_count_sequence_lock_token_and_times() -> None:
    lock_end = datetime(2026, 11, 20, 10, 1, tzinfo=UTC)
    raw = sdk_message(object(), delivery_count=2, sequence_number=42, locked_until=lock_end)

    converted = from_service_bus_message(raw, QUEUE, from_dead_letter=False, peeked=False)

    assert converted.queue == QUEUE
    assert (converted.message_id, converted.body) == ("lead-1", b'{"leadId": "lead-1"}')
    assert converted.application_properties == PROPERTIES
    assert converted.content_type == "application/json"
    assert converted.delivery_count == 2
    assert converted.sequence_number == 42
    assert converted.lock_token == str(raw.lock_token)
    assert uuid.UUID(converted.lock_token)
    assert converted.enqueued_time == datetime(2026, 11, 20, 10, 0, tzinfo=UTC)
    assert converted.locked_until == lock_end
    assert converted.raw is raw
    assert (converted.dead_letter_reason, converted.from_dead_letter) == (None, False)


def test_dead_letter_carries_reason_and_description_as_fields_not_properties() -> None:
    raw = sdk_message(object(), dead_letter=("CredentialsRejected", "AADSTS50126"), peeked=True)

    converted = from_service_bus_message(raw, QUEUE, from_dead_letter=True, peeked=True)

    assert converted.dead_letter_reason == "CredentialsRejected"
    assert converted.dead_letter_description == "AADSTS50126"
    assert converted.application_properties == PROPERTIES
    assert converted.from_dead_letter
    assert (converted.lock_token, converted.locked_until) == (None, None)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ({b"publisherId": b"contoso"}, {"publisherId": "contoso"}),
        ({"attempt": 3, b"ok": True, "w": 1.5}, {"attempt": 3, "ok": True, "w": 1.5}),
        ({b"id": uuid.UUID(int=1)}, {"id": "00000000-0000-0000-0000-000000000001"}),
        ({b"at": datetime(2026, 1, 1, tzinfo=UTC)}, {"at": "2026-01-01 00:00:00+00:00"}),
        ({b"gone": None, b"DeadLetterReason": b"InvalidLead"}, {}),
        (None, {}),
    ],
)
def test_received_properties_are_decoded_to_text(
    raw: dict[Any, Any] | None, expected: dict[str, Any]
) -> None:
    assert decode_properties(raw) == expected


# -- sending ---------------------------------------------------------------------------------------


def test_one_message_is_sent_directly_and_several_as_one_batch_on_a_cached_sender(setup: Setup) -> None:
    setup.transport.send(QUEUE, [OutgoingMessage(body=b"{}", message_id="one")])
    setup.transport.send(QUEUE, [OutgoingMessage(body=b"{}", message_id=f"m{i}") for i in range(3)])

    [sender] = setup.client.senders
    single, batch = sender.sent
    assert isinstance(single, ServiceBusMessage)
    assert single.message_id == "one"
    assert isinstance(batch, ServiceBusMessageBatch)
    assert len(batch) == 3


def test_a_batch_over_the_size_limit_is_sent_in_several(setup: Setup) -> None:
    setup.client.batch_size = 1200
    setup.transport.send(QUEUE, [OutgoingMessage(body=b"x" * 400, message_id=f"m{i}") for i in range(6)])

    [sender] = setup.client.senders
    assert len(sender.sent) > 1
    assert sum(len(cast(ServiceBusMessageBatch, batch)) for batch in sender.sent) == 6


def test_each_queue_gets_its_own_sender(setup: Setup) -> None:
    setup.transport.send("leads-incoming", [OutgoingMessage(body=b"{}", message_id="a")])
    setup.transport.send(QUEUE, [OutgoingMessage(body=b"{}", message_id="b")])

    assert [sender.queue for sender in setup.client.senders] == ["leads-incoming", QUEUE]


# -- receiving and settling ------------------------------------------------------------------------


def test_receive_uses_a_peek_lock_receiver_with_count_and_wait(setup: Setup) -> None:
    deliver(setup, 2)

    received = setup.transport.receive(QUEUE, max_messages=5, max_wait=3.0)

    [receiver] = setup.client.receivers
    assert (receiver.queue, receiver.sub_queue) == (QUEUE, None)
    assert receiver.receive_mode == ServiceBusReceiveMode.PEEK_LOCK
    assert receiver.calls == [("receive", 5, 3.0)]
    assert [m.message_id for m in received] == ["lead-0-0", "lead-0-1"]
    assert all(m.lock_token for m in received)


def test_receive_waits_at_least_the_minimum_the_service_needs(setup: Setup) -> None:
    setup.transport.receive(QUEUE)

    assert setup.client.receivers[0].calls == [("receive", 1, MIN_RECEIVE_WAIT)]


def test_a_receiver_holding_unsettled_messages_is_not_used_for_the_next_receive(setup: Setup) -> None:
    deliver(setup, 1)
    [first] = setup.transport.receive(QUEUE)
    [second] = setup.transport.receive(QUEUE)
    assert len(setup.client.receivers) == 2

    setup.transport.complete(first)
    setup.transport.complete(second)
    setup.transport.receive(QUEUE)

    assert len(setup.client.receivers) == 2


@pytest.mark.parametrize(
    ("settle", "expected"),
    [
        (lambda t, m: t.complete(m), ("complete",)),
        (lambda t, m: t.abandon(m), ("abandon",)),
        (
            lambda t, m: t.dead_letter(m, "LeadRejected", "CRM said 400"),
            ("dead_letter", "LeadRejected", "CRM said 400"),
        ),
    ],
)
def test_settlement_goes_to_the_receiver_the_message_came_from(
    setup: Setup, settle: Callable[[Transport, ReceivedMessage], None], expected: tuple[str, ...]
) -> None:
    deliver(setup, 1)
    [first] = setup.transport.receive(QUEUE)
    [second] = setup.transport.receive(QUEUE)
    one, two = setup.client.receivers

    settle(setup.transport, first)

    name, message, *extra = one.calls[-1]
    assert (name, *extra) == expected
    assert message is first.raw
    assert [call[0] for call in two.calls] == ["receive"]
    assert second.raw is not first.raw


def test_renewing_a_lock_updates_locked_until(setup: Setup) -> None:
    deliver(setup, 1)
    [message] = setup.transport.receive(QUEUE)

    setup.transport.renew_lock(message)

    assert setup.client.receivers[0].calls[-1] == ("renew", message.raw)
    assert message.locked_until == datetime(2026, 11, 20, 10, 5, tzinfo=UTC)


SETTLEMENTS: dict[str, Callable[[Transport, ReceivedMessage], None]] = {
    "complete": lambda t, m: t.complete(m),
    "abandon": lambda t, m: t.abandon(m),
    "dead_letter": lambda t, m: t.dead_letter(m, "LeadRejected", "400"),
    "renew_lock": lambda t, m: t.renew_lock(m),
}


@pytest.mark.parametrize("settlement", SETTLEMENTS)
def test_an_expired_lock_raises_lock_lost(setup: Setup, settlement: str) -> None:
    deliver(setup, 1)
    [message] = setup.transport.receive(QUEUE)
    setup.client.receivers[0].lock_lost.add(id(message.raw))

    with pytest.raises(LockLost) as caught:
        SETTLEMENTS[settlement](setup.transport, message)

    assert isinstance(caught.value.__cause__, MessageLockLostError)


@pytest.mark.parametrize("settlement", ["complete", "abandon", "dead_letter"])
def test_settling_twice_raises_lock_lost(setup: Setup, settlement: str) -> None:
    deliver(setup, 1)
    [message] = setup.transport.receive(QUEUE)
    setup.transport.complete(message)

    with pytest.raises(LockLost):
        SETTLEMENTS[settlement](setup.transport, message)


@pytest.mark.parametrize("settlement", SETTLEMENTS)
def test_a_peeked_dead_letter_cannot_be_settled(setup: Setup, settlement: str) -> None:
    setup.client.prepare = lambda r: r.dead_letters.append(
        sdk_message(r, dead_letter=("InvalidLead", "bad"), peeked=True)
    )
    [peeked] = setup.transport.peek_dead_letters(QUEUE)

    with pytest.raises(ValueError, match=r"peeked|dead-lettered again"):
        SETTLEMENTS[settlement](setup.transport, peeked)

    assert [call[0] for call in setup.client.receivers[0].calls] == ["peek"]


# -- dead letters and stats ------------------------------------------------------------------------


def dead_lettered(receiver: FakeReceiver, reasons: list[str]) -> None:
    receiver.dead_letters = [
        sdk_message(receiver, message_id=f"d{i}", sequence_number=i + 1, dead_letter=(r, "why"), peeked=True)
        for i, r in enumerate(reasons)
    ]


@pytest.mark.parametrize(("from_sequence", "sent"), [(0, 1), (1, 1), (17, 17)])
def test_dead_letters_are_peeked_from_the_dead_letter_sub_queue_at_an_explicit_sequence(
    setup: Setup, from_sequence: int, sent: int
) -> None:
    setup.client.prepare = lambda r: dead_lettered(r, ["InvalidLead"] * 20)

    peeked = setup.transport.peek_dead_letters(QUEUE, max_messages=2, from_sequence=from_sequence)

    [receiver] = setup.client.receivers
    assert receiver.sub_queue == ServiceBusSubQueue.DEAD_LETTER
    assert receiver.calls == [("peek", 2, sent)]
    assert [m.sequence_number for m in peeked] == [sent, sent + 1]
    assert all(m.from_dead_letter and m.lock_token is None for m in peeked)


def test_dead_letters_are_received_locked_from_the_dead_letter_sub_queue(setup: Setup) -> None:
    deliver(setup, 1, dead_letter=("RetriesExhausted", "5 attempts"))

    [message] = setup.transport.receive_dead_letters(QUEUE, max_messages=10)
    setup.transport.complete(message)

    [receiver] = setup.client.receivers
    assert receiver.sub_queue == ServiceBusSubQueue.DEAD_LETTER
    assert (message.from_dead_letter, message.dead_letter_reason) == (True, "RetriesExhausted")
    assert receiver.calls[-1] == ("complete", message.raw)


@dataclass
class FakeRuntimeProperties:
    active_message_count: int
    scheduled_message_count: int
    dead_letter_message_count: int


class FakeAdmin:
    def __init__(self) -> None:
        self.asked: list[str] = []
        self.closed = False

    def get_queue_runtime_properties(self, queue: str) -> FakeRuntimeProperties:
        self.asked.append(queue)
        return FakeRuntimeProperties(5, 2, 250)

    def close(self) -> None:
        self.closed = True


def test_stats_combine_runtime_counts_with_reasons_from_a_bounded_peek() -> None:
    client, admin = FakeClient(), FakeAdmin()
    client.prepare = lambda r: dead_lettered(r, ["InvalidLead", "CredentialsRejected"] * 125)
    transport = ServiceBusTransport(
        NAMESPACE,
        cast(TokenCredential, FakeCredential()),
        client=cast(ServiceBusClient, client),
        admin_client=cast(ServiceBusAdministrationClient, admin),
        dead_letter_scan_limit=150,
    )

    stats = transport.stats(QUEUE)

    assert admin.asked == [QUEUE]
    assert (stats.active, stats.scheduled, stats.dead_lettered) == (5, 2, 250)
    assert dict(stats.dead_lettered_by_reason) == {"InvalidLead": 75, "CredentialsRejected": 75}
    assert [call[2] for call in client.receivers[0].calls] == [1, 101]


def test_close_closes_senders_receivers_and_clients(setup: Setup) -> None:
    setup.transport.send(QUEUE, [OutgoingMessage(body=b"{}", message_id="a")])
    setup.transport.receive(QUEUE)

    setup.transport.close()

    assert setup.client.closed
    assert all(sender.closed for sender in setup.client.senders)
    assert all(receiver.closed for receiver in setup.client.receivers)


def test_the_transport_repr_names_only_the_namespace(setup: Setup) -> None:
    assert repr(setup.transport) == f"ServiceBusTransport({NAMESPACE!r})"


def test_make_transport_builds_the_service_bus_adapter_for_the_servicebus_backend() -> None:
    settings = Settings.from_env(
        {
            "LEADWRITER_QUEUE_BACKEND": "servicebus",
            "ServiceBusConnection__fullyQualifiedNamespace": NAMESPACE,
        }
    )

    transport = make_transport(settings)
    try:
        assert isinstance(transport, ServiceBusTransport)
        assert isinstance(transport, Transport)
        assert transport.fully_qualified_namespace == NAMESPACE
    finally:
        transport.close()


class RefusingAdmin(FakeAdmin):
    """The administration API as a Data Receiver/Sender identity sees it: no Manage right."""

    def get_queue_runtime_properties(self, queue: str) -> FakeRuntimeProperties:
        self.asked.append(queue)
        raise ClientAuthenticationError("Unauthorized: claim 'Manage' is required")


def test_stats_count_by_peeking_when_the_identity_lacks_the_manage_right() -> None:
    client, admin = FakeClient(), RefusingAdmin()
    client.prepare = lambda r: dead_lettered(r, ["InvalidLead"] * 3 + ["RetriesExhausted"] * 2)
    transport = ServiceBusTransport(
        NAMESPACE,
        cast(TokenCredential, FakeCredential()),
        client=cast(ServiceBusClient, client),
        admin_client=cast(ServiceBusAdministrationClient, admin),
    )

    stats = transport.stats(QUEUE)

    assert admin.asked == [QUEUE]
    assert stats.dead_lettered == 5
    assert dict(stats.dead_lettered_by_reason) == {"InvalidLead": 3, "RetriesExhausted": 2}
    assert stats.active + stats.scheduled == 5, "the fake answers every peek with the same five messages"


# -- scheduled retries, recorded and released early -------------------------------------


class MemoryLedger:
    """A ScheduleLedger in a list (the state-store one is tested in tests/test_recovery.py)."""

    def __init__(self) -> None:
        self.entries: list[ScheduledEntry] = []

    def record(self, entries: Sequence[ScheduledEntry]) -> None:
        self.entries += entries

    def waiting(self, publisher_id: str, *, queue: str | None = None, after: datetime) -> list[ScheduledEntry]:
        found = [
            e for e in self.entries
            if e.publisher_id == publisher_id and (queue is None or e.queue == queue) and e.due > after
        ]
        return sorted(found, key=lambda e: e.due)

    def forget(self, entries: Sequence[ScheduledEntry]) -> None:
        self.entries = [e for e in self.entries if e not in entries]


class SchedulingSender(FakeSender):
    """Answers schedule_messages with sequence numbers, as the SDK does, and records cancels."""

    next_sequence = 100

    def __init__(self, queue: str, batch_size: int, log: list[tuple[Any, ...]]) -> None:
        super().__init__(queue, batch_size)
        self.log = log

    def send_messages(self, message: ServiceBusMessage | ServiceBusMessageBatch) -> None:
        super().send_messages(message)
        self.log.append(("send", message))

    def schedule_messages(self, message: ServiceBusMessage, schedule_time_utc: datetime) -> list[int]:
        SchedulingSender.next_sequence += 1
        self.log.append(("schedule", message, schedule_time_utc, SchedulingSender.next_sequence))
        return [SchedulingSender.next_sequence]

    def cancel_scheduled_messages(self, sequence_numbers: int) -> None:
        self.log.append(("cancel", sequence_numbers))


@dataclass
class LedgerSetup:
    transport: ServiceBusTransport
    client: FakeClient
    ledger: MemoryLedger
    log: list[tuple[Any, ...]]


@pytest.fixture
def ledger_setup() -> LedgerSetup:
    client = FakeClient()
    log: list[tuple[Any, ...]] = []
    client.get_queue_sender = lambda queue: SchedulingSender(queue, client.batch_size, log)  # type: ignore[method-assign]
    ledger = MemoryLedger()
    transport = ServiceBusTransport(
        NAMESPACE, cast(TokenCredential, FakeCredential()), client=cast(ServiceBusClient, client), ledger=ledger
    )
    return LedgerSetup(transport, client, ledger, log)


def _retry(lead: str, due: datetime, publisher: str = "contoso") -> OutgoingMessage:
    return OutgoingMessage(
        body=b"{}",
        message_id=f"{lead}.a3",
        application_properties={"publisherId": publisher, "leadId": lead, "attempt": 3},
        scheduled_enqueue_time=due,
    )


def test_a_scheduled_send_goes_through_schedule_messages_and_its_sequence_number_is_recorded(
    ledger_setup: LedgerSetup,
) -> None:
    due = datetime.now(UTC) + timedelta(minutes=5)
    now_message = OutgoingMessage(body=b"{}", message_id="L9", application_properties={"publisherId": "contoso"})

    ledger_setup.transport.send(QUEUE, [_retry("L1", due), now_message])

    kinds = [entry[0] for entry in ledger_setup.log]
    assert kinds == ["schedule", "send"]
    _, scheduled, when, sequence = ledger_setup.log[0]
    assert scheduled.message_id == "L1.a3"
    assert when == due
    assert ledger_setup.ledger.entries == [ScheduledEntry(QUEUE, "contoso", sequence, due)]
    assert ledger_setup.transport.scheduled_of("contoso") == (1, due)


def test_release_sends_a_copy_with_a_new_id_before_it_cancels_the_scheduled_original(
    ledger_setup: LedgerSetup,
) -> None:
    soon, later = datetime.now(UTC) + timedelta(minutes=1), datetime.now(UTC) + timedelta(minutes=5)
    ledger_setup.transport.send(QUEUE, [_retry("L2", later)])
    ledger_setup.transport.send(QUEUE, [_retry("L1", soon)])
    first, second = (entry[3] for entry in ledger_setup.log)

    def prepare(receiver: FakeReceiver) -> None:
        # What a peek by sequence number finds: the scheduled originals.
        receiver.dead_letters = [
            sdk_message(
                receiver,
                message_id=f"{lead}.a3",
                sequence_number=number,
                properties={"publisherId": "contoso", "leadId": lead, "attempt": 3},
                peeked=True,
                state=2,
            )
            for lead, number in (("L2", first), ("L1", second))
        ]

    ledger_setup.client.prepare = prepare
    ledger_setup.log.clear()

    released = ledger_setup.transport.release_scheduled(QUEUE, "contoso", 1)

    assert released == 1
    # Earliest due first (L1), the copy sent before the original is cancelled.
    assert [entry[0] for entry in ledger_setup.log] == ["send", "cancel"]
    copy = ledger_setup.log[0][1]
    assert copy.message_id == "L1.a3.d1"
    assert copy.scheduled_enqueue_time_utc is None
    assert decode_properties(copy.application_properties)["attempt"] == 3  # no attempt spent
    assert ledger_setup.log[1] == ("cancel", second)
    assert ledger_setup.transport.scheduled_of("contoso") == (1, later)


def test_a_recorded_message_that_is_no_longer_scheduled_is_forgotten_not_sent(ledger_setup: LedgerSetup) -> None:
    ledger_setup.transport.send(QUEUE, [_retry("L1", datetime.now(UTC) + timedelta(minutes=1))])
    sequence = ledger_setup.log[0][3]

    def prepare(receiver: FakeReceiver) -> None:
        # It fell due and was received meanwhile: the peek finds the next message, not this one.
        receiver.dead_letters = [sdk_message(receiver, sequence_number=sequence + 5, peeked=True, state=2)]

    ledger_setup.client.prepare = prepare
    ledger_setup.log.clear()

    assert ledger_setup.transport.release_scheduled(QUEUE, "contoso", 5) == 0
    assert ledger_setup.log == []
    assert ledger_setup.ledger.entries == []


def test_a_deferred_copy_is_scheduled_but_not_recorded_for_release(ledger_setup: LedgerSetup) -> None:
    deferred = OutgoingMessage(
        body=b"{}",
        message_id="L1.d2",
        application_properties={"publisherId": "contoso", "leadId": "L1", "attempt": 1, "deferrals": 2},
        scheduled_enqueue_time=datetime.now(UTC) + timedelta(seconds=3),
    )

    ledger_setup.transport.send(QUEUE, [deferred])

    assert [entry[0] for entry in ledger_setup.log] == ["schedule"]
    assert ledger_setup.ledger.entries == []


def test_without_a_ledger_scheduled_sends_stay_plain_sends_and_nothing_is_released(setup: Setup) -> None:
    setup.transport.send(QUEUE, [_retry("L1", datetime.now(UTC) + timedelta(minutes=1))])

    assert len(setup.client.senders[0].sent) == 1
    assert setup.transport.release_scheduled(QUEUE, "contoso", 5) == 0
    assert setup.transport.scheduled_of("contoso") == (0, None)
