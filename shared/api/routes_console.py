"""The pages a person opens in a browser: the web console (``/console``) and the API docs
(``/api/docs``), served from files in this package so that neither loads anything from another host.

Both pages are static and hold no data and no key: the console's script asks for a key, keeps it in
``sessionStorage`` and calls the JSON API with it like any other client, so the API's own guards decide
what it may read or change. This module must not import the pipeline, the CRM client or any backend.

The console is also served under ``/api/console`` (and its assets always live there): in Azure the
Functions HTTP trigger only receives paths under its route prefix, ``/api`` by default.
"""

from __future__ import annotations

import base64
import hashlib
import re
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse, Response

from shared.api.middleware import docs_csp

router = APIRouter(include_in_schema=False)

CONSOLE_DIR = Path(__file__).with_name("console")
SWAGGER_DIR = Path(__file__).with_name("swagger_ui")

CONSOLE_PATHS = ("/console", "/api/console")
CONSOLE_ASSETS = "/api/console/assets"
DOCS_ASSETS = "/api/docs/assets"

_MEDIA_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".png": "image/png",
    ".svg": "image/svg+xml",
}
#: The only files served: a fixed list, so no path a caller sends can reach another file.
_CONSOLE_FILES = frozenset({"console.js", "console.css", "favicon.svg"})
_SWAGGER_FILES = frozenset({"swagger-ui-bundle.js", "swagger-ui.css", "favicon-32x32.png"})
#: The vendored Swagger UI changes only with a commit: let browsers keep it for a day.
_SWAGGER_CACHE = "public, max-age=86400"

_INLINE_SCRIPT = re.compile(r"<script>(.*?)</script>", re.DOTALL)


def _not_found() -> Response:
    return Response(status_code=404, content=b'{"error": "not found"}', media_type="application/json")


def _file(directory: Path, name: str, allowed: frozenset[str], cache: str | None = None) -> Response:
    if name not in allowed:
        return _not_found()
    path = directory / name
    headers = {"cache-control": cache} if cache else None
    return FileResponse(path, media_type=_MEDIA_TYPES[path.suffix], headers=headers)


@router.get("/console")
@router.get("/api/console")
def console_page() -> Response:
    """The single-page console; its script and style come from :data:`CONSOLE_ASSETS`."""
    return FileResponse(CONSOLE_DIR / "index.html", media_type=_MEDIA_TYPES[".html"])


@router.get(CONSOLE_ASSETS + "/{name}")
def console_asset(name: str) -> Response:
    return _file(CONSOLE_DIR, name, _CONSOLE_FILES)


@router.get(DOCS_ASSETS + "/{name}")
def docs_asset(name: str) -> Response:
    return _file(SWAGGER_DIR, name, _SWAGGER_FILES, _SWAGGER_CACHE)


def _script_hashes(html: str) -> list[str]:
    """CSP ``'sha256-…'`` sources for each inline ``<script>`` of ``html``, so none needs 'unsafe-inline'."""
    return [
        "'sha256-" + base64.b64encode(hashlib.sha256(body.encode("utf-8")).digest()).decode("ascii") + "'"
        for body in _INLINE_SCRIPT.findall(html)
    ]


@router.get("/api/docs")
def docs_page(request: Request) -> HTMLResponse:
    """Swagger UI over this app's OpenAPI document, from the vendored files, with a CSP that names
    only this server (and the hash of the page's one inline script)."""
    page = get_swagger_ui_html(
        openapi_url=request.app.openapi_url or "/api/openapi.json",
        title=f"{request.app.title} API",
        swagger_js_url=f"{DOCS_ASSETS}/swagger-ui-bundle.js",
        swagger_css_url=f"{DOCS_ASSETS}/swagger-ui.css",
        swagger_favicon_url=f"{DOCS_ASSETS}/favicon-32x32.png",
        oauth2_redirect_url=None,
        # validatorUrl: Swagger UI would otherwise send the document to validator.swagger.io.
        swagger_ui_parameters={"validatorUrl": None, "defaultModelsExpandDepth": 0, "tryItOutEnabled": False},
    )
    html = bytes(page.body).decode("utf-8")
    return HTMLResponse(html, headers={"content-security-policy": docs_csp(_script_hashes(html)).decode("ascii")})
