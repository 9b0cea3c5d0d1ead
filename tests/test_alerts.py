"""Alerts: the webhook URL guard (DNS rebinding included), the signature scheme, the routes, and events
delivered to a real HTTPS receiver on localhost, off the delivery path, with retries."""

from __future__ import annotations

import json
import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from shared.errors import DeadLetterReason
from shared.ops.alerts import (
    AlertService,
    UnsafeWebhookUrl,
    check_webhook_url,
    public_address,
    signature,
    verify_signature,
)
from shared.pipeline.lead import lead_record_id
from shared.pipeline.outcomes import Delivered, Reject, SettleAction, Stage
from shared.pipeline.settle import Settled
from shared.runtime.embedded import wait_until
from shared.secretstore import make_secret_store
from shared.simulator import CrmSimulator, SimOrg
from shared.simulator.certs import ensure_certificates
from shared.simulator.server import server_context
from shared.state import EmbeddedStateStore
from shared.transport.base import ReceivedMessage
from tests.fixtures.api import ApiStack, api_stack, make_settings, password_body

# -- the URL guard ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("http://hooks.example.com/x", "https://"),
        ("https://user:pw@hooks.example.com/x", "user name"),
        ("https://hooks.example.com/x#frag", "fragment"),
        ("https://93.184.216.34/x", "IP address"),
        ("https://[::1]/x", "IP address"),
        ("https://2130706433/x", "IP address"),
        ("https://hooks.example.com:8443/x", "port 443"),
        ("https://localhost/x", "public"),
        ("https://printer.local/x", "public"),
        ("https://hooks.example.com\\@evil/x", "backslash"),
        ("https://hooks.exa mple.com/x", "whitespace"),
        ("", "empty"),
    ],
)
def test_a_webhook_url_that_is_not_a_public_https_host_is_refused_naming_why(url: str, problem: str) -> None:
    with pytest.raises(UnsafeWebhookUrl, match=problem) as refused:
        check_webhook_url(url)
    assert refused.value.field == "webhookUrl"


def test_a_public_https_url_with_a_path_and_query_is_accepted() -> None:
    target = check_webhook_url("https://Hooks.Example.com/lead-writer?tenant=7")
    assert (target.host, target.port, target.allowed) == ("hooks.example.com", 443, False)


def test_an_operator_allowed_local_receiver_may_use_any_port_and_address() -> None:
    target = check_webhook_url("https://localhost:8443/hook", ("localhost:*",))
    assert target.allowed
    assert public_address(target, lambda host, port: ["127.0.0.1"]) == "127.0.0.1"


@pytest.mark.parametrize(
    "addresses",
    [["127.0.0.1"], ["10.0.0.5"], ["93.184.216.34", "192.168.1.1"], ["169.254.169.254"], ["::1"], ["::ffff:127.0.0.1"]],
)
def test_a_host_resolving_to_any_private_or_reserved_address_is_refused(addresses: list[str]) -> None:
    target = check_webhook_url("https://hooks.example.com/x")
    with pytest.raises(UnsafeWebhookUrl, match="private or reserved"):
        public_address(target, lambda host, port: addresses)


# -- the signature ---------------------------------------------------------------------------------------


def test_the_signature_is_the_stripe_scheme_over_timestamp_and_raw_body() -> None:
    import hashlib
    import hmac

    body = b'{"id":"evt_1"}'
    header = signature("whsec_test", 1_700_000_000, body)
    expected = hmac.new(b"whsec_test", b"1700000000." + body, hashlib.sha256).hexdigest()
    assert header == f"t=1700000000,v1={expected}"
    assert verify_signature("whsec_test", header, body, now=1_700_000_010)
    assert not verify_signature("whsec_test", header, body + b" ", now=1_700_000_010)
    assert not verify_signature("whsec_other", header, body, now=1_700_000_010)
    assert not verify_signature("whsec_test", header, body, now=1_700_001_000), "too old"


# -- a real HTTPS receiver -----------------------------------------------------------------------------


@dataclass
class Receiver:
    """An HTTPS server on localhost that records each POST and answers the next status in ``statuses``."""

    port: int
    ca: Path
    calls: list[tuple[dict[str, str], bytes]] = field(default_factory=list)
    statuses: list[int] = field(default_factory=list)
    gate: threading.Event = field(default_factory=threading.Event)

    @property
    def url(self) -> str:
        return f"https://localhost:{self.port}/hook"

    def events(self, kind: str | None = None) -> list[dict[str, Any]]:
        found = [json.loads(body) for _, body in self.calls]
        return [event for event in found if kind is None or event["type"] == kind]


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[Receiver]:
    certs = ensure_certificates(tmp_path / "certs", "127.0.0.1")
    state: dict[str, Receiver] = {}

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("content-length", "0")))
            me = state["receiver"]
            me.gate.wait()
            me.calls.append(({k.lower(): v for k, v in self.headers.items()}, body))
            status = me.statuses.pop(0) if me.statuses else 200
            self.send_response(status)
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    context: ssl.SSLContext = server_context(str(certs.server_cert), str(certs.server_key))
    server.socket = context.wrap_socket(server.socket, server_side=True)
    me = Receiver(port=server.server_address[1], ca=certs.ca_cert)
    me.gate.set()
    state["receiver"] = me
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield me
    finally:
        me.gate.set()
        server.shutdown()
        server.server_close()


