"""Request and response bodies of the HTTP API (architecture §6): pydantic models, camelCase JSON.

Shapes that other modules own (a redacted connection, a dead letter, a replay plan entry) are kept as
JSON objects here and described in their field descriptions, so there is one definition of each.

Class docstrings, field descriptions, titles and examples are what ``/api/docs`` shows a user: they
are written for someone calling the API, not for someone reading this code. Field names and aliases
are the stable API and never change.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints
from pydantic.alias_generators import to_camel

from shared.crm.connection import Auth

_Filter = Annotated[str, StringConstraints(max_length=200)]

#: Words that read better in capitals in a field title ("Publisher ID", not "Publisher id").
_TITLE_WORDS = {"id": "ID", "ids": "IDs", "url": "URL", "crm": "CRM"}


def field_title(name: str, _info: Any = None) -> str:
    """``publisher_id`` → ``Publisher ID``: the title a schema viewer shows for a field."""
    words = [_TITLE_WORDS.get(word, word) for word in name.split("_")]
    first = words[0] if words[0].isupper() else words[0].capitalize()
    return " ".join([first, *words[1:]])


def model_title(model: type[Any]) -> str:
    """``PublisherStatusAnswer`` → ``Publisher status answer``."""
    words = re.findall(r"[A-Z][a-z0-9]*", model.__name__) or [model.__name__]
    return " ".join([words[0], *(word.lower() for word in words[1:])])


class ApiModel(BaseModel):
    """camelCase on the wire, snake_case in Python; unknown fields refused in requests."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        field_title_generator=field_title,
        model_title_generator=model_title,
    )


class ErrorAnswer(ApiModel):
    """Every error answer. `error` says what is wrong; `field` names the input at fault, when there is one."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "error": "queue: unknown queue leads-nowhere; one of leads-incoming, leads-validated, leads-ready",
                    "field": "queue",
                },
                {
                    "error": "Entra refused the password (AADSTS50126)",
                    "reason": "CredentialsRejected",
                    "message": "Entra refused the password (AADSTS50126)",
                },
            ]
        }
    )

    error: str = Field(description="What is wrong, in words.")
    field: str | None = Field(default=None, description="The input at fault, e.g. `queue` or `lead.UserDetails`.")
    reason: str | None = Field(
        default=None,
        description="For a connection that failed verification: the dead-letter reason its leads would get, "
        "e.g. `CredentialsRejected`.",
    )
    message: str | None = Field(default=None, description="The verification failure in words.")
    verification: dict[str, Any] | None = Field(
        default=None, description="The full verification report: each check and its result."
    )
    retry_after: int | None = Field(default=None, description="Seconds to wait before trying again (503 only).")


# -- health ----------------------------------------------------------------------------------------


class HealthAnswer(ApiModel):
    """Whether the service is up and its backends answer."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "status": "ok",
                    "runtime": "embedded",
                    "queueBackend": "embedded",
                    "secretBackend": "embedded",
                    "stateBackend": "embedded",
                    "checks": {"queue": "ok", "secrets": "ok"},
                }
            ]
        }
    )

    status: Literal["ok", "degraded"] = Field(description="`ok`, or `degraded` when a check failed (then 503).")
    runtime: str = Field(description="`embedded` (stage workers) or `functions` (the registered Functions triggers).")
    queue_backend: str = Field(description="`embedded` or `servicebus`.")
    secret_backend: str = Field(description="`embedded` or `keyvault`.")
    state_backend: str = Field(description="`embedded` or `tables` (Azure Table Storage).")
    checks: dict[str, str] = Field(description="Each backend check and its result: `ok` or `unavailable`.")


# -- session ---------------------------------------------------------------------------------------


