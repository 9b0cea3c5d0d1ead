"""Observability : settlement counters, the settlement log line, Application Insights.

Settlements are real: messages go through the embedded broker and :func:`shared.pipeline.settle.settle` turns
real stage outcomes into broker actions and :class:`~shared.pipeline.settle.Settled` records. OpenTelemetry is
real too: an SDK meter provider with an in-memory reader, and, for export, Azure Monitor's own
exporter in a child process posting to a local ingestion endpoint that stands in for Application
Insights (the only seam faked, and it is just an HTTP server that records what it is sent).
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import re
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from functions import _host
from shared.errors import DeadLetterReason
from shared.names import QUEUE_INCOMING, QUEUE_READY, QUEUE_VALIDATED
from shared.ops.telemetry import (
    DEAD_LETTERED,
    DELIVERED,
    FORWARDED,
    RESCHEDULED,
    Metrics,
    MetricsSnapshot,
    fan_out,
)
from shared.pipeline.messages import envelope
from shared.pipeline.outcomes import STAGES, Delivered, Forward, Outcome, Reject, Retry
from shared.pipeline.settle import Settled, SettlementSummary, settle
from shared.services import Services
from shared.settings import Settings
from shared.transport.embedded import EmbeddedBroker
from tests.fixtures.servicebus import sdk_message

REPO = Path(__file__).resolve().parent.parent
EMAIL = "ada.lovelace@example.com"
MASKED = "a***@example.com"


def settle_one(
    broker: EmbeddedBroker,
    stage: str,
    outcome: Outcome,
    *,
    lead_id: str | None = None,
    publisher_id: str = "contoso",
    attempt: int = 1,
    observer: Callable[[Settled], None] | None = None,
) -> Settled:
    """Send a lead message to ``stage``'s queue, receive it, and settle it with ``outcome``."""
    queue = STAGES[stage]
    lead_id = lead_id or f"lead-{uuid.uuid4().hex[:8]}"
    body = json.dumps({"leadId": lead_id, "publisherId": publisher_id}).encode()
    broker.send(queue, [envelope(body, publisher_id=publisher_id, lead_id=lead_id, attempt=attempt)])
    [message] = broker.receive(queue, max_messages=1)
    return settle(
        stage,
        message,
        outcome,
        sender=broker,
        settler=broker,
        started=time.monotonic(),
        observer=observer,
        schedule=(5.0,),  # one retry, then RetriesExhausted
    )


def forward_to(queue: str) -> Forward:
    return Forward(queue, envelope(b"{}", publisher_id="contoso", lead_id=f"next-{uuid.uuid4().hex[:8]}"))


# -- Metrics --------------------------------------------------------------------------------------


def test_metrics_count_each_settlement_by_stage_and_dead_letters_by_reason(broker: EmbeddedBroker) -> None:
    metrics = Metrics(otel=False)
    rejected = Reject(DeadLetterReason.CREDENTIALS_REJECTED, "Entra refused the password (50126)")
    settled = [
        settle_one(broker, "validate_credentials", forward_to(QUEUE_VALIDATED), observer=metrics.observe),
        settle_one(broker, "validate_credentials", forward_to(QUEUE_VALIDATED), observer=metrics.observe),
        settle_one(broker, "validate_credentials", rejected, observer=metrics.observe),
        settle_one(broker, "validate_credentials", rejected, observer=metrics.observe),
        settle_one(broker, "check_solution", Retry("CRM answered 503"), observer=metrics.observe),
        settle_one(broker, "write_lead", Delivered(uuid.uuid4(), created=True), observer=metrics.observe),
        settle_one(broker, "write_lead", Delivered(uuid.uuid4(), created=False), observer=metrics.observe),
        settle_one(broker, "write_lead", Retry("CRM timed out"), attempt=2, observer=metrics.observe),
        settle_one(
            broker, "write_lead", Reject(DeadLetterReason.LEAD_REJECTED, "400"), observer=metrics.observe
        ),
    ]
    assert [s.action for s in settled] == [FORWARDED] * 2 + [DEAD_LETTERED] * 2 + [RESCHEDULED] + [DELIVERED] * 2 + [
        DEAD_LETTERED
    ] * 2

    snapshot = metrics.snapshot()

    assert snapshot == MetricsSnapshot(
        forwarded={"validate_credentials": 2},
        delivered={"write_lead": 2},
        rescheduled={"check_solution": 1},
        dead_lettered={
            "validate_credentials": {"CredentialsRejected": 2},
            "write_lead": {"LeadRejected": 1, "RetriesExhausted": 1},
        },
    )
    assert [snapshot.total(action) for action in (FORWARDED, DELIVERED, RESCHEDULED, DEAD_LETTERED)] == [2, 2, 1, 4]
    assert snapshot.dead_lettered_by_reason() == {"CredentialsRejected": 2, "LeadRejected": 1, "RetriesExhausted": 1}
    # The counts describe what the broker really did.
    assert broker.stats(QUEUE_READY).dead_lettered_by_reason == {"LeadRejected": 1, "RetriesExhausted": 1}
    assert broker.stats(QUEUE_INCOMING).dead_lettered == 2


