"""The pipeline's vocabulary: the three stages, what a stage decides, and what settling did.

Each stage returns one :data:`Outcome`:

- :class:`Forward` — send ``message`` to ``queue`` (the next stage), then complete this one;
- :class:`Delivered` — the lead is in the CRM (written now, or found there already);
- :class:`Retry` — transient failure; :mod:`shared.pipeline.settle` turns it into a rescheduled copy or,
  when the retry schedule is spent, a ``RetriesExhausted`` dead letter;
- :class:`Reject` — dead-letter now with a reason (``shared.errors.DeadLetterReason``).

:func:`outcome_for_error` is the one place that maps an exception onto an outcome.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from uuid import UUID

from shared.errors import CrmPaced, DeadLetter, DeadLetterReason, InvalidInput, RetryLater, UnsafeCrmUrl
from shared.names import QUEUE_INCOMING, QUEUE_READY, QUEUE_VALIDATED
from shared.transport.base import OutgoingMessage


class Stage(StrEnum):
    """The three stages, in pipeline order; each reads its own queue."""

    VALIDATE_CREDENTIALS = "validate_credentials"
    CHECK_SOLUTION = "check_solution"
    WRITE_LEAD = "write_lead"

    @property
    def queue(self) -> str:
        """The queue this stage is triggered by."""
        return STAGES[self]


#: Stage → the queue it reads (also the queue a rescheduled copy goes back to).
STAGES: dict[Stage, str] = {
    Stage.VALIDATE_CREDENTIALS: QUEUE_INCOMING,
    Stage.CHECK_SOLUTION: QUEUE_VALIDATED,
    Stage.WRITE_LEAD: QUEUE_READY,
}


class SettleAction(StrEnum):
    """What settling did with a message."""

    FORWARDED = "forwarded"
    DELIVERED = "delivered"
    RESCHEDULED = "rescheduled"
    DEAD_LETTERED = "dead-lettered"


@dataclass(frozen=True)
class Forward:
    queue: str
    message: OutgoingMessage


@dataclass(frozen=True)
class Delivered:
    record_id: UUID
    created: bool


@dataclass(frozen=True)
class Retry:
    description: str
    retry_after: float | None = None
    #: Nothing reached the CRM (a penalty, or pacing said "not yet"): the message may wait
    #: ``retry_after`` seconds without spending one of its retry attempts.
    not_sent: bool = False


@dataclass(frozen=True)
class Reject:
    reason: DeadLetterReason
    description: str


Outcome = Forward | Delivered | Retry | Reject


def outcome_for_error(exc: BaseException) -> Outcome:
    """Map any exception a stage raised onto an outcome: the one place that decides.

    Every dead-letter error names its reason. Of the input errors, a stored CRM URL that is no longer
    allowed is the publisher's to fix (``CredentialsRejected``: the connection must be replaced); any
    other is the message's own (``InvalidLead``). Unexpected exceptions (bugs, unforeseen library
    errors) are retried on the normal schedule and then dead-lettered ``RetriesExhausted``: a worker
    never stops and a message never loops forever.
    """
    if isinstance(exc, DeadLetter):
        return Reject(exc.reason, str(exc))
    if isinstance(exc, CrmPaced):
        return Retry(str(exc), exc.retry_after, not_sent=True)
    if isinstance(exc, RetryLater):
        return Retry(str(exc), exc.retry_after)
    if isinstance(exc, UnsafeCrmUrl):
        return Reject(DeadLetterReason.CREDENTIALS_REJECTED, f"the stored CRM URL is refused: {exc}")
    if isinstance(exc, InvalidInput):
        return Reject(DeadLetterReason.INVALID_LEAD, str(exc))
    return Retry(f"internal error: {type(exc).__name__}")
