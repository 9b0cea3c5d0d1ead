"""The Azure Functions entry: ``function_app.app`` registers the HTTP API beside the three stage triggers,
and the HTTP function serves the same FastAPI app through the ASGI integration."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import azure.functions as func
import pytest

import functions.http
from shared.names import QUEUE_INCOMING, QUEUE_READY, QUEUE_VALIDATED, SERVICEBUS_CONNECTION
from shared.services import use_process_services
from tests.fixtures.api import ADMIN_KEY, MARKETPLACE_LEAD

# ``app.get_functions()`` may run once per process (a second call refuses the names as duplicates), so
# the one cached call of the stage adapters' tests is shared here.
from tests.fixtures.functions import registered


def _trigger(name: str) -> dict[str, Any]:
    [trigger] = [
        b.get_dict_repr() for b in registered()[name].get_bindings() if b.get_dict_repr()["type"].endswith("Trigger")
    ]
    return trigger


def test_the_http_api_is_registered_as_an_anonymous_catch_all_http_function() -> None:
    function = registered()["http_api"]
    assert function.is_http_function()
    trigger = _trigger("http_api")
    assert trigger["type"] == "httpTrigger"
    assert trigger["route"] == "{*route}"
    assert str(trigger["authLevel"]).lower().endswith("anonymous")
    assert {str(getattr(m, "value", m)) for m in trigger["methods"]} >= {"GET", "POST", "PUT", "DELETE"}


def test_the_function_app_registers_the_http_api_beside_the_three_stages() -> None:
    assert set(registered()) == {"validate_credentials", "check_solution", "write_lead", "run_job", "http_api"}
    for name, queue in (
        ("validate_credentials", QUEUE_INCOMING),
        ("check_solution", QUEUE_VALIDATED),
        ("write_lead", QUEUE_READY),
    ):
        trigger = _trigger(name)
        assert (trigger["type"], trigger["queueName"], trigger["connection"]) == (
            "serviceBusTrigger",
            queue,
            SERVICEBUS_CONNECTION,
        )


@pytest.fixture
def functions_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """App settings as the Functions host would set them; the process-wide app is rebuilt for the test."""
    data_dir = tmp_path / "data"
    monkeypatch.setenv("LEADWRITER_DATA_DIR", str(data_dir))
    monkeypatch.setenv("LEADWRITER_ADMIN_KEY", ADMIN_KEY)
    monkeypatch.delenv("LEADWRITER_QUEUE_BACKEND", raising=False)
    monkeypatch.delenv("LEADWRITER_SECRET_BACKEND", raising=False)
    use_process_services(None)
    functions.http.api_app.cache_clear()
    functions.http._asgi.cache_clear()
    yield data_dir
    app = functions.http.api_app()
    app.state.services.close()
    use_process_services(None)
    functions.http.api_app.cache_clear()
    functions.http._asgi.cache_clear()


def _invoke(method: str, url: str, *, headers: dict[str, str] | None = None, body: bytes = b"") -> func.HttpResponse:
    handler = registered()["http_api"].get_user_function()
    request = func.HttpRequest(method, url, headers=headers or {}, body=body)
    response: func.HttpResponse = asyncio.run(handler(request, None))
    return response


def test_the_http_function_serves_the_api_app_built_once_from_the_environment(functions_env: Path) -> None:
    health = _invoke("GET", "http://localhost/api/health")
    assert health.status_code == 200
    assert json.loads(health.get_body())["checks"] == {"queue": "ok", "secrets": "ok", "dataDir": "ok"}
    assert health.headers["X-Content-Type-Options"] == "nosniff"
    app = functions.http.api_app()
    assert functions.http.api_app() is app
    assert app.state.services.settings.data_dir == functions_env


def test_a_key_issued_through_the_http_function_ingests_a_lead(functions_env: Path) -> None:
    issued = _invoke(
        "POST", "http://localhost/api/admin/publishers/contoso/keys", headers={"Authorization": f"Bearer {ADMIN_KEY}"}
    )
    assert issued.status_code == 201
    key = json.loads(issued.get_body())["key"]
    refused = _invoke("GET", "http://localhost/api/stats", headers={"Authorization": f"Bearer {key}"})
    assert refused.status_code == 403
    queued = _invoke(
        "POST",
        f"http://localhost/api/publishers/contoso/leads?key={key}",
        headers={"Content-Type": "application/json"},
        body=json.dumps(MARKETPLACE_LEAD).encode(),
    )
    assert queued.status_code == 202
    stats = functions.http.api_app().state.services.transport.stats(QUEUE_INCOMING)
    assert stats.active == 1
