"""The dead-letter core against the real embedded broker: filters, shapes, plans, safe replay, purge.

The broker runs on a SQLite file in ``tmp_path`` with an injected clock, so enqueue times and lock
expiry are driven by the test, never waited for.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from shared.errors import DeadLetterReason
from shared.names import QUEUE_INCOMING, QUEUE_READY, QUEUE_VALIDATED, STAGE_QUEUES
from shared.ops.deadletters import (
    DeadLetterFilter,
    DeadLetterItem,
    configuration_filter,
    group_counts,
    list_dead_letters,
    plan_replay,
    purge,
    replay,
    replay_copy,
)
from shared.pipeline.messages import envelope, hop_message_id
from shared.transport.base import OutgoingMessage, PropertyValue, ReceivedMessage
from shared.transport.embedded import EmbeddedBroker

START = datetime(2026, 11, 20, 10, 0, tzinfo=UTC)
LOCK = 30.0


class Clock:
    """The broker's clock, moved by the test."""

    def __init__(self) -> None:
        self.now = START.timestamp()

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def embedded(tmp_path: Path, clock: Clock) -> Iterator[EmbeddedBroker]:
    broker = EmbeddedBroker(tmp_path / "broker.db", lock_duration=LOCK, clock=clock)
    yield broker
    broker.close()


def lead_body(lead_id: str, publisher_id: str) -> bytes:
    return json.dumps(
        {
            "leadId": lead_id,
            "publisherId": publisher_id,
            "lead": {"UserDetails": {"Email": "ada@example.com"}},
        }
    ).encode()


def seed(
    broker: EmbeddedBroker,
    queue: str,
    lead_id: str,
    *,
    publisher_id: str = "contoso",
    reason: str = DeadLetterReason.CREDENTIALS_REJECTED,
    description: str = "AADSTS50126: invalid username or password",
    replay: int = 0,
    attempt: int = 1,
    extra: Mapping[str, PropertyValue] | None = None,
    body: bytes | None = None,
) -> str:
    """Put one dead letter on ``queue`` the way a stage does (send, receive, dead-letter); its message id."""
    message = envelope(
        lead_body(lead_id, publisher_id) if body is None else body,
        publisher_id=publisher_id,
        lead_id=lead_id,
        replay=replay,
        attempt=attempt,
        extra=extra,
    )
    broker.send(queue, [message])
    (received,) = broker.receive(queue, max_messages=1)
    assert received.message_id == message.message_id
    broker.dead_letter(received, reason, description)
    return message.message_id


def dead_ids(broker: EmbeddedBroker, queue: str) -> list[str]:
    return [m.message_id for m in broker.peek_dead_letters(queue, max_messages=10_000)]


def all_dead_ids(broker: EmbeddedBroker) -> dict[str, list[str]]:
    return {queue: dead_ids(broker, queue) for queue in STAGE_QUEUES}


def drain(broker: EmbeddedBroker, queue: str) -> list[ReceivedMessage]:
    """Every visible active message of ``queue`` (locked by the receive)."""
    return broker.receive(queue, max_messages=10_000)


def assert_receivable_now(broker: EmbeddedBroker, queue: str, message_ids: Sequence[str]) -> None:
    """The dead letters are there and not locked: a receive at the same instant gets every one."""
    received = broker.receive_dead_letters(queue, max_messages=10_000)
    assert sorted(m.message_id for m in received) == sorted(message_ids)
    for message in received:
        broker.abandon(message)


# --------------------------------------------------------------------------------------------------
# Filters and listing


@dataclass
class Population:
    """Seven dead letters across queues, reasons, publishers and two enqueue times."""

    ids: dict[str, str]
    middle: datetime


