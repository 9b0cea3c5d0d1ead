"""After a full run, no password, client secret, token or API key is anywhere it could be observed.

The run: keys issued, a password publisher and a clientSecret publisher registered (and verified live),
verifications failed with other secrets, leads ingested over HTTP and delivered, some dead-lettered
(no connection; credentials disabled at Entra), dead letters listed, status and stats read, a test lead
written — with logging captured at DEBUG. Then every log record, every API answer (body and headers),
every dead letter (body, properties, description) and every byte of every file under the data dir is
searched for each secret. An API key may appear only in the one answer that issued it.
"""

from __future__ import annotations

import json
import logging
import re
import secrets
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

from shared.names import STAGE_QUEUES
from shared.runtime.embedded import wait_until
from shared.simulator import CrmSimulator
from tests.fixtures.api import ADMIN_KEY, MARKETPLACE_LEAD, api_stack

#: The shape of a JWT (every token the simulator issues is one): header.payload starting ``eyJ``.
_JWT = re.compile(r"eyJ[\w-]{8,}\.[\w-]{8,}")
#: The test's own HTTP client logs the URLs it calls (``?key=`` included); that is not the service.
_CLIENT_LOGGERS = ("httpx", "httpcore")


def _all_bytes_under(root: Path) -> dict[str, bytes]:
    return {str(path): path.read_bytes() for path in root.rglob("*") if path.is_file()}


