"""What the trigger adapters share: the process-wide pipeline and settlement through the Functions host.

Built lazily on the first invocation (settings are read once, at start of work, not at import or in
decorator arguments), then reused by every invocation of every stage in this worker process.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from azure.servicebus import ServiceBusReceivedMessage as SdkReceivedMessage

from shared.ops.status import StatusBook
from shared.ops.telemetry import Metrics, configure_telemetry, fan_out
from shared.pipeline.settle import Sender, Settled, settle
from shared.pipeline.stages import STAGES, Outcome, Pipeline
from shared.secretstore import make_secret_store
from shared.secretstore.base import ConnectionStore
from shared.services import penalties_for
from shared.settings import Settings
from shared.transport import make_transport
from shared.transport.base import ReceivedMessage
from shared.transport.servicebus import from_service_bus_message

logger = logging.getLogger(__name__)


class MessageActions(Protocol):
    """The part of the host's ``ServiceBusMessageActions`` (settlement over gRPC) we use."""

    def complete(self, message: SdkReceivedMessage) -> None: ...

    def deadletter(
        self,
        message: SdkReceivedMessage,
        deadletter_reason: str | None = None,
        deadletter_error_description: str | None = None,
    ) -> None: ...


@dataclass
class ActionsSettler:
    """Settles the trigger message through the host's settlement channel (gRPC to the host)."""

    actions: MessageActions
    sdk_message: SdkReceivedMessage

    def complete(self, message: ReceivedMessage) -> None:
        self.actions.complete(self.sdk_message)

    def dead_letter(self, message: ReceivedMessage, reason: str, description: str) -> None:
        self.actions.deadletter(self.sdk_message, deadletter_reason=reason, deadletter_error_description=description)


@dataclass
class Host:
    settings: Settings
    pipeline: Pipeline
    sender: Sender

    def settle(
        self,
        stage: str,
        message: ReceivedMessage,
        outcome: Outcome,
        actions: MessageActions,
        sdk_message: SdkReceivedMessage,
        started: float,
    ) -> Settled:
        """Settle through the host's message actions, forwards and copies through our sender."""
        return settle(
            stage,
            message,
            outcome,
            sender=self.sender,
            settler=ActionsSettler(actions, sdk_message),
            started=started,
            schedule=self.settings.retry_schedule,
        )

    #: Per-publisher delivery status (None: not recorded, e.g. in a test that does not need it).
    status: StatusBook | None = None
    metrics: Metrics = field(default_factory=Metrics)

    def observe(self, settled: Settled) -> None:
        """The settlement observer: status book and metrics. Raises nothing."""
        observers = [self.metrics.observe] if self.status is None else [self.status.observe, self.metrics.observe]
        fan_out(*observers)(settled)


@functools.cache
def host() -> Host:
    """The process-wide pipeline: settings, telemetry, secret store, Service Bus sender, status book.

    Raises ConfigurationError for a missing or invalid setting (every invocation then fails the same
    way and the messages are redelivered; nothing is lost).
    """
    settings = Settings.from_env()
    configure_telemetry(settings)
    secrets = make_secret_store(settings)
    pipeline = Pipeline(settings, ConnectionStore(secrets), throttle=penalties_for(settings, secrets))
    status = StatusBook(settings.data_dir / "status.db")
    return Host(settings, pipeline, make_transport(settings), status=status)


def run_stage(
    stage: str, sdk_message: SdkReceivedMessage, actions: MessageActions, *, using: Host | None = None
) -> Settled:
    """Run ``stage`` on the trigger message and settle it explicitly (send first, complete after).

    Raises what the broker raises when settling fails: the host then leaves the message locked and it
    is redelivered after the lock expires — nothing is lost.
    """
    current = using or host()
    started = time.monotonic()
    message = from_service_bus_message(sdk_message, STAGES[stage], from_dead_letter=False, peeked=False)
    outcome = current.pipeline.handle(stage, message)
    return settle(
        stage,
        message,
        outcome,
        sender=current.sender,
        settler=ActionsSettler(actions, sdk_message),
        started=started,
        observer=current.observe,
        schedule=current.settings.retry_schedule,
    )


def run_write_batch(
    sdk_messages: Sequence[SdkReceivedMessage], actions: MessageActions, *, using: Host | None = None
) -> list[Settled]:
    """The write stage for a batch the trigger delivered: one ``$batch`` per publisher, then each message
    settled on its own. A message whose settlement fails is left locked (redelivered after its lock
    expires; the idempotent write makes that safe) and the others are still settled."""
    current = using or host()
    started = time.monotonic()
    messages = [
        from_service_bus_message(m, STAGES["write_lead"], from_dead_letter=False, peeked=False) for m in sdk_messages
    ]
    settled: list[Settled] = []
    for sdk_message, message, outcome in zip(
        sdk_messages, messages, current.pipeline.write_leads(messages), strict=True
    ):
        try:
            settled.append(current.settle("write_lead", message, outcome, actions, sdk_message, started))
        except Exception:  # one failed settlement must not strand the rest of the batch
            logger.exception("settling message %s failed; it is redelivered after its lock expires", message.message_id)
    return settled
