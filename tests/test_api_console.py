"""``GET /api/whoami``, the console's files and the docs page over a real socket: who a key is, what each
page is allowed to load (its Content-Security-Policy), and that the OpenAPI text is written for users."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.api import ADMIN_KEY, ApiStack, api_stack, assert_security_headers


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[ApiStack]:
    with api_stack(tmp_path / "data") as running:
        yield running


# -- whoami ------------------------------------------------------------------------------------------


def test_whoami_names_the_admin_key(stack: ApiStack) -> None:
    answer = stack.client.get("/api/whoami", headers=stack.admin())

    assert answer.status_code == 200
    assert answer.json() == {"role": "admin", "publisherId": None}


def test_whoami_names_the_publisher_a_publisher_key_belongs_to(stack: ApiStack) -> None:
    key = stack.key_for("contoso")

    answer = stack.client.get("/api/whoami", headers=stack.bearer(key))

    assert answer.status_code == 200
    assert answer.json() == {"role": "publisher", "publisherId": "contoso"}


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer lw-not-a-key"}, {"Authorization": "Basic abc"}, {"Authorization": "Bearer"}],
    ids=["no-key", "invalid-key", "other-scheme", "bearer-without-key"],
)
def test_whoami_without_a_valid_key_is_401_with_a_bearer_challenge(stack: ApiStack, headers: dict[str, str]) -> None:
    answer = stack.client.get("/api/whoami", headers=headers)

    assert answer.status_code == 401
    assert answer.headers["www-authenticate"] == "Bearer"
    assert "error" in answer.json()


def test_whoami_never_takes_the_key_from_the_query_string(stack: ApiStack) -> None:
    key = stack.key_for("contoso")

    for query_key in (key, ADMIN_KEY):
        assert stack.client.get("/api/whoami", params={"key": query_key}).status_code == 401


def test_a_revoked_publisher_key_is_401(stack: ApiStack) -> None:
    key = stack.key_for("contoso")
    assert stack.client.delete("/api/admin/publishers/contoso/keys", headers=stack.admin()).status_code == 204

    assert stack.client.get("/api/whoami", headers=stack.bearer(key)).status_code == 401


# -- console files -----------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/console", "/api/console"])
def test_the_console_page_is_served_with_a_policy_that_allows_only_this_server(stack: ApiStack, path: str) -> None:
    answer = stack.client.get(path)

    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("text/html")
    assert_security_headers(answer)
    csp = answer.headers["content-security-policy"]
    assert "script-src 'self';" in csp
    assert "connect-src 'self'" in csp
    assert "unsafe-inline" not in csp
    assert "http" not in csp, "no other origin is named"
    # Everything the page loads is a path on this server; nothing inline runs.
    assert re.findall(r'(?:src|href)="([^"]+)"', answer.text) == [
        "/api/console/assets/favicon.svg",
        "/api/console/assets/console.css",
        "/api/console/assets/console.js",
    ]
    assert "<script>" not in answer.text
    assert "style=" not in answer.text


@pytest.mark.parametrize(
    ("name", "media_type"),
    [("console.js", "text/javascript"), ("console.css", "text/css"), ("favicon.svg", "image/svg+xml")],
)
def test_the_console_assets_are_served_with_their_media_type(stack: ApiStack, name: str, media_type: str) -> None:
    answer = stack.client.get(f"/api/console/assets/{name}")

    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith(media_type)
    assert answer.headers["x-content-type-options"] == "nosniff"


@pytest.mark.parametrize(
    "path",
    [
        "/api/console/assets/index.html",
        "/api/console/assets/..%2Fapp.py",
        "/api/console/assets/%2e%2e%2fmodels.py",
        "/api/docs/assets/LICENSE",
        "/api/docs/assets/..%2F..%2Fsettings.py",
    ],
)
def test_only_the_listed_asset_files_are_served(stack: ApiStack, path: str) -> None:
    assert stack.client.get(path).status_code == 404


def test_the_console_script_never_writes_html_from_data_or_stores_the_key_outside_the_session(stack: ApiStack) -> None:
    script = stack.client.get("/api/console/assets/console.js").text

    assert "innerHTML" not in script
    assert "localStorage" not in script
    assert "document.cookie" not in script
    assert "sessionStorage.setItem(KEY_STORAGE" in script


# -- docs --------------------------------------------------------------------------------------------


def test_the_docs_page_loads_swagger_ui_from_this_server_and_its_script_only_by_hash(stack: ApiStack) -> None:
    answer = stack.client.get("/api/docs")

    assert answer.status_code == 200
    assert_security_headers(answer, docs=True)
    csp = answer.headers["content-security-policy"]
    assert "cdn" not in csp
    assert "https:" not in csp
    script_src = re.search(r"script-src ([^;]+);", csp)
    assert script_src is not None
    assert "'unsafe-inline'" not in script_src.group(1)
    assert re.fullmatch(r"'self' 'sha256-[A-Za-z0-9+/=]+'", script_src.group(1))
    urls = re.findall(r'(?:src|href)="([^"]+)"', answer.text)
    assert urls
    assert all(url.startswith("/api/docs/assets/") for url in urls), urls
    for url in urls:
        assert stack.client.get(url).status_code == 200, url


def _texts(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("description", "summary", "title") and isinstance(value, str):
                yield value
            else:
                yield from _texts(value)
    elif isinstance(node, list):
        for value in node:
            yield from _texts(value)


def test_the_openapi_text_is_written_for_users(stack: ApiStack) -> None:
    document = stack.client.get("/api/openapi.json").json()
    texts = list(_texts(document))

    assert texts
    for text in texts:
        assert "DESIGN" not in text, text
        assert "Raises" not in text, text
        assert "``" not in text, text
        assert ":func:" not in text, text
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            assert operation.get("summary"), f"{method} {path}"
            assert operation.get("description"), f"{method} {path}"


def test_the_openapi_models_carry_examples_and_readable_field_titles(stack: ApiStack) -> None:
    schemas = stack.client.get("/api/openapi.json").json()["components"]["schemas"]

    for name in ("ReplayBody", "PurgeBody", "ReplayAnswer", "StatsAnswer", "PublisherStatusAnswer", "WhoAmIAnswer"):
        assert schemas[name].get("examples"), name
    status = schemas["PublisherStatusAnswer"]["properties"]
    assert status["publisherId"]["title"] == "Publisher ID"
    assert status["deadLettersTotal"]["title"] == "Dead letters total"
    assert status["consecutiveConfigFailures"]["description"]
    assert schemas["ReplayBody"]["properties"]["dryRun"]["title"] == "Dry run"
