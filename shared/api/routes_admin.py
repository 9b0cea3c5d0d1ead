"""Admin routes (architecture §6): publisher keys, dead letters (peek, replay, purge) and queue stats.

All of them need the admin key (``LEADWRITER_ADMIN_KEY``); without that setting they refuse everyone.
"""

from __future__ import annotations

import logging
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Query, Response
from fastapi.responses import JSONResponse

from shared.api.auth import ADMIN, GuardedRoute, Principal, services_dependency
from shared.api.errors import error_response
from shared.api.models import (
    DeadLettersAnswer,
    DeadLetterSelection,
    ErrorAnswer,
    FailingPublisher,
    IssuedKey,
    JobAccepted,
    JobAnswer,
    PurgeAnswer,
    PurgeBody,
    QueueStatsAnswer,
    ReplayAnswer,
    ReplayBody,
    StatsAnswer,
)
from shared.errors import InvalidFilter
from shared.names import STAGE_QUEUES
from shared.ops.deadletters import DeadLetterFilter, list_dead_letters, plan_replay, purge, replay
from shared.ops.jobs import JobKind
from shared.secretstore.base import validate_publisher_id
from shared.services import Services

logger = logging.getLogger(__name__)

router = APIRouter(route_class=GuardedRoute, tags=["admin"])

AdminAccess = Annotated[Principal, Depends(ADMIN)]
ServicesDep = Annotated[Services, Depends(services_dependency)]
PublisherId = Annotated[str, Path(alias="publisherId", description="The publisher's id, e.g. `contoso`.")]

_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorAnswer, "description": "No key, not a valid key, or no admin key configured."},
    403: {"model": ErrorAnswer, "description": "A publisher key on an admin route."},
    422: {"model": ErrorAnswer, "description": "Invalid input; `field` names it."},
    503: {"model": ErrorAnswer, "description": "A backend is unavailable; retry after Retry-After."},
}


def _filter(selection: DeadLetterSelection) -> DeadLetterFilter:
    """Raises InvalidFilter naming the field."""
    return DeadLetterFilter.build(
        queue=selection.queue,
        reason=selection.reason,
        publisher_id=selection.publisher_id,
        message_ids=selection.message_ids,
    )


def _bad_filter(exc: InvalidFilter) -> JSONResponse:
    return error_response(422, str(exc), field=exc.field or "body")


@router.post(
    "/api/admin/publishers/{publisherId}/keys",
    status_code=201,
    response_model=IssuedKey,
    responses=_ERRORS,
    summary="Issue a publisher key",
    description="Issues a new key for the publisher and revokes its previous one. The key is shown only in this "
    "answer: Lead Writer keeps only its hash. Hand it to the publisher; it works only for that publisher.",
)
def issue_key(publisher_id: PublisherId, _admin: AdminAccess, services: ServicesDep) -> IssuedKey:
    """Raises InvalidPublisherId (422), RetryLater (503)."""
    validate_publisher_id(publisher_id)
    return IssuedKey(key=services.api_keys.issue(publisher_id), publisher_id=publisher_id)


@router.delete(
    "/api/admin/publishers/{publisherId}/keys",
    status_code=204,
    response_class=Response,
    responses={**_ERRORS, 404: {"model": ErrorAnswer, "description": "The publisher has no key."}},
    summary="Revoke the publisher's key",
    description="The publisher's key stops working at once. Its connection and leads are not touched.",
)
def revoke_key(publisher_id: PublisherId, _admin: AdminAccess, services: ServicesDep) -> Response:
    """Raises InvalidPublisherId (422), RetryLater (503)."""
    validate_publisher_id(publisher_id)
    if not services.api_keys.revoke(publisher_id):
        return error_response(404, f"publisher {publisher_id} has no key")
    return Response(status_code=204)


@router.get(
    "/api/deadletters",
    response_model=DeadLettersAnswer,
    responses=_ERRORS,
    summary="List dead letters",
    description="Dead letters that match the filters, with their reason, description and body. Reading them "
    "changes nothing: they stay where they are.",
)
def get_dead_letters(
    _admin: AdminAccess,
    services: ServicesDep,
    queue: Annotated[str | None, Query(max_length=200, description=f"One of {', '.join(STAGE_QUEUES)}")] = None,
    reason: Annotated[
        str | None, Query(max_length=200, description="A dead-letter reason, e.g. `RetriesExhausted`, or `Unknown`")
    ] = None,
    publisher_id: Annotated[
        str | None, Query(alias="publisherId", max_length=200, description="Only this publisher's dead letters")
    ] = None,
    limit: Annotated[int, Query(ge=0, le=1000, description="At most this many")] = 100,
) -> DeadLettersAnswer | JSONResponse:
    """Raises RetryLater (503)."""
    try:
        flt = _filter(DeadLetterSelection(queue=queue, reason=reason, publisher_id=publisher_id))
    except InvalidFilter as exc:
        return _bad_filter(exc)
    items = list_dead_letters(services.transport, flt, limit=limit)
    return DeadLettersAnswer(items=[item.to_json() for item in items])


