"""``GET /api/whoami``: which key the caller holds, so a page can show only what that key may do.

Same rules as every guarded route (:mod:`shared.api.auth`): no key or a key that is no valid key →
401; any valid key (admin or publisher) → 200. The key only ever comes from the ``Authorization``
header, never from ``?key=``.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.security import HTTPAuthorizationCredentials

from shared.api.auth import Unauthenticated, bearer_key, bearer_scheme, identify, services_of
from shared.api.models import ErrorAnswer, WhoAmIAnswer

router = APIRouter(tags=["session"])


@router.get(
    "/api/whoami",
    response_model=WhoAmIAnswer,
    responses={
        401: {"model": ErrorAnswer, "description": "No key, or not a valid key."},
        503: {"model": ErrorAnswer, "description": "Publisher keys cannot be checked right now; retry later."},
    },
    summary="Which key is this?",
    description="Tells whether the key sent in `Authorization: Bearer` is the admin key or a publisher key, "
    "and for which publisher. Reads and changes nothing else; use it to decide what to show a user.",
)
async def whoami(
    request: Request,
    # Declared so the OpenAPI document shows the bearer scheme; the key itself is read below.
    _credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_scheme)] = None,
) -> WhoAmIAnswer:
    key = bearer_key(request)
    if key is None:
        raise Unauthenticated("an API key is required: send Authorization: Bearer <key>")
    principal = await identify(services_of(request), key)
    if principal is None:
        raise Unauthenticated("the API key is not valid")
    if principal.admin:
        return WhoAmIAnswer(role="admin", publisher_id=None)
    return WhoAmIAnswer(role="publisher", publisher_id=principal.publisher_id)