def test_no_secret_token_or_key_is_observable_after_a_full_run(
    simulator: CrmSimulator, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    suffix = uuid.uuid4().hex[:6]
    password = f"Pw-{secrets.token_urlsafe(18)}"
    client_secret = f"Cs~{secrets.token_urlsafe(24)}"
    wrong_password = f"Wrong-{secrets.token_urlsafe(12)}"
    wrong_secret = f"WrongCs-{secrets.token_urlsafe(12)}"
    client_id = str(uuid.uuid4())

    pw_org = simulator.add_org(f"scanpw-{suffix}")
    username = f"svc@{pw_org.name}.example"
    simulator.add_user(pw_org.name, username, password)
    cs_org = simulator.add_org(f"scancs-{suffix}", solution_version="1.3.0.0")
    simulator.add_app(cs_org.name, client_id, client_secret)
    orphan = f"scanorphan-{suffix}"

    answers: list[tuple[str, httpx.Response]] = []
    data_dir = tmp_path / "data"
    with api_stack(data_dir, simulator) as stack:

        def call(label: str, method: str, path: str, **kwargs: Any) -> httpx.Response:
            answer = stack.client.request(method, path, **kwargs)
            answers.append((label, answer))
            return answer

        admin = stack.admin()
        keys = {}
        for publisher in (pw_org.name, cs_org.name, orphan):
            issued = call(f"issue:{publisher}", "POST", f"/api/admin/publishers/{publisher}/keys", headers=admin)
            assert issued.status_code == 201
            keys[publisher] = issued.json()["key"]
        pw_auth = {"Authorization": f"Bearer {keys[pw_org.name]}"}
        cs_auth = {"Authorization": f"Bearer {keys[cs_org.name]}"}

        # Verifications that fail, with secrets that must not be echoed either
        bad_pw = {"url": pw_org.url, "auth": {"kind": "password", "username": username, "password": wrong_password}}
        assert (
            call("bad-pw", "PUT", f"/api/publishers/{pw_org.name}/connection", json=bad_pw, headers=pw_auth).status_code
            == 422
        )
        bad_cs = {
            "url": cs_org.url,
            "auth": {
                "kind": "clientSecret",
                "tenantId": cs_org.tenant_id,
                "clientId": client_id,
                "clientSecret": wrong_secret,
            },
        }
        assert (
            call("bad-cs", "PUT", f"/api/publishers/{cs_org.name}/connection", json=bad_cs, headers=cs_auth).status_code
            == 422
        )
        invalid = {"url": "https://evil.example", "auth": {"kind": "password", "username": "u", "password": password}}
        assert (
            call(
                "invalid", "PUT", f"/api/publishers/{pw_org.name}/connection", json=invalid, headers=pw_auth
            ).status_code
            == 422
        )

        # The connections that verify
        good_pw = {**bad_pw, "auth": {**bad_pw["auth"], "password": password}}
        good_cs = {**bad_cs, "auth": {**bad_cs["auth"], "clientSecret": client_secret}}
        assert (
            call("pw", "PUT", f"/api/publishers/{pw_org.name}/connection", json=good_pw, headers=pw_auth).status_code
            == 200
        )
        assert (
            call("cs", "PUT", f"/api/publishers/{cs_org.name}/connection", json=good_cs, headers=cs_auth).status_code
            == 200
        )

        # Leads: delivered for both, dead-lettered for the publisher without a connection
        for n in range(4):
            lead = {**MARKETPLACE_LEAD, "UserDetails": {"Email": f"lead{n}@example.com", "FirstName": f"L{n}"}}
            call("ingest", "POST", f"/api/publishers/{pw_org.name}/leads", params={"key": keys[pw_org.name]}, json=lead)
            call("ingest", "POST", f"/api/publishers/{cs_org.name}/leads", json=lead, headers=cs_auth)
            call("ingest", "POST", f"/api/publishers/{orphan}/leads", params={"key": keys[orphan]}, json=lead)
        stack.start_runtime()
        assert wait_until(lambda: len(simulator.leads(pw_org.name)) == 4 and len(simulator.leads(cs_org.name)) == 4, 60)
        assert wait_until(lambda: stack.services.status.get(orphan).consecutive_config_failures >= 4, 30)

        # Credentials that stop working at Entra: the next lead is dead-lettered CredentialsRejected
        simulator.set_user_flags(pw_org.name, username, disabled=True)
        simulator.expire_tokens(pw_org.name)
        stored = stack.services.connections.get(pw_org.name)
        assert stored is not None
        stack.services.pipeline.tokens.invalidate(stored)
        call("ingest", "POST", f"/api/publishers/{pw_org.name}/leads", json=dict(MARKETPLACE_LEAD), headers=pw_auth)
        assert wait_until(lambda: stack.services.status.get(pw_org.name).last_error_reason == "CredentialsRejected", 30)
        stack.stop_runtime()

        # What ops and publishers read
        call("dead", "GET", "/api/deadletters", headers=admin)
        call("stats", "GET", "/api/stats", headers=admin)
        call("dry", "POST", "/api/deadletters/replay", json={"dryRun": True}, headers=admin)
        for publisher, auth in ((pw_org.name, pw_auth), (cs_org.name, cs_auth)):
            call("status", "GET", f"/api/publishers/{publisher}/status", headers=auth)
            call("get", "GET", f"/api/publishers/{publisher}/connection", headers=auth)
        call(
            "test",
            "POST",
            f"/api/publishers/{cs_org.name}/connection/test",
            params={"sendTestLead": "true"},
            headers=cs_auth,
        )
        call("test-failing", "POST", f"/api/publishers/{pw_org.name}/connection/test", headers=pw_auth)
        call("health", "GET", "/api/health")

        dead_letters = [
            message for queue in STAGE_QUEUES for message in stack.services.transport.peek_dead_letters(queue, 1000)
        ]
        files_open = _all_bytes_under(data_dir)
    files_closed = _all_bytes_under(data_dir)

    # The run did what it says, so the scan below looks at something
    reasons = {message.dead_letter_reason for message in dead_letters}
    assert {"CredentialsMissing", "CredentialsRejected"} <= reasons
    assert any(label == "test-failing" and answer.status_code == 422 for label, answer in answers)
    assert len(files_closed) >= 3

    never = {
        "password": password,
        "client secret": client_secret,
        "wrong password": wrong_password,
        "wrong secret": wrong_secret,
        "admin key": ADMIN_KEY,
    }
    api_keys = {f"key of {publisher}": key for publisher, key in keys.items()}

    # Formatted as a handler would write them, tracebacks of logged exceptions included.
    formatter = logging.Formatter("%(name)s %(levelname)s %(message)s")
    log_text = "\n".join(
        formatter.format(record) for record in caplog.records if not record.name.startswith(_CLIENT_LOGGERS)
    )
    assert "CredentialsRejected" in log_text or "rejected" in log_text
    for name, secret in {**never, **api_keys}.items():
        assert secret not in log_text, f"the {name} is in a log record"
    assert not _JWT.search(log_text), "a token is in a log record"

    for label, answer in answers:
        observed = answer.text + json.dumps(dict(answer.headers))
        for name, secret in never.items():
            assert secret not in observed, f"the {name} is in the answer to {label}"
        for name, key in api_keys.items():
            if label != f"issue:{name.removeprefix('key of ')}":
                assert key not in observed, f"the {name} is in the answer to {label}"
        assert not _JWT.search(observed), f"a token is in the answer to {label}"

    for message in dead_letters:
        observed = (
            message.body.decode("utf-8", "replace")
            + json.dumps(message.application_properties)
            + str(message.dead_letter_description)
        )
        for name, secret in {**never, **api_keys}.items():
            assert secret not in observed, f"the {name} is in dead letter {message.message_id}"
        assert not _JWT.search(observed)

    for snapshot in (files_open, files_closed):
        for path, content in snapshot.items():
            for name, secret in {**never, **api_keys}.items():
                assert secret.encode() not in content, f"the {name} is in {path}"
            assert not _JWT.search(content.decode("latin-1")), f"a token is in {path}"
