"""A non-write stage takes a long backlog of one publisher in groups; a group stops at the first
message to be retried, so a failing or hanging CRM is not met once per message on one thread."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from shared.names import QUEUE_READY
from shared.pipeline.outcomes import Forward, Outcome, Retry, Stage
from shared.runtime.embedded import StageWorker
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


def messages(broker: EmbeddedBroker, count: int) -> list[ReceivedMessage]:
    broker.send(
        "leads-validated",
        [
            OutgoingMessage(body=b"{}", message_id=f"m{n}", application_properties={"publisherId": "contoso"})
            for n in range(count)
        ],
    )
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