class WhoAmIAnswer(ApiModel):
    """Which key was sent: the admin key, or the key of one publisher."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [{"role": "publisher", "publisherId": "contoso"}, {"role": "admin", "publisherId": None}]
        }
    )

    role: Literal["admin", "publisher"] = Field(description="`admin` may act for every publisher.")
    publisher_id: str | None = Field(description="The publisher a publisher key belongs to; null for the admin key.")


# -- keys ------------------------------------------------------------------------------------------


class IssuedKey(ApiModel):
    """A new publisher key. It is shown only in this answer: Lead Writer keeps only its hash."""

    model_config = ConfigDict(
        json_schema_extra={"examples": [{"key": "lwp_contoso_9f2c1e…", "publisherId": "contoso"}]}
    )

    key: str = Field(description="The publisher key; send it as `Authorization: Bearer <key>`.")
    publisher_id: str = Field(description="The publisher it belongs to.")


# -- connections -----------------------------------------------------------------------------------


class ConnectionBody(ApiModel):
    """The publisher's CRM and how to sign in to it: a service account (`password`) or an app
    registration (`clientSecret`)."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "url": "https://contoso.crm4.dynamics.com",
                    "auth": {"kind": "password", "username": "leadwriter@contoso.com", "password": "…"},
                },
                {
                    "url": "https://contoso.crm4.dynamics.com",
                    "auth": {
                        "kind": "clientSecret",
                        "tenantId": "72f988bf-86f1-41af-91ab-2d7cd011db47",
                        "clientId": "0f3a8e4c-1b2d-4c5e-9f6a-7b8c9d0e1f2a",
                        "clientSecret": "…",
                    },
                },
            ]
        }
    )

    url: str = Field(
        min_length=1,
        max_length=2048,
        examples=["https://contoso.crm4.dynamics.com"],
        description="The Dataverse environment URL: `https://<org>.crm<N>.dynamics.com`.",
    )
    auth: Auth = Field(description="How Lead Writer signs in to the CRM.")


class ConnectionAnswer(ApiModel):
    """The stored connection without its secret, its last verification, and what happened next."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "publisherId": "contoso",
                    "connection": {
                        "url": "https://contoso.crm4.dynamics.com",
                        "auth": {"kind": "password", "username": "leadwriter@contoso.com"},
                        "updatedAt": "2026-12-01T21:04:11Z",
                    },
                    "verification": {
                        "ok": True,
                        "checkedAt": "2026-12-01T21:04:12Z",
                        "solutionVersion": "1.4.0.0",
                    },
                    "replayed": 3,
                }
            ]
        }
    )

    publisher_id: str = Field(description="The publisher.")
    connection: dict[str, Any] = Field(description="The stored connection, without password or client secret.")
    verification: dict[str, Any] | None = Field(
        default=None,
        description="The last live check: `ok`, `checkedAt`, and on failure the `reason` and `message`.",
    )
    replayed: int | None = Field(
        default=None,
        description="Dead letters of this publisher that waited for a working connection and were sent again.",
    )
    replay_error: str | None = Field(
        default=None, description="Why those dead letters could not be sent again now (they stay for ops)."
    )
    replay_job_id: str | None = Field(
        default=None,
        description="When there were too many to send again within the request: the job doing it "
        "(`GET /api/jobs/{jobId}`).",
    )
    test_lead: dict[str, Any] | None = Field(
        default=None,
        description="With `?sendTestLead=true`: the `MSFT_TEST` lead written to the CRM (`leadId`, `recordId`, "
        "`created`).",
    )


# -- status ----------------------------------------------------------------------------------------


class LastError(ApiModel):
    """The last time one of this publisher's leads failed."""

    message: str | None = Field(description="What went wrong, in words.")
    reason: str | None = Field(description="The dead-letter reason, or `transient` for a failure that is retried.")
    at: str | None = Field(description="When (ISO 8601, UTC).")


class ConnectionState(ApiModel):
    """Whether a connection is stored and whether its last check passed."""

    stored: bool = Field(description="A connection is stored.")
    verified: bool = Field(description="Its last live check passed.")
    last_verification: dict[str, Any] | None = Field(default=None, description="That check, when there was one.")


