"""Message ids and envelopes: deterministic ids, new ids for copies, properties on every hop."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from shared.pipeline.messages import MAX_MESSAGE_ID, envelope, hop_message_id, rescheduled_copy
from shared.transport.base import ReceivedMessage


def _received(props: dict[str, str | int], message_id: str = "lead-1") -> ReceivedMessage:
    return ReceivedMessage(
        queue="leads-incoming",
        body=b"{}",
        message_id=message_id,
        application_properties=props,
        content_type="application/json",
        delivery_count=1,
        enqueued_time=datetime.now(UTC),
        sequence_number=1,
    )


@pytest.mark.parametrize(
    ("replay", "attempt", "expected"),
    [(0, 1, "lead-1"), (0, 2, "lead-1.a2"), (1, 1, "lead-1.r1"), (2, 3, "lead-1.r2.a3")],
)
def test_hop_message_id_is_deterministic_and_distinct_per_copy(replay: int, attempt: int, expected: str) -> None:
    assert hop_message_id("lead-1", replay=replay, attempt=attempt) == expected


def test_long_lead_ids_are_shortened_to_the_service_bus_limit_without_colliding() -> None:
    a = hop_message_id("x" * 300 + "a", attempt=2)
    b = hop_message_id("x" * 300 + "b", attempt=2)
    assert len(a) <= MAX_MESSAGE_ID
    assert len(b) <= MAX_MESSAGE_ID
    assert a != b
    assert a.endswith(".a2")


def test_envelope_carries_publisher_lead_and_attempt() -> None:
    message = envelope(b"{}", publisher_id="contoso", lead_id="lead-1")
    assert message.message_id == "lead-1"
    assert dict(message.application_properties) == {"publisherId": "contoso", "leadId": "lead-1", "attempt": 1}


def test_rescheduled_copy_gets_a_new_id_the_next_attempt_and_a_future_enqueue_time() -> None:
    now = datetime(2026, 11, 20, 10, 0, tzinfo=UTC)
    original = _received({"publisherId": "contoso", "leadId": "lead-1", "attempt": 2, "replayCount": 1}, "lead-1.r1.a2")
    copy = rescheduled_copy(original, 15.0, now=now)
    assert copy.message_id == "lead-1.r1.a3"
    assert copy.application_properties["attempt"] == 3
    assert copy.application_properties["replayCount"] == 1
    assert copy.scheduled_enqueue_time == datetime(2026, 11, 20, 10, 0, 15, tzinfo=UTC)
    assert copy.body == original.body
