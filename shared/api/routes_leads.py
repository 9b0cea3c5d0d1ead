"""One lead at a time: its journey, and getting a dead lead back.

- ``GET /api/leads/{leadId}``: every settlement of one lead, from the state store. The admin key
  names the publisher with ``?publisherId=``; a publisher key reads only its own leads (a
  ``publisherId`` of another publisher is 403, decided before anything is read).
- ``POST /api/deadletters/archive``, ``GET /api/deadletters/archived``,
  ``POST /api/deadletters/archived/restore``: discard dead letters into an archive, list it, send
  entries back (admin key; :mod:`shared.ops.archive`).
- ``POST /api/deadletters/{messageId}/resend``: correct an ``InvalidLead`` or ``LeadRejected`` dead
  letter and send it again (admin key).
"""

from __future__ import annotations

import logging
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Query, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from shared.api.auth import (
    ADMIN,
    Forbidden,
    Guard,
    GuardedRoute,
    Principal,
    services_dependency,
)
from shared.api.errors import error_response
from shared.api.models import (
    ArchiveAnswer,
    ArchiveBody,
    ArchivedAnswer,
    ErrorAnswer,
    LeadJourneyAnswer,
    ResendAnswer,
    ResendBody,
    RestoreAnswer,
    RestoreBody,
)
from shared.errors import InvalidFilter
from shared.names import STAGE_QUEUES
from shared.ops.archive import DeadLetterArchive, DeadLetterNotFound, NotEditable, resend
from shared.ops.deadletters import DeadLetterFilter
from shared.secretstore.base import validate_publisher_id
from shared.services import Services

logger = logging.getLogger(__name__)

router = APIRouter(route_class=GuardedRoute, tags=["leads"])

class LeadGuard(Guard):
    """Any valid key; a publisher key only for its own publisher (``?publisherId=`` when given)."""

    def check_scope(self, principal: Principal, request: Request) -> None:
        """Raises Forbidden (403) for a publisher key and another publisher's ``publisherId``."""
        target = request.query_params.get("publisherId")
        if target and not principal.may_act_for(target):
            raise Forbidden("this key may act only for its own publisher")


LEAD_READER = LeadGuard()
LeadAccess = Annotated[Principal, Depends(LEAD_READER)]
AdminAccess = Annotated[Principal, Depends(ADMIN)]
#: Dead letters one archive request takes at most; the answer's ``matched`` says when to ask again.
MAX_ARCHIVE_PER_REQUEST = 1000

_ADMIN_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorAnswer, "description": "No key, not a valid key, or no admin key configured."},
    403: {"model": ErrorAnswer, "description": "A publisher key on an admin route."},
    422: {"model": ErrorAnswer, "description": "Invalid input; `field` names it."},
    503: {"model": ErrorAnswer, "description": "A backend is unavailable; retry after Retry-After."},
}
ServicesDep = Annotated[Services, Depends(services_dependency)]


@router.get(
    "/api/leads/{leadId}",
    response_model=LeadJourneyAnswer,
    response_model_exclude_none=True,
    responses={
        401: {"model": ErrorAnswer, "description": "No key, or not a valid key."},
        403: {"model": ErrorAnswer, "description": "A publisher key asking for another publisher's lead."},
        404: {"model": ErrorAnswer, "description": "No settlement of this lead is recorded."},
        422: {"model": ErrorAnswer, "description": "Invalid input; `field` names it."},
        503: {"model": ErrorAnswer, "description": "The state store is unavailable; retry after Retry-After."},
    },
    summary="What happened to a lead",
    description="Every settlement of the lead, oldest first: the stage, what came of it (forwarded, delivered, "
    "retried later, dead-lettered), the reason, the attempt, the time, and the CRM record id once written. "
    "With the admin key, name the publisher with `?publisherId=`; a publisher key sees only its own leads.",
)
async def get_lead(
    principal: LeadAccess,
    services: ServicesDep,
    lead_id: Annotated[str, Path(alias="leadId", min_length=1, max_length=200, description="The marketplace lead id.")],
    publisher_id: Annotated[
        str | None,
        Query(alias="publisherId", max_length=200, description="The lead's publisher (needed with the admin key)."),
    ] = None,
    limit: Annotated[int, Query(ge=1, le=1000, description="At most this many events (the newest).")] = 200,
) -> LeadJourneyAnswer | JSONResponse:
    """Raises InvalidPublisherId (422), RetryLater (503)."""
    publisher = publisher_id or principal.publisher_id
    if not publisher:
        return error_response(422, "publisherId: the admin key must name the lead's publisher", field="publisherId")
    validate_publisher_id(publisher)
    journey = await run_in_threadpool(services.journeys.get, publisher, lead_id, limit=limit)
    if not journey.events:
        return error_response(404, f"no settlement of lead {lead_id} of publisher {publisher} is recorded")
    return LeadJourneyAnswer.model_validate(journey.to_json())


def _archive(services: Services) -> DeadLetterArchive:
    return DeadLetterArchive(services.state)


