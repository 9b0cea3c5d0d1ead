"""Settling a group of messages at once: forwards in one send, completions in one broker write, in the
order single settlement keeps (send before complete), and nothing lost when the broker fails."""

from __future__ import annotations

import uuid

import pytest

from shared.errors import DeadLetterReason
from shared.names import QUEUE_READY, QUEUE_VALIDATED
from shared.pipeline.outcomes import Delivered, Forward, Reject, SettleAction, Stage
from shared.pipeline.settle import Settled, settle_many
from shared.transport import EmbeddedBroker, OutgoingMessage, ReceivedMessage


def incoming(n: int) -> OutgoingMessage:
    return OutgoingMessage(
        body=b"{}", message_id=f"lead-{n}", application_properties={"publisherId": "contoso", "leadId": f"lead-{n}"}
    )


def received(broker: EmbeddedBroker, queue: str, count: int) -> list[ReceivedMessage]:
    broker.send(queue, [incoming(n) for n in range(count)])
    return broker.receive(queue, max_messages=count)


def test_a_group_of_forwards_is_sent_then_completed_and_each_is_observed(broker: EmbeddedBroker) -> None:
    messages = received(broker, QUEUE_VALIDATED, 5)
    seen: list[Settled] = []
    items = [(m, Forward(QUEUE_READY, incoming(n)), None) for n, m in enumerate(messages)]

    results = settle_many(Stage.CHECK_SOLUTION, items, sender=broker, settler=broker, observer=seen.append)

    assert [r.action for r in results] == [SettleAction.FORWARDED] * 5
    assert [s.message.message_id for s in seen] == [m.message_id for m in messages]
    assert broker.stats(QUEUE_VALIDATED).active == 0
    assert sorted(m.message_id for m in broker.receive(QUEUE_READY, max_messages=10)) == [
        f"lead-{n}" for n in range(5)
    ]


def test_a_group_mixing_deliveries_and_dead_letters_settles_each_its_own_way(broker: EmbeddedBroker) -> None:
    delivered, rejected = received(broker, QUEUE_READY, 2)
    items = [
        (delivered, Delivered(record_id=uuid.uuid4(), created=True), None),
        (rejected, Reject(DeadLetterReason.LEAD_REJECTED, "400 from the CRM"), None),
    ]

    results = settle_many(Stage.WRITE_LEAD, items, sender=broker, settler=broker)

    assert {r.action for r in results} == {SettleAction.DELIVERED, SettleAction.DEAD_LETTERED}
    assert broker.stats(QUEUE_READY).active == 0
    assert [m.message_id for m in broker.peek_dead_letters(QUEUE_READY)] == [rejected.message_id]


class FailingSender:
    def send(self, queue: str, messages: object) -> None:
        raise OSError("disk full")


def test_when_the_forwards_cannot_be_sent_no_message_of_the_group_is_completed(broker: EmbeddedBroker) -> None:
    messages = received(broker, QUEUE_VALIDATED, 3)
    errors: list[str] = []
    items = [(m, Forward(QUEUE_READY, incoming(n)), None) for n, m in enumerate(messages)]

    results = settle_many(
        Stage.CHECK_SOLUTION,
        items,
        sender=FailingSender(),
        settler=broker,
        on_error=lambda message, exc: errors.append(message.message_id),
    )

    assert results == []
    assert sorted(errors) == sorted(m.message_id for m in messages)
    assert broker.stats(QUEUE_VALIDATED).active == 3, "still locked: each is delivered again when its lock ends"


def test_without_an_error_handler_a_failed_group_raises(broker: EmbeddedBroker) -> None:
    [message] = received(broker, QUEUE_VALIDATED, 1)

    with pytest.raises(OSError, match="disk full"):
        settle_many(
            Stage.CHECK_SOLUTION,
            [(message, Forward(QUEUE_READY, incoming(0)), None)],
            sender=FailingSender(),
            settler=broker,
        )