@router.post(
    "/api/deadletters/replay",
    response_model=ReplayAnswer,
    response_model_exclude_none=True,
    responses=_ERRORS,
    summary="Replay dead letters",
    description="Sends each matching dead letter again to the stage queue it died on, as a copy with a new "
    'message id and the same lead id, then removes the dead letter. Send `"dryRun": true` first to see the '
    "plan without sending anything. A dead letter already replayed 5 times is refused and stays.",
)
def replay_dead_letters(body: ReplayBody, _admin: AdminAccess, services: ServicesDep) -> ReplayAnswer | JSONResponse:
    """Raises RetryLater (503)."""
    try:
        flt = _filter(body)
    except InvalidFilter as exc:
        return _bad_filter(exc)
    if body.dry_run:
        plan = plan_replay(services.transport, flt, limit=body.limit)
        refusals = [entry.refused for entry in plan if entry.refused]
        return ReplayAnswer(
            matched=len(plan),
            replayed=0,
            refused=len(refusals),
            refusals=refusals,
            dry_run=True,
            plan=[entry.to_json() for entry in plan],
        )
    accepted = _as_job(services, "replay", flt, body.limit)
    if accepted is not None:
        return accepted
    result = replay(services.transport, flt, limit=body.limit)
    logger.info("admin replay: matched=%d replayed=%d", result.matched, result.replayed)
    return ReplayAnswer.model_validate(result.to_json())


def _as_job(services: Services, kind: JobKind, flt: DeadLetterFilter, limit: int | None) -> JSONResponse | None:
    """A sweep that could outlast the request is queued as a job: its 202 answer; None to run it here."""
    matched = services.jobs.too_large(flt, limit)
    if matched is None:
        return None
    job = services.jobs.submit(kind, flt, matched)
    answer = JobAccepted(job_id=job.job_id, matched=matched)
    return JSONResponse(answer.model_dump(by_alias=True), status_code=202)


@router.get(
    "/api/jobs/{jobId}",
    response_model=JobAnswer,
    response_model_exclude_none=True,
    responses={**_ERRORS, 404: {"model": ErrorAnswer, "description": "No such job."}},
    summary="A sweep job's progress",
    description="A replay or purge too large for one request runs as a job (the request answered 202 with its "
    "`jobId`); this is how far it got.",
)
def get_job(
    job_id: Annotated[str, Path(alias="jobId", max_length=64, pattern="^[0-9a-f]{1,64}$")],
    _admin: AdminAccess,
    services: ServicesDep,
) -> JobAnswer | JSONResponse:
    job = services.jobs.get(job_id)
    if job is None:
        return error_response(404, f"no job {job_id}")
    return JobAnswer.model_validate(job.to_json())


@router.post(
    "/api/deadletters/purge",
    response_model=PurgeAnswer,
    responses=_ERRORS,
    summary="Purge dead letters",
    description='Deletes the matching dead letters for good. Needs `"confirm": true`; without it nothing is '
    "deleted and the answer is 422. List them first (`GET /api/deadletters`) to see what would go.",
)
def purge_dead_letters(body: PurgeBody, _admin: AdminAccess, services: ServicesDep) -> PurgeAnswer | JSONResponse:
    """Raises RetryLater (503)."""
    if body.confirm is not True:
        return error_response(
            422, 'confirm: a purge deletes dead letters for good; send "confirm": true', field="confirm"
        )
    try:
        flt = _filter(body)
    except InvalidFilter as exc:
        return _bad_filter(exc)
    accepted = _as_job(services, "purge", flt, body.limit)
    if accepted is not None:
        return accepted
    result = purge(services.transport, flt, confirm=True, limit=body.limit)
    logger.info("admin purge: matched=%d purged=%d", result.matched, result.purged)
    return PurgeAnswer.model_validate(result.to_json())


@router.get(
    "/api/stats",
    response_model=StatsAnswer,
    responses=_ERRORS,
    summary="Queue and dead-letter statistics",
    description="For each stage queue: messages waiting now, waiting for a retry, and dead letters by reason; "
    "and the publishers whose leads keep failing for a reason they must fix themselves.",
)
def stats(_admin: AdminAccess, services: ServicesDep) -> StatsAnswer:
    """Raises RetryLater (503)."""
    queues = []
    for queue in STAGE_QUEUES:
        counts = services.transport.stats(queue)
        queues.append(
            QueueStatsAnswer(
                queue=counts.queue,
                active=counts.active,
                scheduled=counts.scheduled,
                dead_lettered=counts.dead_lettered,
                dead_lettered_by_reason=dict(counts.dead_lettered_by_reason),
            )
        )
    failing = [
        FailingPublisher(
            publisher_id=status.publisher_id,
            consecutive_config_failures=status.consecutive_config_failures,
            last_error=status.last_error,
            last_error_reason=status.last_error_reason,
            last_error_at=status.last_error_at,
        )
        for status in services.status.all()
        if status.consecutive_config_failures > 0
    ]
    return StatsAnswer(queues=queues, publishers_failing=failing, secret_store_reads=services.connections.reads)
