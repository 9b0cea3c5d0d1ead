"""Request and response bodies of the HTTP API (DESIGN §6): pydantic models, camelCase JSON.

Shapes that other modules own (a redacted connection, a dead letter, a replay plan entry) are kept as
JSON objects here and described by their docstrings, so there is one definition of each.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints
from pydantic.alias_generators import to_camel

from shared.crm.connection import Auth

_Filter = Annotated[str, StringConstraints(max_length=200)]


class ApiModel(BaseModel):
    """camelCase on the wire, snake_case in Python; unknown fields refused in requests."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")


class ErrorAnswer(ApiModel):
    """Every error answer: ``error`` says what is wrong, ``field`` names the offending input."""

    error: str
    field: str | None = None
    reason: str | None = Field(default=None, description="the DESIGN §5 reason, for verification failures")
    message: str | None = None
    verification: dict[str, Any] | None = None
    retry_after: int | None = None


# -- health ----------------------------------------------------------------------------------------


class HealthAnswer(ApiModel):
    status: Literal["ok", "degraded"]
    queue_backend: str
    secret_backend: str
    checks: dict[str, str]


# -- keys ------------------------------------------------------------------------------------------


class IssuedKey(ApiModel):
    """A new publisher key. Shown once: only its hash is kept."""

    key: str
    publisher_id: str


# -- connections -----------------------------------------------------------------------------------


class ConnectionBody(ApiModel):
    """``{"url": "https://contoso.crm4.dynamics.com", "auth": {"kind": "password" | "clientSecret", …}}``."""

    url: str = Field(min_length=1, max_length=2048, examples=["https://contoso.crm4.dynamics.com"])
    auth: Auth


class ConnectionAnswer(ApiModel):
    """A connection without its secret, its last verification, and how many dead letters were replayed."""

    publisher_id: str
    connection: dict[str, Any] = Field(description="the stored connection without password or client secret")
    verification: dict[str, Any] | None = Field(
        default=None, description="the last live verification: ok, checkedAt, reason, message, checks"
    )
    replayed: int | None = Field(
        default=None, description="configuration dead letters replayed after this verified update"
    )
    replay_error: str | None = None
    test_lead: dict[str, Any] | None = Field(
        default=None,
        description="the MSFT_TEST lead written by ?sendTestLead=true: leadId, recordId, created",
    )


# -- status ----------------------------------------------------------------------------------------


class LastError(ApiModel):
    message: str | None
    reason: str | None
    at: str | None


class ConnectionState(ApiModel):
    stored: bool
    verified: bool
    last_verification: dict[str, Any] | None = None


class PublisherStatusAnswer(ApiModel):
    publisher_id: str
    delivered: int
    last_delivery: str | None
    pending: dict[str, int] | None = Field(
        default=None,
        description="this publisher's messages waiting in each stage queue, when the broker can count",
    )
    pending_note: str | None = None
    dead_letters: dict[str, int] = Field(description="this publisher's dead letters by reason")
    dead_letters_total: int
    last_error: LastError | None
    consecutive_config_failures: int
    connection: ConnectionState


# -- ingest ----------------------------------------------------------------------------------------


class IngestAnswer(ApiModel):
    lead_id: str = Field(description="the lead's id: leadId, the Idempotency-Key header, or derived from the content")
    queued: bool
    duplicate: bool = Field(
        default=False, description="true when this lead was accepted before (answered 200 instead of 202)"
    )


# -- dead letters and stats ------------------------------------------------------------------------


class DeadLettersAnswer(ApiModel):
    items: list[dict[str, Any]] = Field(
        description="messageId, leadId, publisherId, queue, reason, description, enqueuedAt, deliveryCount, "
        "replayCount, body"
    )


class DeadLetterSelection(ApiModel):
    """Which dead letters: every filter is optional; a list means any of its values."""

    queue: _Filter | list[_Filter] | None = None
    reason: _Filter | list[_Filter] | None = None
    publisher_id: _Filter | None = None
    message_ids: list[_Filter] | None = Field(default=None, max_length=10_000)
    limit: int | None = Field(default=None, ge=0, le=1_000_000)


class ReplayBody(DeadLetterSelection):
    dry_run: bool = False


class PurgeBody(DeadLetterSelection):
    confirm: bool = Field(default=False, description="must be true: a purge deletes dead letters for good")


class ReplayAnswer(ApiModel):
    matched: int
    replayed: int
    refused: int = 0
    errors: list[str] = []
    refusals: list[str] = []
    dry_run: bool = False
    plan: list[dict[str, Any]] | None = Field(
        default=None,
        description="dry run: messageId, queue, newMessageId, reason, publisherId, replayCount, refused",
    )


class PurgeAnswer(ApiModel):
    matched: int
    purged: int
    errors: list[str] = []


class QueueStatsAnswer(ApiModel):
    queue: str
    active: int
    scheduled: int
    dead_lettered: int
    dead_lettered_by_reason: dict[str, int]


class FailingPublisher(ApiModel):
    publisher_id: str
    consecutive_config_failures: int
    last_error: str | None
    last_error_reason: str | None
    last_error_at: str | None


class StatsAnswer(ApiModel):
    queues: list[QueueStatsAnswer]
    publishers_failing: list[FailingPublisher] = Field(
        description="publishers whose leads keep failing for configuration reasons (DESIGN §5)"
    )
