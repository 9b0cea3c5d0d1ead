"""Who may call what (architecture §6), over a real socket: 401 for no key or an invalid one, 403 for a
valid key outside its scope, and nothing read or changed in either case."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from shared.names import QUEUE_INCOMING
from shared.ops.apikeys import RECORD_PREFIX, StateRecords
from shared.secretstore.base import secret_name_for
from shared.transport.base import OutgoingMessage
from tests.fixtures.api import ADMIN_KEY, MARKETPLACE_LEAD, ApiStack, api_stack

CONNECTION_BODY = {
    "url": "https://contoso.crm4.dynamics.com",
    "auth": {"kind": "password", "username": "svc@contoso.example", "password": "Not-Used-Here-1!"},
}

#: (method, path template, JSON body) of every route that needs a key; {p} is the target publisher.
PUBLISHER_ROUTES: list[tuple[str, str, Any]] = [
    ("PUT", "/api/publishers/{p}/connection?verify=false", CONNECTION_BODY),
    ("GET", "/api/publishers/{p}/connection", None),
    ("DELETE", "/api/publishers/{p}/connection", None),
    ("POST", "/api/publishers/{p}/connection/test", None),
    ("GET", "/api/publishers/{p}/status", None),
    ("POST", "/api/publishers/{p}/leads", dict(MARKETPLACE_LEAD)),
    ("PUT", "/api/publishers/{p}/mapping?validate=false", {"leadSourceCode": 8}),
    ("GET", "/api/publishers/{p}/mapping", None),
]
ADMIN_ROUTES: list[tuple[str, str, Any]] = [
    ("POST", "/api/admin/publishers/{p}/keys", None),
    ("DELETE", "/api/admin/publishers/{p}/keys", None),
    ("GET", "/api/deadletters", None),
    ("POST", "/api/deadletters/replay", {"dryRun": True}),
    ("POST", "/api/deadletters/purge", {"confirm": True}),
    ("GET", "/api/stats", None),
]
ALL_ROUTES = PUBLISHER_ROUTES + ADMIN_ROUTES


def _ids(routes: list[tuple[str, str, Any]]) -> list[str]:
    return [f"{method} {path}" for method, path, _ in routes]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiStack]:
    with api_stack(tmp_path_factory.mktemp("auth") / "data") as running:
        yield running


@pytest.fixture(scope="module")
def keys(stack: ApiStack) -> dict[str, str]:
    """Keys of publishers ``alpha`` and ``beta``, and a revoked key of ``gamma``."""
    issued = {name: stack.key_for(name) for name in ("alpha", "beta", "gamma")}
    assert stack.client.delete("/api/admin/publishers/gamma/keys", headers=stack.admin()).status_code == 204
    return issued


def _call(stack: ApiStack, method: str, path: str, body: Any, publisher: str, headers: dict[str, str]) -> Any:
    return stack.client.request(method, path.format(p=publisher), json=body, headers=headers)


@pytest.mark.parametrize(("method", "path", "body"), ALL_ROUTES, ids=_ids(ALL_ROUTES))
@pytest.mark.parametrize(
    "authorization",
    [None, "Bearer", "Bearer not-a-key", "Bearer lw_alpha_00000000_forged", "Basic YWxwaGE6eA==", "lw_alpha_x_y"],
)
def test_no_key_or_an_invalid_key_is_401_with_a_bearer_challenge(
    stack: ApiStack, keys: dict[str, str], method: str, path: str, body: Any, authorization: str | None
) -> None:
    headers = {"Authorization": authorization} if authorization is not None else {}
    answer = _call(stack, method, path, body, "alpha", headers)
    assert answer.status_code == 401, answer.text
    assert answer.headers["WWW-Authenticate"] == "Bearer"
    assert answer.json()["error"]


@pytest.mark.parametrize(("method", "path", "body"), ALL_ROUTES, ids=_ids(ALL_ROUTES))
def test_a_revoked_key_is_401(stack: ApiStack, keys: dict[str, str], method: str, path: str, body: Any) -> None:
    answer = _call(stack, method, path, body, "gamma", stack.bearer(keys["gamma"]))
    assert answer.status_code == 401


@pytest.mark.parametrize(("method", "path", "body"), PUBLISHER_ROUTES, ids=_ids(PUBLISHER_ROUTES))
def test_publisher_a_key_on_publisher_b_is_403(
    stack: ApiStack, keys: dict[str, str], method: str, path: str, body: Any
) -> None:
    answer = _call(stack, method, path, body, "beta", stack.bearer(keys["alpha"]))
    assert answer.status_code == 403
    assert "WWW-Authenticate" not in answer.headers


@pytest.mark.parametrize(("method", "path", "body"), ADMIN_ROUTES, ids=_ids(ADMIN_ROUTES))
def test_a_publisher_key_on_an_admin_route_is_403_even_for_its_own_publisher(
    stack: ApiStack, keys: dict[str, str], method: str, path: str, body: Any
) -> None:
    answer = _call(stack, method, path, body, "alpha", stack.bearer(keys["alpha"]))
    assert answer.status_code == 403


def test_an_unauthenticated_malformed_body_is_refused_401_before_it_is_parsed(stack: ApiStack) -> None:
    answer = stack.client.put(
        "/api/publishers/alpha/connection", content=b"{not json", headers={"Content-Type": "application/json"}
    )
    assert answer.status_code == 401


def test_a_foreign_key_changes_and_reveals_nothing(stack: ApiStack, keys: dict[str, str]) -> None:
    # Given beta has a connection and a dead letter
    admin = stack.admin()
    stored = stack.client.put("/api/publishers/beta/connection?verify=false", json=CONNECTION_BODY, headers=admin)
    assert stored.status_code == 200
    before = stack.services.connections.get("beta")
    stack.services.transport.send(
        QUEUE_INCOMING,
        [
            OutgoingMessage(
                body=b'{"publisherId": "beta"}', message_id="beta-dl", application_properties={"publisherId": "beta"}
            )
        ],
    )
    [message] = stack.services.transport.receive(QUEUE_INCOMING, max_messages=1)
    stack.services.transport.dead_letter(message, "CredentialsMissing", "no connection")
    alpha = stack.bearer(keys["alpha"])
    # When alpha's key tries to replace, delete, read and purge beta's things
    other_body = {**CONNECTION_BODY, "url": "https://other.crm.dynamics.com"}
    attempts = [
        stack.client.put("/api/publishers/beta/connection?verify=false", json=other_body, headers=alpha),
        stack.client.delete("/api/publishers/beta/connection", headers=alpha),
        stack.client.get("/api/publishers/beta/connection", headers=alpha),
        stack.client.post("/api/deadletters/purge", json={"confirm": True, "publisherId": "beta"}, headers=alpha),
        stack.client.post("/api/admin/publishers/beta/keys", headers=alpha),
    ]
    # Then each is 403, answers nothing of beta's, and beta's connection, key and dead letter are intact
    assert [answer.status_code for answer in attempts] == [403] * len(attempts)
    assert all("contoso" not in answer.text and "svc@" not in answer.text for answer in attempts)
    assert stack.services.connections.get("beta") == before
    assert stack.services.api_keys.verify(keys["beta"]) == "beta"
    listed = stack.client.get("/api/deadletters", params={"publisherId": "beta"}, headers=admin).json()["items"]
    assert [item["messageId"] for item in listed] == ["beta-dl"]


def test_the_admin_key_reaches_every_publisher_and_admin_route(stack: ApiStack) -> None:
    admin = stack.admin()
    for method, path, body in ALL_ROUTES:
        answer = _call(stack, method, path, body, "delta", admin)
        # The route ran: whatever it answers, it is not an auth refusal.
        assert answer.status_code not in (401, 403), f"{method} {path}: {answer.status_code} {answer.text}"


def test_ingest_takes_the_publisher_key_as_a_query_parameter(stack: ApiStack, keys: dict[str, str]) -> None:
    answer = stack.client.post(
        "/api/publishers/alpha/leads", params={"key": keys["alpha"]}, json=dict(MARKETPLACE_LEAD)
    )
    assert answer.status_code == 202
    foreign = stack.client.post(
        "/api/publishers/beta/leads", params={"key": keys["alpha"]}, json=dict(MARKETPLACE_LEAD)
    )
    assert foreign.status_code == 403


@pytest.mark.parametrize("path", ["/api/publishers/alpha/status", "/api/publishers/alpha/connection"])
def test_a_query_key_is_refused_everywhere_but_ingest(stack: ApiStack, keys: dict[str, str], path: str) -> None:
    answer = stack.client.get(path, params={"key": keys["alpha"]})
    assert answer.status_code == 401


def test_the_admin_key_is_never_accepted_in_the_url(stack: ApiStack) -> None:
    answer = stack.client.post("/api/publishers/alpha/leads", params={"key": ADMIN_KEY}, json=dict(MARKETPLACE_LEAD))
    assert answer.status_code == 401


def test_a_reissued_key_replaces_the_previous_one(stack: ApiStack) -> None:
    first = stack.key_for("epsilon")
    second = stack.key_for("epsilon")
    assert first != second
    assert stack.client.get("/api/publishers/epsilon/status", headers=stack.bearer(first)).status_code == 401
    assert stack.client.get("/api/publishers/epsilon/status", headers=stack.bearer(second)).status_code == 200


def test_issuing_a_key_answers_it_once_and_stores_only_its_hash(stack: ApiStack) -> None:
    answer = stack.client.post("/api/admin/publishers/zeta/keys", headers=stack.admin())
    assert answer.status_code == 201
    assert answer.json()["publisherId"] == "zeta"
    key = answer.json()["key"]
    record = StateRecords(stack.services.state).get(secret_name_for("zeta", prefix=RECORD_PREFIX))
    assert record is not None
    assert key not in record
    assert all(key not in (stack.services.secrets.get(name) or "") for name in stack.services.secrets.list_names())
    raw = b"".join(path.read_bytes() for path in Path(stack.data_dir).rglob("*") if path.is_file())
    assert key.encode() not in raw


def test_revoking_a_key_that_does_not_exist_is_404(stack: ApiStack) -> None:
    answer = stack.client.delete("/api/admin/publishers/nobody/keys", headers=stack.admin())
    assert answer.status_code == 404


def test_without_an_admin_key_setting_admin_routes_refuse_everyone_but_publisher_keys_work(tmp_path: Path) -> None:
    with api_stack(tmp_path / "data") as configured:
        key = configured.key_for("alpha")
    with api_stack(tmp_path / "data", admin_key=None) as stack:
        for method, path, body in ADMIN_ROUTES:
            answer = _call(stack, method, path, body, "alpha", stack.bearer(ADMIN_KEY))
            assert answer.status_code == 401, f"{method} {path}"
        assert stack.client.get("/api/publishers/alpha/status", headers=stack.bearer(key)).status_code == 200
        assert stack.client.get("/api/publishers/alpha/status", headers=stack.bearer(ADMIN_KEY)).status_code == 401
