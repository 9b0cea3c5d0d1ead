"""Lead ingest, ``POST /api/publishers/{publisherId}/leads``: the rules, and a short way through.

The route's rules live here once: :func:`prepare_lead` turns a posted body into the
``leads-incoming`` message (or raises the error that answers it), :func:`deliver_lead` queues it and
says whether it is new. The FastAPI route (:mod:`shared.api.routes_publishers`) is both, around
FastAPI's dependencies.

:class:`IngestShortcut` answers the common case without FastAPI's routing and dependency solving,
which cost more CPU than everything else about a lead together (measured: about half of the serve
process's time when leads arrive by POST, as the marketplace sends them). It answers only what it
is sure of — a well-formed lead under a key checked without I/O, once queued — and hands anything
else to the app unchanged (the body it read replayed), so every refusal is answered by the one code
path that answers it for every route: the same status, body and headers, and a bad key counted once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import threading
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from fastapi.responses import JSONResponse
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from shared.api.auth import INGEST
from shared.api.errors import retry_later_response
from shared.api.models import IngestAnswer
from shared.errors import InvalidLead, LeadWriterError
from shared.names import QUEUE_INCOMING
from shared.pipeline.identity import (
    IDEMPOTENCY_KEY_HEADER,
    InvalidIdempotencyKey,
    SeenIds,
    check_idempotency_key,
    content_lead_id,
)
from shared.pipeline.lead import decode_json_object, parse_incoming, repair_text
from shared.pipeline.messages import envelope
from shared.secretstore.base import validate_publisher_id
from shared.services import Services
from shared.transport.base import OutgoingMessage

logger = logging.getLogger(__name__)

#: The ingest route's path template (the access log names it) and the paths it matches.
INGEST_PATH = "/api/publishers/{publisherId}/leads"
_INGEST_PATH = re.compile(r"/api/publishers/([^/]+)/leads")
#: Threads that queue the shortcut's leads, each taking every lead waiting at once (up to
#: MAX_BATCH): one on a local broker does it all; more keep a remote one's round trips overlapping.
SHORTCUT_THREADS = 4
#: Leads one sender thread queues in one go at most.
MAX_BATCH = 200
#: Seconds a sender thread waits for work before it ends (the next lead starts one again).
IDLE_SECONDS = 5.0
_IDEMPOTENCY_HEADER = IDEMPOTENCY_KEY_HEADER.lower().encode("latin-1")


def _now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class PreparedLead:
    """A posted lead, ready to queue: its id and its ``leads-incoming`` message."""

    publisher_id: str
    lead_id: str
    message: OutgoingMessage


def ingest_lead_id(publisher_id: str, message: Mapping[str, Any], lead: Any, idempotency_key: str | None) -> str:
    """The lead id of an ingested lead: ``leadId`` in the body, else the ``Idempotency-Key`` header,
    else derived from the lead's content (architecture §3).

    Raises InvalidIdempotencyKey (422) for an unusable header or one that contradicts ``leadId``, and
    InvalidLead for a lead that has no canonical form.
    """
    key = check_idempotency_key(idempotency_key) if idempotency_key is not None else None
    given = message.get("leadId")
    if given is not None:
        if key is not None and given != key:
            raise InvalidIdempotencyKey(f"the {IDEMPOTENCY_KEY_HEADER} header differs from leadId in the body")
        if not isinstance(given, str):
            raise InvalidLead("leadId must be a string", field="leadId")
        return given
    if key is not None:
        return key
    if lead is None:
        raise InvalidLead("the message has no lead object", field="lead")
    if not isinstance(lead, Mapping):
        raise InvalidLead("lead must be an object", field="lead")
    try:
        return content_lead_id(publisher_id, lead)
    except ValueError:
        # A parsed JSON body has string keys and JSON values only: NaN or Infinity is all that can fail.
        raise InvalidLead("the body holds NaN or Infinity, which JSON does not allow", field="body") from None


def prepare_lead(publisher_id: str, raw: bytes, idempotency_key: str | None) -> PreparedLead:
    """The ``leads-incoming`` message for a posted body: the marketplace lead object, or a whole
    message (``{leadId, publisherId, receivedAt, lead}``).

    Raises InvalidPublisherId / InvalidLead / InvalidIdempotencyKey (all 422), naming the problem: a
    lead that would be dead-lettered ``InvalidLead`` is refused while the caller can still act.
    """
    validate_publisher_id(publisher_id)
    # The same door as the queue path: size, depth, UTF-8, strict JSON (no NaN), an object.
    payload = decode_json_object(raw)
    if "lead" in payload:
        message: dict[str, Any] = dict(payload)
        claimed = message.get("publisherId")
        if claimed is not None and claimed != publisher_id:
            raise InvalidLead("publisherId in the body differs from the publisher in the path", field="publisherId")
        message["publisherId"] = publisher_id
    else:
        message = {"publisherId": publisher_id, "lead": payload}
    message["leadId"] = ingest_lead_id(publisher_id, message, message.get("lead"), idempotency_key)
    if message.get("receivedAt") is None:
        message["receivedAt"] = _now().isoformat().replace("+00:00", "Z")
    # Lone surrogates (a "\\ud800" escape) are repaired by the rule the queue path applies, so the
    # stored body is valid UTF-8 and the lead reads the same whichever door it came through.
    body = json.dumps(repair_text(message), ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    lead = parse_incoming(body)
    return PreparedLead(publisher_id, lead.lead_id, envelope(body, publisher_id=publisher_id, lead_id=lead.lead_id))


#: What queuing a lead comes to: its status and answer, or the 503 answer when it could not be queued.
Outcome = tuple[int, IngestAnswer] | JSONResponse


def deliver_lead(services: Services, seen: SeenIds, lead: PreparedLead) -> Outcome:
    """Queue ``lead`` on ``leads-incoming``: ``(202, answer)``, ``(200, answer)`` with ``duplicate``
    when its id was accepted before, or a 503 answer when it could not be queued.

    The lead is sent *before* it is recorded as seen, so a failed send is never answered "duplicate"
    on the retry; a lead posted twice at once is sent twice with one message id, and the broker's
    duplicate detection and the idempotent write keep it one lead in the CRM.
    """
    return deliver_leads(services, seen, [lead])[0]


def _record_seen(seen: SeenIds, lead: PreparedLead) -> Outcome:
    """Record a queued lead's id: 202 when new, 200 with ``duplicate`` when accepted before."""
    try:
        first = seen.first_time(lead.publisher_id, lead.lead_id)
    except Exception as exc:  # noqa: BLE001 - the lead is queued; only the "duplicate" flag is unknown
        logger.warning(
            "could not record lead %s of publisher %s as seen: %s",
            lead.lead_id,
            lead.publisher_id,
            type(exc).__name__,
        )
        first = True
    if not first:
        logger.info("lead %s of publisher %s was posted again: a duplicate", lead.lead_id, lead.publisher_id)
        return 200, IngestAnswer(lead_id=lead.lead_id, queued=True, duplicate=True)
    # One a lead: DEBUG. The stages' settlement summary (INFO, once a minute) counts what came in.
    logger.debug("queued lead %s of publisher %s", lead.lead_id, lead.publisher_id)
    return 202, IngestAnswer(lead_id=lead.lead_id, queued=True)


