"""The HTTP API on Azure Functions: one catch-all HTTP trigger serving the FastAPI app through ASGI.

Anonymous at the Functions level on purpose: the API's own keys decide who may do what,
and a Functions key in front would only add a second secret to hand out. The app is built once per
worker process, on the first request (settings are read then, never at import), and it is the same
app object ``leadwriter serve`` runs.
"""

# No `from __future__ import annotations` here: the Functions worker reads the binding types from the
# trigger function's annotations at indexing time, and needs them as real objects.

import functools
import logging

import azure.functions as func
from fastapi import FastAPI

from shared.api import create_app
from shared.services import process_services

logger = logging.getLogger(__name__)

HTTP_METHODS = ("GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS")

http_api = func.Blueprint()  # type: ignore[no-untyped-call]


@functools.cache
def api_app() -> FastAPI:
    """The process-wide API app, over the same services as this worker's stage triggers (a connection
    update it makes is seen by them at once). Raises ConfigurationError for a bad setting."""
    return create_app(process_services())


@functools.cache
def _asgi() -> func.AsgiMiddleware:
    return func.AsgiMiddleware(api_app())  # type: ignore[no-untyped-call]


@http_api.function_name("http_api")
@http_api.route(route="{*route}", auth_level=func.AuthLevel.ANONYMOUS, methods=HTTP_METHODS)
async def serve(req: func.HttpRequest, context: func.Context) -> func.HttpResponse:
    """Hand the request to the API app; its middleware answers every error itself."""
    response: func.HttpResponse = await _asgi().handle_async(req, context)
    return response
