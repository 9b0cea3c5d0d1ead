"""A lead's journey (``GET /api/leads/{leadId}``): every settlement of one lead, from the state store.

The admin key names the publisher with ``?publisherId=``; a publisher key reads only its own leads (a
``publisherId`` of another publisher is 403, decided before anything is read, like every guarded route).
"""

from __future__ import annotations

import logging
from typing import Annotated

from fastapi import APIRouter, Depends, Path, Query, Request
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials
from starlette.concurrency import run_in_threadpool

from shared.api.auth import (
    Forbidden,
    Guard,
    GuardedRoute,
    Principal,
    Unauthenticated,
    bearer_key,
    bearer_scheme,
    identify,
    services_of,
)
from shared.api.errors import error_response
from shared.api.models import ErrorAnswer, LeadJourneyAnswer
from shared.secretstore.base import validate_publisher_id
from shared.services import Services

logger = logging.getLogger(__name__)

router = APIRouter(route_class=GuardedRoute, tags=["leads"])

_PRINCIPAL = "lead_principal"


class LeadGuard(Guard):
    """Any valid key; a publisher key only for its own publisher (``?publisherId=`` when given)."""

    async def authorize(self, request: Request) -> Principal:
        """Raises Unauthenticated (401) or Forbidden (403); SecretStoreUnavailable when keys cannot be read."""
        key = bearer_key(request)
        if key is None:
            raise Unauthenticated("an API key is required: send Authorization: Bearer <key>")
        principal = await identify(services_of(request), key)
        if principal is None:
            raise Unauthenticated("the API key is not valid")
        target = request.query_params.get("publisherId")
        if target and not principal.may_act_for(target):
            raise Forbidden("this key may act only for its own publisher")
        setattr(request.state, _PRINCIPAL, principal)
        return principal

    async def __call__(
        self,
        request: Request,
        # Declared so OpenAPI shows the bearer scheme; the key itself is read in authorize().
        _credentials: HTTPAuthorizationCredentials | None = Depends(bearer_scheme),  # noqa: B008
    ) -> Principal:
        principal = getattr(request.state, _PRINCIPAL, None)
        if isinstance(principal, Principal):
            return principal
        return await self.authorize(request)


LEAD_READER = LeadGuard()
LeadAccess = Annotated[Principal, Depends(LEAD_READER)]
ServicesDep = Annotated[Services, Depends(services_of)]


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