class PublisherStatusAnswer(ApiModel):
    """Delivery health of one publisher: are its leads arriving, and if not, why."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "publisherId": "contoso",
                    "delivered": 412,
                    "lastDelivery": "2026-12-01T21:58:03Z",
                    "pending": {"leads-incoming": 0, "leads-validated": 0, "leads-ready": 2},
                    "deadLetters": {"LeadRejected": 1, "PermissionDenied": 3},
                    "deadLettersTotal": 4,
                    "lastError": {
                        "message": "the CRM answered 403: the Lead Writer role is not assigned",
                        "reason": "PermissionDenied",
                        "at": "2026-12-01T21:40:00Z",
                    },
                    "consecutiveConfigFailures": 3,
                    "waitingForRetry": 2,
                    "nextRetryAt": "2026-12-01T22:03:00Z",
                    "connection": {"stored": True, "verified": True},
                }
            ]
        }
    )

    publisher_id: str = Field(description="The publisher.")
    delivered: int = Field(description="Leads written to the CRM.")
    last_delivery: str | None = Field(description="When the last one was written (ISO 8601, UTC).")
    pending: dict[str, int] | None = Field(
        default=None,
        description="Leads of this publisher waiting in each stage queue, when the queue backend can count them.",
    )
    pending_note: str | None = Field(default=None, description="Why `pending` is missing, when it is.")
    dead_letters: dict[str, int] = Field(description="Dead letters of this publisher, by reason.")
    dead_letters_total: int = Field(description="All dead letters of this publisher.")
    last_error: LastError | None = Field(description="The last failure, if any.")
    consecutive_config_failures: int = Field(
        description="Leads in a row that failed for a reason the publisher fixes (credentials, solution, role); "
        "0 after a delivery."
    )
    connection: ConnectionState = Field(description="The stored connection.")
    waiting_for_retry: int | None = Field(
        default=None,
        description="Leads waiting out the retry schedule after a transient CRM failure (released early, at the "
        "paced rate, once the CRM answers successes again). Null when the queue backend cannot tell.",
    )
    next_retry_at: str | None = Field(
        default=None, description="When the next of them is due (ISO 8601, UTC); null when none waits."
    )


# -- ingest ----------------------------------------------------------------------------------------


class IngestAnswer(ApiModel):
    """The lead was accepted and queued for delivery (202), or was accepted before (200, a duplicate)."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [{"leadId": "6f1c2d3e-4b5a-4c6d-8e7f-901a2b3c4d5e", "queued": True, "duplicate": False}]
        }
    )

    lead_id: str = Field(
        description="The lead's id: `leadId`, the `Idempotency-Key` header, or derived from the content."
    )
    queued: bool = Field(description="Queued on `leads-incoming`.")
    duplicate: bool = Field(
        default=False, description="True when this lead was accepted before (answered 200 instead of 202)."
    )


# -- dead letters and stats ------------------------------------------------------------------------

_DEAD_LETTER_EXAMPLE: dict[str, Any] = {
    "messageId": "6f1c2d3e-4b5a-4c6d-8e7f-901a2b3c4d5e",
    "leadId": "6f1c2d3e-4b5a-4c6d-8e7f-901a2b3c4d5e",
    "publisherId": "contoso",
    "queue": "leads-ready",
    "reason": "LeadRejected",
    "description": "the CRM refused the lead (400): a required column is missing",
    "enqueuedAt": "2026-12-01T21:40:00Z",
    "deliveryCount": 1,
    "replayCount": 0,
    "body": {"leadId": "6f1c2d3e-4b5a-4c6d-8e7f-901a2b3c4d5e", "publisherId": "contoso", "lead": {"…": "…"}},
}


class DeadLettersAnswer(ApiModel):
    """Dead letters, oldest first. Reading them changes nothing."""

    model_config = ConfigDict(json_schema_extra={"examples": [{"items": [_DEAD_LETTER_EXAMPLE]}]})

    items: list[dict[str, Any]] = Field(
        description="Each dead letter: `messageId`, `leadId`, `publisherId`, `queue` (the stage it died on), "
        "`reason`, `description`, `enqueuedAt`, `deliveryCount`, `replayCount` and the message `body`."
    )