@pytest.fixture
def population(embedded: EmbeddedBroker, clock: Clock) -> Population:
    ids = {
        "in-contoso-rejected": seed(embedded, QUEUE_INCOMING, "L1", reason="CredentialsRejected"),
        "in-fabrikam-rejected": seed(
            embedded, QUEUE_INCOMING, "L2", publisher_id="fabrikam", reason="CredentialsRejected"
        ),
        "in-contoso-invalid": seed(embedded, QUEUE_INCOMING, "L3", reason="InvalidLead"),
        "val-contoso-solution": seed(embedded, QUEUE_VALIDATED, "L4", reason="SolutionMissing"),
    }
    clock.advance(3600)
    middle = datetime.fromtimestamp(clock.now, UTC)
    clock.advance(3600)
    ids |= {
        "ready-fabrikam-rejected": seed(
            embedded, QUEUE_READY, "L5", publisher_id="fabrikam", reason="LeadRejected"
        ),
        "ready-contoso-retries": seed(embedded, QUEUE_READY, "L6", reason="RetriesExhausted"),
        "in-contoso-rejected-late": seed(embedded, QUEUE_INCOMING, "L7", reason="CredentialsRejected"),
    }
    return Population(ids=ids, middle=middle)


FILTER_CASES: list[tuple[str, dict[str, Any], set[str]]] = [
    (
        "no filter selects all",
        {},
        {
            "in-contoso-rejected",
            "in-fabrikam-rejected",
            "in-contoso-invalid",
            "val-contoso-solution",
            "ready-fabrikam-rejected",
            "ready-contoso-retries",
            "in-contoso-rejected-late",
        },
    ),
    (
        "one queue",
        {"queues": (QUEUE_READY,)},
        {"ready-fabrikam-rejected", "ready-contoso-retries"},
    ),
    (
        "two queues",
        {"queues": (QUEUE_VALIDATED, QUEUE_READY)},
        {"val-contoso-solution", "ready-fabrikam-rejected", "ready-contoso-retries"},
    ),
    (
        "one reason",
        {"reasons": frozenset({"CredentialsRejected"})},
        {"in-contoso-rejected", "in-fabrikam-rejected", "in-contoso-rejected-late"},
    ),
    (
        "two reasons",
        {"reasons": frozenset({"InvalidLead", "LeadRejected"})},
        {"in-contoso-invalid", "ready-fabrikam-rejected"},
    ),
    (
        "publisher",
        {"publisher_id": "fabrikam"},
        {"in-fabrikam-rejected", "ready-fabrikam-rejected"},
    ),
    (
        "publisher and reason and queue",
        {
            "publisher_id": "contoso",
            "reasons": frozenset({"CredentialsRejected"}),
            "queues": (QUEUE_INCOMING,),
        },
        {"in-contoso-rejected", "in-contoso-rejected-late"},
    ),
    ("a reason nobody has", {"reasons": frozenset({"PermissionDenied"})}, set()),
]


@pytest.mark.parametrize(
    ("kwargs", "expected"), [c[1:] for c in FILTER_CASES], ids=[c[0] for c in FILTER_CASES]
)
def test_filters_select_exactly_the_matching_dead_letters(
    embedded: EmbeddedBroker, population: Population, kwargs: dict[str, Any], expected: set[str]
) -> None:
    items = list_dead_letters(embedded, DeadLetterFilter(**kwargs), limit=1000)

    assert sorted(item.message_id for item in items) == sorted(population.ids[key] for key in expected)


def test_message_id_filter_selects_only_those_ids(embedded: EmbeddedBroker, population: Population) -> None:
    wanted = {population.ids["in-fabrikam-rejected"], population.ids["ready-contoso-retries"], "no-such-id"}

    items = list_dead_letters(embedded, DeadLetterFilter(message_ids=frozenset(wanted)))

    assert {item.message_id for item in items} == wanted - {"no-such-id"}