def test_a_snapshot_is_a_copy_that_later_settlements_do_not_change(broker: EmbeddedBroker) -> None:
    metrics = Metrics(otel=False)
    settle_one(broker, "write_lead", Delivered(uuid.uuid4(), created=True), observer=metrics.observe)
    before = metrics.snapshot()

    settle_one(broker, "write_lead", Delivered(uuid.uuid4(), created=True), observer=metrics.observe)

    assert before.delivered == {"write_lead": 1}
    assert metrics.snapshot().delivered == {"write_lead": 2}
    assert metrics.snapshot().to_json()["deadLettered"] == {}


def test_metrics_lose_no_count_when_many_workers_observe_at_once(broker: EmbeddedBroker) -> None:
    metrics = Metrics(otel=False)
    delivered = settle_one(broker, "write_lead", Delivered(uuid.uuid4(), created=True))
    rejected = settle_one(broker, "validate_credentials", Reject(DeadLetterReason.INVALID_LEAD, "not JSON"))
    start = threading.Barrier(8)

    def work() -> None:
        start.wait()
        for _ in range(500):
            metrics.observe(delivered)
            metrics.observe(rejected)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    snapshot = metrics.snapshot()
    assert snapshot.delivered == {"write_lead": 4000}
    assert snapshot.dead_lettered == {"validate_credentials": {"InvalidLead": 4000}}


def _points(reader: InMemoryMetricReader) -> dict[str, dict[frozenset[tuple[str, Any]], int]]:
    data = reader.get_metrics_data()
    assert data is not None
    found: dict[str, dict[frozenset[tuple[str, Any]], int]] = {}
    for resource in data.resource_metrics:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                for point in metric.data.data_points:
                    attributes = frozenset((point.attributes or {}).items())
                    found.setdefault(metric.name, {})[attributes] = int(point.value)  # type: ignore[union-attr]
    return found


def test_opentelemetry_counters_carry_stage_and_dead_letter_reason(broker: EmbeddedBroker) -> None:
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    metrics = Metrics(provider.get_meter("test"))
    try:
        settle_one(broker, "validate_credentials", forward_to(QUEUE_VALIDATED), observer=metrics.observe)
        settle_one(broker, "write_lead", Delivered(uuid.uuid4(), created=True), observer=metrics.observe)
        settle_one(broker, "write_lead", Delivered(uuid.uuid4(), created=True), observer=metrics.observe)
        settle_one(broker, "check_solution", Retry(f"CRM answered 503 for {EMAIL}"), observer=metrics.observe)
        settle_one(
            broker,
            "check_solution",
            Reject(DeadLetterReason.SOLUTION_MISSING, "not installed"),
            observer=metrics.observe,
        )

        points = _points(reader)
    finally:
        provider.shutdown()

    assert points["leadwriter.leads.forwarded"] == {frozenset({("stage", "validate_credentials")}): 1}
    assert points["leadwriter.leads.delivered"] == {frozenset({("stage", "write_lead")}): 2}
    # A rescheduled message's error text is not an attribute: one time series per stage, not per error.
    assert points["leadwriter.leads.rescheduled"] == {frozenset({("stage", "check_solution")}): 1}
    assert points["leadwriter.leads.deadlettered"] == {
        frozenset({("stage", "check_solution"), ("reason", "SolutionMissing")}): 1
    }


# -- observers ------------------------------------------------------------------------------------


def test_a_failing_observer_is_logged_and_does_not_stop_the_others(
    broker: EmbeddedBroker, caplog: pytest.LogCaptureFixture
) -> None:
    metrics = Metrics(otel=False)

    def broken(settled: Settled) -> None:
        raise RuntimeError("status database is locked")

    with caplog.at_level(logging.ERROR, logger="shared.ops.telemetry"):
        settled = settle_one(
            broker, "write_lead", Delivered(uuid.uuid4(), created=True), observer=fan_out(broken, metrics.observe)
        )

    assert settled.action == DELIVERED
    assert metrics.snapshot().delivered == {"write_lead": 1}
    [record] = [r for r in caplog.records if r.name == "shared.ops.telemetry"]
    assert "the message itself is settled" in record.getMessage()
    assert record.exc_info is not None


