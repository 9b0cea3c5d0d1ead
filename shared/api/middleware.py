"""The ASGI layer around every answer: body limit, security headers, request log, last-resort 500.

One pure ASGI middleware (not ``BaseHTTPMiddleware``, which buffers and re-raises) so that:

- a body over the limit is refused with 413 from its ``Content-Length`` before the app runs, and,
  for a chunked or lying body, as soon as the streamed bytes pass the limit;
- every answer — 404s, 413s and 500s included — carries the security headers;
- each request logs one line: method, the route's path *template* (never the raw path, a query string,
  a header or a body: keys travel in ``?key=`` and headers), status and milliseconds;
- an exception that escaped every handler is logged by type only (its text could hold anything) and
  answered with a generic 500; it is not re-raised, so no server logs its traceback and message.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from fastapi import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

logger = logging.getLogger(__name__)
#: The request log: one line per request, nothing the caller sent beyond method and route.
access_logger = logging.getLogger("shared.api.access")

DOCS_PATHS = frozenset({"/api/docs"})
#: The console page and its assets (:mod:`shared.api.routes_console`).
CONSOLE_PREFIXES = ("/console", "/api/console")

SECURITY_HEADERS: tuple[tuple[bytes, bytes], ...] = (
    (b"x-content-type-options", b"nosniff"),
    (b"cache-control", b"no-store"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
)
STRICT_CSP = b"default-src 'none'; frame-ancestors 'none'"
#: The console: its own script and style from this server, JSON calls back here, nothing inline
#: (no inline script or style attribute runs), no forms posted anywhere, no <base> rewriting.
CONSOLE_CSP = (
    b"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    b"base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


def docs_csp(script_hashes: list[str] | tuple[str, ...] = ()) -> bytes:
    """The Swagger UI page's policy: its vendored script and style from this server, its inline
    start-up script only by hash, the OpenAPI document from here. Swagger UI sets style attributes,
    hence 'unsafe-inline' for styles only."""
    scripts = " ".join(["'self'", *script_hashes])
    return (
        f"default-src 'none'; script-src {scripts}; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ).encode("ascii")


#: The docs page's fallback (the route sets the policy with its script's hash itself).
DOCS_CSP = docs_csp()


def _csp_for(path: str) -> bytes:
    if path in DOCS_PATHS:
        return DOCS_CSP
    if any(path == prefix or path.startswith(prefix + "/") for prefix in CONSOLE_PREFIXES):
        return CONSOLE_CSP
    return STRICT_CSP


class BodyTooLarge(HTTPException):
    """Raised from ``receive`` when the streamed body passes the limit; answered 413 by the app."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, detail=f"the request body is larger than {limit // 1024} KiB")


def _json_answer(status: int, payload: dict[str, Any]) -> tuple[Message, Message]:
    body = json.dumps(payload).encode("utf-8")
    start: Message = {
        "type": "http.response.start",
        "status": status,
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
    }
    return start, {"type": "http.response.body", "body": body, "more_body": False}


class ApiMiddleware:
    """See the module docstring. ``max_body`` is in bytes."""

    def __init__(self, app: ASGIApp, *, max_body: int) -> None:
        self.app = app
        self.max_body = max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.monotonic()
        path: str = scope.get("path", "")
        csp = _csp_for(path)
        status_seen = 0

        async def send_with_headers(message: Message) -> None:
            nonlocal status_seen
            if message["type"] == "http.response.start":
                status_seen = int(message["status"])
                names = {bytes(name).lower() for name, _ in message.get("headers", [])}
                headers = list(message.get("headers", []))
                headers += [(name, value) for name, value in SECURITY_HEADERS if name not in names]
                if b"content-security-policy" not in names:
                    headers.append((b"content-security-policy", csp))
                message = {**message, "headers": headers}
            await send(message)

        try:
            declared = self._declared_length(scope)
            if declared is not None and declared > self.max_body:
                await self._answer(send_with_headers, 413, {"error": BodyTooLarge(self.max_body).detail})
                return
            await self.app(scope, self._limited(receive), send_with_headers)
        except Exception as exc:  # noqa: BLE001 - the last resort: nothing escapes with its message
            logger.error("unhandled %s answering %s %s", type(exc).__name__, scope.get("method"), _template(scope))
            if status_seen == 0:
                await self._answer(send_with_headers, 500, {"error": "internal error"})
        finally:
            access_logger.info(
                "%s %s -> %d in %.1f ms",
                scope.get("method", "-"),
                _template(scope),
                status_seen,
                (time.monotonic() - started) * 1000,
            )

    @staticmethod
    def _declared_length(scope: Scope) -> int | None:
        for name, value in scope.get("headers", []):
            if name.lower() == b"content-length":
                try:
                    return int(value)
                except ValueError:
                    return None  # the server refuses a malformed length itself; count the stream instead
        return None

    def _limited(self, receive: Receive) -> Receive:
        received = 0
        limit = self.max_body

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit)
            return message

        return limited_receive

    @staticmethod
    async def _answer(send: Send, status: int, payload: dict[str, Any]) -> None:
        start, body = _json_answer(status, payload)
        await send(start)
        await send(body)


def _template(scope: Scope) -> str:
    """The matched route's path template (``/api/publishers/{publisherId}/status``), else ``-``."""
    route = scope.get("route")
    template = getattr(route, "path", None)
    return template if isinstance(template, str) else "-"