@pytest.mark.parametrize(
    ("window", "expected"),
    [
        (
            "before",
            {"in-contoso-rejected", "in-fabrikam-rejected", "in-contoso-invalid", "val-contoso-solution"},
        ),
        ("after", {"ready-fabrikam-rejected", "ready-contoso-retries", "in-contoso-rejected-late"}),
    ],
)
def test_time_window_selects_by_enqueued_time(
    embedded: EmbeddedBroker, population: Population, window: str, expected: set[str]
) -> None:
    flt = (
        DeadLetterFilter(enqueued_before=population.middle)
        if window == "before"
        else DeadLetterFilter(enqueued_after=population.middle)
    )

    items = list_dead_letters(embedded, flt)

    assert {item.message_id for item in items} == {population.ids[key] for key in expected}


def test_naive_time_bounds_are_taken_as_utc(embedded: EmbeddedBroker, population: Population) -> None:
    naive = population.middle.replace(tzinfo=None)

    items = list_dead_letters(embedded, DeadLetterFilter(enqueued_after=naive, publisher_id="fabrikam"))

    assert [item.message_id for item in items] == [population.ids["ready-fabrikam-rejected"]]


def test_filter_refuses_a_queue_that_is_not_a_stage_queue() -> None:
    with pytest.raises(ValueError, match="leads-elsewhere"):
        DeadLetterFilter(queues=("leads-elsewhere",))


def test_filter_built_from_api_parameters_treats_empty_values_as_any(
    embedded: EmbeddedBroker, population: Population
) -> None:
    flt = DeadLetterFilter.build(queue="", reason="CredentialsRejected", publisher_id="", message_ids=[])

    assert flt == DeadLetterFilter(reasons=frozenset({"CredentialsRejected"}))
    assert len(list_dead_letters(embedded, flt)) == 3


def test_listing_peeks_without_locking_or_changing_anything(
    embedded: EmbeddedBroker, population: Population
) -> None:
    before = all_dead_ids(embedded)

    list_dead_letters(embedded, DeadLetterFilter())

    assert all_dead_ids(embedded) == before
    assert_receivable_now(embedded, QUEUE_INCOMING, before[QUEUE_INCOMING])


def test_listed_item_has_the_design_keys_and_a_parsed_body(embedded: EmbeddedBroker, clock: Clock) -> None:
    message_id = seed(
        embedded,
        QUEUE_VALIDATED,
        "lead-42",
        publisher_id="contoso",
        reason="SolutionMissing",
        description="solution not installed",
        replay=2,
    )

    (item,) = list_dead_letters(embedded, DeadLetterFilter())
    shown = item.to_json()

    assert set(shown) == {
        "messageId",
        "leadId",
        "publisherId",
        "queue",
        "reason",
        "description",
        "enqueuedAt",
        "deliveryCount",
        "replayCount",
        "body",
    }
    assert shown["messageId"] == message_id == "lead-42.r2"
    assert shown["leadId"] == "lead-42"
    assert shown["publisherId"] == "contoso"
    assert shown["queue"] == QUEUE_VALIDATED
    assert shown["reason"] == "SolutionMissing"
    assert shown["description"] == "solution not installed"
    assert shown["enqueuedAt"] == "2026-11-20T10:00:00Z"
    assert shown["deliveryCount"] == 1
    assert shown["replayCount"] == 2
    assert shown["body"]["lead"]["UserDetails"]["Email"] == "ada@example.com"
    assert json.loads(json.dumps(shown)) == shown


@pytest.mark.parametrize(
    ("body", "shown"),
    [
        (b'{"leadId": "x", "n": 1}', {"leadId": "x", "n": 1}),
        (b"not json at all", "not json at all"),
        (b"[1, 2]", [1, 2]),
        (b"\xff\xfe\x00binary", {"$base64": "//4AYmluYXJ5"}),
    ],
    ids=["json object", "text", "json array", "bytes that are not utf-8"],
)
def test_body_is_shown_as_json_text_or_marked_base64(
    embedded: EmbeddedBroker, body: bytes, shown: Any
) -> None:
    seed(embedded, QUEUE_INCOMING, "odd", reason="InvalidLead", body=body)

    (item,) = list_dead_letters(embedded, DeadLetterFilter())

    assert item.body == shown


