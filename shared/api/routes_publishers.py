"""Publisher routes (architecture §6): the connection, its live test, delivery status, and lead ingest.

Every route takes the admin key or the key of the publisher in the path (:mod:`shared.api.auth`);
ingest also takes the publisher key as ``?key=``.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections import Counter
from datetime import UTC, datetime
from typing import Annotated, Any, Protocol, runtime_checkable

from fastapi import APIRouter, Depends, Header, Path, Query, Request, Response
from fastapi.responses import JSONResponse

from shared.api.auth import INGEST, PUBLISHER, GuardedRoute, Principal, services_dependency
from shared.api.errors import error_response, retry_later_response
from shared.api.ingest import INGEST_PATH, deliver_lead, prepare_lead
from shared.api.models import (
    ConnectionAnswer,
    ConnectionBody,
    ConnectionState,
    ErrorAnswer,
    IngestAnswer,
    LastError,
    PublisherStatusAnswer,
)
from shared.crm import LeadWrite
from shared.crm.connection import Connection
from shared.crm.urlguard import check_crm_url
from shared.crm.verify import VerificationReport, verify_connection
from shared.errors import CONFIGURATION_REASONS, DeadLetter, RetryLater
from shared.names import STAGE_QUEUES
from shared.ops.deadletters import UNKNOWN_REASON, DeadLetterFilter, list_dead_letters, replay
from shared.pipeline.identity import (
    IDEMPOTENCY_KEY_HEADER,
    SeenIds,
)
from shared.pipeline.lead import (
    LeadMessage,
    lead_record_id,
    parse_marketplace_lead,
    to_dataverse_columns,
)
from shared.secretstore.base import validate_publisher_id
from shared.services import Services

logger = logging.getLogger(__name__)

router = APIRouter(route_class=GuardedRoute, tags=["publishers"])

#: Dead letters the status route reads at most per publisher (it peeks, so this bounds its cost).
STATUS_DEAD_LETTER_SCAN = 10_000

PublisherId = Annotated[str, Path(alias="publisherId", description="The publisher's id, e.g. `contoso`.")]
PublisherAccess = Annotated[Principal, Depends(PUBLISHER)]
ServicesDep = Annotated[Services, Depends(services_dependency)]

_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorAnswer, "description": "No key, or not a valid key."},
    403: {"model": ErrorAnswer, "description": "A valid key for another publisher."},
    422: {"model": ErrorAnswer, "description": "Invalid input, or the connection failed verification."},
    503: {
        "model": ErrorAnswer,
        "description": "A backend or the CRM is unavailable; retry after Retry-After.",
    },
}


@runtime_checkable
class PublisherCounter(Protocol):
    """A broker that can count one publisher's messages waiting in a queue (by ``publisherId``)."""

    def pending_count(self, queue: str, publisher_id: str) -> int: ...


def _now() -> datetime:
    return datetime.now(UTC)


def _not_found(publisher_id: str) -> JSONResponse:
    return error_response(404, f"no connection is stored for publisher {publisher_id}")


def _verification_failed(report: VerificationReport) -> JSONResponse:
    verification = report.verification
    message = verification.message or "the connection failed verification"
    return error_response(
        422,
        message,
        reason=verification.reason,
        message=message,
        verification=report.to_json(),
    )


def _replay_configuration(services: Services, publisher_id: str) -> tuple[int, str | None, str | None]:
    """Replay the publisher's configuration dead letters of every stage queue: (replayed, error, job id).
    Many of them are replayed by a job (as a replay from ops would be), not inside the request."""
    flt = DeadLetterFilter.build(
        publisher_id=publisher_id, reason=sorted(str(reason) for reason in CONFIGURATION_REASONS)
    )
    try:
        matched = services.jobs.too_large(flt)
        if matched is not None:
            job = services.jobs.submit("replay", flt, matched)
            return 0, None, job.job_id
        result = replay(services.transport, flt)
    except Exception as exc:  # noqa: BLE001 - the connection is stored; replay can be re-run by ops
        logger.warning("auto-replay for publisher %s failed: %s", publisher_id, type(exc).__name__)
        return 0, "the dead letters could not be replayed now; they stay dead-lettered for ops to replay", None
    logger.info("auto-replayed %d configuration dead letters of publisher %s", result.replayed, publisher_id)
    return result.replayed, None, None


