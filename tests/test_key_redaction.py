"""A publisher key given as ``?key=`` appears in no log line — uvicorn's access log and its trace-level ASGI
log included —, no telemetry span, no answer and no dead letter (architecture §6). The server runs for real
(uvicorn on a socket, access log on); requests go through ``http.client``, which logs nothing itself, so
every record of every logger is checked."""

from __future__ import annotations

import http.client
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from uvicorn.config import LOGGING_CONFIG
from uvicorn.logging import AccessFormatter

from shared.api import create_app
from shared.api.logredact import REDACTED, RedactingFilter, redact, redacting_span_processor
from shared.names import QUEUE_INCOMING
from shared.runtime.embedded import EmbeddedRuntime, wait_until
from shared.services import Services
from tests.fixtures.api import ADMIN_KEY, MARKETPLACE_LEAD, ApiServer, make_settings

SERVER_LOGGER_NAMES = ("uvicorn", "uvicorn.access", "uvicorn.error", "uvicorn.asgi")


class Capture(logging.Handler):
    """Every record it sees, formatted the way a server would write it."""

    def __init__(self) -> None:
        super().__init__(level=logging.NOTSET)
        self.records: list[logging.LogRecord] = []
        self.lines: list[str] = []
        self._access = AccessFormatter('%(client_addr)s - "%(request_line)s" %(status_code)s')
        self._plain = logging.Formatter("%(name)s %(levelname)s %(message)s")

    def attach(self) -> None:
        for name in SERVER_LOGGER_NAMES:
            logging.getLogger(name).addHandler(self)

    def detach(self) -> None:
        for name in SERVER_LOGGER_NAMES:
            logging.getLogger(name).removeHandler(self)

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
        formatter = self._access if record.name == "uvicorn.access" else self._plain
        self.lines.append(formatter.format(record))


def _call(server: ApiServer, method: str, path: str, body: Any = None, **headers: str) -> tuple[int, str]:
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        payload = None if body is None else json.dumps(body).encode()
        connection.request(method, path, body=payload, headers={"Content-Type": "application/json", **headers})
        response = connection.getresponse()
        return response.status, response.read().decode()
    finally:
        connection.close()


@pytest.fixture
def capture(caplog: pytest.LogCaptureFixture) -> Iterator[Capture]:
    """caplog at DEBUG for all loggers, plus a handler on uvicorn's own loggers (its default logging
    config stops them propagating to the root). Call ``attach`` after uvicorn configured its logging."""
    caplog.set_level(1)
    handler = Capture()
    try:
        yield handler
    finally:
        handler.detach()


@pytest.mark.parametrize(
    "uvicorn_options",
    [
        pytest.param({"log_config": LOGGING_CONFIG, "log_level": "debug"}, id="uvicorn-default-logging"),
        pytest.param({"log_config": None, "log_level": "trace"}, id="trace-level-scope-dumps"),
    ],
)
def test_a_query_key_appears_in_no_log_record_no_answer_and_no_dead_letter(
    tmp_path: Path, capture: Capture, caplog: pytest.LogCaptureFixture, uvicorn_options: dict[str, Any]
) -> None:
    services = Services.from_settings(make_settings(tmp_path / "data"))
    server = ApiServer(services, access_log=True, **uvicorn_options)
    capture.attach()
    server.start()
    try:
        key = _issue_key(server, "contoso")
        wrong = "lw-" + "not-a-key-but-secret-looking-0123456789"
        answers = [
            _call(server, "POST", f"/api/publishers/contoso/leads?key={key}", dict(MARKETPLACE_LEAD)),
            _call(server, "POST", f"/api/publishers/contoso/leads?key={key}", dict(MARKETPLACE_LEAD)),
            _call(server, "POST", f"/api/publishers/contoso/leads?x=1&key={key}", {"UserDetails": {"Country": "US"}}),
            _call(server, "POST", f"/api/publishers/fabrikam/leads?key={key}", dict(MARKETPLACE_LEAD)),
            _call(server, "POST", f"/api/publishers/contoso/leads?key={wrong}", dict(MARKETPLACE_LEAD)),
            _call(server, "GET", f"/api/publishers/contoso/status?key={key}"),
            _call(
                server, "POST", "/api/publishers/contoso/leads", dict(MARKETPLACE_LEAD), Authorization=f"Bearer {key}"
            ),
            _call(server, "GET", f"/no/such/route?key={key}"),
        ]
        assert [status for status, _ in answers] == [202, 200, 422, 403, 401, 401, 200, 404]

        # The lead is dead-lettered (no connection is stored): the dead letter does not hold the key either.
        runtime = EmbeddedRuntime(services.transport, services.pipeline).start()
        try:
            assert wait_until(lambda: services.transport.stats(QUEUE_INCOMING).dead_lettered == 1, timeout=30)
        finally:
            runtime.stop()
        status, dead_letters = _call(server, "GET", "/api/deadletters", Authorization=f"Bearer {ADMIN_KEY}")
        assert status == 200
        assert json.loads(dead_letters)["items"][0]["reason"] == "CredentialsMissing"
        [dead] = services.transport.peek_dead_letters(QUEUE_INCOMING)
        stored = dead.body.decode() + json.dumps(dead.application_properties) + str(dead.dead_letter_description)
    finally:
        server.stop()
        services.close()

    # The access log was on and wrote the ingest lines, with the key's value redacted.
    access = [
        line for record, line in zip(capture.records, capture.lines, strict=True) if record.name == "uvicorn.access"
    ]
    assert any(f"/api/publishers/contoso/leads?key={REDACTED}" in line for line in access), access
    everything = "\n".join([*capture.lines, *(r.getMessage() for r in caplog.records), caplog.text])
    for secret in (key, wrong):
        assert secret not in everything
        assert all(secret not in text for _, text in answers)
        assert secret not in dead_letters
        assert secret not in stored