@pytest.fixture
def stack(tmp_path: Path, receiver: Receiver) -> Iterator[ApiStack]:
    with api_stack(
        tmp_path / "data",
        LEADWRITER_WEBHOOK_ALLOWED_HOSTS="localhost:*",
        REQUESTS_CA_BUNDLE=str(receiver.ca),
    ) as running:
        yield running


def message(publisher: str, lead_id: str) -> ReceivedMessage:
    return ReceivedMessage(
        queue="leads-ready",
        body=b"{}",
        message_id=lead_id,
        application_properties={"publisherId": publisher, "leadId": lead_id, "attempt": 1},
        content_type="application/json",
        delivery_count=1,
        enqueued_time=datetime.now(UTC),
        sequence_number=1,
    )


def dead_lettered(publisher: str, lead_id: str, reason: str = DeadLetterReason.CREDENTIALS_REJECTED) -> Settled:
    outcome = Reject(DeadLetterReason(reason), "Entra refused the password (AADSTS50126)")
    return Settled(
        Stage.VALIDATE_CREDENTIALS, SettleAction.DEAD_LETTERED, message(publisher, lead_id), outcome, reason=reason
    )


def delivered(publisher: str, lead_id: str) -> Settled:
    outcome = Delivered(lead_record_id(publisher, lead_id), True)
    return Settled(Stage.WRITE_LEAD, SettleAction.DELIVERED, message(publisher, lead_id), outcome)


def test_setting_up_alerts_shows_the_secret_once_and_sends_a_signed_test_event(
    stack: ApiStack, receiver: Receiver
) -> None:
    key = stack.key_for("contoso")
    answer = stack.client.put(
        "/api/publishers/contoso/alerts", json={"webhookUrl": receiver.url}, headers=stack.bearer(key)
    )
    assert answer.status_code == 200, answer.text
    secret = answer.json()["secret"]
    assert secret.startswith("whsec_")
    assert answer.json()["events"] == ["delivery.failing", "delivery.recovered", "connection.verified", "test"]
    assert wait_until(lambda: receiver.events("test"), 15)
    headers, body = receiver.calls[0]
    assert verify_signature(secret, headers["leadwriter-signature"], body)
    event = json.loads(body)
    assert set(event) == {"id", "type", "publisherId", "occurredAt", "data"}
    assert event["publisherId"] == "contoso"

    shown = stack.client.get("/api/publishers/contoso/alerts", headers=stack.bearer(key)).json()
    assert "secret" not in shown
    again = stack.client.put("/api/publishers/contoso/alerts", json={"webhookUrl": receiver.url}, headers=stack.admin())
    assert "secret" not in again.json(), "a later PUT keeps the secret"
    rotated = stack.client.put(
        "/api/publishers/contoso/alerts", json={"webhookUrl": receiver.url, "rotateSecret": True}, headers=stack.admin()
    )
    assert rotated.json()["secret"] not in (None, secret)
    assert stack.client.delete("/api/publishers/contoso/alerts", headers=stack.bearer(key)).status_code == 204
    assert stack.client.get("/api/publishers/contoso/alerts", headers=stack.bearer(key)).status_code == 404


def test_alert_routes_keep_other_publishers_and_callers_without_a_key_out(stack: ApiStack, receiver: Receiver) -> None:
    other = stack.key_for("fabrikam")
    body = {"webhookUrl": receiver.url}
    assert stack.client.put("/api/publishers/contoso/alerts", json=body).status_code == 401
    assert stack.client.put("/api/publishers/contoso/alerts", json=body, headers=stack.bearer(other)).status_code == 403
    assert stack.client.get("/api/publishers/contoso/alerts", headers=stack.bearer(other)).status_code == 403
    assert stack.client.delete("/api/publishers/contoso/alerts", headers=stack.bearer(other)).status_code == 403


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"webhookUrl": "http://localhost/hook"}, "webhookUrl"),
        ({"webhookUrl": "https://10.0.0.1/hook"}, "webhookUrl"),
        ({"webhookUrl": "https://localhost:1/hook", "events": ["lead.created"]}, "events"),
        ({}, "webhookUrl"),
    ],
)
def test_alert_settings_that_make_no_sense_are_422_naming_the_field(
    stack: ApiStack, body: dict[str, Any], field: str
) -> None:
    answer = stack.client.put("/api/publishers/contoso/alerts", json=body, headers=stack.admin())
    assert answer.status_code == 422, answer.text
    assert answer.json()["field"] == field


