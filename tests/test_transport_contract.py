"""The Transport contract (shared/transport/base.py), run against every adapter that can run here.

The embedded broker runs every case with a clock the test drives. The Service Bus adapter needs a
namespace, which is not reachable here: its parametrisation is skipped honestly rather than run
against a fake that would only agree with our own reading of Service Bus. Its conversions and its
routing of settlement to the right receiver are covered by tests/test_servicebus_adapter.py.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from shared.errors import DeadLetterReason
from shared.transport import LockLost, OutgoingMessage, ReceivedMessage, Transport
from shared.transport.embedded import EmbeddedBroker
from tests.fixtures.transport import FakeClock

QUEUE = "leads-incoming"
LOCK_DURATION = 30.0
MAX_DELIVERY_COUNT = 3
DUPLICATE_WINDOW = 600.0


@dataclass
class Harness:
    transport: Transport
    #: Moves the broker's time forward (seconds).
    advance: Callable[[float], None]
    #: The broker's current time.
    now: Callable[[], datetime]


@pytest.fixture(
    params=[
        "embedded",
        pytest.param(
            "servicebus",
            marks=pytest.mark.skip(
                reason="needs a reachable Service Bus namespace and a clock we cannot drive; "
                "conversions and settlement routing are tested in test_servicebus_adapter.py"
            ),
        ),
    ]
)
def harness(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Harness]:
    if request.param != "embedded":  # pragma: no cover - skipped above
        raise NotImplementedError(request.param)
    clock = FakeClock()
    broker = EmbeddedBroker(
        tmp_path / "broker.db",
        lock_duration=LOCK_DURATION,
        max_delivery_count=MAX_DELIVERY_COUNT,
        duplicate_window=DUPLICATE_WINDOW,
        clock=clock,
    )
    yield Harness(broker, clock.advance, lambda: datetime.fromtimestamp(clock(), UTC))
    broker.close()


def outgoing(message_id: str, body: bytes = b'{"leadId": "x"}', **options: object) -> OutgoingMessage:
    properties = {"publisherId": "contoso", "leadId": message_id, "attempt": 1}
    return OutgoingMessage(body=body, message_id=message_id, application_properties=properties, **options)  # type: ignore[arg-type]


def receive_one(transport: Transport, queue: str = QUEUE) -> ReceivedMessage:
    received = transport.receive(queue)
    assert len(received) == 1, received
    return received[0]


def test_sent_message_is_received_with_body_id_and_properties_then_completed(harness: Harness) -> None:
    sent = OutgoingMessage(
        body=b'{"leadId": "L1"}',
        message_id="L1",
        application_properties={"publisherId": "contoso", "leadId": "L1", "attempt": 2, "ok": True, "w": 0.5},
        content_type="application/json",
    )
    harness.transport.send(QUEUE, [sent])

    message = receive_one(harness.transport)

    assert (message.queue, message.body, message.message_id) == (QUEUE, sent.body, "L1")
    assert message.application_properties == dict(sent.application_properties)
    assert message.content_type == "application/json"
    assert message.delivery_count == 1
    assert message.lock_token
    assert message.locked_until == harness.now() + timedelta(seconds=LOCK_DURATION)
    assert message.enqueued_time == harness.now()
    assert not message.from_dead_letter
    harness.transport.complete(message)
    assert harness.transport.receive(QUEUE) == []
    assert harness.transport.stats(QUEUE).active == 0


def test_locked_message_is_invisible_to_other_receivers(harness: Harness) -> None:
    harness.transport.send(QUEUE, [outgoing("a")])
    receive_one(harness.transport)

    assert harness.transport.receive(QUEUE, max_messages=10) == []


def test_abandoned_message_is_redelivered_at_once_with_delivery_count_plus_one(harness: Harness) -> None:
    harness.transport.send(QUEUE, [outgoing("a")])
    first = receive_one(harness.transport)

    harness.transport.abandon(first)
    again = receive_one(harness.transport)

    assert again.message_id == "a"
    assert again.delivery_count == first.delivery_count + 1
    assert again.lock_token != first.lock_token


def test_expired_lock_makes_the_message_visible_again_and_the_old_lock_useless(harness: Harness) -> None:
    harness.transport.send(QUEUE, [outgoing("a")])
    first = receive_one(harness.transport)

    harness.advance(LOCK_DURATION - 1)
    assert harness.transport.receive(QUEUE) == []
    harness.advance(2)
    again = receive_one(harness.transport)

    assert (again.message_id, again.delivery_count) == ("a", 2)
    with pytest.raises(LockLost):
        harness.transport.complete(first)
    harness.transport.complete(again)


def test_expired_lock_cannot_settle_even_before_anyone_receives_again(harness: Harness) -> None:
    harness.transport.send(QUEUE, [outgoing("a")])
    message = receive_one(harness.transport)

    harness.advance(LOCK_DURATION + 1)

    with pytest.raises(LockLost):
        harness.transport.complete(message)


def test_message_delivered_max_delivery_count_times_is_dead_lettered(harness: Harness) -> None:
    harness.transport.send(QUEUE, [outgoing("poison")])
    for attempt in range(1, MAX_DELIVERY_COUNT + 1):
        message = receive_one(harness.transport)
        assert message.delivery_count == attempt
        harness.transport.abandon(message)

    assert harness.transport.receive(QUEUE) == []
    [dead] = harness.transport.peek_dead_letters(QUEUE)
    assert dead.message_id == "poison"
    assert dead.dead_letter_reason == DeadLetterReason.MAX_DELIVERY_COUNT_EXCEEDED
    assert dead.dead_letter_description == (
        f"Message could not be consumed after {MAX_DELIVERY_COUNT} delivery attempts."
    )
    assert dead.delivery_count == MAX_DELIVERY_COUNT


def test_dead_lettering_for_delivery_count_does_not_starve_the_batch(harness: Harness) -> None:
    harness.transport.send(QUEUE, [outgoing("poison")])
    for _ in range(MAX_DELIVERY_COUNT):
        harness.transport.abandon(receive_one(harness.transport))
    harness.transport.send(QUEUE, [outgoing("fine-1"), outgoing("fine-2")])

    received = harness.transport.receive(QUEUE, max_messages=2)

    assert [m.message_id for m in received] == ["fine-1", "fine-2"]


def test_scheduled_message_is_invisible_until_due(harness: Harness) -> None:
    due = harness.now() + timedelta(seconds=120)
    harness.transport.send(QUEUE, [outgoing("later", scheduled_enqueue_time=due)])

    assert harness.transport.receive(QUEUE) == []
    assert (harness.transport.stats(QUEUE).scheduled, harness.transport.stats(QUEUE).active) == (1, 0)
    harness.advance(119)
    assert harness.transport.receive(QUEUE) == []
    harness.advance(1)
    message = receive_one(harness.transport)

    assert message.message_id == "later"
    assert message.enqueued_time == due


def test_scheduled_time_in_the_past_is_visible_at_once(harness: Harness) -> None:
    an_hour_ago = harness.now() - timedelta(hours=1)
    harness.transport.send(QUEUE, [outgoing("now", scheduled_enqueue_time=an_hour_ago)])

    assert receive_one(harness.transport).message_id == "now"


def test_release_scheduled_brings_a_publishers_earliest_retries_forward_and_counts_the_rest(
    harness: Harness,
) -> None:
    due = harness.now() + timedelta(minutes=5)
    harness.transport.send(
        QUEUE, [outgoing(f"retry-{n}", scheduled_enqueue_time=due + timedelta(seconds=10 - n)) for n in range(3)]
    )
    assert harness.transport.scheduled_of("contoso") == (3, due + timedelta(seconds=8))

    assert harness.transport.release_scheduled(QUEUE, "someone-else", 5) == 0
    assert harness.transport.release_scheduled(QUEUE, "contoso", 2) == 2

    released = harness.transport.receive(QUEUE, max_messages=10)
    assert sorted(m.message_id for m in released) == ["retry-1", "retry-2"]
    for message in released:
        harness.transport.complete(message)
    assert harness.transport.scheduled_of("contoso") == (1, due + timedelta(seconds=10))
    harness.advance(300 + 10)
    assert receive_one(harness.transport).message_id == "retry-0"
    assert harness.transport.scheduled_of("contoso") == (0, None)


def test_duplicate_message_id_within_the_window_is_dropped_silently(harness: Harness) -> None:
    harness.transport.send(QUEUE, [outgoing("dup", body=b"first")])
    harness.advance(DUPLICATE_WINDOW - 1)
    harness.transport.send(QUEUE, [outgoing("dup", body=b"second")])

    received = harness.transport.receive(QUEUE, max_messages=10)

    assert [m.body for m in received] == [b"first"]


def test_duplicate_message_id_is_dropped_even_after_the_first_was_completed(harness: Harness) -> None:
    harness.transport.send(QUEUE, [outgoing("dup")])
    harness.transport.complete(receive_one(harness.transport))
    harness.transport.send(QUEUE, [outgoing("dup")])

    assert harness.transport.receive(QUEUE) == []


def test_duplicate_message_id_after_the_window_is_accepted(harness: Harness) -> None:
    harness.transport.send(QUEUE, [outgoing("dup", body=b"first")])
    harness.transport.complete(receive_one(harness.transport))
    harness.advance(DUPLICATE_WINDOW + 1)
    harness.transport.send(QUEUE, [outgoing("dup", body=b"second")])

    assert receive_one(harness.transport).body == b"second"


def test_duplicate_detection_is_per_queue(harness: Harness) -> None:
    harness.transport.send(QUEUE, [outgoing("same")])
    harness.transport.send("leads-validated", [outgoing("same")])

    assert receive_one(harness.transport, QUEUE).message_id == "same"
    assert receive_one(harness.transport, "leads-validated").message_id == "same"


def test_message_whose_time_to_live_runs_out_is_dead_lettered_ttl_expired(harness: Harness) -> None:
    harness.transport.send(
        QUEUE, [outgoing("short", time_to_live=10.0), outgoing("long", time_to_live=100.0)]
    )
    harness.advance(11)

    received = harness.transport.receive(QUEUE, max_messages=10)

    assert [m.message_id for m in received] == ["long"]
    [dead] = harness.transport.peek_dead_letters(QUEUE)
    assert dead.message_id == "short"
    assert dead.dead_letter_reason == DeadLetterReason.TTL_EXPIRED
    assert dead.dead_letter_description


def test_dead_letter_keeps_body_id_properties_reason_and_description(harness: Harness) -> None:
    sent = outgoing("bad", body=b'{"not": "a lead"}')
    harness.transport.send(QUEUE, [sent])

    harness.transport.dead_letter(receive_one(harness.transport), "InvalidLead", "lead.UserDetails: missing")

    [dead] = harness.transport.peek_dead_letters(QUEUE)
    assert (dead.body, dead.message_id) == (sent.body, "bad")
    assert dead.application_properties == dict(sent.application_properties)
    assert dead.dead_letter_reason == "InvalidLead"
    assert dead.dead_letter_description == "lead.UserDetails: missing"
    assert dead.from_dead_letter
    assert dead.lock_token is None
    assert harness.transport.receive(QUEUE) == []


def test_peeking_dead_letters_locks_nothing_and_pages_by_sequence(harness: Harness) -> None:
    harness.transport.send(QUEUE, [outgoing(f"m{i}") for i in range(5)])
    for message in harness.transport.receive(QUEUE, max_messages=5):
        harness.transport.dead_letter(message, "LeadRejected", "400")

    first_page = harness.transport.peek_dead_letters(QUEUE, max_messages=2)
    again = harness.transport.peek_dead_letters(QUEUE, max_messages=2)
    second_page = harness.transport.peek_dead_letters(
        QUEUE, max_messages=10, from_sequence=first_page[-1].sequence_number + 1
    )

    assert [m.message_id for m in first_page] == ["m0", "m1"]
    assert [m.sequence_number for m in again] == [m.sequence_number for m in first_page]
    assert [m.message_id for m in second_page] == ["m2", "m3", "m4"]
    assert len(harness.transport.receive_dead_letters(QUEUE, max_messages=10)) == 5


def test_received_dead_letters_are_locked_completed_or_released(harness: Harness) -> None:
    harness.transport.send(QUEUE, [outgoing("a"), outgoing("b")])
    for message in harness.transport.receive(QUEUE, max_messages=2):
        harness.transport.dead_letter(message, "RetriesExhausted", "gave up")

    locked = harness.transport.receive_dead_letters(QUEUE, max_messages=10)
    assert [m.message_id for m in locked] == ["a", "b"]
    assert all(m.from_dead_letter and m.lock_token for m in locked)
    assert locked[0].dead_letter_reason == "RetriesExhausted"
    assert harness.transport.receive_dead_letters(QUEUE) == []

    harness.transport.complete(locked[0])
    harness.transport.abandon(locked[1])

    [left] = harness.transport.peek_dead_letters(QUEUE)
    assert left.message_id == "b"
    assert [m.message_id for m in harness.transport.receive_dead_letters(QUEUE)] == ["b"]
    assert harness.transport.stats(QUEUE).dead_lettered == 1


Settle = Callable[[Transport, ReceivedMessage], None]
SETTLEMENTS: dict[str, Settle] = {
    "complete": lambda t, m: t.complete(m),
    "abandon": lambda t, m: t.abandon(m),
    "dead_letter": lambda t, m: t.dead_letter(m, "LeadRejected", "400"),
    "renew_lock": lambda t, m: t.renew_lock(m),
}


@pytest.mark.parametrize("first", ["complete", "abandon", "dead_letter"])
@pytest.mark.parametrize("second", ["complete", "abandon", "dead_letter", "renew_lock"])
def test_settling_a_settled_message_again_raises_lock_lost(harness: Harness, first: str, second: str) -> None:
    harness.transport.send(QUEUE, [outgoing("a")])
    message = receive_one(harness.transport)
    SETTLEMENTS[first](harness.transport, message)

    with pytest.raises(LockLost):
        SETTLEMENTS[second](harness.transport, message)


@pytest.mark.parametrize("settlement", ["complete", "abandon", "dead_letter", "renew_lock"])
def test_a_peeked_dead_letter_cannot_be_settled(harness: Harness, settlement: str) -> None:
    harness.transport.send(QUEUE, [outgoing("a")])
    harness.transport.dead_letter(receive_one(harness.transport), "LeadRejected", "400")
    [peeked] = harness.transport.peek_dead_letters(QUEUE)

    with pytest.raises(ValueError, match=r"peeked|dead-lettered again"):
        SETTLEMENTS[settlement](harness.transport, peeked)
    assert len(harness.transport.peek_dead_letters(QUEUE)) == 1


def test_renewing_a_lock_extends_it_by_the_lock_duration(harness: Harness) -> None:
    harness.transport.send(QUEUE, [outgoing("slow")])
    message = receive_one(harness.transport)

    harness.advance(LOCK_DURATION * 0.8)
    harness.transport.renew_lock(message)
    assert message.locked_until == harness.now() + timedelta(seconds=LOCK_DURATION)
    harness.advance(LOCK_DURATION * 0.8)

    assert harness.transport.receive(QUEUE) == []
    harness.transport.complete(message)
    assert harness.transport.stats(QUEUE).active == 0


def test_stats_count_active_scheduled_and_dead_letters_by_reason(harness: Harness) -> None:
    later = harness.now() + timedelta(hours=1)
    harness.transport.send(
        QUEUE,
        [outgoing(f"m{i}") for i in range(6)] + [outgoing("s1", scheduled_enqueue_time=later)],
    )
    received = harness.transport.receive(QUEUE, max_messages=4)
    harness.transport.dead_letter(received[0], "InvalidLead", "bad json")
    harness.transport.dead_letter(received[1], "InvalidLead", "no contact")
    harness.transport.dead_letter(received[2], "CredentialsMissing", "no connection for contoso")

    stats = harness.transport.stats(QUEUE)

    # Locked messages are still active, as on Service Bus.
    assert (stats.queue, stats.active, stats.scheduled, stats.dead_lettered) == (QUEUE, 3, 1, 3)
    assert dict(stats.dead_lettered_by_reason) == {"InvalidLead": 2, "CredentialsMissing": 1}
    assert harness.transport.stats("never-used").active == 0


def test_batch_receive_returns_up_to_max_messages_in_order(harness: Harness) -> None:
    harness.transport.send(QUEUE, [outgoing(f"m{i}") for i in range(5)])

    first = harness.transport.receive(QUEUE, max_messages=3)
    rest = harness.transport.receive(QUEUE, max_messages=3)

    assert [m.message_id for m in first] == ["m0", "m1", "m2"]
    assert [m.message_id for m in rest] == ["m3", "m4"]
    assert first[0].sequence_number < first[1].sequence_number < rest[0].sequence_number


def test_receive_with_nothing_to_receive_returns_an_empty_list(harness: Harness) -> None:
    assert harness.transport.receive(QUEUE, max_messages=5, max_wait=0.05) == []


def test_concurrent_receivers_never_get_the_same_message_while_it_is_locked(harness: Harness) -> None:
    total = 300
    harness.transport.send(QUEUE, [outgoing(f"m{i}") for i in range(total)])
    got: list[list[int]] = [[] for _ in range(8)]
    errors: list[BaseException] = []

    def drain(slot: int) -> None:
        try:
            while batch := harness.transport.receive(QUEUE, max_messages=1 + slot % 4):
                got[slot].extend(m.sequence_number for m in batch)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=drain, args=(slot,)) for slot in range(len(got))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)

    assert errors == []
    everything = [seq for batch in got for seq in batch]
    assert len(everything) == total
    assert len(set(everything)) == total
