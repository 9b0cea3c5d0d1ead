"""Turn a stage outcome into broker actions, in the one safe order (architecture §5).

The next message (forward, rescheduled copy) is sent **before** the current one is completed: if the
process dies in between, the current message is redelivered and sent again with the same message id,
which duplicate detection drops. The reverse order could lose the lead.

Used by the embedded runtime (settling through the :class:`~shared.transport.base.Transport`) and by
the Azure Functions adapters (settling through ``ServiceBusMessageActions``).
"""

from __future__ import annotations

import logging
import random
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, cast

from shared.errors import DeadLetterReason
from shared.names import PROP_LEAD_ID, PROP_PUBLISHER_ID
from shared.pipeline.lead import mask_email
from shared.pipeline.messages import attempt_of, deferrals_of, rescheduled_copy
from shared.pipeline.outcomes import Delivered, Forward, Outcome, Reject, Retry, SettleAction, Stage
from shared.pipeline.retry import next_retry
from shared.transport.base import LockLost, OutgoingMessage, ReceivedMessage, complete_all

logger = logging.getLogger(__name__)

#: Service Bus accepts long descriptions, but nobody reads past this in a dead-letter listing.
MAX_DESCRIPTION = 1024
#: Deferrals (put off without reaching the CRM) a message gets before they count as attempts: far
#: beyond any penalty or pacing wait, so a message is never put off forever.
MAX_DEFERRALS = 200
#: A deferred copy waits at least this long, and up to this share of its wait longer (spread).
MIN_DEFERRAL = 0.5
DEFERRAL_SPREAD = 0.25


class Sender(Protocol):
    def send(self, queue: str, messages: Sequence[OutgoingMessage]) -> None: ...


class Settler(Protocol):
    def complete(self, message: ReceivedMessage) -> None: ...

    def dead_letter(self, message: ReceivedMessage, reason: str, description: str) -> None: ...


class SendsAndCompletes(Protocol):
    """A broker that sends and completes in one transaction (the embedded broker)."""

    def send_and_complete(self, queue: str, messages: Sequence[OutgoingMessage], message: ReceivedMessage) -> None: ...


def _send_then_complete(
    sender: Sender, settler: Settler, queue: str, outgoing: OutgoingMessage, message: ReceivedMessage
) -> None:
    """Send ``outgoing``, then complete ``message``: as one transaction when the one broker does both,
    else in this order (a crash in between redelivers ``message``, whose copy duplicate detection drops)."""
    # Looked up on the class: a wrapper that forwards unknown names (``__getattr__``) to a broker
    # must not have its own send and complete bypassed.
    if cast(object, sender) is settler and callable(getattr(type(sender), "send_and_complete", None)):
        cast(SendsAndCompletes, sender).send_and_complete(queue, [outgoing], message)
        return
    sender.send(queue, [outgoing])
    settler.complete(message)


@dataclass(frozen=True)
class Settled:
    """What happened to a message."""

    stage: Stage
    action: SettleAction
    message: ReceivedMessage
    outcome: Outcome
    reason: str | None = None
    delay: float | None = None


Observer = Callable[[Settled], None]


