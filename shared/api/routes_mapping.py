"""Mapping routes (architecture §6): ``GET``/``PUT /api/publishers/{publisherId}/mapping``.

A PUT is validated live against the publisher's CRM (:func:`shared.crm.metadata.validate_mapping`)
before it is stored: an unknown column, a wrong type, a missing campaign or owner → 422 naming it, and
nothing stored. A stored mapping replays the publisher's ``LeadRejected`` dead letters, which is how a
lead refused under a mapping that went stale (a column deleted in the CRM) is delivered once it is fixed.
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, Path, Query, Request
from fastapi.responses import JSONResponse

from shared.api.auth import PUBLISHER, GuardedRoute, Principal, services_dependency
from shared.api.errors import error_response
from shared.api.models import ApiModel, ErrorAnswer
from shared.crm.metadata import validate_mapping
from shared.errors import DeadLetter, DeadLetterReason, PermissionDenied
from shared.ops.deadletters import DeadLetterFilter, replay
from shared.pipeline.mapping import ValidatedMapping, parse_mapping
from shared.pipeline.mapping_store import MappingStore
from shared.secretstore.base import validate_publisher_id
from shared.services import Services

logger = logging.getLogger(__name__)

router = APIRouter(route_class=GuardedRoute, tags=["mapping"])

PublisherId = Annotated[str, Path(alias="publisherId", description="the publisher id")]
PublisherAccess = Annotated[Principal, Depends(PUBLISHER)]
ServicesDep = Annotated[Services, Depends(services_dependency)]

_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorAnswer, "description": "no key, or not a valid key"},
    403: {"model": ErrorAnswer, "description": "a valid key for another publisher"},
    422: {"model": ErrorAnswer, "description": "an invalid mapping, or one the CRM does not support"},
    503: {"model": ErrorAnswer, "description": "the CRM is unavailable; retry after Retry-After"},
}


class MappingAnswer(ApiModel):
    publisher_id: str
    mapping: dict[str, Any]
    validated_at: datetime | None = None
    replayed: int | None = None


def mapping_store_of(request: Request) -> MappingStore:
    """The :class:`~shared.pipeline.mapping_store.MappingStore` the app was built with."""
    store: MappingStore = request.app.state.mappings
    return store


StoreDep = Annotated[MappingStore, Depends(mapping_store_of)]


def _answer(publisher_id: str, mapping: ValidatedMapping, replayed: int | None = None) -> MappingAnswer:
    return MappingAnswer(
        publisher_id=publisher_id,
        mapping=mapping.body().to_json(),
        validated_at=mapping.validated_at,
        replayed=replayed,
    )


@router.get(
    "/api/publishers/{publisherId}/mapping",
    response_model=MappingAnswer,
    response_model_exclude_none=True,
    responses={**_ERRORS, 404: {"model": ErrorAnswer, "description": "no mapping stored"}},
    summary="The stored mapping and when it was last validated",
    description="How this publisher's leads land in its CRM: lead source, campaign, owner, subject, extra columns "
    "and linking to an existing contact or account. Absent fields use the default mapping.",
)
def get_mapping(
    publisher_id: PublisherId, _principal: PublisherAccess, store: StoreDep
) -> MappingAnswer | JSONResponse:
    """Raises InvalidPublisherId (422)."""
    validate_publisher_id(publisher_id)
    mapping = store.get(publisher_id)
    if mapping is None:
        return error_response(404, f"no mapping is stored for publisher {publisher_id}: its leads use the default")
    return _answer(publisher_id, mapping)


@router.put(
    "/api/publishers/{publisherId}/mapping",
    response_model=MappingAnswer,
    response_model_exclude_none=True,
    responses=_ERRORS,
    summary="Store how this publisher's leads land (validated live against the CRM first)",
    description="Every field is optional. The mapping is checked against the CRM's lead columns, option values "
    "and the campaign and owner it names; an unknown column, a wrong type or a missing record answers 422 "
    "naming it, and nothing is stored. Add `?validate=false` to store without checking. Leads refused by "
    "the CRM under the previous mapping are sent again.",
)
def put_mapping(
    publisher_id: PublisherId,
    body: Annotated[dict[str, Any], Body(description="The mapping; every field optional.")],
    _principal: PublisherAccess,
    services: ServicesDep,
    store: StoreDep,
    validate: Annotated[bool, Query(description="validate against the CRM's lead metadata first")] = True,
) -> MappingAnswer | JSONResponse:
    """Parse, validate live (unless ``?validate=false``), store; then replay ``LeadRejected`` dead letters.

    A stored connection that does not work answers 422 with its architecture §5 reason.
    Raises InvalidPublisherId / InvalidMapping (422) and RetryLater (503), answered by the app.
    """
    validate_publisher_id(publisher_id)
    mapping = parse_mapping(body)
    if validate:
        connection = services.connections.get(publisher_id)
        if connection is None:
            return error_response(
                422,
                f"no connection is stored for publisher {publisher_id}: store one first (PUT …/connection), "
                "so the mapping can be checked against the CRM",
                field="connection",
            )
        try:
            validated = validate_mapping(services.pipeline.client(connection), mapping)
        except PermissionDenied as exc:
            return error_response(
                422,
                f"the CRM refused to show what the mapping needs: {exc.message}",
                reason=str(exc.reason),
            )
        except DeadLetter as exc:
            # The stored connection does not work (credentials rejected, …): the mapping cannot be checked.
            return error_response(
                422,
                f"the mapping could not be checked against the CRM: {exc.message}",
                field="connection",
                reason=str(exc.reason),
            )
    else:
        validated = ValidatedMapping.model_validate(mapping.model_dump())
    store.put(publisher_id, validated)
    services.pipeline.forget(publisher_id)
    logger.info("stored the mapping of publisher %s (%s)", publisher_id, "validated" if validate else "not validated")
    flt = DeadLetterFilter.build(publisher_id=publisher_id, reason=[str(DeadLetterReason.LEAD_REJECTED)])
    try:
        replayed = replay(services.transport, flt).replayed
    except Exception as exc:  # noqa: BLE001 - the mapping is stored; ops can replay
        logger.warning("replay after the mapping of %s failed: %s", publisher_id, type(exc).__name__)
        replayed = 0
    return _answer(publisher_id, validated, replayed)