class DeadLetterSelection(ApiModel):
    """Which dead letters: every filter is optional and they combine with AND; a list means any of its values."""

    queue: _Filter | list[_Filter] | None = Field(
        default=None, description="Stage queue: `leads-incoming`, `leads-validated` or `leads-ready`."
    )
    reason: _Filter | list[_Filter] | None = Field(
        default=None, description="Dead-letter reason, e.g. `RetriesExhausted`, or `Unknown` for none."
    )
    publisher_id: _Filter | None = Field(default=None, description="Only this publisher's dead letters.")
    message_ids: list[_Filter] | None = Field(
        default=None, max_length=10_000, description="Only these messages (from a listing or a dry run)."
    )
    limit: int | None = Field(default=None, ge=0, le=1_000_000, description="At most this many.")


class ReplayBody(DeadLetterSelection):
    """Which dead letters to send again, and whether to only show the plan."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"reason": "RetriesExhausted", "publisherId": "contoso", "dryRun": True},
                {"messageIds": ["6f1c2d3e-4b5a-4c6d-8e7f-901a2b3c4d5e"]},
            ]
        }
    )

    dry_run: bool = Field(default=False, description="Only show what would be sent where; send nothing.")


class PurgeBody(DeadLetterSelection):
    """Which dead letters to delete for good."""

    model_config = ConfigDict(
        json_schema_extra={"examples": [{"reason": "InvalidLead", "publisherId": "contoso", "confirm": True}]}
    )

    confirm: bool = Field(default=False, description="Must be true: a purge deletes dead letters for good.")


class ReplayAnswer(ApiModel):
    """What a replay did, or with `dryRun`, what it would do."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"matched": 3, "replayed": 3, "refused": 0, "errors": [], "refusals": [], "dryRun": False},
                {
                    "matched": 1,
                    "replayed": 0,
                    "refused": 0,
                    "errors": [],
                    "refusals": [],
                    "dryRun": True,
                    "plan": [
                        {
                            "messageId": "6f1c2d3e-4b5a-4c6d-8e7f-901a2b3c4d5e",
                            "queue": "leads-ready",
                            "newMessageId": "6f1c2d3e-4b5a-4c6d-8e7f-901a2b3c4d5e.r1",
                            "reason": "RetriesExhausted",
                            "publisherId": "contoso",
                            "replayCount": 1,
                            "refused": None,
                        }
                    ],
                },
            ]
        }
    )

    matched: int = Field(description="Dead letters the selection matched.")
    replayed: int = Field(description="Sent again (0 in a dry run).")
    refused: int = Field(default=0, description="Not sent because they were already replayed too often.")
    errors: list[str] = Field(default=[], description="Dead letters that could not be sent now; they stay.")
    refusals: list[str] = Field(default=[], description="Why each refused one was refused.")
    dry_run: bool = Field(default=False, description="True when nothing was sent.")
    plan: list[dict[str, Any]] | None = Field(
        default=None,
        description="Dry run only: for each dead letter, `messageId`, the `queue` it goes back to, the "
        "`newMessageId` of its copy, `reason`, `publisherId`, `replayCount`, and `refused` when it would not be sent.",
    )


class JobAccepted(ApiModel):
    """A sweep too large for one request: it runs as a job; follow it at `GET /api/jobs/{jobId}`."""

    model_config = ConfigDict(json_schema_extra={"examples": [{"jobId": "3f2a9c…", "matched": 25000}]})

    job_id: str = Field(description="The job.")
    matched: int = Field(description="Dead letters the selection matched when the job was queued.")


