"""The HTTP API served for real: uvicorn on a free 127.0.0.1 port, called over the socket with httpx.

The envelope of every answer (health, security headers, 404, 413, 422 shapes, the request log).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

from shared.errors import SecretStoreUnavailable
from shared.ops.apikeys import ApiKeyStore
from shared.runtime.embedded import wait_until
from shared.secretstore.base import CONTENT_TYPE, ConnectionStore, SecretStore
from shared.services import Services
from tests.fixtures.api import (
    MARKETPLACE_LEAD,
    ApiStack,
    api_stack,
    assert_security_headers,
    make_settings,
)

# --------------------------------------------------------------------------------------------------
# Tests of the envelope


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[ApiStack]:
    """The API on embedded backends, no simulator (routes that never reach a CRM)."""
    with api_stack(tmp_path / "data") as running:
        yield running


def test_health_reports_backends_and_answers_ok_when_they_answer(stack: ApiStack) -> None:
    answer = stack.client.get("/api/health")
    assert answer.status_code == 200
    assert answer.json() == {
        "status": "ok",
        "runtime": "embedded",
        "queueBackend": "embedded",
        "secretBackend": "embedded",
        "stateBackend": "embedded",
        "checks": {"queue": "ok", "secrets": "ok", "dataDir": "ok"},
    }
    assert_security_headers(answer)


def test_health_is_answered_from_a_short_cache_so_anonymous_traffic_costs_the_backends_nothing(
    stack: ApiStack,
) -> None:
    reads: list[str] = []
    store = stack.services.secrets
    original = store.get

    def counting_get(name: str) -> str | None:
        reads.append(name)
        return original(name)

    store.get = counting_get  # type: ignore[method-assign]
    try:
        answers = [stack.client.get("/api/health").status_code for _ in range(20)]
    finally:
        store.get = original  # type: ignore[method-assign]

    assert answers == [200] * 20
    assert len(reads) <= 1


class _DownSecretStore:
    """A SecretStore (our port) whose backend is unreachable."""

    def get(self, name: str) -> str | None:
        raise SecretStoreUnavailable("Key Vault could not be reached")

    def put(
        self,
        name: str,
        value: str,
        *,
        content_type: str = CONTENT_TYPE,
        tags: Mapping[str, str] | None = None,
    ) -> None:
        raise SecretStoreUnavailable("Key Vault could not be reached")

    def delete(self, name: str) -> bool:
        raise SecretStoreUnavailable("Key Vault could not be reached")

    def list_names(self, prefix: str = "") -> list[str]:
        raise SecretStoreUnavailable("Key Vault could not be reached")


def test_health_answers_503_naming_the_backend_that_does_not_answer(tmp_path: Path) -> None:
    down: SecretStore = _DownSecretStore()
    broken = Services.from_settings(make_settings(tmp_path / "data"))
    broken.secrets, broken.connections, broken.api_keys = down, ConnectionStore(down), ApiKeyStore(down)
    with api_stack(tmp_path / "data", services=broken) as stack:
        answer = stack.client.get("/api/health")
        assert answer.status_code == 503
        assert answer.json()["checks"] == {"queue": "ok", "secrets": "unavailable", "dataDir": "ok"}
        assert answer.json()["status"] == "degraded"
        # A publisher key cannot be checked while the store is down: 503 with Retry-After, not 401.
        status = stack.client.get("/api/publishers/contoso/status", headers=stack.bearer("lw_contoso_0_x"))
        assert status.status_code == 503
        assert int(status.headers["Retry-After"]) >= 1


def test_unknown_routes_answer_404_json_with_security_headers(stack: ApiStack) -> None:
    answer = stack.client.get("/api/nothing/here")
    assert answer.status_code == 404
    assert answer.json() == {"error": "not found"}
    assert_security_headers(answer)


def test_a_wrong_method_answers_405_json(stack: ApiStack) -> None:
    answer = stack.client.patch("/api/health")
    assert answer.status_code == 405
    assert answer.json() == {"error": "method not allowed"}


def test_openapi_document_lists_every_stable_route(stack: ApiStack) -> None:
    answer = stack.client.get("/api/openapi.json")
    assert answer.status_code == 200
    paths = answer.json()["paths"]
    expected = {
        "/api/health": {"get"},
        "/api/admin/publishers/{publisherId}/keys": {"post", "delete"},
        "/api/publishers/{publisherId}/connection": {"put", "get", "delete"},
        "/api/publishers/{publisherId}/connection/test": {"post"},
        "/api/publishers/{publisherId}/status": {"get"},
        "/api/publishers/{publisherId}/leads": {"post"},
        "/api/publishers/{publisherId}/mapping": {"get", "put"},
        "/api/publishers/{publisherId}/alerts": {"get", "put", "delete"},
        "/api/deadletters": {"get"},
        "/api/deadletters/replay": {"post"},
        "/api/deadletters/purge": {"post"},
        "/api/stats": {"get"},
        "/api/whoami": {"get"},
        "/api/jobs/{jobId}": {"get"},
        "/api/leads/{leadId}": {"get"},
        "/api/deadletters/archive": {"post"},
        "/api/deadletters/archived": {"get"},
        "/api/deadletters/archived/restore": {"post"},
        "/api/deadletters/{messageId}/resend": {"post"},
    }
    assert {path: set(ops) for path, ops in paths.items()} == expected
    schemas = answer.json()["components"]["schemas"]
    assert {"url", "auth"} <= set(schemas["ConnectionBody"]["properties"])


def test_docs_page_is_served_with_a_policy_that_lets_it_load(stack: ApiStack) -> None:
    answer = stack.client.get("/api/docs")
    assert answer.status_code == 200
    assert "swagger" in answer.text.lower()
    assert_security_headers(answer, docs=True)


def test_a_body_declared_over_256_kib_is_refused_with_413_before_auth(stack: ApiStack) -> None:
    body = b"{" + b'"pad":"' + b"x" * (256 * 1024) + b'"}'
    answer = stack.client.post(
        "/api/publishers/contoso/leads", content=body, headers={"Content-Type": "application/json"}
    )
    assert answer.status_code == 413
    assert "256 KiB" in answer.json()["error"]
    assert_security_headers(answer)


def test_a_streamed_body_without_length_is_cut_off_at_256_kib(stack: ApiStack) -> None:
    key = stack.key_for("contoso")

    def chunks() -> Iterator[bytes]:
        yield b'{"pad":"'
        for _ in range(40):
            yield b"x" * 8192
        yield b'"}'

    answer = stack.client.post(
        "/api/publishers/contoso/leads",
        content=chunks(),
        headers={"Content-Type": "application/json", **stack.bearer(key)},
    )
    assert "content-length" not in answer.request.headers
    assert answer.status_code == 413
    assert_security_headers(answer)


@pytest.mark.parametrize(
    ("content", "field"),
    [
        (b"{not json", "body"),
        (b"[1, 2]", "body"),
        (b'{"url": "https://contoso.crm4.dynamics.com"}', "auth"),
        (
            b'{"url": "https://contoso.crm4.dynamics.com", "auth": {"kind": "password", "username": "u"}}',
            "auth.password",
        ),
        (b'{"url": "https://contoso.crm4.dynamics.com", "auth": {"kind": "magic"}}', "auth"),
        (
            b'{"url": "https://evil.example.com", "auth": {"kind": "password", "username": "u", "password": "p"}}',
            "url",
        ),
        (b'{"url": "https://contoso.crm4.dynamics.com", "auth": {}, "extra": 1}', "auth"),
    ],
)
def test_invalid_connection_bodies_answer_422_naming_the_field(stack: ApiStack, content: bytes, field: str) -> None:
    answer = stack.client.put(
        "/api/publishers/contoso/connection",
        content=content,
        headers={"Content-Type": "application/json", **stack.admin()},
    )
    assert answer.status_code == 422, answer.text
    payload = answer.json()
    assert payload["field"] == field
    assert payload["error"]
    assert "Traceback" not in answer.text


def test_an_invalid_publisher_id_answers_422_naming_publisher_id(stack: ApiStack) -> None:
    answer = stack.client.get("/api/publishers/no%20spaces/status", headers=stack.admin())
    assert answer.status_code == 422
    assert answer.json()["field"] == "publisherId"


def test_request_log_names_route_template_and_status_but_never_key_query_or_body(
    stack: ApiStack, caplog: pytest.LogCaptureFixture
) -> None:
    key = stack.key_for("contoso")
    caplog.set_level(logging.DEBUG)
    answer = stack.client.post(
        "/api/publishers/contoso/leads",
        params={"key": key},
        json={**MARKETPLACE_LEAD, "Description": "body-marker-77"},
    )
    assert answer.status_code == 202
    # The line is written after the answer is sent: poll for it.
    assert wait_until(lambda: any(r.name == "shared.api.access" for r in caplog.records), timeout=5)
    access = [r.getMessage() for r in caplog.records if r.name == "shared.api.access"]
    assert any(line.startswith("POST /api/publishers/{publisherId}/leads -> 202 in ") for line in access), access
    # The server's logs (the test's own HTTP client logs the URL it called, key and all).
    everything = "\n".join(r.getMessage() for r in caplog.records if not r.name.startswith(("httpx", "httpcore")))
    assert key not in everything
    assert "body-marker-77" not in everything
    assert "key=" not in everything


def test_a_real_bug_answers_a_generic_500_and_logs_only_the_exception_type(
    stack: ApiStack, caplog: pytest.LogCaptureFixture
) -> None:
    leaked = "Secret-In-An-Exception-Message-42"

    def broken() -> None:
        raise RuntimeError(f"connection string with {leaked}")

    # A route with a bug, added to the running app (the router reads its routes per request).
    stack.server.app.add_api_route("/api/broken", broken)
    caplog.set_level(logging.DEBUG)
    answer = stack.client.get("/api/broken")
    assert answer.status_code == 500
    assert answer.json() == {"error": "internal error"}
    assert leaked not in answer.text
    assert_security_headers(answer)
    assert wait_until(lambda: any("unhandled RuntimeError" in r.getMessage() for r in caplog.records), timeout=5)
    formatter = logging.Formatter("%(message)s")
    assert all(leaked not in formatter.format(record) for record in caplog.records)
    # The server stays up.
    assert stack.client.get("/api/health").status_code == 200
