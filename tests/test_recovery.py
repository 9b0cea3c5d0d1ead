"""When a CRM that had been failing answers successes again, its waiting retries go early —
at the paced rate, never into a penalty, never as a herd.

The decisions are driven by hand first (:class:`Recovery` over the real embedded broker, a pacer on a
hand-moved clock, no thread); then end to end against the CRM simulator over real sockets, on both
stage runtimes, with a real retry schedule whose later slots are minutes away.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from shared.crm.pacing import Pacer
from shared.names import QUEUE_INCOMING, QUEUE_READY, QUEUE_VALIDATED, STAGE_QUEUES
from shared.pipeline.messages import envelope
from shared.pipeline.outcomes import Delivered, Retry, SettleAction, Stage
from shared.pipeline.recovery import Recovery
from shared.pipeline.settle import Settled
from shared.simulator import CrmSimulator
from shared.state.embedded import EmbeddedStateStore
from shared.state.scheduled import StateScheduledRetries
from shared.transport.base import ReceivedMessage, ScheduledEntry
from shared.transport.embedded import EmbeddedBroker
from tests.fixtures.harness import Harness, lead_message, running

KEY = "https://contoso.crm.dynamics.com|app"
#: A real schedule: two short retries, then slots a minute and more away (the ones a heal must beat).
SCHEDULE = "2,4,60,300,900,1800,3600,7200"

# -- the decisions, driven by hand ----------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _settled(stage: Stage, outcome: Retry | Delivered, publisher: str = "contoso") -> Settled:
    message = ReceivedMessage(
        queue=stage.queue,
        body=b"{}",
        message_id="m",
        application_properties={"publisherId": publisher, "leadId": "m", "attempt": 3},
        content_type=None,
        delivery_count=1,
        enqueued_time=datetime.now(UTC),
        sequence_number=1,
    )
    if isinstance(outcome, Delivered):
        return Settled(stage, SettleAction.DELIVERED, message, outcome)
    return Settled(stage, SettleAction.RESCHEDULED, message, outcome, delay=60.0)


FAILED = _settled(Stage.WRITE_LEAD, Retry("the CRM answered 503"))
DELIVERED = _settled(Stage.WRITE_LEAD, Delivered(uuid.uuid4(), created=True))


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[EmbeddedBroker]:
    with EmbeddedBroker(tmp_path / "broker.db") as broker:
        yield broker


def _schedule(
    broker: EmbeddedBroker, queue: str, count: int, *, publisher: str = "contoso", minutes: int = 5, tag: str = ""
) -> None:
    due = datetime.now(UTC) + timedelta(minutes=minutes)
    broker.send(
        queue,
        [
            envelope(b"{}", publisher_id=publisher, lead_id=f"{publisher}-{queue}-{tag}{n}", attempt=4,
                     scheduled_at=due + timedelta(seconds=n))
            for n in range(count)
        ],
    )


def _recovery(broker: EmbeddedBroker, clock: Clock, **options: float) -> tuple[Recovery, Pacer]:
    pacer = Pacer(clock=clock)
    return Recovery(broker, pacer, lambda publisher: KEY, clock=clock, background=False, **options), pacer


def test_a_delivery_after_crm_failures_releases_the_waiting_retries_at_the_paced_rate(broker: EmbeddedBroker) -> None:
    clock = Clock()
    _schedule(broker, QUEUE_READY, 15)
    _schedule(broker, QUEUE_VALIDATED, 5)
    _schedule(broker, QUEUE_READY, 3, publisher="fabrikam")
    recovery, pacer = _recovery(broker, clock)
    per_round = int(pacer.snapshot(KEY).rate * recovery.interval)  # 20 req/s over 0.5 s

    recovery.observe(FAILED)
    assert recovery.step() == 0  # failing: nothing is released (the canary waits its interval)
    recovery.observe(DELIVERED)

    assert recovery.step() == per_round
    assert broker.scheduled_of("contoso")[0] == 20 - per_round
    # The write queue first, earliest due first.
    released = [m.message_id for m in broker.receive(QUEUE_READY, 100)]
    assert released == [f"contoso-leads-ready-{n}.a4" for n in range(10)]
    assert recovery.step() == 10
    assert recovery.step() == 0  # nothing left: the release ends
    assert not recovery.releasing("contoso")
    assert broker.scheduled_of("fabrikam")[0] == 3  # another publisher's CRM did not heal


def test_a_failure_during_the_release_leaves_the_rest_on_its_schedule(broker: EmbeddedBroker) -> None:
    clock = Clock()
    _schedule(broker, QUEUE_READY, 30)
    recovery, _ = _recovery(broker, clock)
    recovery.observe(FAILED)
    recovery.observe(DELIVERED)
    assert recovery.step() == 10

    recovery.observe(FAILED)

    assert recovery.step() == 0
    assert broker.scheduled_of("contoso")[0] == 20
    recovery.observe(DELIVERED)  # the next success resumes, still paced
    assert recovery.step() == 10


def test_nothing_is_released_inside_a_penalty(broker: EmbeddedBroker) -> None:
    clock = Clock()
    _schedule(broker, QUEUE_READY, 5)
    recovery, pacer = _recovery(broker, clock)
    recovery.observe(FAILED)
    recovery.observe(DELIVERED)
    pacer.push_back(KEY, retry_after=30)

    assert recovery.step() == 0
    clock.now += 29.9
    assert recovery.step() == 0
    clock.now += 0.2
    assert recovery.step() == 5


def test_a_failing_crm_gets_one_canary_per_interval_and_not_inside_a_penalty(broker: EmbeddedBroker) -> None:
    clock = Clock()
    _schedule(broker, QUEUE_READY, 5)
    recovery, pacer = _recovery(broker, clock, canary_interval=30)
    recovery.observe(FAILED)

    clock.now += 29
    assert recovery.step() == 0
    clock.now += 1
    assert recovery.step() == 1
    assert recovery.step() == 0
    pacer.push_back(KEY, retry_after=100)
    clock.now += 30
    assert recovery.step() == 0
    assert broker.scheduled_of("contoso")[0] == 4


def test_retries_that_never_reached_the_crm_do_not_count_as_failures(broker: EmbeddedBroker) -> None:
    clock = Clock()
    _schedule(broker, QUEUE_READY, 3)
    recovery, _ = _recovery(broker, clock, canary_interval=1)
    recovery.observe(_settled(Stage.WRITE_LEAD, Retry("paced", 1.0, not_sent=True)))
    recovery.observe(_settled(Stage.VALIDATE_CREDENTIALS, Retry("the token endpoint answered 503")))

    clock.now += 5
    assert recovery.step() == 0


def test_a_delivery_this_process_knows_no_failure_for_probes_for_waiting_retries_at_most_every_interval(
    broker: EmbeddedBroker,
) -> None:
    clock = Clock()
    _schedule(broker, QUEUE_INCOMING, 3)
    recovery, _ = _recovery(broker, clock, probe_interval=15)

    recovery.observe(DELIVERED)  # e.g. after a restart: the failures were met by the process before
    assert recovery.step() == 3
    _schedule(broker, QUEUE_INCOMING, 2, minutes=9, tag="later")
    recovery.observe(DELIVERED)
    assert recovery.step() == 0
    clock.now += 15
    recovery.observe(DELIVERED)
    assert recovery.step() == 2


def test_the_embedded_broker_releases_only_scheduled_messages_of_that_publisher_and_queue(
    broker: EmbeddedBroker,
) -> None:
    _schedule(broker, QUEUE_READY, 2)
    broker.send(QUEUE_READY, [envelope(b"{}", publisher_id="contoso", lead_id="now")])
    locked = broker.receive(QUEUE_READY, 1)  # locked: not scheduled, never released
    assert [m.message_id for m in locked] == ["now"]

    assert broker.release_scheduled(QUEUE_VALIDATED, "contoso", 10) == 0
    assert broker.release_scheduled(QUEUE_READY, "fabrikam", 10) == 0
    assert broker.release_scheduled(QUEUE_READY, "contoso", 10) == 2
    assert broker.scheduled_of("contoso") == (0, None)
    assert sorted(m.message_id for m in broker.receive(QUEUE_READY, 10)) == [
        "contoso-leads-ready-0.a4", "contoso-leads-ready-1.a4"
    ]


def test_a_deferred_copy_waits_for_its_penalty_or_pacing_and_is_neither_released_nor_counted(
    broker: EmbeddedBroker,
) -> None:
    soon = datetime.now(UTC) + timedelta(seconds=30)
    broker.send(
        QUEUE_READY,
        [envelope(b"{}", publisher_id="contoso", lead_id="paced", attempt=2, deferrals=3, scheduled_at=soon)],
    )

    assert broker.scheduled_of("contoso") == (0, None)
    assert broker.release_scheduled(QUEUE_READY, "contoso", 10) == 0


def test_a_broker_file_from_before_the_publisher_column_is_migrated_on_open(tmp_path: Path) -> None:
    import sqlite3

    path = tmp_path / "broker.db"
    with EmbeddedBroker(path) as broker:
        _schedule(broker, QUEUE_READY, 2)
    with sqlite3.connect(path) as conn:  # as an older version left it
        conn.execute("DROP INDEX messages_publisher")
        conn.execute("ALTER TABLE messages DROP COLUMN publisher")

    with EmbeddedBroker(path) as broker:
        assert broker.scheduled_of("contoso")[0] == 2
        assert broker.release_scheduled(QUEUE_READY, "contoso", 5) == 2


def test_the_state_ledger_keeps_entries_per_publisher_earliest_first_and_prunes_old_ones(tmp_path: Path) -> None:
    store = EmbeddedStateStore(tmp_path / "state.db")
    ledger = StateScheduledRetries(store)
    now = datetime.now(UTC)
    later, soon, past = (ScheduledEntry(QUEUE_READY, "contoso/eu", n, now + timedelta(minutes=m))
                         for n, m in ((1, 5), (2, 1), (3, -20)))
    ledger.record([later, soon, past, ScheduledEntry(QUEUE_READY, "fabrikam", 4, now)])

    assert ledger.waiting("contoso/eu", after=now) == [soon, later]
    assert ledger.waiting("contoso/eu", queue=QUEUE_VALIDATED, after=now) == []
    ledger.forget([soon])
    assert ledger.waiting("contoso/eu", queue=QUEUE_READY, after=now) == [later]
    # The entry 20 minutes past due was pruned on the way.
    assert len(store.query("scheduledretries")) == 2
    store.close()


# -- end to end: a CRM down for minutes, then healed ---------------------------------------------

#: Every end-to-end test here runs on the embedded workers and on the registered Functions triggers.
e2e = pytest.mark.usefixtures("runtime")


def _all_waiting_a_minute_or_more(h: Harness, publisher: str, total: int) -> bool:
    count, next_due = h.services.transport.scheduled_of(publisher)
    return count == total and next_due is not None and next_due > datetime.now(UTC) + timedelta(seconds=40)


def _take_down(h: Harness, publisher: str, total: int) -> None:
    """Given: the CRM answers 503 to everything until every lead has spent its short retries and
    waits for a slot a minute or more away."""
    h.simulator.faults(publisher).fail_next(1_000_000, 503)
    h.start()
    h.send([lead_message(publisher, n) for n in range(total)])
    h.wait_for(lambda: _all_waiting_a_minute_or_more(h, publisher, total), timeout=40)
    assert h.written(publisher) == []


@e2e
def test_a_healed_crm_gets_every_waiting_lead_long_before_its_backoff_slot(
    simulator: CrmSimulator, tmp_path: Path
) -> None:
    with running(simulator, tmp_path, LEADWRITER_RETRY_SCHEDULE=SCHEDULE) as h:
        publisher = h.publisher()
        total = 30
        _take_down(h, publisher, total)

        # When: the CRM heals, and a new lead arrives
        simulator.faults(publisher).clear()
        h.send([lead_message(publisher, total)])

        # Then: every waiting lead is delivered within seconds, not at its slot a minute away
        h.wait_for(lambda: len(h.written(publisher)) == total + 1, timeout=20)
        h.wait_for(lambda: h.pending() == 0, timeout=10)
        assert h.dead_letters(publisher_id=publisher) == []
        assert h.services.transport.scheduled_of(publisher) == (0, None)


@e2e
def test_a_healed_crm_is_found_by_a_canary_when_no_new_lead_arrives(simulator: CrmSimulator, tmp_path: Path) -> None:
    with running(simulator, tmp_path, LEADWRITER_RETRY_SCHEDULE=SCHEDULE) as h:
        h.services.recovery.canary_interval = 1.0
        publisher = h.publisher()
        total = 20
        _take_down(h, publisher, total)

        simulator.faults(publisher).clear()

        h.wait_for(lambda: len(h.written(publisher)) == total, timeout=20)
        assert h.dead_letters(publisher_id=publisher) == []


@e2e
def test_a_half_healed_crm_gets_its_backlog_at_the_paced_rate_and_no_lead_is_lost(
    simulator: CrmSimulator, tmp_path: Path
) -> None:
    with running(simulator, tmp_path, LEADWRITER_RETRY_SCHEDULE=SCHEDULE) as h:
        recovery = h.services.recovery
        recovery.canary_interval = 1.0
        publisher = h.publisher()
        total = 40
        _take_down(h, publisher, total)

        # When: the CRM comes back failing one request in five
        faults = simulator.faults(publisher)
        faults.clear()
        faults.fail_one_in(5)
        h.send([lead_message(publisher, total)])

        # Then: every lead arrives (failures went back on the schedule and came out with the next
        # success), and no round released more than the pacer's rate allows in one interval
        h.wait_for(lambda: len(h.written(publisher)) == total + 1, timeout=45)
        key = h.services.pipeline.throttle_key(publisher)
        assert key is not None
        assert recovery.largest_round <= max(1, int(h.services.pacer.snapshot(key).rate * recovery.interval))
        assert recovery.released >= total
        assert h.dead_letters(publisher_id=publisher) == []


@e2e
def test_a_penalty_met_during_the_release_wins(simulator: CrmSimulator, tmp_path: Path) -> None:
    with running(simulator, tmp_path, LEADWRITER_RETRY_SCHEDULE=SCHEDULE) as h:
        publisher = h.publisher()
        total = 60
        _take_down(h, publisher, total)
        faults = simulator.faults(publisher)
        faults.clear()
        faults.latency = 0.05  # the release takes a few rounds

        h.send([lead_message(publisher, total)])
        h.wait_for(lambda: len(h.written(publisher)) >= 1, timeout=20)
        faults.throttle_next(1, retry_after=3)  # a 429 with Retry-After in the middle of the release

        h.wait_for(lambda: len(h.written(publisher)) == total + 1, timeout=40)
        log = simulator.requests(publisher)
        key = h.services.pipeline.throttle_key(publisher)
        assert key is not None
        # Only a request already in flight when the 429 came back may have reached the CRM inside the
        # penalty; nothing was sent, released or not, once it was recorded.
        assert log.during_penalty <= h.services.pacer.snapshot(key).in_flight_at_push_back
        assert log.throttled == 1 + log.during_penalty
        assert h.dead_letters(publisher_id=publisher) == []


def test_the_status_answer_counts_waiting_leads_across_the_stage_queues(broker: EmbeddedBroker) -> None:
    for queue in STAGE_QUEUES:
        _schedule(broker, queue, 1)
    count, next_due = broker.scheduled_of("contoso")
    assert count == 3
    assert next_due is not None