def deliver_leads(services: Services, seen: SeenIds, leads: list[PreparedLead]) -> list[Outcome]:
    """:func:`deliver_lead` for leads posted at the same moment, with one broker send for them all
    (all or nothing, as one send is): the outcome of each, in order."""
    try:
        # Grouped with the sends of requests arriving at the same moment: one broker write for them all.
        services.ingest.send(QUEUE_INCOMING, [lead.message for lead in leads])
    except Exception as exc:  # noqa: BLE001 - adapters raise their own errors; the callers should retry
        first = leads[0]
        logger.warning(
            "could not queue %d lead(s), lead %s of publisher %s first: %s",
            len(leads),
            first.lead_id,
            first.publisher_id,
            type(exc).__name__,
        )
        return [retry_later_response("the lead could not be queued now; send it again", None) for _ in leads]
    return [_record_seen(seen, lead) for lead in leads]


class _Batcher:
    """Hands leads from the event loop to a few sender threads: each thread takes every lead waiting,
    queues them with :func:`deliver_leads`, and wakes the loop once for all of their answers. A lead
    a request at a time would cost two thread switches each way; under load these are shared."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._waiting: deque[tuple[PreparedLead, Services, SeenIds, asyncio.Future[Outcome]]] = deque()
        self._threads = 0
        self._idle = 0

    async def deliver(self, services: Services, seen: SeenIds, lead: PreparedLead) -> Outcome:
        future: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
        with self._cond:
            self._waiting.append((lead, services, seen, future))
            if self._idle:
                self._cond.notify()
            elif self._threads < SHORTCUT_THREADS:
                self._threads += 1
                threading.Thread(target=self._run, name="lw-ingest", daemon=True).start()
        return await future

    def _run(self) -> None:
        while True:
            with self._cond:
                if not self._waiting:
                    self._idle += 1
                    self._cond.wait(IDLE_SECONDS)
                    self._idle -= 1
                    if not self._waiting:
                        self._threads -= 1
                        return
                taken = [self._waiting.popleft() for _ in range(min(len(self._waiting), MAX_BATCH))]
            # One app's services and seen ids in practice; grouped by them all the same.
            groups: dict[tuple[int, int], list[tuple[PreparedLead, Services, SeenIds, asyncio.Future[Outcome]]]] = {}
            for item in taken:
                groups.setdefault((id(item[1]), id(item[2])), []).append(item)
            for items in groups.values():
                try:
                    outcomes = deliver_leads(items[0][1], items[0][2], [item[0] for item in items])
                except BaseException as exc:  # noqa: BLE001 - handed to each request, whose answer is a 500
                    _settle([(item[3], exc) for item in items])
                else:
                    _settle([(item[3], outcome) for item, outcome in zip(items, outcomes, strict=True)])


def _settle(results: list[tuple[asyncio.Future[Outcome], Outcome | BaseException]]) -> None:
    """Resolve futures from a sender thread: one wake-up of each event loop for all of them."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[Outcome], Outcome | BaseException]]] = {}
    for future, result in results:
        by_loop.setdefault(future.get_loop(), []).append((future, result))
    for loop, items in by_loop.items():
        with contextlib.suppress(RuntimeError):  # a loop closed meanwhile has nobody to answer
            loop.call_soon_threadsafe(_resolve, items)