def test_publisher_and_lead_fall_back_to_the_body_when_properties_are_missing(
    embedded: EmbeddedBroker,
) -> None:
    # A raw marketplace message dead-lettered at intake carries no hop properties at all.
    embedded.send(QUEUE_INCOMING, [OutgoingMessage(body=lead_body("raw-1", "tailspin"), message_id="raw-1")])
    (received,) = embedded.receive(QUEUE_INCOMING)
    embedded.dead_letter(received, "InvalidLead", "no contact")

    (item,) = list_dead_letters(embedded, DeadLetterFilter(publisher_id="tailspin"))

    assert (item.lead_id, item.publisher_id, item.replay_count) == ("raw-1", "tailspin", 0)


def test_list_pages_past_the_first_page_and_honours_the_limit(embedded: EmbeddedBroker) -> None:
    embedded.send(QUEUE_READY, [envelope(b"{}", publisher_id="noise", lead_id=f"n{i}") for i in range(130)])
    embedded.send(QUEUE_READY, [envelope(b"{}", publisher_id="needle", lead_id=f"k{i}") for i in range(5)])
    for message in embedded.receive(QUEUE_READY, max_messages=1000):
        embedded.dead_letter(message, "LeadRejected", "400")

    needles = list_dead_letters(embedded, DeadLetterFilter(publisher_id="needle"))
    first_three = list_dead_letters(embedded, DeadLetterFilter(publisher_id="needle"), limit=3)

    assert [item.lead_id for item in needles] == [f"k{i}" for i in range(5)]
    assert [item.lead_id for item in first_three] == ["k0", "k1", "k2"]
    assert len(list_dead_letters(embedded, DeadLetterFilter(), limit=1000)) == 135


def test_group_counts_by_queue_reason_and_publisher(embedded: EmbeddedBroker, population: Population) -> None:
    seed(embedded, QUEUE_INCOMING, "L8", reason="CredentialsRejected")
    items = list_dead_letters(embedded, DeadLetterFilter(), limit=1000)

    counts = group_counts(items)

    assert counts == {
        (QUEUE_INCOMING, "CredentialsRejected", "contoso"): 3,
        (QUEUE_INCOMING, "CredentialsRejected", "fabrikam"): 1,
        (QUEUE_INCOMING, "InvalidLead", "contoso"): 1,
        (QUEUE_VALIDATED, "SolutionMissing", "contoso"): 1,
        (QUEUE_READY, "LeadRejected", "fabrikam"): 1,
        (QUEUE_READY, "RetriesExhausted", "contoso"): 1,
    }
    queues_in_order = [queue for queue, _, _ in counts]
    assert queues_in_order == sorted(queues_in_order, key=STAGE_QUEUES.index)


def test_group_counts_name_a_missing_reason_unknown() -> None:
    item = DeadLetterItem("m", None, None, QUEUE_READY, None, None, START, 1, 0, {})

    assert group_counts([item, item]) == {(QUEUE_READY, "Unknown", None): 2}


# --------------------------------------------------------------------------------------------------
# Dry run


def snapshot(broker: EmbeddedBroker) -> dict[str, tuple[int, int, int, list[str]]]:
    return {
        queue: (s.active, s.scheduled, s.dead_lettered, dead_ids(broker, queue))
        for queue in STAGE_QUEUES
        for s in [broker.stats(queue)]
    }