def _issue_key(server: ApiServer, publisher: str) -> str:
    status, text = _call(server, "POST", f"/api/admin/publishers/{publisher}/keys", Authorization=f"Bearer {ADMIN_KEY}")
    assert status == 201, text
    key: str = json.loads(text)["key"]
    return key


def test_request_spans_carry_the_url_without_the_query_key(tmp_path: Path) -> None:
    from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    # Given the app instrumented as Azure Monitor instruments it, with the redacting processor first
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(redacting_span_processor())
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    services = Services.from_settings(make_settings(tmp_path / "data"))
    app = create_app(services)
    FastAPIInstrumentor.instrument_app(app, tracer_provider=provider)
    server = ApiServer(services, app=app).start()
    try:
        key = _issue_key(server, "contoso")
        # When a lead is posted with the key in the URL
        status, _ = _call(server, "POST", f"/api/publishers/contoso/leads?key={key}", dict(MARKETPLACE_LEAD))
        assert status == 202
    finally:
        server.stop()
        services.close()
        FastAPIInstrumentor.uninstrument_app(app)

    # Then no span, attribute or event holds it, and the URL attributes are there, redacted
    spans = exporter.get_finished_spans()
    assert spans
    dumped = "\n".join(span.to_json() for span in spans)
    assert key not in dumped
    assert REDACTED in dumped


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "POST /api/publishers/p/leads?key=lw-abc.DEF_1&x=1 HTTP/1.1",
            f"POST /api/publishers/p/leads?key={REDACTED}&x=1 HTTP/1.1",
        ),
        ("/api/x?%6Bey=s3cret", f"/api/x?%6Bey={REDACTED}"),
        ("/api/x?code=fn-key&monkey=kept", f"/api/x?code={REDACTED}&monkey=kept"),
        ("query_string': b'key=s3cret'", f"query_string': b'key={REDACTED}'"),
        ("(b'authorization', b'Bearer s3cret')", f"(b'authorization', b'{REDACTED}')"),
        ("Authorization: Basic dXNlcjpwYXNz", f"Authorization: {REDACTED}"),
        ("sent Bearer eyJ0eXAi.x.y to it", f"sent Bearer {REDACTED} to it"),
        ("GET /api/health HTTP/1.1", "GET /api/health HTTP/1.1"),
    ],
)
def test_redaction_replaces_key_like_values_and_credentials_and_keeps_the_rest(text: str, expected: str) -> None:
    assert redact(text) == expected
    assert redact(expected) == expected


def test_the_filter_keeps_the_shape_of_the_arguments_so_formatters_still_unpack_them() -> None:
    record = logging.LogRecord(
        "uvicorn.access",
        logging.INFO,
        __file__,
        1,
        '%s - "%s %s HTTP/%s" %d',
        ("127.0.0.1:5000", "POST", "/api/publishers/p/leads?key=s3cret", "1.1", 202),
        None,
    )
    assert RedactingFilter().filter(record) is True
    assert record.args == ("127.0.0.1:5000", "POST", f"/api/publishers/p/leads?key={REDACTED}", "1.1", 202)
    assert "s3cret" not in AccessFormatter("%(request_line)s %(status_code)s").format(record)
