"""The Service Bus operations a lead costs, counted at the transport port (``MeteredTransport``).

A real pipeline over the embedded broker against the CRM simulator: the counts are exact for a
known small flow, because every operation the stages ask of the broker passes the meter.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from shared.errors import LockLost
from shared.names import QUEUE_INCOMING, QUEUE_VALIDATED
from shared.pipeline.messages import envelope
from shared.runtime.embedded import EmbeddedRuntime
from shared.simulator import CrmSimulator
from shared.transport.base import OutgoingMessage
from shared.transport.embedded import EmbeddedBroker
from shared.transport.metering import MeteredTransport, OperationCounts
from tests.fixtures.harness import Harness, lead_message


@contextmanager
def metered_pipeline(simulator: CrmSimulator, tmp_path: Path) -> Iterator[tuple[Harness, MeteredTransport]]:
    """The three embedded stage workers on a metered broker (the producer's sends go through it too)."""
    harness = Harness(simulator, tmp_path)
    meter = MeteredTransport(harness.services.transport)
    try:
        yield harness, meter
    finally:
        harness.services.close()


def start(harness: Harness, meter: MeteredTransport) -> EmbeddedRuntime:
    runtime = EmbeddedRuntime(meter, harness.services.pipeline, observer=harness.services.observe)
    return runtime.start()


def send_leads(meter: MeteredTransport, publisher: str, count: int) -> None:
    for n in range(count):
        body = lead_message(publisher, n)
        meter.send(
            QUEUE_INCOMING,
            [envelope(json.dumps(body).encode(), publisher_id=publisher, lead_id=str(body["leadId"]))],
        )


def billable(counts: OperationCounts) -> dict[str, int]:
    """The counts without the polls (empty receives depend on timing)."""
    return {kind: value for kind, value in counts.as_dict().items() if kind != "empty_receives"}


def test_a_written_lead_costs_one_send_one_receive_and_one_complete_per_stage(
    simulator: CrmSimulator, tmp_path: Path
) -> None:
    with metered_pipeline(simulator, tmp_path) as (h, meter):
        publisher = h.publisher()
        send_leads(meter, publisher, 3)
        runtime = start(h, meter)
        try:
            h.wait_for(lambda: len(h.written(publisher)) == 3 and meter.counts().completes == 9)
        finally:
            runtime.stop()

        # Per lead: the producer's send and two forwards; a receive and a complete in each stage.
        assert billable(meter.counts()) == {
            "sends": 9,
            "schedules": 0,
            "received": 9,
            "completes": 9,
            "abandons": 0,
            "dead_letters": 0,
            "renewals": 0,
            "total": 27,
        }
        assert meter.counts().per(3)["total"] == 9.0


def test_a_transient_crm_failure_adds_one_schedule_one_receive_and_one_complete(
    simulator: CrmSimulator, tmp_path: Path
) -> None:
    with metered_pipeline(simulator, tmp_path) as (h, meter):
        publisher = h.publisher()
        simulator.faults(publisher).fail_next(1, status=503)
        send_leads(meter, publisher, 1)
        runtime = start(h, meter)
        try:
            h.wait_for(lambda: len(h.written(publisher)) == 1 and meter.counts().completes == 4)
        finally:
            runtime.stop()

        counts = meter.counts()
        assert (counts.sends, counts.schedules, counts.received, counts.completes) == (3, 1, 4, 4)
        assert counts.total == 12
        assert (counts.abandons, counts.dead_letters, counts.renewals) == (0, 0, 0)


def test_an_invalid_lead_costs_its_send_its_receive_and_its_dead_letter(
    simulator: CrmSimulator, tmp_path: Path
) -> None:
    with metered_pipeline(simulator, tmp_path) as (h, meter):
        meter.send(QUEUE_INCOMING, [OutgoingMessage(body=b"{not json", message_id="bad-1")])
        runtime = start(h, meter)
        try:
            h.wait_for(lambda: meter.counts().dead_letters == 1)
        finally:
            runtime.stop()

        assert billable(meter.counts()) == {
            "sends": 1,
            "schedules": 0,
            "received": 1,
            "completes": 0,
            "abandons": 0,
            "dead_letters": 1,
            "renewals": 0,
            "total": 3,
        }


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[EmbeddedBroker]:
    with EmbeddedBroker(tmp_path / "broker.db", lock_duration=30) as b:
        yield b


def test_the_meter_counts_scheduled_sends_renewals_and_abandons_by_kind(broker: EmbeddedBroker) -> None:
    meter = MeteredTransport(broker)
    later = datetime.now(UTC) + timedelta(hours=1)
    meter.send(
        QUEUE_INCOMING,
        [
            OutgoingMessage(body=b"{}", message_id="now-1"),
            OutgoingMessage(body=b"{}", message_id="later-1", scheduled_enqueue_time=later),
        ],
    )
    [message] = meter.receive(QUEUE_INCOMING, max_messages=10)
    meter.renew_lock(message)
    meter.abandon(message)
    assert meter.receive(QUEUE_VALIDATED) == []

    counts = meter.counts()
    assert (counts.sends, counts.schedules, counts.received, counts.renewals, counts.abandons) == (1, 1, 1, 1, 1)
    assert counts.empty_receives == 1
    assert counts.total == 5


def test_send_and_complete_through_the_meter_is_one_transaction_counted_as_a_send_and_a_complete(
    broker: EmbeddedBroker,
) -> None:
    meter = MeteredTransport(broker)
    broker.send(QUEUE_INCOMING, [OutgoingMessage(body=b"{}", message_id="m-1")])
    [message] = broker.receive(QUEUE_INCOMING)

    meter.send_and_complete(QUEUE_VALIDATED, [OutgoingMessage(body=b"{}", message_id="m-1.next")], message)

    assert (meter.counts().sends, meter.counts().completes) == (1, 1)
    assert broker.stats(QUEUE_INCOMING).active == 0
    assert [m.message_id for m in broker.receive(QUEUE_VALIDATED)] == ["m-1.next"]


def test_send_and_complete_on_a_lost_lock_sends_nothing(tmp_path: Path) -> None:
    now = [1_000_000.0]
    with EmbeddedBroker(tmp_path / "broker.db", lock_duration=5, clock=lambda: now[0]) as broker:
        broker.send(QUEUE_INCOMING, [OutgoingMessage(body=b"{}", message_id="m-1")])
        [message] = broker.receive(QUEUE_INCOMING)
        now[0] += 6  # the lock has lapsed

        with pytest.raises(LockLost):
            broker.send_and_complete(QUEUE_VALIDATED, [OutgoingMessage(body=b"{}", message_id="m-1.next")], message)

        assert broker.stats(QUEUE_VALIDATED).active == 0
        # Nothing was recorded for duplicate detection either: the redelivered message's copy goes out.
        [again] = broker.receive(QUEUE_INCOMING)
        broker.send_and_complete(QUEUE_VALIDATED, [OutgoingMessage(body=b"{}", message_id="m-1.next")], again)
        assert [m.message_id for m in broker.receive(QUEUE_VALIDATED)] == ["m-1.next"]