class JobAnswer(ApiModel):
    """A sweep job's progress."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "jobId": "3f2a9c…",
                    "kind": "replay",
                    "state": "running",
                    "matched": 25000,
                    "processed": 4000,
                    "replayed": 4000,
                    "refused": 0,
                    "errors": [],
                    "createdAt": "2026-12-01T10:00:00+00:00",
                    "updatedAt": "2026-12-01T10:00:41+00:00",
                }
            ]
        }
    )

    job_id: str = Field(description="The job.")
    kind: str = Field(description="`replay` or `purge`.")
    state: str = Field(description="`queued`, `running`, `done` or `failed`.")
    matched: int = Field(description="Dead letters the selection matched when the job was queued.")
    processed: int = Field(description="Dead letters dealt with so far.")
    replayed: int | None = Field(default=None, description="Sent again so far (replay).")
    purged: int | None = Field(default=None, description="Deleted so far (purge).")
    refused: int = Field(default=0, description="Not replayed: replayed too often already.")
    errors: list[str] = Field(default=[], description="The latest dead letters that could not be dealt with.")
    created_at: str = Field(description="When the job was queued (UTC).")
    updated_at: str | None = Field(default=None, description="Its latest progress (UTC).")


class PurgeAnswer(ApiModel):
    """What a purge deleted."""

    model_config = ConfigDict(json_schema_extra={"examples": [{"matched": 2, "purged": 2, "errors": []}]})

    matched: int = Field(description="Dead letters the selection matched.")
    purged: int = Field(description="Deleted for good.")
    errors: list[str] = Field(default=[], description="Dead letters that could not be deleted now.")


class QueueStatsAnswer(ApiModel):
    """One stage queue's depth and dead letters."""

    queue: str = Field(description="The stage queue.")
    active: int = Field(description="Messages waiting to be processed now.")
    scheduled: int = Field(description="Messages waiting for their retry time.")
    dead_lettered: int = Field(description="Dead letters on this queue.")
    dead_lettered_by_reason: dict[str, int] = Field(description="Those dead letters, by reason.")


class FailingPublisher(ApiModel):
    """A publisher whose leads keep failing for a reason only the publisher can fix."""

    publisher_id: str = Field(description="The publisher.")
    consecutive_config_failures: int = Field(description="Its leads in a row that failed this way.")
    last_error: str | None = Field(description="The last failure, in words.")
    last_error_reason: str | None = Field(description="Its dead-letter reason.")
    last_error_at: str | None = Field(description="When (ISO 8601, UTC).")


class StatsAnswer(ApiModel):
    """Every stage queue's depth and dead letters, and the publishers whose configuration keeps failing."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "queues": [
                        {
                            "queue": "leads-incoming",
                            "active": 0,
                            "scheduled": 0,
                            "deadLettered": 1,
                            "deadLetteredByReason": {"InvalidLead": 1},
                        },
                        {
                            "queue": "leads-validated",
                            "active": 1,
                            "scheduled": 0,
                            "deadLettered": 3,
                            "deadLetteredByReason": {"CredentialsRejected": 3},
                        },
                        {
                            "queue": "leads-ready",
                            "active": 12,
                            "scheduled": 4,
                            "deadLettered": 2,
                            "deadLetteredByReason": {"RetriesExhausted": 2},
                        },
                    ],
                    "publishersFailing": [
                        {
                            "publisherId": "fabrikam",
                            "consecutiveConfigFailures": 3,
                            "lastError": "Entra refused the password (AADSTS50126)",
                            "lastErrorReason": "CredentialsRejected",
                            "lastErrorAt": "2026-12-01T21:40:00Z",
                        }
                    ],
                }
            ]
        }
    )

    queues: list[QueueStatsAnswer] = Field(description="The three stage queues, in pipeline order.")
    publishers_failing: list[FailingPublisher] = Field(
        description="Publishers whose leads keep failing for a reason they fix: credentials, solution or role."
    )
    secret_store_reads: int | None = Field(
        default=None,
        description="Connections this process read from the secret store since it started (the cache answers "
        "the rest): how often leads cost a Key Vault read.",
    )


class JourneyEventAnswer(ApiModel):
    """One settlement of a lead: which stage handled it, and what came of it."""

    at: str = Field(description="When it was settled (ISO 8601, UTC).")
    stage: str = Field(description="`validate_credentials`, `check_solution` or `write_lead`.")
    action: str = Field(description="`forwarded`, `delivered`, `rescheduled` (a retry later) or `dead-lettered`.")
    attempt: int = Field(description="The delivery attempt, from 1.")
    replay_count: int = Field(default=0, description="How often the lead was replayed or resent before.")
    deferrals: int = Field(default=0, description="How often it waited without reaching the CRM (a penalty).")
    reason: str | None = Field(default=None, description="The dead-letter reason, e.g. `LeadRejected`.")
    description: str | None = Field(default=None, description="The error in words, for a retry or a dead letter.")
    message_id: str | None = Field(default=None, description="The message that was settled.")
    record_id: str | None = Field(default=None, description="The Dataverse lead record id, once written.")
    created: bool | None = Field(default=None, description="True when this write created the CRM record.")
    delay: float | None = Field(default=None, description="Seconds a rescheduled copy waits.")


class LeadJourneyAnswer(ApiModel):
    """Everything that happened to one lead, oldest first."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "publisherId": "contoso",
                    "leadId": "a1b2c3",
                    "state": "delivered",
                    "recordId": "0c6b8f1e-2a4d-5b3c-9e8f-7a6b5c4d3e2f",
                    "events": [
                        {
                            "at": "2026-01-05T10:00:00.120Z",
                            "stage": "validate_credentials",
                            "action": "forwarded",
                            "attempt": 1,
                            "replayCount": 0,
                            "deferrals": 0,
                        },
                        {
                            "at": "2026-01-05T10:00:00.480Z",
                            "stage": "write_lead",
                            "action": "delivered",
                            "attempt": 1,
                            "replayCount": 0,
                            "deferrals": 0,
                            "recordId": "0c6b8f1e-2a4d-5b3c-9e8f-7a6b5c4d3e2f",
                            "created": True,
                        },
                    ],
                }
            ]
        }
    )

    publisher_id: str = Field(description="The lead's publisher.")
    lead_id: str = Field(description="The marketplace lead id.")
    state: str = Field(description="Where it is now: `delivered`, `dead-lettered`, `waiting` (a retry) or `in-flight`.")
    record_id: str | None = Field(default=None, description="The Dataverse lead record id, once written.")
    events: list[JourneyEventAnswer] = Field(description="Every settlement, oldest first.")