def test_plan_shows_what_would_move_where_and_moves_nothing(
    embedded: EmbeddedBroker, population: Population
) -> None:
    seed(embedded, QUEUE_READY, "capped", publisher_id="fabrikam", reason="LeadRejected", replay=5)
    before = snapshot(embedded)

    plan = plan_replay(embedded, DeadLetterFilter(publisher_id="fabrikam"))

    assert snapshot(embedded) == before
    assert [(e.message_id, e.queue, e.new_message_id, e.replay_count, e.refused is None) for e in plan] == [
        ("L2", QUEUE_INCOMING, "L2.r1", 1, True),
        ("L5", QUEUE_READY, "L5.r1", 1, True),
        ("capped.r5", QUEUE_READY, "capped.r6", 6, False),
    ]
    assert plan[2].reason == "LeadRejected"
    assert plan[2].publisher_id == "fabrikam"
    assert set(plan[0].to_json()) == {
        "messageId",
        "queue",
        "newMessageId",
        "reason",
        "publisherId",
        "replayCount",
        "refused",
    }


def test_replay_dry_run_moves_nothing_and_reports_the_plan(
    embedded: EmbeddedBroker, population: Population
) -> None:
    before = snapshot(embedded)
    seen: list[int] = []

    result = replay(
        embedded,
        DeadLetterFilter(reasons=frozenset({"CredentialsRejected"})),
        dry_run=True,
        progress=seen.append,
    )

    assert snapshot(embedded) == before
    assert (result.matched, result.replayed, result.refused, result.dry_run) == (3, 0, 0, True)
    assert seen == [3]
    assert_receivable_now(embedded, QUEUE_INCOMING, before[QUEUE_INCOMING][3])


# --------------------------------------------------------------------------------------------------
# Replay


def test_replayed_copy_has_a_new_id_the_same_lead_and_lands_on_the_queue_it_died_on(
    embedded: EmbeddedBroker,
) -> None:
    sdk_props = {"DeadLetterReason": "CredentialsRejected", "DeadLetterErrorDescription": "AADSTS50126"}
    old_id = seed(
        embedded,
        QUEUE_VALIDATED,
        "lead-7",
        publisher_id="contoso",
        reason="SolutionMissing",
        attempt=3,
        replay=1,
        extra={**sdk_props, "DeadLetterSource": "leads-validated", "traceparent": "00-abc-def-01"},
    )
    body = lead_body("lead-7", "contoso")

    result = replay(embedded, DeadLetterFilter())

    assert (result.matched, result.replayed, result.refused, result.errors) == (1, 1, 0, [])
    assert dead_ids(embedded, QUEUE_VALIDATED) == []
    assert drain(embedded, QUEUE_INCOMING) == []
    assert drain(embedded, QUEUE_READY) == []
    (copy,) = drain(embedded, QUEUE_VALIDATED)
    assert old_id == "lead-7.r1.a3"
    assert copy.message_id == hop_message_id("lead-7", replay=2) == "lead-7.r2"
    assert copy.body == body
    assert copy.content_type == "application/json"
    assert copy.application_properties == {
        "leadId": "lead-7",
        "publisherId": "contoso",
        "attempt": 1,
        "replayCount": 2,
        "traceparent": "00-abc-def-01",
    }
    assert copy.dead_letter_reason is None


def test_a_lead_dead_lettered_again_after_replay_replays_with_the_next_count_until_the_cap(
    embedded: EmbeddedBroker,
) -> None:
    seed(embedded, QUEUE_READY, "lead-9", reason="RetriesExhausted")
    ids = []
    for _ in range(3):
        assert replay(embedded, DeadLetterFilter(), max_replays=3).replayed == 1
        (copy,) = drain(embedded, QUEUE_READY)
        ids.append(copy.message_id)
        embedded.dead_letter(copy, "RetriesExhausted", "still down")

    result = replay(embedded, DeadLetterFilter(), max_replays=3)

    assert ids == ["lead-9.r1", "lead-9.r2", "lead-9.r3"]
    assert (result.matched, result.replayed, result.refused) == (1, 0, 1)
    assert dead_ids(embedded, QUEUE_READY) == ["lead-9.r3"]