@router.post(
    "/api/deadletters/archive",
    response_model=ArchiveAnswer,
    response_model_exclude_none=True,
    responses=_ADMIN_ERRORS,
    tags=["admin"],
    summary="Archive dead letters",
    description="Takes the matching dead letters out of the dead-letter queue into an archive, where they can be "
    'listed and restored for 30 days. Send `"dryRun": true` first to see what would go. A dead letter too large '
    f"for the archive (over 64 KiB) is refused and stays. At most {MAX_ARCHIVE_PER_REQUEST} per request.",
)
async def archive_dead_letters(
    body: ArchiveBody, _admin: AdminAccess, services: ServicesDep
) -> ArchiveAnswer | JSONResponse:
    """Raises RetryLater (503)."""
    try:
        flt = DeadLetterFilter.build(
            queue=body.queue, reason=body.reason, publisher_id=body.publisher_id, message_ids=body.message_ids
        )
    except InvalidFilter as exc:
        return error_response(422, str(exc), field=exc.field or "body")
    limit = min(body.limit if body.limit is not None else MAX_ARCHIVE_PER_REQUEST, MAX_ARCHIVE_PER_REQUEST)
    result = await run_in_threadpool(
        _archive(services).archive, services.transport, flt, limit=limit, dry_run=body.dry_run
    )
    logger.info("admin archive: matched=%d archived=%d dry_run=%s", result.matched, result.archived, body.dry_run)
    return ArchiveAnswer.model_validate(result.to_json())


@router.get(
    "/api/deadletters/archived",
    response_model=ArchivedAnswer,
    responses=_ADMIN_ERRORS,
    tags=["admin"],
    summary="List archived dead letters",
    description="Archived dead letters that match the filters, newest archived first, with their body, "
    "`archivedAt` and `expiresAt` (after which they can no longer be restored).",
)
async def get_archived(
    _admin: AdminAccess,
    services: ServicesDep,
    queue: Annotated[str | None, Query(max_length=200, description=f"One of {', '.join(STAGE_QUEUES)}")] = None,
    reason: Annotated[str | None, Query(max_length=200, description="A dead-letter reason")] = None,
    publisher_id: Annotated[
        str | None, Query(alias="publisherId", max_length=200, description="Only this publisher's")
    ] = None,
    limit: Annotated[int, Query(ge=0, le=1000, description="At most this many")] = 100,
) -> ArchivedAnswer | JSONResponse:
    """Raises RetryLater (503)."""
    try:
        entries = await run_in_threadpool(
            _archive(services).list, queue=queue, reason=reason, publisher_id=publisher_id, limit=limit
        )
    except InvalidFilter as exc:
        return error_response(422, str(exc), field=exc.field or "query")
    return ArchivedAnswer(items=[entry.to_json() for entry in entries])


@router.post(
    "/api/deadletters/archived/restore",
    response_model=RestoreAnswer,
    response_model_exclude_none=True,
    responses=_ADMIN_ERRORS,
    tags=["admin"],
    summary="Restore archived dead letters",
    description="Sends each matching archived dead letter back to the stage queue it died on, as a replay does "
    "(a copy with a new message id and the same lead id), then takes it out of the archive. Name at least one "
    'filter (usually `messageIds`); `"dryRun": true` shows the plan first.',
)
async def restore_archived(
    body: RestoreBody, _admin: AdminAccess, services: ServicesDep
) -> RestoreAnswer | JSONResponse:
    """Raises RetryLater (503)."""
    if not (body.queue or body.reason or body.publisher_id or body.message_ids):
        return error_response(
            422, "messageIds: name what to restore (messageIds, or a queue, reason or publisherId)", field="messageIds"
        )
    archive = _archive(services)
    try:
        entries = await run_in_threadpool(
            archive.list,
            queue=body.queue,
            reason=body.reason,
            publisher_id=body.publisher_id,
            message_ids=body.message_ids,
            limit=body.limit if body.limit is not None else MAX_ARCHIVE_PER_REQUEST,
        )
    except InvalidFilter as exc:
        return error_response(422, str(exc), field=exc.field or "body")
    result = await run_in_threadpool(archive.restore, services.transport, entries, dry_run=body.dry_run)
    logger.info("admin restore: matched=%d restored=%d dry_run=%s", result.matched, result.restored, body.dry_run)
    return RestoreAnswer.model_validate(result.to_json())


@router.post(
    "/api/deadletters/{messageId}/resend",
    response_model=ResendAnswer,
    response_model_exclude_none=True,
    responses={
        **_ADMIN_ERRORS,
        404: {"model": ErrorAnswer, "description": "No dead letter has this message id."},
        409: {"model": ErrorAnswer, "description": "Not an `InvalidLead` or `LeadRejected` dead letter: replay it."},
        422: {"model": ErrorAnswer, "description": "The corrected body is not a lead; `field` names what is wrong."},
    },
    tags=["admin"],
    summary="Correct a dead letter and send it again",
    description="For an `InvalidLead` or `LeadRejected` dead letter: the corrected body is validated as a lead "
    "first (nothing is sent when it is not one; the answer names the field), then sent to the queue the lead "
    "died on as a copy with a new message id and the same lead id, and only then is the dead letter removed. "
    '`"dryRun": true` only validates.',
)
async def resend_dead_letter(
    body: ResendBody,
    _admin: AdminAccess,
    services: ServicesDep,
    message_id: Annotated[str, Path(alias="messageId", min_length=1, max_length=200, description="The dead letter.")],
) -> ResendAnswer | JSONResponse:
    """Raises InvalidLead (422), RetryLater (503)."""
    try:
        result = await run_in_threadpool(resend, services.transport, message_id, body.body, dry_run=body.dry_run)
    except DeadLetterNotFound as exc:
        return error_response(404, exc.message, field=exc.field)
    except NotEditable as exc:
        return error_response(409, exc.message, field=exc.field)
    logger.info("admin resend of a dead letter: sent=%s completed=%s", result.sent, result.completed)
    return ResendAnswer.model_validate(result.to_json())