class ArchiveBody(DeadLetterSelection):
    """Which dead letters to archive: taken out of the dead-letter queue, kept restorable for 30 days."""

    model_config = ConfigDict(
        json_schema_extra={"examples": [{"reason": "InvalidLead", "publisherId": "contoso", "dryRun": True}]}
    )

    dry_run: bool = Field(default=False, description="Only show what would be archived; change nothing.")


class ArchiveAnswer(ApiModel):
    """What an archive did, or with `dryRun`, what it would do."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"matched": 2, "archived": 2, "refused": 0, "errors": [], "refusals": [], "dryRun": False},
                {
                    "matched": 1,
                    "archived": 0,
                    "refused": 0,
                    "errors": [],
                    "refusals": [],
                    "dryRun": True,
                    "messageIds": ["6f1c2d3e-4b5a-4c6d-8e7f-901a2b3c4d5e"],
                },
            ]
        }
    )

    matched: int = Field(description="Dead letters the selection matched.")
    archived: int = Field(description="Archived and removed from the dead-letter queue (0 in a dry run).")
    refused: int = Field(default=0, description="Too large to archive (over 64 KiB); they stay dead-lettered.")
    errors: list[str] = Field(default=[], description="Dead letters that could not be archived now; they stay.")
    refusals: list[str] = Field(default=[], description="Why each refused one was refused.")
    dry_run: bool = Field(default=False, description="True when nothing changed.")
    message_ids: list[str] | None = Field(default=None, description="Dry run only: the dead letters that match.")


class ArchivedAnswer(ApiModel):
    """Archived dead letters, newest archived first: the dead letter's fields plus `archivedAt` and
    `expiresAt` (after which it can no longer be restored)."""

    items: list[dict[str, Any]] = Field(description="Each archived dead letter, with its body.")


class RestoreBody(DeadLetterSelection):
    """Which archived dead letters to send back to the stage queue they died on. Name at least one filter."""

    model_config = ConfigDict(
        json_schema_extra={"examples": [{"messageIds": ["6f1c2d3e-4b5a-4c6d-8e7f-901a2b3c4d5e"], "dryRun": True}]}
    )

    dry_run: bool = Field(default=False, description="Only show what would be sent where; send nothing.")


class RestoreAnswer(ApiModel):
    """What a restore did, or with `dryRun`, what it would do."""

    model_config = ConfigDict(
        json_schema_extra={"examples": [{"matched": 1, "restored": 1, "errors": [], "dryRun": False}]}
    )

    matched: int = Field(description="Archived dead letters the selection matched.")
    restored: int = Field(description="Sent back to their queue and taken out of the archive (0 in a dry run).")
    errors: list[str] = Field(default=[], description="Entries that could not be restored now; they stay archived.")
    dry_run: bool = Field(default=False, description="True when nothing was sent.")
    plan: list[dict[str, Any]] | None = Field(
        default=None, description="Dry run only: each entry's `messageId`, `queue` and the `newMessageId` of its copy."
    )


class ResendBody(ApiModel):
    """The corrected lead message. `leadId` and `publisherId` may be left out (the dead letter's are kept);
    if given they must be the dead letter's."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "body": {
                        "leadId": "mkt-000123",
                        "publisherId": "contoso",
                        "lead": {
                            "UserDetails": {"FirstName": "Ada", "LastName": "Lovelace", "Email": "ada@example.com"}
                        },
                    }
                }
            ]
        }
    )

    body: dict[str, Any] = Field(description="The corrected message, in the shape of the dead letter's body.")
    dry_run: bool = Field(default=False, description="Only validate the body and show what would be sent.")