def test_replay_cap_is_refused_with_a_message_naming_the_cap(embedded: EmbeddedBroker) -> None:
    capped = seed(embedded, QUEUE_READY, "tired", reason="RetriesExhausted", replay=5)
    fresh = seed(embedded, QUEUE_READY, "fresh", reason="RetriesExhausted", replay=4)

    result = replay(embedded, DeadLetterFilter(), max_replays=5)

    assert (result.matched, result.replayed, result.refused, result.errors) == (2, 1, 1, [])
    (refusal,) = result.refusals
    assert capped in refusal
    assert "replay cap is 5" in refusal
    assert "replayed 5 times" in refusal
    assert [m.message_id for m in drain(embedded, QUEUE_READY)] == ["fresh.r5"]
    assert fresh not in dead_ids(embedded, QUEUE_READY)
    assert_receivable_now(embedded, QUEUE_READY, [capped])


def test_dead_letters_the_filter_leaves_out_stay_dead_lettered_and_unlocked(
    embedded: EmbeddedBroker, population: Population
) -> None:
    before = all_dead_ids(embedded)

    result = replay(embedded, DeadLetterFilter(publisher_id="fabrikam", queues=(QUEUE_INCOMING, QUEUE_READY)))

    assert (result.matched, result.replayed) == (2, 2)
    after = all_dead_ids(embedded)
    gone = {population.ids["in-fabrikam-rejected"], population.ids["ready-fabrikam-rejected"]}
    assert {q: sorted(ids) for q, ids in after.items()} == {
        q: sorted(set(ids) - gone) for q, ids in before.items()
    }
    # Released, not merely left to time out: receivable at the very same instant.
    for queue in STAGE_QUEUES:
        assert_receivable_now(embedded, queue, after[queue])
    assert [m.message_id for m in drain(embedded, QUEUE_INCOMING)] == ["L2.r1"]
    assert [m.message_id for m in drain(embedded, QUEUE_READY)] == ["L5.r1"]