def test_services_observe_feeds_both_the_status_book_and_the_metrics(broker: EmbeddedBroker, tmp_path: Path) -> None:
    services = Services.from_settings(Settings.from_env({"LEADWRITER_DATA_DIR": str(tmp_path / "data")}))
    try:
        settle_one(broker, "write_lead", Delivered(uuid.uuid4(), created=True), observer=services.observe)
        settle_one(
            broker,
            "validate_credentials",
            Reject(DeadLetterReason.CREDENTIALS_REJECTED, "Entra refused the password (50126)"),
            publisher_id="fabrikam",
            observer=services.observe,
        )
        contoso, fabrikam = services.status.get("contoso"), services.status.get("fabrikam")
    finally:
        services.close()

    assert contoso.delivered == 1
    assert fabrikam.last_error_reason == "CredentialsRejected"
    assert fabrikam.consecutive_config_failures == 1
    assert services.metrics.snapshot().total(DELIVERED) == 1
    assert services.metrics.snapshot().dead_lettered_by_reason() == {"CredentialsRejected": 1}


class RecordingActions(_host.MessageActions):
    """Stands in for the Functions host's settlement channel (gRPC to the host; not reachable here)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str | None]] = []

    def complete(self, message: Any) -> None:
        self.calls.append(("complete", None))

    def deadletter(
        self, message: Any, deadletter_reason: str | None = None, deadletter_error_description: str | None = None
    ) -> None:
        self.calls.append(("deadletter", deadletter_reason))

    def renew_message_lock(self, message: Any) -> None:
        self.calls.append(("renew", None))


def test_the_functions_host_feeds_status_and_metrics_from_each_trigger(tmp_path: Path) -> None:
    services = Services.from_settings(Settings.from_env({"LEADWRITER_DATA_DIR": str(tmp_path / "data")}))
    services.metrics = Metrics(otel=False)
    message = sdk_message(
        None,
        message_id="broken-1",
        body=b"{not json",
        properties={"publisherId": "contoso", "leadId": "broken-1", "attempt": 1},
    )
    actions = RecordingActions()
    try:
        settled = _host.run_stage("validate_credentials", message, actions, services=services)
        status = services.status.get("contoso")
    finally:
        services.close()

    assert actions.calls == [("deadletter", "InvalidLead")]
    assert settled.action == DEAD_LETTERED
    assert services.metrics.snapshot().dead_lettered == {"validate_credentials": {"InvalidLead": 1}}
    assert status.last_error_reason == "InvalidLead"


# -- the settlement log line ----------------------------------------------------------------------

#: ``key=value`` or ``key="value with spaces"``.
FIELD = re.compile(r'(\w+)=("[^"]*"|\S+)')


def _settlement_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "shared.pipeline.settle" and r.getMessage().startswith("settled ")]


def test_the_settlement_log_line_is_one_structured_line_with_the_email_masked(
    broker: EmbeddedBroker, caplog: pytest.LogCaptureFixture
) -> None:
    outcome = Retry(f"CRM answered 400: the value {EMAIL} of emailaddress1\nis invalid")
    with caplog.at_level(logging.INFO, logger="shared.pipeline.settle"):
        settle_one(broker, "write_lead", outcome, lead_id=EMAIL, publisher_id="contoso")

    [record] = _settlement_records(caplog)
    line = record.getMessage()
    assert "\n" not in line
    fields = {key: value.strip('"') for key, value in FIELD.findall(line)}
    assert fields["stage"] == "write_lead"
    assert fields["outcome"] == RESCHEDULED
    assert fields["reason"] == f"CRM answered 400: the value {MASKED} of emailaddress1 is invalid"
    assert fields["publisherId"] == "contoso"
    assert fields["leadId"] == MASKED
    assert fields["attempt"] == "1"
    assert float(fields["latencyMs"]) >= 0
    assert record.levelno == logging.INFO
    # The same fields ride on the record, for Application Insights' custom dimensions.
    assert {k: getattr(record, k) for k in ("stage", "outcome", "publisherId", "leadId", "attempt")} == {
        "stage": "write_lead",
        "outcome": RESCHEDULED,
        "publisherId": "contoso",
        "leadId": MASKED,
        "attempt": 1,
    }
    assert EMAIL not in caplog.text
    assert all(EMAIL not in str(value) for value in vars(record).values())


@pytest.mark.parametrize(
    ("stage", "outcome", "action", "reason", "level"),
    [
        ("validate_credentials", "forward", FORWARDED, "-", logging.DEBUG),
        ("write_lead", "delivered", DELIVERED, "-", logging.DEBUG),
        ("check_solution", "reject", DEAD_LETTERED, "SolutionVersionUnsupported", logging.WARNING),
    ],
)
def test_every_outcome_logs_its_stage_outcome_and_reason_forwards_and_deliveries_at_debug(
    broker: EmbeddedBroker,
    caplog: pytest.LogCaptureFixture,
    stage: str,
    outcome: str,
    action: str,
    reason: str,
    level: int,
) -> None:
    outcomes: dict[str, Outcome] = {
        "forward": forward_to(QUEUE_VALIDATED),
        "delivered": Delivered(uuid.uuid4(), created=True),
        "reject": Reject(DeadLetterReason.SOLUTION_VERSION_UNSUPPORTED, "0.9.0.0 is below 1.0.0.0"),
    }
    with caplog.at_level(logging.DEBUG, logger="shared.pipeline.settle"):
        settle_one(broker, stage, outcomes[outcome], lead_id="lead-42", publisher_id="fabrikam", attempt=3)

    [record] = _settlement_records(caplog)
    fields = dict(FIELD.findall(record.getMessage()))
    assert (fields["stage"], fields["outcome"], fields["reason"]) == (stage, action, reason)
    assert (fields["publisherId"], fields["leadId"], fields["attempt"]) == ("fabrikam", "lead-42", "3")
    assert record.levelno == level


def test_forwards_and_deliveries_are_summed_up_in_one_info_line_a_minute(
    broker: EmbeddedBroker, caplog: pytest.LogCaptureFixture
) -> None:
    now = [0.0]
    summary = SettlementSummary(60.0, clock=lambda: now[0])
    forwarded = settle_one(broker, "validate_credentials", forward_to(QUEUE_VALIDATED), lead_id="a", publisher_id="p")
    delivered = settle_one(broker, "write_lead", Delivered(uuid.uuid4(), created=True), lead_id="b", publisher_id="p")
    with caplog.at_level(logging.INFO, logger="shared.pipeline.settle"):
        for result in (forwarded, forwarded, delivered):
            summary.count(result)
        assert not [r for r in caplog.records if "in the last" in r.getMessage()], "not before the minute is up"
        now[0] = 61.0
        summary.count(delivered)

    [line] = [r.getMessage() for r in caplog.records if "in the last" in r.getMessage()]
    assert line == "settled in the last 61 s: validate_credentials forwarded=2; write_lead delivered=2"


# -- configure_telemetry --------------------------------------------------------------------------


def _child_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("LEADWRITER_", "APPLICATIONINSIGHTS_", "OTEL_"))
    }
    env.update(LEADWRITER_DATA_DIR=str(tmp_path / "data"), PYTHONIOENCODING="utf-8", **extra)
    return env


def _run_child(script: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", script],
        cwd=REPO,
        env=env,
        capture_output=True,
        encoding="utf-8",
        timeout=60,
        check=False,
    )


def test_configure_telemetry_without_the_setting_does_nothing_and_imports_no_azure_monitor(
    tmp_path: Path,
) -> None:
    # A child process: this one may have imported azure.monitor for another test already.
    script = """
