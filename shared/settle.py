"""Turn a stage outcome into broker actions, in the one safe order (STYLE habit 7).

The next message (forward, rescheduled copy) is sent **before** the current one is completed: if the
process dies in between, the current message is redelivered and sent again with the same message id,
which duplicate detection drops. The reverse order could lose the lead.

Used by the embedded runtime (settling through the :class:`~shared.transport.base.Transport`) and by
the Azure Functions adapters (settling through ``ServiceBusMessageActions``).
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from shared.errors import DeadLetterReason
from shared.lead import mask_email
from shared.messages import attempt_of, rescheduled_copy
from shared.names import PROP_LEAD_ID, PROP_PUBLISHER_ID
from shared.retry import next_retry
from shared.stages import STAGES, Delivered, Forward, Outcome, Reject, Retry
from shared.transport.base import OutgoingMessage, ReceivedMessage

logger = logging.getLogger(__name__)

#: Service Bus accepts long descriptions, but nobody reads past this in a dead-letter listing.
MAX_DESCRIPTION = 1024


class Sender(Protocol):
    def send(self, queue: str, messages: Sequence[OutgoingMessage]) -> None: ...


class Settler(Protocol):
    def complete(self, message: ReceivedMessage) -> None: ...

    def dead_letter(self, message: ReceivedMessage, reason: str, description: str) -> None: ...


@dataclass(frozen=True)
class Settled:
    """What happened to a message: ``action`` is forwarded, delivered, rescheduled or dead-lettered."""

    stage: str
    action: str
    message: ReceivedMessage
    outcome: Outcome
    reason: str | None = None
    delay: float | None = None


Observer = Callable[[Settled], None]


def settle(
    stage: str,
    message: ReceivedMessage,
    outcome: Outcome,
    *,
    sender: Sender,
    settler: Settler,
    started: float | None = None,
    observer: Observer | None = None,
    rand: Callable[[], float] = random.random,
    schedule: Sequence[float] = (),
) -> Settled:
    """Carry out ``outcome`` for ``message``. Raises whatever the broker raises (the message then
    stays locked and is redelivered after its lock expires — nothing is lost)."""
    queue = STAGES[stage]
    if isinstance(outcome, Forward):
        sender.send(outcome.queue, [outcome.message])
        settler.complete(message)
        result = Settled(stage, "forwarded", message, outcome)
    elif isinstance(outcome, Delivered):
        settler.complete(message)
        result = Settled(stage, "delivered", message, outcome)
    elif isinstance(outcome, Retry):
        attempt = attempt_of(message)
        decision = next_retry(attempt, outcome.retry_after, rand=rand, schedule=schedule)
        if decision.delay is None:
            reason = DeadLetterReason.RETRIES_EXHAUSTED
            description = f"gave up after {attempt} attempts; last error: {outcome.description}"
            settler.dead_letter(message, reason, description[:MAX_DESCRIPTION])
            result = Settled(stage, "dead-lettered", message, outcome, reason=reason)
        else:
            sender.send(queue, [rescheduled_copy(message, decision.delay)])
            settler.complete(message)
            result = Settled(stage, "rescheduled", message, outcome, reason=outcome.description, delay=decision.delay)
    elif isinstance(outcome, Reject):
        settler.dead_letter(message, outcome.reason, outcome.description[:MAX_DESCRIPTION])
        result = Settled(stage, "dead-lettered", message, outcome, reason=outcome.reason)
    else:  # pragma: no cover - the Outcome union is closed
        raise TypeError(f"unknown outcome {outcome!r}")
    log_settlement(result, started)
    if observer is not None:
        observer(result)
    return result


def log_settlement(result: Settled, started: float | None) -> None:
    """One structured line per settlement: stage, outcome, reason, publisher, lead, attempt, latency."""
    props = result.message.application_properties
    latency_ms = (time.monotonic() - started) * 1000 if started is not None else -1.0
    level = logging.WARNING if result.action == "dead-lettered" else logging.INFO
    logger.log(
        level,
        "settled stage=%s outcome=%s reason=%s publisherId=%s leadId=%s attempt=%d delay=%s latencyMs=%.1f",
        result.stage,
        result.action,
        _safe(result.reason),
        _safe(props.get(PROP_PUBLISHER_ID)),
        _safe(props.get(PROP_LEAD_ID, result.message.message_id)),
        attempt_of(result.message),
        f"{result.delay:.1f}" if result.delay is not None else "-",
        latency_ms,
    )


def _safe(value: object) -> str:
    """Log-safe text: no line breaks (log injection), e-mail addresses masked, bounded length."""
    if value is None:
        return "-"
    text = str(value).replace("\r", " ").replace("\n", " ")[:200]
    if "@" in text and " " not in text:
        return mask_email(text) or "-"
    return text
