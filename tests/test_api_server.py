"""The HTTP API served for real: uvicorn on a free 127.0.0.1 port, called over the socket with httpx.

Also home of the helpers the other ``test_api_*`` modules use (:class:`ApiServer`, :func:`api_stack`):
the envelope of every answer (health, security headers, 404, 413, 422 shapes, the request log).
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from shared.api import create_app
from shared.apikeys import ApiKeyStore
from shared.errors import SecretStoreUnavailable
from shared.runtime import EmbeddedRuntime, wait_until
from shared.secretstore.base import CONTENT_TYPE, ConnectionStore, SecretStore
from shared.services import Services
from shared.settings import Settings
from shared.simulator import CrmSimulator, SimOrg
from tests.fixtures.simulator import SIM_PASSWORD, sim_username, simulator_settings

ADMIN_KEY = "lw-admin-" + "k3y-for-tests-0123456789abcdef"
FAST_ENV = {
    "LEADWRITER_RETRY_SCHEDULE": "0.2,0.4,0.8,1,1",
    "LEADWRITER_CRM_READ_TIMEOUT": "3",
    "LEADWRITER_CRM_CONNECT_TIMEOUT": "3",
}


class ApiServer:
    """``create_app(services)`` under uvicorn in a thread, on a port the OS chose."""

    def __init__(self, services: Services) -> None:
        self.app = create_app(services)
        # IPPROTO_TCP explicitly: asyncio sets TCP_NODELAY only on sockets that name it, and without it
        # every answer written in two parts waits out the client's delayed ACK (40 ms).
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self.port = self._sock.getsockname()[1]
        config = uvicorn.Config(
            self.app, log_level="warning", access_log=False, lifespan="off", timeout_graceful_shutdown=2
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [self._sock]}, name="api-server", daemon=True
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> ApiServer:
        self._thread.start()
        assert wait_until(lambda: self._server.started, timeout=10), "uvicorn did not start"
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)
        self._sock.close()


@dataclass
class ApiStack:
    """A running API over real services on a temporary data dir, and a client for it."""

    services: Services
    server: ApiServer
    client: httpx.Client
    simulator: CrmSimulator | None
    data_dir: Path
    runtime: EmbeddedRuntime | None = None

    def admin(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {ADMIN_KEY}"}

    def key_for(self, publisher_id: str) -> str:
        answer = self.client.post(f"/api/admin/publishers/{publisher_id}/keys", headers=self.admin())
        assert answer.status_code == 201, answer.text
        key: str = answer.json()["key"]
        return key

    def bearer(self, key: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {key}"}

    def start_runtime(self) -> EmbeddedRuntime:
        self.runtime = EmbeddedRuntime(
            self.services.transport, self.services.pipeline, observer=self.services.status.observe
        ).start()
        return self.runtime

    def stop_runtime(self) -> None:
        if self.runtime is not None:
            self.runtime.stop()
            self.runtime = None


def make_settings(
    data_dir: Path, simulator: CrmSimulator | None = None, *, admin_key: str | None = ADMIN_KEY, **env: str
) -> Settings:
    """Settings on ``data_dir`` with short CRM timeouts, the admin key, and the simulator when given."""
    values = {**FAST_ENV, **env}
    if admin_key is not None:
        values["LEADWRITER_ADMIN_KEY"] = admin_key
    if simulator is not None:
        return simulator_settings(simulator, data_dir, **values)
    return Settings.from_env({"LEADWRITER_DATA_DIR": str(data_dir), **values})


@contextmanager
def api_stack(
    data_dir: Path,
    simulator: CrmSimulator | None = None,
    *,
    admin_key: str | None = ADMIN_KEY,
    services: Services | None = None,
    **env: str,
) -> Iterator[ApiStack]:
    """Services on ``data_dir`` (pointed at ``simulator`` when given), the API serving them, a client."""
    if services is None:
        services = Services.from_settings(make_settings(data_dir, simulator, admin_key=admin_key, **env))
    server = ApiServer(services).start()
    client = httpx.Client(base_url=server.url, timeout=30.0, follow_redirects=False)
    stack = ApiStack(services, server, client, simulator, data_dir)
    try:
        yield stack
    finally:
        stack.stop_runtime()
        client.close()
        server.stop()
        services.close()


def password_body(org: SimOrg, password: str = SIM_PASSWORD, **auth: Any) -> dict[str, Any]:
    return {
        "url": org.url,
        "auth": {"kind": "password", "username": sim_username(org), "password": password, **auth},
    }


def client_secret_body(org: SimOrg, client_id: str, secret: str) -> dict[str, Any]:
    return {
        "url": org.url,
        "auth": {
            "kind": "clientSecret",
            "tenantId": org.tenant_id,
            "clientId": client_id,
            "clientSecret": secret,
        },
    }


MARKETPLACE_LEAD: Mapping[str, Any] = {
    "UserDetails": {
        "FirstName": "Ada",
        "LastName": "Lovelace",
        "Email": "ada@example.com",
        "Phone": "1234567890",
        "Country": "US",
        "Company": "Contoso",
        "Title": "CTO",
    },
    "LeadSource": "AzureMarketplace-INS|contoso.widget-saas",
    "ActionCode": "INS",
    "OfferTitle": "Contoso Widget",
    "Description": "Wants a demo",
}

SECURITY_HEADERS = {
    "x-content-type-options": "nosniff",
    "cache-control": "no-store",
    "x-frame-options": "DENY",
    "referrer-policy": "no-referrer",
}


def assert_security_headers(answer: httpx.Response, *, docs: bool = False) -> None:
    for name, value in SECURITY_HEADERS.items():
        assert answer.headers.get(name) == value, name
    csp = answer.headers.get("content-security-policy", "")
    if docs:
        assert "script-src" in csp
    else:
        assert csp.startswith("default-src 'none'")


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
        "queueBackend": "embedded",
        "secretBackend": "embedded",
        "checks": {"queue": "ok", "secrets": "ok"},
    }
    assert_security_headers(answer)


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
        assert answer.json()["checks"] == {"queue": "ok", "secrets": "unavailable"}
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
        "/api/deadletters": {"get"},
        "/api/deadletters/replay": {"post"},
        "/api/deadletters/purge": {"post"},
        "/api/stats": {"get"},
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