import json, sys
import shared.tools.cli, shared.services
from shared.settings import Settings
from shared.ops.telemetry import Metrics, configure_telemetry
configured = configure_telemetry(Settings.from_env())
Metrics().snapshot()
loaded = sorted(m for m in sys.modules if m.startswith(("azure.monitor", "opentelemetry.sdk")))
print(json.dumps({"configured": configured, "loaded": loaded}))
"""
    result = _run_child(script, _child_env(tmp_path))

    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"configured": False, "loaded": []}


def test_an_invalid_connection_string_stops_serve_with_exit_2_naming_the_setting(tmp_path: Path) -> None:
    value = "InstrumentationKey=not-a-guid-but-private-looking"
    command = [str(Path(sys.executable).with_name("leadwriter"))]
    if not Path(command[0]).exists():
        command = [sys.executable, "-m", "shared.tools.cli"]

    result = subprocess.run(
        [*command, "serve", "--no-api", "--no-workers"],
        cwd=REPO,
        env=_child_env(tmp_path, APPLICATIONINSIGHTS_CONNECTION_STRING=value, NO_COLOR="1"),
        capture_output=True,
        encoding="utf-8",
        timeout=60,
        check=False,
    )

    assert result.returncode == 2
    assert "APPLICATIONINSIGHTS_CONNECTION_STRING" in result.stderr
    assert "not-a-guid-but-private-looking" not in result.stderr + result.stdout


class _Ingestion(BaseHTTPRequestHandler):
    """Application Insights' track endpoint, as far as the exporter needs: accept and record."""

    received: list[dict[str, Any]]

    def do_POST(self) -> None:
        data = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        if self.headers.get("Content-Encoding") == "gzip":
            data = gzip.decompress(data)
        if self.path.endswith("/v2.1/track"):
            items = json.loads(data)
            self.received.extend(items if isinstance(items, list) else [items])
        body = json.dumps({"itemsReceived": 1, "itemsAccepted": 1, "errors": []}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def ingestion() -> Iterator[tuple[str, list[dict[str, Any]]]]:
    received: list[dict[str, Any]] = []
    handler = type("Handler", (_Ingestion,), {"received": received})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/", received
    finally:
        server.shutdown()
        server.server_close()


def test_with_the_setting_settlement_logs_and_counters_reach_application_insights(
    tmp_path: Path, ingestion: tuple[str, list[dict[str, Any]]]
) -> None:
    endpoint, received = ingestion
    connection = (
        f"InstrumentationKey={uuid.UUID(int=7)};IngestionEndpoint={endpoint};LiveEndpoint={endpoint}"
    )
    script = f"""
import logging, time
from opentelemetry import _logs, metrics as otel_metrics
from shared.errors import DeadLetterReason
from shared.pipeline.messages import envelope
from shared.names import QUEUE_INCOMING
from shared.settings import Settings
from shared.pipeline.settle import settle
from shared.pipeline.outcomes import Reject
from shared.ops.telemetry import Metrics, configure_telemetry
from shared.transport import make_transport

logging.basicConfig(level=logging.INFO)
settings = Settings.from_env()
assert configure_telemetry(settings) is True
assert configure_telemetry(settings) is True  # a second call changes nothing
metrics = Metrics()
broker = make_transport(settings)
broker.send(QUEUE_INCOMING, [envelope(b"{{}}", publisher_id="contoso", lead_id={EMAIL!r})])
[message] = broker.receive(QUEUE_INCOMING)
outcome = Reject(DeadLetterReason.CREDENTIALS_REJECTED, "Entra refused the password (50126)")
settle("validate_credentials", message, outcome, sender=broker, settler=broker, started=time.monotonic(),
       observer=metrics.observe)
_logs.get_logger_provider().force_flush()
otel_metrics.get_meter_provider().force_flush()
"""
    env = _child_env(
        tmp_path, APPLICATIONINSIGHTS_CONNECTION_STRING=connection, APPLICATIONINSIGHTS_STATSBEAT_DISABLED_ALL="true"
    )

    result = _run_child(script, env)

    assert result.returncode == 0, result.stderr
    assert "already instrumented" not in result.stderr, "configure_azure_monitor ran twice"
    messages = [
        item["data"]["baseData"]
        for item in received
        if item.get("data", {}).get("baseType") == "MessageData"
        and item["data"]["baseData"]["message"].startswith("settled ")
    ]
    assert len(messages) == 1, "configured once: one exported record per log line"
    [log] = messages
    assert log["message"].startswith("settled stage=validate_credentials outcome=dead-lettered")
    assert {k: log["properties"][k] for k in ("stage", "outcome", "reason", "publisherId", "leadId")} == {
        "stage": "validate_credentials",
        "outcome": "dead-lettered",
        "reason": "CredentialsRejected",
        "publisherId": "contoso",
        "leadId": MASKED,
    }
    counters = [
        (metric["name"], data["baseData"].get("properties", {}), metric["value"])
        for item in received
        if (data := item.get("data", {})).get("baseType") == "MetricData"
        for metric in data["baseData"]["metrics"]
        if metric["name"].startswith("leadwriter.")
    ]
    assert counters == [
        ("leadwriter.leads.deadlettered", {"stage": "validate_credentials", "reason": "CredentialsRejected"}, 1)
    ]
    assert EMAIL not in json.dumps(received)
