"""Message envelopes between stages: ids, application properties, and how copies are made.

Message ids are derived deterministically from (leadId, replay count, attempt) so that:

- a redelivered message forwards a copy with the *same* id, which duplicate detection drops — a crash
  between "send the next hop" and "complete this one" never doubles a lead in the next queue;
- a rescheduled copy (``attempt + 1``), a deferred copy (``deferrals + 1``: put off without reaching
  the CRM, no attempt spent) and a replayed copy (``replayCount + 1``) get *new* ids, which duplicate
  detection would otherwise silently drop.

Service Bus limits message ids to 128 characters; longer ids are shortened with a hash.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta

from shared.names import PROP_ATTEMPT, PROP_DEFERRALS, PROP_LEAD_ID, PROP_PUBLISHER_ID, PROP_REPLAY_COUNT
from shared.pipeline.lead import LeadMessage
from shared.pipeline.outcomes import Forward
from shared.transport.base import OutgoingMessage, PropertyValue, ReceivedMessage

MAX_MESSAGE_ID = 128


def hop_message_id(lead_id: str, *, replay: int = 0, attempt: int = 1, deferrals: int = 0) -> str:
    """The message id of a lead's message on a stage queue (see module docstring)."""
    parts = ((f".r{replay}", replay), (f".a{attempt}", attempt - 1), (f".d{deferrals}", deferrals))
    suffix = "".join(part for part, n in parts if n)
    message_id = lead_id + suffix
    if len(message_id) <= MAX_MESSAGE_ID:
        return message_id
    digest = hashlib.sha256(lead_id.encode()).hexdigest()[:32]
    return f"{lead_id[: MAX_MESSAGE_ID - len(suffix) - 34]}~{digest}{suffix}"


def _int_prop(props: Mapping[str, PropertyValue], name: str, default: int) -> int:
    value = props.get(name, default)
    try:
        return max(int(value), 0)
    except (TypeError, ValueError):
        return default


def attempt_of(message: ReceivedMessage) -> int:
    """The stage attempt carried by a message (1 for the first try)."""
    return max(_int_prop(message.application_properties, PROP_ATTEMPT, 1), 1)


def replay_count_of(message: ReceivedMessage) -> int:
    return _int_prop(message.application_properties, PROP_REPLAY_COUNT, 0)


def deferrals_of(message: ReceivedMessage) -> int:
    return _int_prop(message.application_properties, PROP_DEFERRALS, 0)


def envelope(
    body: bytes,
    *,
    publisher_id: str,
    lead_id: str,
    replay: int = 0,
    attempt: int = 1,
    deferrals: int = 0,
    scheduled_at: datetime | None = None,
    extra: Mapping[str, PropertyValue] | None = None,
) -> OutgoingMessage:
    """Build a stage message with the application properties every hop carries (architecture §3)."""
    props: dict[str, PropertyValue] = dict(extra or {})
    props.update({PROP_PUBLISHER_ID: publisher_id, PROP_LEAD_ID: lead_id, PROP_ATTEMPT: attempt})
    props.pop(PROP_DEFERRALS, None)
    if replay:
        props[PROP_REPLAY_COUNT] = replay
    if deferrals:
        props[PROP_DEFERRALS] = deferrals
    return OutgoingMessage(
        body=body,
        message_id=hop_message_id(lead_id, replay=replay, attempt=attempt, deferrals=deferrals),
        application_properties=props,
        scheduled_enqueue_time=scheduled_at,
    )


def rescheduled_copy(
    message: ReceivedMessage, delay: float, *, now: datetime | None = None, deferred: bool = False
) -> OutgoingMessage:
    """A copy of ``message`` for the same queue, visible after ``delay`` seconds, with ``attempt + 1``
    — or, ``deferred``, with the same attempt and ``deferrals + 1`` (nothing reached the CRM)."""
    now = now or datetime.now(UTC)
    props = message.application_properties
    lead_id = str(props.get(PROP_LEAD_ID) or message.message_id)
    publisher_id = str(props.get(PROP_PUBLISHER_ID, ""))
    return envelope(
        message.body,
        publisher_id=publisher_id,
        lead_id=lead_id,
        replay=replay_count_of(message),
        attempt=attempt_of(message) + (0 if deferred else 1),
        deferrals=deferrals_of(message) + 1 if deferred else 0,
        scheduled_at=now + timedelta(seconds=delay),
        extra={k: v for k, v in props.items() if k not in (PROP_PUBLISHER_ID, PROP_LEAD_ID, PROP_ATTEMPT)},
    )


def forward(lead: LeadMessage, message: ReceivedMessage, queue: str) -> Forward:
    """The next hop of ``lead``: its normalised body on ``queue``, keeping the replay count (and so
    the same message id when ``message`` is a redelivery: duplicate detection drops the copy)."""
    return Forward(
        queue,
        envelope(lead.to_body(), publisher_id=lead.publisher_id, lead_id=lead.lead_id, replay=replay_count_of(message)),
    )
