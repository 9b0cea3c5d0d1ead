"""The FastAPI application of architecture §6, built from :class:`~shared.services.Services`.

The same app object serves ``leadwriter serve`` (uvicorn on ``127.0.0.1:7071``) and Azure Functions
(:mod:`functions.http`, through the ASGI integration).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from shared.api import (
    routes_admin,
    routes_alerts,
    routes_console,
    routes_leads,
    routes_mapping,
    routes_publishers,
    routes_whoami,
)
from shared.api.auth import LIMITER_STATE, FailedKeyLimiter
from shared.api.errors import install_error_handlers
from shared.api.ingest import IngestShortcut
from shared.api.logredact import install_log_redaction
from shared.api.middleware import ApiMiddleware
from shared.api.models import HealthAnswer
from shared.datadir import WritableProbe
from shared.names import QUEUE_INCOMING
from shared.pipeline.identity import SeenIds
from shared.pipeline.lead import MAX_BODY_BYTES
from shared.pipeline.mapping_store import MappingStore
from shared.services import Services

logger = logging.getLogger(__name__)

#: The file of the default seen-id table, in the data dir.
SEEN_IDS_FILE = "ingest-seen.db"
#: The file of the default mapping store, in the data dir.
MAPPINGS_FILE = "mappings.db"
#: Seconds a health check may take before its backend counts as not answering.
HEALTH_TIMEOUT = 5.0
#: Seconds a health answer is reused: anonymous traffic on /api/health must not become backend
#: traffic (a Key Vault read per request would spend the vault's transaction budget).
HEALTH_CACHE_SECONDS = 5.0
#: A secret name no one stores: reading it proves the store answers, and costs a miss.
_HEALTH_PROBE_SECRET = "leadwriter-health-probe"  # noqa: S105 - a name, not a secret

TAGS = [
    {"name": "health", "description": "Is the service up? Needs no key."},
    {
        "name": "publishers",
        "description": "A publisher's CRM connection, its delivery status, and sending it leads. The admin key, "
        "or that publisher's own key.",
    },
    {"name": "admin", "description": "Publisher keys, dead letters (list, replay, purge) and statistics: admin key."},
    {"name": "leads", "description": "What happened to one lead, step by step. Admin key or its publisher's."},
    {"name": "session", "description": "Which key you hold, and so what you may do."},
]

DESCRIPTION = """Lead Writer delivers Microsoft commercial marketplace leads into each publisher's
Dynamics 365 / Dataverse CRM.

Send keys as `Authorization: Bearer <key>`: the admin key (`LEADWRITER_ADMIN_KEY`) or a publisher
key issued by `POST /api/admin/publishers/{publisherId}/keys`. No key or an invalid key → 401; a
valid key outside its scope → 403. Bodies over 256 KiB → 413; invalid input → 422
`{"error", "field"}`.

The web console at `/console` shows the same data for people: delivery health, dead letters grouped by
reason, replay and purge with a preview first.
"""


async def _check(name: str, probe: Callable[[], Any]) -> tuple[str, str]:
    try:
        await asyncio.wait_for(run_in_threadpool(probe), timeout=HEALTH_TIMEOUT)
    except Exception as exc:  # noqa: BLE001 - any failure means "not ready"; the type is enough
        logger.warning("health check %s failed: %s", name, type(exc).__name__)
        return name, "unavailable"
    return name, "ok"


async def _data_dir_check(probe: WritableProbe) -> tuple[str, str]:
    """("dataDir", "ok") or what is wrong with it: "full", "read-only", "not writable (…)"."""
    try:
        problem = await asyncio.wait_for(run_in_threadpool(probe.problem), timeout=HEALTH_TIMEOUT)
    except TimeoutError:
        problem = "not answering"
    if problem is not None:
        logger.warning("health check dataDir failed: the data dir is %s", problem)
    return "dataDir", problem or "ok"


def create_app(services: Services, *, seen_ids: SeenIds | None = None, mappings: MappingStore | None = None) -> FastAPI:
    """The HTTP API over ``services``. Raises nothing; backends are first used per request.

    ``seen_ids`` records the lead ids ingest has accepted, so a repeated POST is answered as a
    duplicate; ``mappings`` keeps publishers' mappings. By default both are the services' own, on the
    shared state store (every instance answers the same).
    """
    app = FastAPI(
        title="Lead Writer",
        version="1.0",
        description=DESCRIPTION,
        openapi_tags=TAGS,
        openapi_url="/api/openapi.json",
        # /api/docs is served by routes_console from vendored Swagger UI files (it renders offline).
        docs_url=None,
        redoc_url=None,
    )
    # The server around the app logs URLs (uvicorn's access log), and an ingest URL carries ?key=.
    install_log_redaction()
    app.state.services = services
    app.state.seen_ids = seen_ids if seen_ids is not None else services.seen_ids
    app.state.mappings = mappings if mappings is not None else services.pipeline.mappings
    # Invalid keys per client address (shared.api.auth): one limiter per app, so per process.
    setattr(app.state, LIMITER_STATE, FailedKeyLimiter())
    # Every backend keeps something in the data dir (status, penalties; the embedded ones everything).
    # Probed by writing a small file, at most every few seconds however often health is asked.
    data_dir_probe = WritableProbe(services.settings.data_dir)
    install_error_handlers(app)
    # Added first, so it runs inside ApiMiddleware: the body limit, headers and log apply to it too.
    app.add_middleware(IngestShortcut)
    app.add_middleware(ApiMiddleware, max_body=MAX_BODY_BYTES)
    health_lock = asyncio.Lock()
    health_cache: list[Any] = []

    @app.get(
        "/api/health",
        response_model=HealthAnswer,
        tags=["health"],
        summary="Liveness and readiness",
        description="Answers 200 when the service runs and its queue and secret backends answer, 503 naming the "
        "check that failed. Needs no key.",
    )
    async def health() -> JSONResponse:
        settings = services.settings
        async with health_lock:
            now = time.monotonic()
            if health_cache and now - health_cache[0] < HEALTH_CACHE_SECONDS:
                checks = health_cache[1]
            else:
                checks = dict(
                    await asyncio.gather(
                        _check("queue", lambda: services.transport.stats(QUEUE_INCOMING)),
                        _check("secrets", lambda: services.secrets.get(_HEALTH_PROBE_SECRET)),
                        _data_dir_check(data_dir_probe),
                    )
                )
                health_cache[:] = [now, checks]
        ok = all(state == "ok" for state in checks.values())
        answer = HealthAnswer(
            status="ok" if ok else "degraded",
            runtime=settings.runtime,
            queue_backend=settings.queue_backend,
            secret_backend=settings.secret_backend,
            state_backend=getattr(settings, "state_backend", "embedded"),
            checks=checks,
        )
        return JSONResponse(answer.model_dump(by_alias=True), status_code=200 if ok else 503)

    app.include_router(routes_publishers.router)
    app.include_router(routes_mapping.router)
    app.include_router(routes_alerts.router)
    app.include_router(routes_admin.router)
    app.include_router(routes_leads.router)
    app.include_router(routes_whoami.router)
    app.include_router(routes_console.router)
    return app