@router.put(
    "/api/publishers/{publisherId}/connection",
    response_model=ConnectionAnswer,
    response_model_exclude_none=True,
    responses=_ERRORS,
    summary="Store the CRM connection",
    description="Checks the credentials live first (sign-in, the CRM user, the Lead Writer solution) and stores "
    "them only if every check passes; a failed check answers 422 with its reason and stores nothing. Add "
    "`?verify=false` to store without checking. After a verified update, this publisher's leads that waited for "
    "a working connection are sent again. Secrets are never returned.",
)
def put_connection(
    publisher_id: PublisherId,
    body: ConnectionBody,
    _principal: PublisherAccess,
    services: ServicesDep,
    verify: Annotated[bool, Query(description="Check the credentials live before storing them.")] = True,
) -> ConnectionAnswer | JSONResponse:
    """Validate, verify live (unless ``?verify=false``), store; then replay configuration dead letters.

    Raises InvalidPublisherId / UnsafeCrmUrl (422) and RetryLater (503), answered by the app.
    """
    validate_publisher_id(publisher_id)
    origin = check_crm_url(body.url, services.settings.crm_allowed_hosts)
    connection = Connection(url=origin, auth=body.auth, updated_at=_now())
    report: VerificationReport | None = None
    if verify:
        report = verify_connection(services.pipeline, connection)
        if not report.ok:
            return _verification_failed(report)
        connection = connection.model_copy(update={"verification": report.verification})
    services.connections.put(publisher_id, connection)
    services.pipeline.forget(publisher_id)
    logger.info(
        "stored the %s connection of publisher %s (%s)",
        connection.auth.kind,
        publisher_id,
        "verified" if report else "not verified",
    )
    replayed, replay_error, job_id = _replay_configuration(services, publisher_id) if report else (0, None, None)
    if report:
        try:
            services.alerts.emit(
                publisher_id, "connection.verified", {"solutionVersion": report.verification.solution_version}
            )
        except Exception as exc:  # noqa: BLE001 - the connection is stored; an alert is never in the way
            logger.warning("connection.verified alert for %s not queued: %s", publisher_id, type(exc).__name__)
    return ConnectionAnswer(
        publisher_id=publisher_id,
        connection=connection.redacted(),
        verification=report.to_json() if report else None,
        replayed=replayed,
        replay_error=replay_error,
        replay_job_id=job_id,
    )


@router.get(
    "/api/publishers/{publisherId}/connection",
    response_model=ConnectionAnswer,
    response_model_exclude_none=True,
    responses={**_ERRORS, 404: {"model": ErrorAnswer, "description": "No connection is stored."}},
    summary="Read the stored connection",
    description="The stored CRM connection without password or client secret, and the result of its last check.",
)
def get_connection(
    publisher_id: PublisherId, _principal: PublisherAccess, services: ServicesDep
) -> ConnectionAnswer | JSONResponse:
    """Raises InvalidPublisherId (422), RetryLater (503)."""
    validate_publisher_id(publisher_id)
    connection = services.connections.get(publisher_id)
    if connection is None:
        return _not_found(publisher_id)
    redacted = connection.redacted()
    return ConnectionAnswer(publisher_id=publisher_id, connection=redacted, verification=redacted.get("verification"))


@router.delete(
    "/api/publishers/{publisherId}/connection",
    status_code=204,
    response_class=Response,
    responses={**_ERRORS, 404: {"model": ErrorAnswer, "description": "No connection is stored."}},
    summary="Remove the connection",
    description="Deletes the stored credentials. Leads that arrive afterwards wait as dead letters "
    "(`CredentialsMissing`) until a new connection is stored.",
)
def delete_connection(publisher_id: PublisherId, _principal: PublisherAccess, services: ServicesDep) -> Response:
    """Raises InvalidPublisherId (422), RetryLater (503)."""
    validate_publisher_id(publisher_id)
    if not services.connections.delete(publisher_id):
        return _not_found(publisher_id)
    services.pipeline.forget(publisher_id)
    logger.info("deleted the connection of publisher %s", publisher_id)
    return Response(status_code=204)


