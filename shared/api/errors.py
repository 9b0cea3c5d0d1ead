"""How errors become answers: one JSON shape, ``{"error": "…", "field": "…"}``, and the status that
says what the caller can do (architecture §6: 422 names the field, never a 500 for bad input).

Messages are composed from our own text and the location of a validation error only: pydantic's
``input`` (which may be a password) is never echoed.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from shared.errors import InvalidInput, InvalidLead, InvalidPublisherId, RetryLater, UnsafeCrmUrl

logger = logging.getLogger(__name__)

#: Seconds a client is asked to wait when a transient failure named no time of its own.
DEFAULT_RETRY_AFTER = 5
_BODY_PARSE_DETAIL = "There was an error parsing the body"
_STATUS_TEXT = {404: "not found", 405: "method not allowed"}
_AUTH_KINDS = frozenset({"password", "clientSecret"})
_LOCATION_KINDS = frozenset({"body", "query", "path", "header", "cookie"})


def error_response(
    status: int,
    error: str,
    *,
    field: str | None = None,
    headers: Mapping[str, str] | None = None,
    **extra: Any,
) -> JSONResponse:
    """The JSON error answer every route uses."""
    payload: dict[str, Any] = {"error": error}
    if field is not None:
        payload["field"] = field
    payload.update({key: value for key, value in extra.items() if value is not None})
    return JSONResponse(payload, status_code=status, headers=headers)


def retry_later_response(error: str, retry_after: float | None) -> JSONResponse:
    """503 with ``Retry-After`` (whole seconds, at least 1)."""
    seconds = DEFAULT_RETRY_AFTER if retry_after is None else max(1, math.ceil(retry_after))
    return error_response(503, error, headers={"Retry-After": str(seconds)}, retryAfter=seconds)


def field_of(location: Sequence[int | str]) -> str:
    """``("body", "auth", "password")`` → ``auth.password``; ``("query", "limit")`` → ``limit``."""
    parts = [str(part) for part in location]
    if parts and parts[0] in _LOCATION_KINDS:
        parts = parts[1:]
    # A JSON decode error's location is the character offset, which names no field.
    parts = [part for part in parts if not part.isdigit()] if parts[:1] and parts[0].isdigit() else parts
    # pydantic puts the tag of a discriminated union in the location (auth.password.username): drop it.
    for index in range(len(parts) - 2, 0, -1):
        if parts[index - 1] == "auth" and parts[index] in _AUTH_KINDS:
            del parts[index]
    return ".".join(parts) or "body"


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    problems = []
    for error in exc.errors():
        field = field_of(error.get("loc", ()))
        message = str(error.get("msg", "invalid value"))
        if error.get("type") == "json_invalid":
            message = "the body is not valid JSON"
        elif error.get("type") == "union_tag_invalid":
            # pydantic's text repeats the tag the caller sent; name the allowed ones only.
            expected = (error.get("ctx") or {}).get("expected_tags", "")
            message = f"must be one of {expected}"
        problems.append({"field": field, "message": message})
    first = problems[0] if problems else {"field": "body", "message": "invalid request"}
    return error_response(422, f"{first['field']}: {first['message']}", field=first["field"], errors=problems)


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code == 400 and exc.detail == _BODY_PARSE_DETAIL:
        return error_response(422, "body: the body is not valid JSON", field="body")
    detail = exc.detail if isinstance(exc.detail, str) and exc.status_code not in _STATUS_TEXT else None
    return error_response(
        exc.status_code, detail or _STATUS_TEXT.get(exc.status_code, "request refused"), headers=exc.headers
    )


async def _invalid_publisher_id(request: Request, exc: Exception) -> JSONResponse:
    return error_response(422, str(exc), field="publisherId")


async def _unsafe_url(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, UnsafeCrmUrl)
    return error_response(422, f"url: {exc.message}", field="url")


async def _invalid_lead(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, InvalidLead)
    return error_response(422, exc.message, field=exc.field or "body", reason=str(exc.reason))


async def _invalid_input(request: Request, exc: Exception) -> JSONResponse:
    # Any other InvalidInput (an Idempotency-Key header, a mapping): its message is composed by us.
    assert isinstance(exc, InvalidInput)
    return error_response(422, exc.message, field=exc.field or "body")


async def _retry_later(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RetryLater)
    logger.warning("answering 503: %s", type(exc).__name__)
    return retry_later_response(f"temporarily unavailable: {exc.message}", exc.retry_after)


def install_error_handlers(app: FastAPI) -> None:
    """Register every handler above on ``app``."""
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(InvalidPublisherId, _invalid_publisher_id)
    app.add_exception_handler(UnsafeCrmUrl, _unsafe_url)
    app.add_exception_handler(InvalidLead, _invalid_lead)
    app.add_exception_handler(InvalidInput, _invalid_input)
    app.add_exception_handler(RetryLater, _retry_later)
