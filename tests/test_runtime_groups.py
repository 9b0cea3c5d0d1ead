"""A non-write stage takes a long backlog of one publisher in groups; a group stops at the first
message to be retried, so a failing or hanging CRM is not met once per message on one thread."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace
from typing import Any

from shared.names import QUEUE_READY
from shared.pipeline.outcomes import Forward, Outcome, Retry, Stage
from shared.runtime.embedded import FORGET_EVERY, IDLE_FORGET, StageWorker, _PublisherState, wait_until
from shared.transport import EmbeddedBroker, OutgoingMessage, ReceivedMessage


class ScriptedPipeline:
    """Answers each message with the next scripted outcome, counting the calls."""

    def __init__(self, outcomes: list[Outcome]) -> None:
        self.settings = SimpleNamespace(max_batch=100, retry_schedule=(), lock_duration=60.0)
        self.pacer = None
        self.outcomes = outcomes
        self.calls = 0

    def handle(self, stage: Any, message: ReceivedMessage) -> Outcome:
        self.calls += 1
        return self.outcomes.pop(0)


def send(broker: EmbeddedBroker, messages: list[tuple[str, int]]) -> None:
    broker.send(
        "leads-validated",
        [
            OutgoingMessage(body=b"{}", message_id=f"{p}-{n}", application_properties={"publisherId": p})
            for p, n in messages
        ],
    )


def in_flight(worker: StageWorker, publishers: set[str]) -> dict[str, int]:
    """Each publisher's messages in the worker's work in flight."""
    with worker._lock:
        held = [str(m.application_properties["publisherId"]) for m in worker._in_flight.values()]
    return {p: held.count(p) for p in publishers}


def messages(broker: EmbeddedBroker, count: int) -> list[ReceivedMessage]:
    send(broker, [("contoso", n) for n in range(count)])
    return broker.receive("leads-validated", max_messages=count)


def forward() -> Forward:
    return Forward(QUEUE_READY, OutgoingMessage(body=b"{}", message_id="x"))


def test_a_group_stops_at_the_first_message_to_be_retried(broker: EmbeddedBroker) -> None:
    pipeline = ScriptedPipeline([forward(), forward(), Retry("CRM answered 503"), forward(), forward()])
    worker = StageWorker(Stage.CHECK_SOLUTION, broker, pipeline)  # type: ignore[arg-type]

    outcomes = worker._handle_group(messages(broker, 5))

    assert len(outcomes) == 3, "the two after the retry were not tried"
    assert pipeline.calls == 3
    assert isinstance(outcomes[-1], Retry)


def test_a_group_without_a_retry_is_handled_whole(broker: EmbeddedBroker) -> None:
    pipeline = ScriptedPipeline([forward() for _ in range(4)])
    worker = StageWorker(Stage.CHECK_SOLUTION, broker, pipeline)  # type: ignore[arg-type]

    assert len(worker._handle_group(messages(broker, 4))) == 4


class HangingPipeline(ScriptedPipeline):
    """Forwards every message at once, except those of the hung publishers: they wait until released."""

    def __init__(self, hung: set[str], answered_first: int = 0) -> None:
        super().__init__([])
        self.hung = hung
        #: Messages of each hung publisher answered before its CRM stops answering.
        self.answered_first = answered_first
        self.release = threading.Event()
        self.handled: dict[str, int] = {}
        self._count = threading.Lock()

    def handle(self, stage: Any, message: ReceivedMessage) -> Outcome:
        publisher = str(message.application_properties["publisherId"])
        with self._count:
            self.handled[publisher] = self.handled.get(publisher, 0) + 1
            answered = publisher not in self.hung or self.handled[publisher] <= self.answered_first
        if not answered:
            self.release.wait(120)
            return Retry("CRM did not answer")
        return forward()


def test_hung_publishers_at_the_head_of_the_queue_do_not_fill_the_worker_with_their_groups(
    broker: EmbeddedBroker,
) -> None:
    # Six CRMs that never answer, their messages first, against a worker whose capacity (32) they
    # could fill with the groups they hold in flight: a CRM that has not answered yet is sent one
    # message, and unanswered work does not count against the capacity, so the others get through.
    hung, healthy = {f"hung{n}" for n in range(6)}, [f"healthy{n}" for n in range(3)]
    pipeline = HangingPipeline(hung)
    send(broker, [(p, n) for n in range(20) for p in [*sorted(hung), *healthy]])
    worker = StageWorker(Stage.CHECK_SOLUTION, broker, pipeline, concurrency=4, publisher_concurrency=4)  # type: ignore[arg-type]
    worker.start()
    try:
        assert wait_until(lambda: all(pipeline.handled.get(p) == 20 for p in healthy), 60), pipeline.handled
        assert in_flight(worker, hung) == dict.fromkeys(hung, 1), "one message each is with a CRM that does not answer"
    finally:
        pipeline.release.set()
        worker.stop(30)


def test_a_crm_that_stops_answering_with_groups_in_flight_does_not_stop_the_worker_receiving(
    broker: EmbeddedBroker,
) -> None:
    # A CRM that answered at first holds up to four groups when it stops answering: as many messages
    # as the worker's capacity. Once unanswered they no longer count against it, so the worker goes
    # on receiving, and the healthy publisher behind them is handled.
    pipeline = HangingPipeline({"flaky"}, answered_first=1)
    worker = StageWorker(Stage.CHECK_SOLUTION, broker, pipeline, concurrency=4, publisher_concurrency=4)  # type: ignore[arg-type]
    worker.start()
    try:
        send(broker, [("flaky", 0)])
        assert wait_until(lambda: pipeline.handled.get("flaky") == 1, 30)
        send(broker, [("flaky", n) for n in range(1, 41)])
        assert wait_until(lambda: in_flight(worker, {"flaky"})["flaky"] >= worker.capacity, 30), "groups in flight"
        send(broker, [("healthy", n) for n in range(20)])
        assert wait_until(lambda: pipeline.handled.get("healthy") == 20, 30), pipeline.handled
    finally:
        pipeline.release.set()
        worker.stop(30)


def test_a_publisher_idle_for_ten_minutes_is_forgotten_and_an_active_one_is_kept(broker: EmbeddedBroker) -> None:
    worker = StageWorker(Stage.CHECK_SOLUTION, broker, ScriptedPipeline([]))  # type: ignore[arg-type]
    now = time.monotonic()
    idle, held, _recent = (worker._publishers.setdefault(p, _PublisherState()) for p in ("idle", "held", "recent"))
    idle.last_progress = held.last_progress = now - IDLE_FORGET - 1
    held.backlog.append((messages(broker, 1)[0], now))

    assert worker._forget_idle(now + FORGET_EVERY) == 1
    assert set(worker._publishers) == {"held", "recent"}
    assert worker._forget_idle(now + FORGET_EVERY + 1) == 0, "not looked at again before FORGET_EVERY"