def _test_lead(services: Services, publisher_id: str, connection: Connection) -> dict[str, Any]:
    """Write one ``MSFT_TEST_<digits>`` lead straight to the CRM (not through the queues).

    Raises DeadLetter (the CRM refused it) or RetryLater.
    """
    marker = f"MSFT_TEST_{time.time_ns() // 100}"
    lead = parse_marketplace_lead(
        {
            "UserDetails": {
                "FirstName": marker,
                "LastName": marker,
                "Email": marker,
                "Company": marker,
                "Title": marker,
            },
            "LeadSource": f"AzureMarketplace-INS|{marker}",
            "ActionCode": "INS",
            "OfferTitle": marker,
            "Description": "Lead Writer connection test",
        }
    )
    message = LeadMessage(lead_id=str(uuid.uuid4()), publisher_id=publisher_id, received_at=_now(), lead=lead)
    record_id = lead_record_id(publisher_id, message.lead_id)
    result = services.pipeline.client(connection).create_lead(LeadWrite(record_id, to_dataverse_columns(message)))
    logger.info("wrote test lead %s for publisher %s", message.lead_id, publisher_id)
    return {
        "leadId": message.lead_id,
        "recordId": str(result.record_id),
        "created": result.created,
        "marker": marker,
    }


@router.post(
    "/api/publishers/{publisherId}/connection/test",
    response_model=ConnectionAnswer,
    response_model_exclude_none=True,
    responses={**_ERRORS, 404: {"model": ErrorAnswer, "description": "No connection is stored."}},
    summary="Test the stored connection",
    description="Checks the stored connection live again and keeps the result. With `?sendTestLead=true` it also "
    "writes one test lead, marked `MSFT_TEST`, straight to the CRM, as the marketplace's own test does.",
)
def retest_connection(
    publisher_id: PublisherId,
    _principal: PublisherAccess,
    services: ServicesDep,
    send_test_lead: Annotated[
        bool, Query(alias="sendTestLead", description="Also write one `MSFT_TEST` lead to the CRM.")
    ] = False,
) -> ConnectionAnswer | JSONResponse:
    """Re-verify live and store the new verification. Raises InvalidPublisherId (422), RetryLater (503)."""
    validate_publisher_id(publisher_id)
    connection = services.connections.get(publisher_id)
    if connection is None:
        return _not_found(publisher_id)
    report = verify_connection(services.pipeline, connection)
    # Store the result only if the connection was not replaced meanwhile (that one has its own).
    current = services.connections.get(publisher_id)
    if current is not None and current.fingerprint() == connection.fingerprint():
        connection = current.model_copy(update={"verification": report.verification})
        services.connections.put(publisher_id, connection)
    if not report.ok:
        return _verification_failed(report)
    services.pipeline.forget(publisher_id)
    test_lead = None
    if send_test_lead:
        try:
            test_lead = _test_lead(services, publisher_id, connection)
        except DeadLetter as exc:
            return error_response(422, f"the test lead was refused: {exc.message}", reason=str(exc.reason))
        except RetryLater as exc:
            return retry_later_response(f"the test lead could not be written now: {exc.message}", exc.retry_after)
    return ConnectionAnswer(
        publisher_id=publisher_id,
        connection=connection.redacted(),
        verification=report.to_json(),
        test_lead=test_lead,
    )


@router.get(
    "/api/publishers/{publisherId}/status",
    response_model=PublisherStatusAnswer,
    responses=_ERRORS,
    summary="Delivery status",
    description="How this publisher's leads are doing: how many were delivered and when, how many wait in each "
    "stage, dead letters by reason, the last error, and whether the connection is verified.",
)
def publisher_status(
    publisher_id: PublisherId, _principal: PublisherAccess, services: ServicesDep
) -> PublisherStatusAnswer:
    """Raises InvalidPublisherId (422), RetryLater (503)."""
    validate_publisher_id(publisher_id)
    status = services.status.get(publisher_id)
    items = list_dead_letters(
        services.transport, DeadLetterFilter.build(publisher_id=publisher_id), limit=STATUS_DEAD_LETTER_SCAN
    )
    by_reason = Counter(item.reason or UNKNOWN_REASON for item in items)
    transport = services.transport
    pending: dict[str, int] | None = None
    note: str | None = None
    if isinstance(transport, PublisherCounter):
        pending = {queue: transport.pending_count(queue, publisher_id) for queue in STAGE_QUEUES}
    else:
        note = "this queue backend cannot count one publisher's messages; see GET /api/stats for queue depths"
    waiting, next_due = transport.scheduled_of(publisher_id)
    connection = services.connections.get(publisher_id)
    verification = connection.verification if connection else None
    last_error = (
        LastError(message=status.last_error, reason=status.last_error_reason, at=status.last_error_at)
        if status.last_error or status.last_error_reason
        else None
    )
    return PublisherStatusAnswer(
        publisher_id=publisher_id,
        delivered=status.delivered,
        last_delivery=status.last_delivery,
        pending=pending,
        pending_note=note,
        dead_letters=dict(sorted(by_reason.items())),
        dead_letters_total=len(items),
        last_error=last_error,
        consecutive_config_failures=status.consecutive_config_failures,
        waiting_for_retry=waiting,
        next_retry_at=next_due.isoformat() if next_due is not None else None,
        connection=ConnectionState(
            stored=connection is not None,
            verified=bool(verification and verification.ok),
            last_verification=verification.model_dump(mode="json", by_alias=True, exclude_none=True)
            if verification
            else None,
        ),
    )


