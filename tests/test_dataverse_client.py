"""The Dataverse client against the local Dataverse + Entra simulator, over real HTTPS sockets."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from azure.core.exceptions import ClientAuthenticationError, ServiceRequestError
from msal.exceptions import MsalServiceError  # type: ignore[import-untyped]

from shared.crm import DataverseClient, LeadWrite, TokenProvider, WhoAmI
from shared.crm.auth import tenant_from_challenge
from shared.crm.connection import ClientSecretAuth, Connection, PasswordAuth
from shared.crm.errors import (
    error_from_response,
    error_from_token_failure,
    is_already_there,
)
from shared.crm.pacing import Pacer
from shared.errors import (
    AuthorityUnavailable,
    CredentialsRejected,
    CrmThrottled,
    CrmUnavailable,
    DeadLetter,
    LeadRejected,
    PermissionDenied,
    RetryLater,
    SolutionMissing,
    UnsafeCrmUrl,
)
from shared.http import retry_after_seconds
from shared.settings import Settings
from shared.simulator import CrmSimulator, SimOrg
from tests.fixtures.simulator import SIM_CLIENT_ID, SIM_CLIENT_SECRET, SIM_PASSWORD, simulator_settings

# --- helpers ---------------------------------------------------------------------------------------


def password_connection(
    org: SimOrg, *, password: str = SIM_PASSWORD, tenant: bool = True, username: str | None = None
) -> Connection:
    return Connection(
        url=org.url,
        auth=PasswordAuth(
            username=username or f"svc@{org.name}.example",
            password=password,
            tenant_id=org.tenant_id if tenant else None,
        ),
    )


def secret_connection(
    org: SimOrg,
    *,
    client_id: str = SIM_CLIENT_ID,
    secret: str = SIM_CLIENT_SECRET,
    tenant_id: str | None = None,
) -> Connection:
    return Connection(
        url=org.url,
        auth=ClientSecretAuth(
            tenant_id=tenant_id or org.tenant_id, client_id=client_id, client_secret=secret
        ),
    )


def lead(n: int = 0, **columns: object) -> LeadWrite:
    return LeadWrite(
        record_id=uuid.uuid5(uuid.NAMESPACE_URL, f"test/{uuid.uuid4()}/{n}"),
        columns={
            "subject": f"Lead {n}",
            "lastname": f"Lovelace {n}",
            "emailaddress1": f"ada{n}@example.com",
            **columns,
        },
    )


@pytest.fixture
def settings(simulator: CrmSimulator, tmp_path: Path) -> Settings:
    return simulator_settings(simulator, tmp_path)


@pytest.fixture
def tokens(settings: Settings) -> TokenProvider:
    return TokenProvider(settings)


@pytest.fixture
def make_client(settings: Settings, tokens: TokenProvider) -> Callable[..., DataverseClient]:
    def make(connection: Connection, **kwargs: object) -> DataverseClient:
        return DataverseClient(connection, settings, tokens=tokens, **kwargs)  # type: ignore[arg-type]

    return make


# --- authentication --------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["password", "clientSecret"])
def test_whoami_answers_for_both_kinds_of_connection(
    kind: str, simulator: CrmSimulator, crm_org: SimOrg, make_client: Callable[..., DataverseClient]
) -> None:
    connection = password_connection(crm_org) if kind == "password" else secret_connection(crm_org)

    me = make_client(connection).whoami()

    assert isinstance(me, WhoAmI)
    assert uuid.UUID(me.user_id)
    assert uuid.UUID(me.business_unit_id)
    assert uuid.UUID(me.organization_id)
    assert simulator.requests(crm_org.name).whoami == 1


def test_a_password_connection_without_tenant_discovers_it_from_the_bearer_challenge(
    simulator: CrmSimulator,
    crm_org: SimOrg,
    tokens: TokenProvider,
    make_client: Callable[..., DataverseClient],
) -> None:
    connection = password_connection(crm_org, tenant=False)

    make_client(connection).whoami()
    make_client(password_connection(crm_org, tenant=False)).whoami()

    assert tokens.tenant_discoveries == 1
    assert simulator.token_requests(crm_org.name) == 1


def test_many_calls_reuse_one_cached_token(
    simulator: CrmSimulator,
    crm_org: SimOrg,
    tokens: TokenProvider,
    make_client: Callable[..., DataverseClient],
) -> None:
    client = make_client(secret_connection(crm_org))

    for _ in range(4):
        client.whoami()
        client.solution_version("MicrosoftMarketplacesLeadIntegrationSolution")

    assert simulator.token_requests(crm_org.name) == 1
    assert tokens.token_requests == 1
    assert client.request_count == 8


def test_concurrent_first_callers_share_one_token_request(
    simulator: CrmSimulator, crm_org: SimOrg, tokens: TokenProvider
) -> None:
    connection = password_connection(crm_org)
    start = threading.Barrier(8)
    results: list[str] = []
    errors: list[BaseException] = []

    def fetch() -> None:
        start.wait()
        try:
            results.append(tokens.token(connection))
        except BaseException as exc:  # reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=fetch) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)

    assert errors == []
    assert len(results) == 8
    assert len(set(results)) == 1
    assert simulator.token_requests(crm_org.name) == 1


@pytest.mark.parametrize(
    ("setup", "entra_code"),
    [
        ("wrong_password", 50126),
        ("mfa", 50076),
        ("disabled", 50057),
        ("bad_secret", 7000215),
        ("unknown_app", 700016),
        ("unknown_tenant", 90002),
    ],
)
def test_refused_credentials_raise_credentials_rejected_with_the_entra_code(
    setup: str,
    entra_code: int,
    simulator: CrmSimulator,
    crm_org: SimOrg,
    make_client: Callable[..., DataverseClient],
) -> None:
    connection = _refused_connection(setup, simulator, crm_org)

    with pytest.raises(CredentialsRejected) as caught:
        make_client(connection).whoami()

    assert caught.value.entra_code == entra_code
    assert f"AADSTS{entra_code}" in str(caught.value)
    assert isinstance(caught.value, DeadLetter)
    assert simulator.requests(crm_org.name).whoami == 0


def _refused_connection(setup: str, simulator: CrmSimulator, org: SimOrg) -> Connection:
    if setup == "wrong_password":
        return password_connection(org, password="not-the-password")
    if setup == "mfa":
        simulator.add_user(org.name, f"mfa@{org.name}.example", "Mfa-Passw0rd!", mfa_required=True)
        return password_connection(org, username=f"mfa@{org.name}.example", password="Mfa-Passw0rd!")
    if setup == "disabled":
        simulator.add_user(org.name, f"gone@{org.name}.example", "Gone-Passw0rd!", disabled=True)
        return password_connection(org, username=f"gone@{org.name}.example", password="Gone-Passw0rd!")
    if setup == "bad_secret":
        return secret_connection(org, secret="not-the-secret")
    if setup == "unknown_app":
        return secret_connection(org, client_id=str(uuid.uuid4()))
    assert setup == "unknown_tenant"
    return secret_connection(org, tenant_id=str(uuid.uuid4()))


def test_refused_credentials_messages_tell_the_publisher_what_to_fix(
    simulator: CrmSimulator, crm_org: SimOrg, make_client: Callable[..., DataverseClient]
) -> None:
    with pytest.raises(CredentialsRejected) as wrong:
        make_client(password_connection(crm_org, password="nope")).whoami()
    with pytest.raises(CredentialsRejected) as mfa:
        make_client(_refused_connection("mfa", simulator, crm_org)).whoami()

    assert "password was rejected" in wrong.value.message
    assert "multi-factor authentication is required" in mfa.value.message


def test_a_failing_token_endpoint_is_authority_unavailable_and_retried_later(
    simulator: CrmSimulator, crm_org: SimOrg, settings: Settings
) -> None:
    simulator.faults(crm_org.name).token_fail_next(1, status=503)
    now = [0.0]
    tokens = TokenProvider(settings, monotonic=lambda: now[0])
    client = DataverseClient(secret_connection(crm_org), settings, tokens=tokens)

    with pytest.raises(AuthorityUnavailable) as caught:
        client.whoami()

    assert caught.value.status == 503
    assert isinstance(caught.value, RetryLater)
    asked = simulator.token_requests(crm_org.name)
    with pytest.raises(AuthorityUnavailable) as backing_off:
        client.whoami()  # inside the back-off: refused without asking the endpoint again
    assert backing_off.value.retry_after is not None
    assert simulator.token_requests(crm_org.name) == asked
    now[0] += backing_off.value.retry_after
    assert client.whoami().user_id  # the next attempt after the back-off gets a token
    assert simulator.requests(crm_org.name).whoami == 1


def test_a_rejected_cached_token_is_renewed_once_and_the_request_retried(
    simulator: CrmSimulator,
    crm_org: SimOrg,
    tokens: TokenProvider,
    make_client: Callable[..., DataverseClient],
) -> None:
    client = make_client(secret_connection(crm_org))
    client.whoami()
    simulator.expire_tokens(crm_org.name)

    client.whoami()

    assert simulator.token_requests(crm_org.name) == 2
    assert simulator.requests(crm_org.name).whoami == 3  # ok, refused (401), retried
    assert client.request_count == 3


# --- permissions and solution ----------------------------------------------------------------------


def test_a_principal_without_the_role_is_denied_writes_and_cannot_create_leads(
    simulator: CrmSimulator, crm_org: SimOrg, make_client: Callable[..., DataverseClient]
) -> None:
    simulator.add_user(crm_org.name, f"norole@{crm_org.name}.example", "NoRole-Passw0rd!", has_role=False)
    client = make_client(
        password_connection(crm_org, username=f"norole@{crm_org.name}.example", password="NoRole-Passw0rd!")
    )
    me = client.whoami()

    assert client.can_create_leads(me.user_id) is False
    with pytest.raises(PermissionDenied) as caught:
        client.create_lead(lead())
    assert caught.value.status == 403
    assert "Lead Writer security role" in caught.value.message
    assert simulator.leads(crm_org.name) == []


def test_a_principal_with_the_role_can_create_leads(
    crm_org: SimOrg, make_client: Callable[..., DataverseClient]
) -> None:
    client = make_client(secret_connection(crm_org))
    assert client.can_create_leads(client.whoami().user_id) is True


@pytest.mark.parametrize(
    ("installed", "expected"), [(None, None), ("0.9.0.0", "0.9.0.0"), ("1.10.2.0", "1.10.2.0")]
)
def test_solution_version_is_none_when_missing_and_the_installed_version_otherwise(
    installed: str | None,
    expected: str | None,
    simulator: CrmSimulator,
    crm_org: SimOrg,
    make_client: Callable[..., DataverseClient],
) -> None:
    simulator.set_solution(crm_org.name, installed)
    client = make_client(secret_connection(crm_org))

    assert client.solution_version("MicrosoftMarketplacesLeadIntegrationSolution") == expected
    assert client.solution_version("SomeOtherSolution") is None


def test_a_refused_solution_query_is_solution_missing_with_the_crms_message_not_a_rejected_lead(
    simulator: CrmSimulator, crm_org: SimOrg, make_client: Callable[..., DataverseClient]
) -> None:
    client = make_client(secret_connection(crm_org))
    client.whoami()  # the token and the first request are out of the way
    simulator.faults(crm_org.name).fail_next(1, status=400)

    with pytest.raises(SolutionMissing) as caught:
        client.solution_version("MicrosoftMarketplacesLeadIntegrationSolution")

    assert caught.value.status == 400
    assert "MicrosoftMarketplacesLeadIntegrationSolution" in caught.value.message
    assert "refused the query" in caught.value.message


# --- writing leads ---------------------------------------------------------------------------------


def test_writing_the_same_lead_twice_creates_one_record(
    simulator: CrmSimulator, crm_org: SimOrg, make_client: Callable[..., DataverseClient]
) -> None:
    client = make_client(secret_connection(crm_org))
    one = lead(1)

    first = client.create_lead(one)
    second = client.create_lead(one)

    assert (first.created, first.ok) == (True, True)
    assert (second.created, second.ok) == (False, True)
    records = simulator.leads(crm_org.name)
    assert len(records) == 1
    assert records[0]["leadid"] == str(one.record_id)
    assert records[0]["subject"] == "Lead 1"


def test_an_unknown_column_is_lead_rejected_with_the_crm_message(
    simulator: CrmSimulator, crm_org: SimOrg, make_client: Callable[..., DataverseClient]
) -> None:
    client = make_client(secret_connection(crm_org))

    with pytest.raises(LeadRejected) as caught:
        client.create_lead(lead(nosuchcolumn="x"))

    assert caught.value.status == 400
    assert "Could not find a property named 'nosuchcolumn'" in caught.value.message
    assert caught.value.request_id
    assert simulator.leads(crm_org.name) == []


def test_a_batch_returns_each_leads_own_outcome_in_order_and_writes_the_valid_ones(
    simulator: CrmSimulator, crm_org: SimOrg, make_client: Callable[..., DataverseClient]
) -> None:
    client = make_client(secret_connection(crm_org))
    existing = lead(1)
    client.create_lead(existing)
    new_a, invalid, new_b, too_long = lead(2), lead(3, nosuchcolumn="x"), lead(4), lead(5, firstname="x" * 51)

    results = client.create_leads([new_a, existing, invalid, new_b, too_long])

    assert [r.record_id for r in results] == [
        w.record_id for w in (new_a, existing, invalid, new_b, too_long)
    ]
    assert [(r.created, r.ok) for r in results] == [
        (True, True),
        (False, True),
        (False, False),
        (True, True),
        (False, False),
    ]
    assert isinstance(results[2].error, LeadRejected)
    assert "nosuchcolumn" in results[2].error.message
    assert isinstance(results[4].error, LeadRejected)
    assert "firstname" in results[4].error.message
    written = {record["leadid"] for record in simulator.leads(crm_org.name)}
    assert written == {str(existing.record_id), str(new_a.record_id), str(new_b.record_id)}
    log = simulator.requests(crm_org.name)
    assert (log.batches, log.batch_operations) == (1, 5)
    assert client.request_count == 2  # one create_lead, one $batch


def test_a_batch_of_more_than_1000_leads_is_refused_before_sending(
    simulator: CrmSimulator, crm_org: SimOrg, make_client: Callable[..., DataverseClient]
) -> None:
    client = make_client(secret_connection(crm_org))

    with pytest.raises(ValueError, match="1000"):
        client.create_leads([lead(i) for i in range(1001)])

    assert client.request_count == 0
    assert simulator.requests(crm_org.name).total == 0


def test_a_batch_of_1000_leads_is_one_request(
    simulator: CrmSimulator, crm_org: SimOrg, make_client: Callable[..., DataverseClient]
) -> None:
    client = make_client(secret_connection(crm_org))

    results = client.create_leads([lead(i) for i in range(1000)])

    assert all(r.created for r in results)
    assert len(simulator.leads(crm_org.name)) == 1000
    assert client.request_count == 1


def test_a_failed_batch_raises_like_a_single_request(
    simulator: CrmSimulator, crm_org: SimOrg, make_client: Callable[..., DataverseClient]
) -> None:
    client = make_client(secret_connection(crm_org))
    client.whoami()
    simulator.faults(crm_org.name).fail_next(1, status=503)

    with pytest.raises(CrmUnavailable):
        client.create_leads([lead(1), lead(2)])

    assert simulator.leads(crm_org.name) == []


# --- transient failures, throttling, redirects -----------------------------------------------------


def test_throttling_raises_with_retry_after_and_nothing_is_sent_during_the_penalty(
    simulator: CrmSimulator, crm_org: SimOrg, make_client: Callable[..., DataverseClient]
) -> None:
    pacer = Pacer()
    client = make_client(secret_connection(crm_org), pacer=pacer)
    client.whoami()
    simulator.faults(crm_org.name).throttle_next(1, retry_after=30)

    with pytest.raises(CrmThrottled) as first:
        client.create_lead(lead(1))
    sent = simulator.requests(crm_org.name).total
    with pytest.raises(CrmThrottled) as second:
        client.create_lead(lead(2))
    with pytest.raises(CrmThrottled):
        make_client(secret_connection(crm_org), pacer=pacer).create_leads([lead(3)])

    assert first.value.retry_after == 30
    assert first.value.status == 429
    assert second.value.retry_after is not None
    assert 0 < second.value.retry_after <= 30
    assert second.value.status is None  # raised here, never sent
    log = simulator.requests(crm_org.name)
    assert log.total == sent
    assert (log.throttled, log.during_penalty) == (1, 0)
    assert pacer.penalties.remaining(client.throttle_key) > 0


def test_a_penalty_is_per_crm_user(
    simulator: CrmSimulator, crm_org: SimOrg, make_client: Callable[..., DataverseClient]
) -> None:
    pacer = Pacer()
    app_client = make_client(secret_connection(crm_org), pacer=pacer)
    user_client = make_client(password_connection(crm_org), pacer=pacer)
    simulator.faults(crm_org.name).throttle_next(1, retry_after=30)
    with pytest.raises(CrmThrottled):
        app_client.whoami()

    assert user_client.whoami().user_id
    assert app_client.throttle_key != user_client.throttle_key


@pytest.mark.parametrize("status", [500, 502, 503, 504])
def test_server_errors_are_crm_unavailable(
    status: int, simulator: CrmSimulator, crm_org: SimOrg, make_client: Callable[..., DataverseClient]
) -> None:
    client = make_client(secret_connection(crm_org))
    simulator.faults(crm_org.name).fail_next(1, status=status)

    with pytest.raises(CrmUnavailable) as caught:
        client.whoami()

    assert caught.value.status == status
    assert caught.value.request_id


def test_a_hanging_crm_is_unavailable_after_the_read_timeout(
    simulator: CrmSimulator, crm_org: SimOrg, tmp_path: Path
) -> None:
    settings = simulator_settings(simulator, tmp_path, LEADWRITER_CRM_READ_TIMEOUT="0.5")
    client = DataverseClient(secret_connection(crm_org), settings, tokens=TokenProvider(settings))
    client.whoami()
    simulator.faults(crm_org.name).hang_next(1, seconds=3)

    with pytest.raises(CrmUnavailable, match="timed out"):
        client.whoami()


def test_a_connection_reset_is_crm_unavailable(
    simulator: CrmSimulator, crm_org: SimOrg, make_client: Callable[..., DataverseClient]
) -> None:
    client = make_client(secret_connection(crm_org))
    client.whoami()
    simulator.faults(crm_org.name).reset_next(1)

    with pytest.raises(CrmUnavailable):
        client.create_lead(lead(1))


def test_a_redirect_is_never_followed_and_is_permanent(
    simulator: CrmSimulator, crm_org: SimOrg, make_client: Callable[..., DataverseClient]
) -> None:
    elsewhere = simulator.add_org(f"elsewhere{uuid.uuid4().hex[:8]}")
    client = make_client(secret_connection(crm_org))
    client.whoami()
    simulator.faults(crm_org.name).redirect_next(1, f"{elsewhere.url}/api/data/v9.2/WhoAmI")

    with pytest.raises(PermissionDenied) as caught:
        client.whoami()

    assert "redirect" in caught.value.message
    assert "never followed" in caught.value.message
    assert caught.value.status == 302
    assert isinstance(caught.value, DeadLetter)
    assert simulator.requests(elsewhere.name).total == 0


def test_an_unsafe_crm_url_is_refused_before_any_request(settings: Settings, tokens: TokenProvider) -> None:
    connection = Connection(
        url="https://contoso.crm4.dynamics.com.evil.example",
        auth=ClientSecretAuth(tenant_id="t", client_id="c", client_secret="s"),
    )
    with pytest.raises(UnsafeCrmUrl):
        DataverseClient(connection, settings, tokens=tokens)
    with pytest.raises(UnsafeCrmUrl):
        tokens.token(connection)
    assert tokens.token_requests == 0


def test_a_token_is_renewed_about_five_minutes_before_it_expires(
    simulator: CrmSimulator, crm_org: SimOrg, settings: Settings
) -> None:
    now = [time.time()]
    tokens = TokenProvider(settings, clock=lambda: now[0])
    connection = secret_connection(crm_org)
    first = tokens.token(connection)

    now[0] += 3599 - 301  # the simulator's tokens live 3599 s
    assert tokens.token(connection) == first
    assert tokens.token_requests == 1

    now[0] += 2
    tokens.token(connection)
    assert tokens.token_requests == 2


# --- pure parts: the challenge, the status mapping, the token-failure mapping ---------------------


@pytest.mark.parametrize(
    ("challenge", "tenant"),
    [
        (
            "Bearer authorization_uri=https://login.microsoftonline.com/"
            "2B4DB7EF-545E-4B64-B681-1288DE33AB41/oauth2/authorize, resource_id=https://x.crm.dynamics.com/",
            "2b4db7ef-545e-4b64-b681-1288de33ab41",
        ),
        (
            'Bearer authorization_uri="https://login.microsoftonline.com/contoso.onmicrosoft.com/oauth2/authorize"',
            "contoso.onmicrosoft.com",
        ),
        # Only the tenant is taken: a challenge naming another host changes nothing about where we sign in.
        ("Bearer authorization_uri=https://attacker.example/contoso.com/oauth2/authorize", "contoso.com"),
        ("Bearer authorization_uri=https://login.microsoftonline.com/common/oauth2/authorize", None),
        ("Bearer authorization_uri=https://login.microsoftonline.com/../oauth2/authorize", None),
        ("Bearer authorization_uri=https://login.microsoftonline.com/a%2fb/oauth2/authorize", None),
        ("Bearer authorization_uri=https://login.microsoftonline.com/", None),
        ("Bearer realm=x", None),
        ("", None),
    ],
)
def test_only_a_valid_tenant_is_taken_from_a_bearer_challenge(challenge: str, tenant: str | None) -> None:
    assert tenant_from_challenge(challenge) == tenant


def _odata(code: str, message: str) -> bytes:
    return json.dumps({"error": {"code": code, "message": message}}).encode()


@pytest.mark.parametrize(
    ("status", "headers", "write", "kind"),
    [
        (302, {"Location": "https://elsewhere.example/x?token=1"}, False, PermissionDenied),
        (400, {}, False, LeadRejected),
        (400, {}, True, LeadRejected),
        (401, {}, True, PermissionDenied),
        (403, {}, True, PermissionDenied),
        (404, {}, True, LeadRejected),
        (404, {}, False, PermissionDenied),
        (405, {}, True, LeadRejected),
        (408, {}, True, CrmUnavailable),
        (429, {"Retry-After": "7"}, True, CrmThrottled),
        (500, {}, True, CrmUnavailable),
        (503, {}, False, CrmUnavailable),
    ],
)
def test_each_status_maps_to_the_error_that_says_what_to_do_next(
    status: int, headers: dict[str, str], write: bool, kind: type[Exception]
) -> None:
    error = error_from_response(
        status,
        {**headers, "x-ms-service-request-id": "req-1"},
        _odata("0x80040220", "the CRM's own words"),
        operation="create lead",
        write=write,
    )
    assert type(error) is kind
    assert error.status == status
    assert error.request_id == "req-1"
    assert error.code == "0x80040220"


def test_a_redirect_error_names_only_the_target_host() -> None:
    error = error_from_response(
        301, {"Location": "https://user:pw@elsewhere.example/path?token=abc"}, b"", operation="WhoAmI"
    )
    assert "elsewhere.example" in error.message
    assert "token=abc" not in error.message
    assert "pw" not in error.message


def test_a_crm_message_is_carried_but_token_like_text_in_it_is_cut_out() -> None:
    jwt = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJl"
    error = error_from_response(
        400, {"REQ_ID": "r2"}, _odata("", f"Bad value; header was Bearer {jwt} and {jwt}"), operation="x"
    )
    assert "Bad value" in error.message
    assert jwt not in error.message
    assert error.request_id == "r2"
    assert error.code is None


@pytest.mark.parametrize(
    ("value", "seconds"),
    [("7", 7.0), ("0.5", 0.5), ("", 30.0), ("soon", 30.0), ("-3", 0.0), ("999999", 3600.0), ("nan", 30.0)],
)
def test_retry_after_is_read_in_seconds_and_bounded(value: str, seconds: float) -> None:
    assert retry_after_seconds({"Retry-After": value}) == seconds


@pytest.mark.parametrize(
    ("body", "status", "already"),
    [
        (b"", 412, True),
        (_odata("0x80040237", "Cannot insert duplicate key."), 400, True),
        (_odata("", "A record with a duplicate key exists"), 500, True),
        (_odata("0x80048d19", "Invalid property"), 400, False),
        (b"", 404, False),
    ],
)
def test_a_create_that_finds_the_record_is_recognised_as_delivered_before(
    body: bytes, status: int, already: bool
) -> None:
    assert is_already_there(status, body) is already


def _msal_error(description: str) -> ClientAuthenticationError:
    try:
        raise MsalServiceError("HTTP Error", error="invalid_grant", error_description=description)
    except MsalServiceError as inner:
        try:
            raise ClientAuthenticationError(message=f"Authentication failed: {description}") from inner
        except ClientAuthenticationError as outer:
            return outer


@pytest.mark.parametrize(
    ("exc", "kind", "entra_code"),
    [
        (_msal_error("AADSTS50126: Error validating credentials. Trace ID: x"), CredentialsRejected, 50126),
        (
            _msal_error("AADSTS7000222: The provided client secret keys are expired."),
            CredentialsRejected,
            7000222,
        ),
        (_msal_error("AADSTS99999: Something new."), CredentialsRejected, 99999),
        (ClientAuthenticationError(message='{"error_codes": [50057]}'), CredentialsRejected, 50057),
        (
            ClientAuthenticationError(message="Authentication failed: HTTP Error: 503"),
            AuthorityUnavailable,
            None,
        ),
        (
            ClientAuthenticationError(message="Authentication failed: HTTP Error: 429"),
            AuthorityUnavailable,
            None,
        ),
        (ServiceRequestError("Connection refused"), AuthorityUnavailable, None),
        (
            ClientAuthenticationError(message="Unexpected response from Microsoft Entra ID"),
            AuthorityUnavailable,
            None,
        ),
    ],
)
def test_token_failures_map_to_rejected_credentials_or_an_unavailable_authority(
    exc: Exception, kind: type[Exception], entra_code: int | None
) -> None:
    error = error_from_token_failure(exc)
    assert type(error) is kind
    assert getattr(error, "entra_code", None) == entra_code
    if entra_code is not None:
        assert f"AADSTS{entra_code}" in str(error)