def test_failing_then_recovering_delivery_sends_one_event_per_change_not_one_per_lead(
    stack: ApiStack, receiver: Receiver
) -> None:
    stack.client.put("/api/publishers/contoso/alerts", json={"webhookUrl": receiver.url}, headers=stack.admin())
    assert wait_until(lambda: receiver.events("test"), 15)
    for n in range(5):
        stack.services.observe(dead_lettered("contoso", f"bad-{n}"))
    assert wait_until(lambda: receiver.events("delivery.failing"), 15)
    for n in range(5):
        stack.services.observe(delivered("contoso", f"good-{n}"))
    assert wait_until(lambda: receiver.events("delivery.recovered"), 15)
    stack.services.observe(dead_lettered("contoso", "bad-again"))
    assert wait_until(lambda: len(receiver.events("delivery.failing")) == 2, 15)
    [first, _second] = receiver.events("delivery.failing")
    assert first["data"]["reason"] == "CredentialsRejected"
    assert first["data"]["count"] >= 1
    assert "AADSTS50126" in first["data"]["lastError"]
    assert len(receiver.events("delivery.recovered")) == 1
    # Another publisher without alerts: nothing is sent for it.
    stack.services.observe(dead_lettered("fabrikam", "x"))
    assert {event["publisherId"] for event in receiver.events()} == {"contoso"}


def test_a_webhook_answering_500_is_retried_until_it_takes_the_event(stack: ApiStack, receiver: Receiver) -> None:
    receiver.statuses[:] = [500]
    stack.client.put("/api/publishers/contoso/alerts", json={"webhookUrl": receiver.url}, headers=stack.admin())
    assert wait_until(lambda: len(receiver.calls) == 2, 20)
    assert [event["type"] for event in receiver.events()] == ["test", "test"]
    assert receiver.events()[0]["id"] == receiver.events()[1]["id"], "the same event, retried"
    assert stack.services.alerts.failed[0] == "HTTP 500"


def test_a_webhook_that_hangs_never_holds_up_settlements(stack: ApiStack, receiver: Receiver) -> None:
    stack.client.put("/api/publishers/contoso/alerts", json={"webhookUrl": receiver.url}, headers=stack.admin())
    assert wait_until(lambda: receiver.events("test"), 15)
    receiver.gate.clear()  # from now on the receiver holds every request until released
    stack.services.observe(dead_lettered("contoso", "hang-0"))
    # While the webhook is hanging, settlements keep being observed and recorded.
    for n in range(200):
        stack.services.observe(delivered("contoso", f"during-{n}"))
    assert stack.services.journeys.get("contoso", "during-199").state == "delivered"
    assert not receiver.events("delivery.failing"), "the webhook is still holding the request"
    receiver.gate.set()
    assert wait_until(lambda: receiver.events("delivery.failing"), 30)


def test_a_name_rebound_to_loopback_after_it_was_stored_is_not_called(tmp_path: Path, receiver: Receiver) -> None:
    settings = make_settings(tmp_path / "data")
    state = EmbeddedStateStore(tmp_path / "state.db")
    answers = [["93.184.216.34"]]  # public when stored

    def resolver(host: str, port: int) -> list[str]:
        return answers[0]

    service = AlertService(state, make_secret_store(settings), resolver=resolver, backoff=())
    try:
        service.put("contoso", "https://hooks.example.com/hook", None)
        answers[0] = ["127.0.0.1"]  # then rebound to this machine
        service.emit("contoso", "test", {})
        assert wait_until(lambda: service.failed, 15)
        assert service.failed == ["UnsafeWebhookUrl"]
        assert receiver.calls == []
    finally:
        service.close()
        state.close()


def test_a_verified_connection_update_sends_connection_verified(
    tmp_path: Path, receiver: Receiver, simulator: CrmSimulator, crm_org: SimOrg
) -> None:
    # One CA bundle that trusts both the simulated CRM and the local webhook receiver.
    bundle = tmp_path / "ca-bundle.pem"
    bundle.write_bytes(Path(simulator.ca_path).read_bytes() + Path(receiver.ca).read_bytes())
    with api_stack(
        tmp_path / "data",
        simulator,
        LEADWRITER_WEBHOOK_ALLOWED_HOSTS="localhost:*",
        REQUESTS_CA_BUNDLE=str(bundle),
    ) as stack:
        answer = stack.client.put(
            f"/api/publishers/{crm_org.name}/alerts", json={"webhookUrl": receiver.url}, headers=stack.admin()
        )
        assert answer.status_code == 200, answer.text

        stored = stack.client.put(
            f"/api/publishers/{crm_org.name}/connection", json=password_body(crm_org), headers=stack.admin()
        )

        assert stored.status_code == 200, stored.text
        assert wait_until(lambda: receiver.events("connection.verified"), 15)
        [event] = receiver.events("connection.verified")
        assert event["publisherId"] == crm_org.name