def settle(
    stage: Stage | str,
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
    stage = Stage(stage)
    queue = stage.queue
    if isinstance(outcome, Forward):
        _send_then_complete(sender, settler, outcome.queue, outcome.message, message)
        result = Settled(stage, SettleAction.FORWARDED, message, outcome)
    elif isinstance(outcome, Delivered):
        settler.complete(message)
        result = Settled(stage, SettleAction.DELIVERED, message, outcome)
    elif isinstance(outcome, Retry) and outcome.not_sent and deferrals_of(message) < MAX_DEFERRALS:
        # Nothing reached the CRM: put off without spending an attempt. Spread over a while after the
        # wait, so a backlog put off by one penalty does not come back as one burst when it ends.
        wait = max(outcome.retry_after or 0.0, MIN_DEFERRAL)
        delay = wait + max(1.0, wait * DEFERRAL_SPREAD) * rand()
        _send_then_complete(sender, settler, queue, rescheduled_copy(message, delay, deferred=True), message)
        result = Settled(stage, SettleAction.RESCHEDULED, message, outcome, reason=outcome.description, delay=delay)
    elif isinstance(outcome, Retry):
        attempt = attempt_of(message)
        decision = next_retry(attempt, outcome.retry_after, rand=rand, schedule=schedule)
        if decision.delay is None:
            reason = DeadLetterReason.RETRIES_EXHAUSTED
            description = f"gave up after {attempt} attempts; last error: {outcome.description}"
            settler.dead_letter(message, reason, description[:MAX_DESCRIPTION])
            result = Settled(stage, SettleAction.DEAD_LETTERED, message, outcome, reason=reason)
        else:
            _send_then_complete(sender, settler, queue, rescheduled_copy(message, decision.delay), message)
            result = Settled(
                stage, SettleAction.RESCHEDULED, message, outcome, reason=outcome.description, delay=decision.delay
            )
    elif isinstance(outcome, Reject):
        settler.dead_letter(message, outcome.reason, outcome.description[:MAX_DESCRIPTION])
        result = Settled(stage, SettleAction.DEAD_LETTERED, message, outcome, reason=outcome.reason)
    else:  # pragma: no cover - the Outcome union is closed
        raise TypeError(f"unknown outcome {outcome!r}")
    log_settlement(result, started)
    if observer is not None:
        observer(result)
    return result


def settle_many(
    stage: Stage | str,
    items: Sequence[tuple[ReceivedMessage, Outcome, float | None]],
    *,
    sender: Sender,
    settler: Settler,
    observer: Observer | None = None,
    schedule: Sequence[float] = (),
    on_error: Callable[[ReceivedMessage, Exception], None] | None = None,
) -> list[Settled]:
    """Carry out the outcomes of several messages of one stage, in the same safe order as
    :func:`settle`: every forward is sent first (one send per target queue: one broker transaction),
    then the forwarded and delivered messages are completed — in one write where the settler has
    ``complete_many``. Other outcomes (retries, dead letters) are settled one by one with
    :func:`settle`. ``(message, outcome, started)`` per item; the Settled of each message settled.

    A message that could not be settled (its lock was lost, the broker failed) is passed to
    ``on_error`` (default: raise) and is not observed: it is delivered again after its lock expires,
    its forward dropped by duplicate detection — nothing is lost.
    """
    stage = Stage(stage)

    def failed(message: ReceivedMessage, exc: Exception) -> None:
        if on_error is None:
            raise exc
        on_error(message, exc)

    simple: list[tuple[ReceivedMessage, Outcome, float | None]] = []
    results: list[Settled] = []
    for item in items:
        message, outcome, started = item
        if isinstance(outcome, Forward | Delivered):
            simple.append(item)
            continue
        try:
            results.append(
                settle(
                    stage, message, outcome, sender=sender, settler=settler, started=started,
                    observer=observer, schedule=schedule,
                )
            )
        except Exception as exc:  # noqa: BLE001 - handed to on_error, which logs or raises it
            failed(message, exc)
    if not simple:
        return results
    by_queue: dict[str, list[OutgoingMessage]] = {}
    for _, outcome, _ in simple:
        if isinstance(outcome, Forward):
            by_queue.setdefault(outcome.queue, []).append(outcome.message)
    try:
        for queue, outgoing in by_queue.items():
            sender.send(queue, outgoing)
        lost_ids = {id(m) for m in complete_all(settler, [message for message, _, _ in simple])}
    except Exception as exc:  # noqa: BLE001 - every message of the group stays locked, to be redelivered
        for message, _, _ in simple:
            failed(message, exc)
        return results
    for message, outcome, started in simple:
        if id(message) in lost_ids:
            failed(
                message,
                LockLost(f"the lock on message {message.message_id} on {message.queue} expired or it was settled"),
            )
            continue
        action = SettleAction.FORWARDED if isinstance(outcome, Forward) else SettleAction.DELIVERED
        result = Settled(stage, action, message, outcome)
        log_settlement(result, started)
        if observer is not None:
            observer(result)
        results.append(result)
    return results


#: Seconds between the INFO summaries of forwarded and delivered settlements (each of those is a DEBUG
#: line: one per lead and stage would bury the lines that need someone).
SUMMARY_INTERVAL = 60.0


class SettlementSummary:
    """Counts settlements per stage and outcome and, at most every ``interval`` seconds, logs them as one
    INFO line (``settled in the last 60 s: validate_credentials forwarded=…``). Thread-safe."""

    def __init__(self, interval: float = SUMMARY_INTERVAL, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = interval
        self._clock = clock
        self._lock = threading.Lock()
        self._counts: dict[tuple[str, str], int] = {}
        self._since = clock()

    def count(self, result: Settled) -> None:
        """Count one settlement; log the summary when the interval has passed."""
        now = self._clock()
        with self._lock:
            key = (str(result.stage), str(result.action))
            self._counts[key] = self._counts.get(key, 0) + 1
            if now - self._since < self.interval:
                return
            counts, self._counts = self._counts, {}
            seconds, self._since = now - self._since, now
        by_stage: dict[str, list[str]] = {}
        for (stage, action), n in sorted(counts.items()):
            by_stage.setdefault(stage, []).append(f"{action}={n}")
        logger.info(
            "settled in the last %.0f s: %s",
            seconds,
            "; ".join(f"{stage} {' '.join(parts)}" for stage, parts in by_stage.items()),
        )


_summary = SettlementSummary()


def log_settlement(result: Settled, started: float | None) -> None:
    """One structured line per settlement: stage, outcome, reason, publisher, lead, attempt, latency.

    Dead letters are WARNING and reschedules INFO; forwards and deliveries (one per lead and stage)
    are DEBUG, summed up in one INFO line a minute (:class:`SettlementSummary`). The same fields go
    on the record as attributes, which Application Insights shows as custom dimensions
    (``shared.ops.telemetry``). Values are log-safe: one line, e-mail addresses masked.
    """
    _summary.count(result)
    if result.action is SettleAction.DEAD_LETTERED:
        level = logging.WARNING
    elif result.action is SettleAction.RESCHEDULED:
        level = logging.INFO
    else:
        level = logging.DEBUG
    if not logger.isEnabledFor(level):
        return  # the fields below cost a few regular expressions per settlement
    props = result.message.application_properties
    latency_ms = round((time.monotonic() - started) * 1000, 1) if started is not None else -1.0
    fields = {
        "stage": result.stage,
        "outcome": result.action,
        "reason": _safe(result.reason),
        "publisherId": _safe(props.get(PROP_PUBLISHER_ID)),
        "leadId": _safe(props.get(PROP_LEAD_ID, result.message.message_id)),
        "attempt": attempt_of(result.message),
        "delay": f"{result.delay:.1f}" if result.delay is not None else "-",
        "latencyMs": latency_ms,
    }
    logger.log(
        level,
        "settled stage=%s outcome=%s reason=%s publisherId=%s leadId=%s attempt=%d delay=%s latencyMs=%.1f",
        fields["stage"],
        fields["outcome"],
        _quoted(str(fields["reason"])),
        _quoted(str(fields["publisherId"])),
        _quoted(str(fields["leadId"])),
        fields["attempt"],
        fields["delay"],
        latency_ms,
        extra=fields,
    )


#: Line breaks and other control characters: a value must not start a forged log line or drive a terminal.
_CONTROL = re.compile(r"[\x00-\x1f\x7f\x85\u2028\u2029]")
#: Anything shaped like an e-mail address inside free text (a CRM error quoting a field value).
_EMAIL = re.compile(r"[^\s@<>()\[\]{},;:\"'=]+@[^\s@<>()\[\]{},;:\"'=]+")


def _safe(value: object) -> str:
    """Log-safe text: no line breaks (log injection), e-mail addresses masked, bounded length."""
    if value is None:
        return "-"
    text = _CONTROL.sub(" ", str(value))
    # Mask before truncating: a cut could leave an address without the "@" that marks it.
    text = _EMAIL.sub(lambda match: mask_email(match.group(0)) or "***", text)
    return text[:200] or "-"


def _quoted(text: str) -> str:
    """``key=value`` stays one field per key: a value with spaces or ``=`` is double-quoted."""
    if any(ch.isspace() or ch in '="' for ch in text):
        return '"' + text.replace('"', "'") + '"'
    return text