async def seen_ids_of(request: Request) -> SeenIds:
    """The :class:`~shared.pipeline.identity.SeenIds` the app was built with (async: no thread hop)."""
    seen: SeenIds = request.app.state.seen_ids
    return seen


async def _raw_body(request: Request) -> bytes:
    """The request body as sent; parsed by the lead rules, not FastAPI's (whose parser recurses)."""
    return await request.body()


@router.post(
    INGEST_PATH,
    status_code=202,
    response_model=IngestAnswer,
    responses={**_ERRORS, 200: {"model": IngestAnswer, "description": "A duplicate: this lead was accepted before."}},
    summary="Send a lead",
    description="Accepts one marketplace lead, exactly as the marketplace's HTTPS endpoint sends it, and queues "
    "it for delivery (202). The lead's id is `leadId`, else the `Idempotency-Key` header, else derived from its "
    "content, so the same lead sent twice is one lead: the second answer is 200 with `duplicate: true`. A body "
    "that is not a lead is refused at once with 422 naming the field. The publisher key may also be given as "
    "`?key=` for callers that can only be given a URL.",
    # The body is read raw (see _raw_body), so its schema is declared here for the OpenAPI document.
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {
                    "schema": {
                        "type": "object",
                        "additionalProperties": True,
                        "description": "The marketplace lead object ({UserDetails, LeadSource, ActionCode, "
                        "OfferTitle, Description}), or a whole leads-incoming message ({leadId, publisherId, "
                        "receivedAt, lead})",
                    }
                }
            },
        }
    },
)
def ingest_lead(
    publisher_id: PublisherId,
    raw: Annotated[bytes, Depends(_raw_body)],
    _principal: Annotated[Principal, Depends(INGEST)],
    services: ServicesDep,
    seen: Annotated[SeenIds, Depends(seen_ids_of)],
    response: Response,
    key: Annotated[str | None, Query(description="the publisher key, for callers that can only be given a URL")] = None,
    idempotency_key: Annotated[
        str | None,
        Header(
            alias=IDEMPOTENCY_KEY_HEADER,
            description="the lead's id (1-200 printable characters) when the body has no leadId",
        ),
    ] = None,
) -> IngestAnswer | JSONResponse:
    """Wrap the lead in a architecture §3 message and enqueue it on ``leads-incoming``: 202, or 200 with
    ``duplicate: true`` when the same lead id was accepted before.

    The lead id is ``leadId``, else the ``Idempotency-Key`` header, else derived from the lead's content
    (:func:`~shared.pipeline.identity.content_lead_id`), and it is the message id: a lead posted twice —
    byte-identical, in other key casing, or at the same moment — is sent twice with one message id, and
    the broker's duplicate detection and the idempotent write keep it one lead in the CRM. The lead is
    sent *before* it is recorded as seen, so a failed send is never answered "duplicate" on the retry.

    A lead that :func:`~shared.pipeline.lead.parse_marketplace_lead` refuses is answered 422 at once, naming
    the field, rather than queued to be dead-lettered ``InvalidLead``: an HTTP caller can act on the
    answer, and ops are spared dead letters nobody will fix.

    Raises InvalidPublisherId / InvalidLead / InvalidIdempotencyKey (422), RetryLater (503).
    """
    del key  # read by the INGEST guard; declared for the OpenAPI document
    outcome = deliver_lead(services, seen, prepare_lead(publisher_id, raw, idempotency_key))
    if isinstance(outcome, JSONResponse):
        return outcome
    response.status_code, answer = outcome
    return answer