class ResendAnswer(ApiModel):
    """What the resend did."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "messageId": "mkt-000123",
                    "queue": "leads-incoming",
                    "newMessageId": "mkt-000123.r1",
                    "leadId": "mkt-000123",
                    "publisherId": "contoso",
                    "sent": True,
                    "completed": True,
                    "dryRun": False,
                }
            ]
        }
    )

    message_id: str = Field(description="The dead letter that was corrected.")
    queue: str = Field(description="The stage queue the corrected copy went to (the one it died on).")
    new_message_id: str = Field(description="The corrected copy's message id.")
    lead_id: str = Field(description="The lead id (unchanged).")
    publisher_id: str = Field(description="The publisher (unchanged).")
    sent: bool = Field(description="The corrected copy was sent.")
    completed: bool = Field(description="The dead letter was removed (only ever after the copy was sent).")
    dry_run: bool = Field(default=False, description="True when only validated.")
    error: str | None = Field(default=None, description="What went wrong after sending, if anything.")


class AlertsBody(ApiModel):
    """Where to send this publisher's alert events, and which ones."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "webhookUrl": "https://hooks.contoso.com/leadwriter",
                    "events": ["delivery.failing", "delivery.recovered"],
                },
                {"webhookUrl": "https://hooks.contoso.com/leadwriter", "rotateSecret": True},
            ]
        }
    )

    webhook_url: Annotated[str, StringConstraints(max_length=2048)] = Field(
        description="An `https` URL on a public host (port 443). Redirects are not followed."
    )
    events: list[Annotated[str, StringConstraints(max_length=64)]] | None = Field(
        default=None,
        max_length=10,
        description="Any of `delivery.failing`, `delivery.recovered`, `connection.verified`, `test`; default all.",
    )
    rotate_secret: bool = Field(default=False, description="Make a new signing secret (the old one stops working).")


class AlertsAnswer(ApiModel):
    """A publisher's alert settings. `secret` appears only when it was just made: keep it, it is not shown again."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "publisherId": "contoso",
                    "webhookUrl": "https://hooks.contoso.com/leadwriter",
                    "events": ["delivery.failing", "delivery.recovered", "connection.verified", "test"],
                    "updatedAt": "2026-01-05T10:00:00Z",
                    "secret": "whsec_3q2+7w…",
                }
            ]
        }
    )

    publisher_id: str = Field(description="The publisher.")
    webhook_url: str = Field(description="Where events are POSTed.")
    events: list[str] = Field(description="The event types sent.")
    updated_at: str = Field(description="When the settings were last stored (ISO 8601, UTC).")
    secret: str | None = Field(
        default=None,
        description="The signing secret, only when just made. Each event carries `LeadWriter-Signature: "
        't=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<raw body>">` keyed by it.',
    )
