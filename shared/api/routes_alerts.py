"""Alert settings of a publisher (DESIGN §6): ``GET``/``PUT``/``DELETE /api/publishers/{publisherId}/alerts``.

The admin key or the publisher's own key. Storing settings sends a ``test`` event to the webhook (in the
background, like every event), so a receiver can check its signature at once.
"""

from __future__ import annotations

import logging
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Response
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from shared.api.auth import PUBLISHER, GuardedRoute, Principal, services_dependency
from shared.api.errors import error_response
from shared.api.models import AlertsAnswer, AlertsBody, ErrorAnswer
from shared.secretstore.base import validate_publisher_id
from shared.services import Services

logger = logging.getLogger(__name__)

router = APIRouter(route_class=GuardedRoute, tags=["publishers"])

PublisherAccess = Annotated[Principal, Depends(PUBLISHER)]
ServicesDep = Annotated[Services, Depends(services_dependency)]
PublisherId = Annotated[str, Path(alias="publisherId", description="The publisher's id, e.g. `contoso`.")]

_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorAnswer, "description": "No key, or not a valid key."},
    403: {"model": ErrorAnswer, "description": "Another publisher's key."},
    422: {"model": ErrorAnswer, "description": "Invalid input; `field` names it (e.g. `webhookUrl`)."},
    503: {"model": ErrorAnswer, "description": "A backend is unavailable; retry after Retry-After."},
}


@router.get(
    "/api/publishers/{publisherId}/alerts",
    response_model=AlertsAnswer,
    response_model_exclude_none=True,
    responses={**_ERRORS, 404: {"model": ErrorAnswer, "description": "No alerts are set up."}},
    summary="Alert settings",
    description="Where this publisher's alert events go and which ones. The signing secret is never shown here.",
)
async def get_alerts(
    publisher_id: PublisherId, _who: PublisherAccess, services: ServicesDep
) -> AlertsAnswer | JSONResponse:
    validate_publisher_id(publisher_id)
    settings = await run_in_threadpool(services.alerts.get, publisher_id)
    if settings is None:
        return error_response(404, f"publisher {publisher_id} has no alerts set up")
    return AlertsAnswer.model_validate(settings.to_json())


@router.put(
    "/api/publishers/{publisherId}/alerts",
    response_model=AlertsAnswer,
    response_model_exclude_none=True,
    responses=_ERRORS,
    summary="Set up alerts",
    description="A webhook that receives a signed JSON event when this publisher's delivery changes state: "
    "`delivery.failing` (leads dead-lettering for a reason the publisher fixes, or retries running out), "
    "`delivery.recovered`, `connection.verified`, and `test` (sent now). At most one event per change, "
    "retried with backoff on anything but 2xx. The answer carries the signing secret the first time (and "
    'with `"rotateSecret": true`); keep it, it is not shown again.',
)
async def put_alerts(
    body: AlertsBody, publisher_id: PublisherId, _who: PublisherAccess, services: ServicesDep
) -> AlertsAnswer:
    """Raises UnsafeWebhookUrl / InvalidInput (422), RetryLater (503)."""
    validate_publisher_id(publisher_id)
    settings, secret = await run_in_threadpool(
        services.alerts.put, publisher_id, body.webhook_url, body.events, rotate_secret=body.rotate_secret
    )
    await run_in_threadpool(services.alerts.emit, publisher_id, "test", {"message": "alerts are set up"})
    logger.info("alert settings stored for a publisher (new secret: %s)", secret is not None)
    return AlertsAnswer.model_validate({**settings.to_json(), "secret": secret})


@router.delete(
    "/api/publishers/{publisherId}/alerts",
    status_code=204,
    response_class=Response,
    responses={**_ERRORS, 404: {"model": ErrorAnswer, "description": "No alerts are set up."}},
    summary="Stop alerts",
    description="No more events are sent; the signing secret is deleted.",
)
async def delete_alerts(publisher_id: PublisherId, _who: PublisherAccess, services: ServicesDep) -> Response:
    validate_publisher_id(publisher_id)
    if not await run_in_threadpool(services.alerts.delete, publisher_id):
        return error_response(404, f"publisher {publisher_id} has no alerts set up")
    return Response(status_code=204)
