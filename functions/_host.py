"""What the trigger adapters share: the process's services and settlement through the Functions host.

The services come from the one composition root (:func:`shared.services.process_services`), built on
the first invocation (settings are read then, never at import or in decorator arguments) and shared
by every trigger and the HTTP function of this worker process. Every settlement, single or batched,
goes through :func:`_settle`, so each one reaches the status book and the metrics.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol

from azure.servicebus import ServiceBusReceivedMessage as SdkReceivedMessage

from shared.pipeline.outcomes import Outcome, Stage
from shared.pipeline.settle import Settled, settle
from shared.services import Services, process_services
from shared.transport.base import ReceivedMessage
from shared.transport.servicebus import from_service_bus_message

logger = logging.getLogger(__name__)

#: Shortest pause between two lock renewals of a batch (a lock of a few seconds is a test's).
MIN_RENEW_INTERVAL = 0.5


class MessageActions(Protocol):
    """The part of the host's ``ServiceBusMessageActions`` (settlement over gRPC) we use."""

    def complete(self, message: SdkReceivedMessage) -> None: ...

    def deadletter(
        self,
        message: SdkReceivedMessage,
        deadletter_reason: str | None = None,
        deadletter_error_description: str | None = None,
    ) -> None: ...

    def renew_message_lock(self, message: SdkReceivedMessage) -> None: ...


@dataclass
class ActionsSettler:
    """Settles the trigger message through the host's settlement channel (gRPC to the host)."""

    actions: MessageActions
    sdk_message: SdkReceivedMessage

    def complete(self, message: ReceivedMessage) -> None:
        self.actions.complete(self.sdk_message)

    def dead_letter(self, message: ReceivedMessage, reason: str, description: str) -> None:
        self.actions.deadletter(self.sdk_message, deadletter_reason=reason, deadletter_error_description=description)


def _settle(
    services: Services,
    stage: Stage,
    message: ReceivedMessage,
    outcome: Outcome,
    actions: MessageActions,
    sdk_message: SdkReceivedMessage,
    started: float,
) -> Settled:
    """Settle through the host's message actions, next hops and copies through our transport, and
    tell the observer. Raises what settling raises (the message is then redelivered)."""
    return settle(
        stage,
        message,
        outcome,
        sender=services.transport,
        settler=ActionsSettler(actions, sdk_message),
        started=started,
        observer=services.observe,
        schedule=services.settings.retry_schedule,
    )


def run_stage(
    stage: Stage | str, sdk_message: SdkReceivedMessage, actions: MessageActions, *, services: Services | None = None
) -> Settled:
    """Run ``stage`` on the trigger message and settle it explicitly (send first, complete after).

    Raises what the broker raises when settling fails: the host then leaves the message locked and it
    is redelivered after the lock expires — nothing is lost.
    """
    current = services or process_services()
    stage = Stage(stage)
    started = time.monotonic()
    message = from_service_bus_message(sdk_message, stage.queue, from_dead_letter=False, peeked=False)
    outcome = current.pipeline.handle(stage, message)
    return _settle(current, stage, message, outcome, actions, sdk_message, started)


def run_write_batch(
    sdk_messages: Sequence[SdkReceivedMessage], actions: MessageActions, *, services: Services | None = None
) -> list[Settled]:
    """The write stage for a batch the trigger delivered: one ``$batch`` per publisher, then each message
    settled on its own. The batch's locks are renewed while the CRM call runs (the host's automatic
    renewal does not apply to batch triggers). A message whose settlement fails is left locked
    (redelivered after its lock expires; the idempotent write makes that safe) and the others are still
    settled."""
    current = services or process_services()
    started = time.monotonic()
    messages = [
        from_service_bus_message(m, Stage.WRITE_LEAD.queue, from_dead_letter=False, peeked=False) for m in sdk_messages
    ]
    with renewing_locks(actions, sdk_messages, fallback=current.settings.lock_duration):
        outcomes = current.pipeline.write_leads(messages)
    settled: list[Settled] = []
    for sdk_message, message, outcome in zip(sdk_messages, messages, outcomes, strict=True):
        try:
            settled.append(_settle(current, Stage.WRITE_LEAD, message, outcome, actions, sdk_message, started))
        except Exception:  # one failed settlement must not strand the rest of the batch
            logger.exception("settling message %s failed; it is redelivered after its lock expires", message.message_id)
    return settled


def renew_interval(sdk_messages: Sequence[SdkReceivedMessage], fallback: float) -> float:
    """Renew at half the shortest lock left (the queue's lock duration, as the broker stamped it)."""
    now = datetime.now(UTC)
    left = [
        (until - now).total_seconds()
        for m in sdk_messages
        if (until := getattr(m, "locked_until_utc", None)) is not None
    ]
    shortest = min(left) if left else fallback
    return max(MIN_RENEW_INTERVAL, shortest / 2)


@contextmanager
def renewing_locks(
    actions: MessageActions, sdk_messages: Sequence[SdkReceivedMessage], *, fallback: float
) -> Iterator[None]:
    """Renew the locks of ``sdk_messages`` every :func:`renew_interval` seconds while the block runs."""
    stop = threading.Event()
    interval = renew_interval(sdk_messages, fallback)

    def renew() -> None:
        while not stop.wait(interval):
            for message in sdk_messages:
                try:
                    actions.renew_message_lock(message)
                except Exception:  # noqa: BLE001 - a lost lock means redelivery, which the idempotent write absorbs
                    logger.warning("could not renew the lock of message %s", message.message_id)

    thread = threading.Thread(target=renew, name="lw-renew-batch", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