def _resolve(items: list[tuple[asyncio.Future[Outcome], Outcome | BaseException]]) -> None:
    for future, result in items:
        if future.done():  # the request was cancelled (its client went away)
            continue
        if isinstance(result, BaseException):
            future.set_exception(result)
        else:
            future.set_result(result)


def answer_body(answer: IngestAnswer) -> bytes:
    """The answer's JSON as FastAPI renders a route's response model."""
    return json.dumps(
        answer.model_dump(mode="json", by_alias=True), ensure_ascii=False, allow_nan=False, separators=(",", ":")
    ).encode("utf-8")


class IngestShortcut:
    """ASGI middleware: answers a well-formed ingest POST itself (see the module docstring).

    It sits inside :class:`~shared.api.middleware.ApiMiddleware`, so the body limit, the security
    headers and the request log apply to its answers as to any other.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._batcher = _Batcher()
        #: Requests this shortcut answered itself (the rest went to the app).
        self.answered = 0
        self._route: Any = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        matched = _INGEST_PATH.fullmatch(scope.get("path", "")) if scope["type"] == "http" else None
        if matched is None or scope.get("method") != "POST":
            await self.app(scope, receive, send)
            return
        received: list[Message] = []
        try:
            raw = await _read_body(receive, received)
        except Exception as exc:  # noqa: BLE001 - the app answers it (413 for a body over the limit)
            await self.app(scope, _replay(received, receive, exc), send)
            return
        if raw is None:  # the client went away: the app sees the same
            await self.app(scope, _replay(received, receive), send)
            return
        app_ = scope["app"]
        lead = self._prepare(scope, matched.group(1), raw)
        if lead is None:
            await self.app(scope, _replay(received, receive), send)
            return
        scope["route"] = self._ingest_route(app_)
        scope["path_params"] = {"publisherId": lead.publisher_id}
        outcome = await self._batcher.deliver(app_.state.services, app_.state.seen_ids, lead)
        self.answered += 1
        if isinstance(outcome, JSONResponse):
            await outcome(scope, receive, send)
            return
        status, answer = outcome
        body = answer_body(answer)
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(b"content-length", str(len(body)).encode()), (b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": body, "more_body": False})

    def _prepare(self, scope: Scope, publisher_id: str, raw: bytes) -> PreparedLead | None:
        """The lead, when this request is one the shortcut may answer; None hands it to the app."""
        headers = [value for name, value in scope.get("headers", []) if name == _IDEMPOTENCY_HEADER]
        if len(headers) > 1:
            return None
        request = Request({**scope, "path_params": {"publisherId": publisher_id}})
        if INGEST.known_principal(request) is None:
            return None
        try:
            return prepare_lead(publisher_id, raw, headers[0].decode("latin-1") if headers else None)
        except LeadWriterError:
            return None

    def _ingest_route(self, app: Any) -> Any:
        if self._route is None:
            self._route = next(
                (r for r in app.routes if getattr(r, "path", None) == INGEST_PATH and "POST" in r.methods), None
            )
        return self._route


async def _read_body(receive: Receive, received: list[Message]) -> bytes | None:
    """The whole request body, keeping each message read in ``received``; None on a disconnect."""
    chunks: list[bytes] = []
    while True:
        message = await receive()
        received.append(message)
        if message["type"] != "http.request":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


def _replay(received: list[Message], receive: Receive, error: BaseException | None = None) -> Receive:
    """A ``receive`` that gives the messages already read again, then raises ``error`` (where reading
    stopped) or goes on with the real one."""
    pending = list(received)

    async def replay() -> Message:
        if pending:
            return pending.pop(0)
        if error is not None:
            raise error
        return await receive()

    return replay


__all__ = [
    "INGEST_PATH",
    "IngestShortcut",
    "PreparedLead",
    "answer_body",
    "deliver_lead",
    "deliver_leads",
    "ingest_lead_id",
    "prepare_lead",
]