class RecordingTransport:
    """The real broker behind our own port, recording calls and failing sends on demand."""

    def __init__(self, inner: EmbeddedBroker, *, fail_sends_of: frozenset[str] = frozenset()) -> None:
        self.inner = inner
        self.fail_sends_of = fail_sends_of
        self.calls: list[tuple[str, str]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def send(self, queue: str, messages: Sequence[OutgoingMessage]) -> None:
        if any(m.message_id in self.fail_sends_of for m in messages):
            raise ConnectionError("broker unreachable")
        self.inner.send(queue, messages)
        self.calls += [("send", m.message_id) for m in messages]

    def complete(self, message: ReceivedMessage) -> None:
        self.inner.complete(message)
        self.calls.append(("complete", message.message_id))


def test_dead_letter_is_completed_only_after_its_copy_was_sent(embedded: EmbeddedBroker) -> None:
    for i in range(3):
        seed(embedded, QUEUE_INCOMING, f"lead-{i}")
    transport = RecordingTransport(embedded)

    replay(transport, DeadLetterFilter())

    for i in range(3):
        sent_at = transport.calls.index(("send", f"lead-{i}.r1"))
        completed_at = transport.calls.index(("complete", f"lead-{i}"))
        assert sent_at < completed_at


def test_a_copy_the_broker_refuses_leaves_its_dead_letter_in_place_and_unlocked(
    embedded: EmbeddedBroker,
) -> None:
    for i in range(3):
        seed(embedded, QUEUE_INCOMING, f"lead-{i}")
    transport = RecordingTransport(embedded, fail_sends_of=frozenset({"lead-1.r1"}))

    result = replay(transport, DeadLetterFilter())

    assert (result.matched, result.replayed) == (3, 2)
    (error,) = result.errors
    assert "lead-1" in error
    assert "stays dead-lettered" in error
    assert ("complete", "lead-1") not in transport.calls
    assert sorted(m.message_id for m in drain(embedded, QUEUE_INCOMING)) == ["lead-0.r1", "lead-2.r1"]
    assert_receivable_now(embedded, QUEUE_INCOMING, ["lead-1"])


class LockLapsesAfterFirstSend(RecordingTransport):
    """Lets the broker clock run past the lock right after the first send: its completes lose the lock."""

    def __init__(self, inner: EmbeddedBroker, clock: Clock) -> None:
        super().__init__(inner)
        self.clock = clock
        self.sends = 0

    def send(self, queue: str, messages: Sequence[OutgoingMessage]) -> None:
        super().send(queue, messages)
        self.sends += 1
        if self.sends == 1:
            self.clock.advance(LOCK + 1)


def test_a_lock_lost_before_completing_is_retried_without_doubling_the_copy(
    embedded: EmbeddedBroker, clock: Clock
) -> None:
    for i in range(4):
        seed(embedded, QUEUE_READY, f"lead-{i}", reason="RetriesExhausted")
    transport = LockLapsesAfterFirstSend(embedded, clock)

    result = replay(transport, DeadLetterFilter())

    assert (result.matched, result.replayed, result.errors) == (4, 4, [])
    assert transport.sends >= 2  # the copies really were sent a second time
    assert dead_ids(embedded, QUEUE_READY) == []
    assert sorted(m.message_id for m in drain(embedded, QUEUE_READY)) == [f"lead-{i}.r1" for i in range(4)]


def test_bulk_replay_reaches_past_many_unselected_dead_letters_and_reports_progress(
    embedded: EmbeddedBroker,
) -> None:
    noise = [envelope(b"{}", publisher_id="noise", lead_id=f"n{i}") for i in range(270)]
    wanted = [envelope(b"{}", publisher_id="wanted", lead_id=f"w{i}") for i in range(120)]
    # A long run of noise first (more than a batch), then both kinds interleaved.
    interleaved = [m for pair in zip(wanted, noise[150:], strict=True) for m in pair]
    embedded.send(QUEUE_READY, noise[:150] + interleaved)
    for message in embedded.receive(QUEUE_READY, max_messages=1000):
        embedded.dead_letter(message, "RetriesExhausted", "down")
    seen: list[int] = []

    result = replay(embedded, DeadLetterFilter(publisher_id="wanted"), batch_size=50, progress=seen.append)

    assert (result.matched, result.replayed, result.errors) == (120, 120, [])
    assert seen == sorted(seen)
    assert seen[-1] == 120
    assert len(seen) > 2
    copies = drain(embedded, QUEUE_READY)
    assert sorted(m.message_id for m in copies) == sorted(f"w{i}.r1" for i in range(120))
    remaining = dead_ids(embedded, QUEUE_READY)
    assert len(remaining) == 270
    assert all(i.startswith("n") for i in remaining)
    assert_receivable_now(embedded, QUEUE_READY, remaining)


def test_limit_caps_how_many_dead_letters_are_replayed(embedded: EmbeddedBroker) -> None:
    for i in range(5):
        seed(embedded, QUEUE_INCOMING, f"a{i}")
    for i in range(5):
        seed(embedded, QUEUE_READY, f"b{i}", reason="RetriesExhausted")

    result = replay(embedded, DeadLetterFilter(), limit=7, batch_size=3)

    assert (result.matched, result.replayed) == (7, 7)
    assert len(drain(embedded, QUEUE_INCOMING)) == 5
    assert len(drain(embedded, QUEUE_READY)) == 2
    assert_receivable_now(embedded, QUEUE_READY, ["b2", "b3", "b4"])


def test_a_limited_replay_leaves_dead_letters_past_the_limit_untouched(embedded: EmbeddedBroker) -> None:
    for i in range(10):
        seed(embedded, QUEUE_READY, f"c{i}", reason="RetriesExhausted")

    result = replay(embedded, DeadLetterFilter(), limit=2, batch_size=2)

    assert (result.matched, result.replayed) == (2, 2)
    # Not even received (and released): their delivery count is still the stage's single delivery.
    assert {m.message_id: m.delivery_count for m in embedded.peek_dead_letters(QUEUE_READY)} == {
        f"c{i}": 1 for i in range(2, 10)
    }


def test_configuration_filter_selects_what_a_verified_connection_fixes(embedded: EmbeddedBroker) -> None:
    for reason in DeadLetterReason:
        seed(embedded, QUEUE_INCOMING, f"contoso-{reason}", reason=reason)
        seed(embedded, QUEUE_VALIDATED, f"fabrikam-{reason}", publisher_id="fabrikam", reason=reason)

    items = list_dead_letters(embedded, configuration_filter("contoso"))

    assert sorted(item.message_id for item in items) == sorted(
        f"contoso-{reason}"
        for reason in (
            "CredentialsMissing",
            "CredentialsRejected",
            "SolutionMissing",
            "SolutionVersionUnsupported",
            "PermissionDenied",
        )
    )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_replays": -1}, "max_replays"),
        ({"limit": -1}, "limit"),
        ({"batch_size": 0}, "batch_size"),
    ],
)
def test_replay_refuses_nonsense_arguments(
    embedded: EmbeddedBroker, kwargs: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        replay(embedded, DeadLetterFilter(), **kwargs)


def test_replay_copy_takes_the_lead_id_from_the_message_id_as_a_last_resort() -> None:
    message = ReceivedMessage(
        queue=QUEUE_INCOMING,
        body=b"plain text",
        message_id="mkt-123",
        application_properties={"DeadLetterReason": "InvalidLead"},
        content_type="text/plain",
        delivery_count=1,
        enqueued_time=START,
        sequence_number=1,
    )

    copy = replay_copy(message)

    assert copy.message_id == "mkt-123.r1"
    assert copy.content_type == "text/plain"
    assert dict(copy.application_properties) == {"leadId": "mkt-123", "attempt": 1, "replayCount": 1}


# --------------------------------------------------------------------------------------------------
# Purge


@pytest.mark.parametrize("confirm", [False, None, "yes", 1])
def test_purge_refuses_without_confirm_and_removes_nothing(
    embedded: EmbeddedBroker, population: Population, confirm: Any
) -> None:
    before = snapshot(embedded)

    with pytest.raises(ValueError, match="purge needs confirm=true"):
        purge(embedded, DeadLetterFilter(), confirm=confirm)

    assert snapshot(embedded) == before


def test_purge_removes_only_what_the_filters_select(embedded: EmbeddedBroker, population: Population) -> None:
    before = all_dead_ids(embedded)
    seen: list[int] = []

    result = purge(
        embedded,
        DeadLetterFilter(reasons=frozenset({"CredentialsRejected"}), enqueued_before=population.middle),
        confirm=True,
        progress=seen.append,
    )

    assert (result.matched, result.purged, result.errors) == (2, 2, [])
    assert seen[-1] == 2
    gone = {population.ids["in-contoso-rejected"], population.ids["in-fabrikam-rejected"]}
    after = all_dead_ids(embedded)
    assert {q: sorted(ids) for q, ids in after.items()} == {
        q: sorted(set(ids) - gone) for q, ids in before.items()
    }
    for queue in STAGE_QUEUES:
        assert_receivable_now(embedded, queue, after[queue])
        assert drain(embedded, queue) == []  # nothing was re-sent anywhere


def test_purge_honours_the_limit(embedded: EmbeddedBroker) -> None:
    for i in range(6):
        seed(embedded, QUEUE_INCOMING, f"p{i}", reason="InvalidLead")

    result = purge(embedded, DeadLetterFilter(), confirm=True, limit=4, batch_size=4)

    assert (result.matched, result.purged) == (4, 4)
    assert dead_ids(embedded, QUEUE_INCOMING) == ["p4", "p5"]
