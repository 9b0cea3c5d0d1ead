"""Failed sign-ins never lock an account: a credential Entra rejected is not tried
again until the connection changes or the back-off passes, and while the token endpoint fails each
principal backs off — counted as token requests at the simulator's Entra, over real sockets."""

from __future__ import annotations

import threading
import uuid
from pathlib import Path

import pytest

from shared.crm import TokenProvider
from shared.crm.auth import (
    AUTHORITY_BACKOFF_MAX_SECONDS,
    REJECTION_BACKOFF_SECONDS,
    AuthorityBackingOff,
    authority_backoff,
)
from shared.crm.connection import ClientSecretAuth, Connection, PasswordAuth
from shared.errors import AuthorityUnavailable, CredentialsRejected, CrmPaced, DeadLetterReason
from shared.settings import Settings
from shared.simulator import CrmSimulator, SimOrg
from tests.fixtures.harness import lead_message, running
from tests.fixtures.simulator import SIM_CLIENT_ID, SIM_CLIENT_SECRET, SIM_PASSWORD, simulator_settings


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def settings(simulator: CrmSimulator, tmp_path: Path) -> Settings:
    return simulator_settings(simulator, tmp_path)


def secret_connection(org: SimOrg, secret: str = SIM_CLIENT_SECRET) -> Connection:
    return Connection(
        url=org.url, auth=ClientSecretAuth(tenant_id=org.tenant_id, client_id=SIM_CLIENT_ID, client_secret=secret)
    )


def password_connection(org: SimOrg, password: str) -> Connection:
    return Connection(
        url=org.url,
        auth=PasswordAuth(username=f"svc@{org.name}.example", password=password, tenant_id=org.tenant_id),
    )


@pytest.mark.parametrize("kind", ["password", "clientSecret"])
def test_a_rejected_credential_is_not_tried_again_until_the_connection_changes(
    simulator: CrmSimulator, crm_org: SimOrg, settings: Settings, kind: str
) -> None:
    clock = Clock()
    tokens = TokenProvider(settings, monotonic=clock)
    bad = password_connection(crm_org, "wrong") if kind == "password" else secret_connection(crm_org, "wrong")
    before = simulator.token_requests(crm_org.name)

    for _ in range(50):
        with pytest.raises(CredentialsRejected) as caught:
            tokens.token(bad)
        tokens.invalidate(bad)  # what a CRM 401 or a verification does: it must not lift the memory
    assert simulator.token_requests(crm_org.name) - before == 1
    assert caught.value.reason == DeadLetterReason.CREDENTIALS_REJECTED
    assert caught.value.entra_code is not None
    assert "not tried again" in caught.value.message

    good = password_connection(crm_org, SIM_PASSWORD) if kind == "password" else secret_connection(crm_org)
    assert tokens.token(good)
    assert simulator.token_requests(crm_org.name) - before == 2


def test_a_rejected_credential_is_tried_once_more_after_the_back_off(
    simulator: CrmSimulator, crm_org: SimOrg, settings: Settings
) -> None:
    clock = Clock()
    tokens = TokenProvider(settings, monotonic=clock)
    bad = secret_connection(crm_org, "wrong")
    before = simulator.token_requests(crm_org.name)
    with pytest.raises(CredentialsRejected):
        tokens.token(bad)
    clock.now += REJECTION_BACKOFF_SECONDS - 1
    with pytest.raises(CredentialsRejected):
        tokens.token(bad)
    assert simulator.token_requests(crm_org.name) - before == 1
    clock.now += 2
    with pytest.raises(CredentialsRejected):
        tokens.token(bad)
    assert simulator.token_requests(crm_org.name) - before == 2


def test_concurrent_callers_with_a_rejected_credential_cost_one_sign_in(
    simulator: CrmSimulator, crm_org: SimOrg, settings: Settings
) -> None:
    tokens = TokenProvider(settings)
    bad = secret_connection(crm_org, "wrong")
    before = simulator.token_requests(crm_org.name)
    refused: list[BaseException] = []

    def call() -> None:
        try:
            tokens.token(bad)
        except CredentialsRejected as exc:
            refused.append(exc)

    threads = [threading.Thread(target=call) for _ in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert len(refused) == 20
    assert simulator.token_requests(crm_org.name) - before == 1


def test_while_the_token_endpoint_fails_each_principal_backs_off_without_asking(
    simulator: CrmSimulator, crm_org: SimOrg, settings: Settings
) -> None:
    clock = Clock()
    tokens = TokenProvider(settings, monotonic=clock)
    connection = secret_connection(crm_org)
    simulator.faults(crm_org.name).token_fail_next(1000, status=503)
    before = simulator.token_requests(crm_org.name)
    waits: list[float | None] = []
    # One minute of a failing endpoint with a lead every 0.1 s: a handful of requests, not 600.
    for _ in range(600):
        with pytest.raises(AuthorityUnavailable) as caught:
            tokens.token(connection)
        if isinstance(caught.value, AuthorityBackingOff):
            waits.append(caught.value.retry_after)
        clock.now += 0.1
    made = simulator.token_requests(crm_org.name) - before
    assert 3 <= made <= 8, made
    # Every other caller was told how long to wait, as a wait that spends no retry attempt.
    assert len(waits) == 600 - made
    assert all(wait is not None and wait > 0 for wait in waits)
    assert issubclass(AuthorityBackingOff, CrmPaced)
    simulator.faults(crm_org.name).clear()
    clock.now += AUTHORITY_BACKOFF_MAX_SECONDS
    assert tokens.token(connection)
    # Recovered: the next failure starts the back-off from the beginning again.
    assert simulator.token_requests(crm_org.name) - before == made + 1


@pytest.mark.parametrize(
    ("failures", "retry_after", "expected"),
    [(1, None, 2.0), (2, None, 4.0), (3, None, 8.0), (6, None, 60.0), (50, None, 60.0), (1, 30.0, 30.0)],
)
def test_authority_backoff_doubles_up_to_a_minute_and_retry_after_wins(
    failures: int, retry_after: float | None, expected: float
) -> None:
    assert authority_backoff(failures, retry_after) == expected


def test_the_provider_forgets_the_least_recently_used_entries_past_its_bound(
    simulator: CrmSimulator, crm_org: SimOrg, settings: Settings
) -> None:
    tokens = TokenProvider(settings, max_entries=3)
    for _ in range(10):
        with pytest.raises(CredentialsRejected):
            tokens.token(secret_connection(crm_org, f"rotated-{uuid.uuid4()}"))
    assert tokens.token(secret_connection(crm_org))
    for name in ("_locks", "_tokens", "_credentials", "_tenants", "_rejections", "_outages"):
        assert len(getattr(tokens, name)) <= 3, name


def test_leads_of_a_rotated_password_dead_letter_credentials_rejected_after_one_sign_in(
    simulator: CrmSimulator, tmp_path: Path
) -> None:
    with running(simulator, tmp_path) as h:
        publisher = h.publisher(kind="password", wrong_secret=True)
        before = simulator.token_requests(publisher)
        h.send([lead_message(publisher, n) for n in range(47)])
        h.start()
        h.wait_for(lambda: len(h.dead_letters()) == 47)
        assert {item.reason for item in h.dead_letters()} == {DeadLetterReason.CREDENTIALS_REJECTED}
        assert simulator.token_requests(publisher) - before == 1


def test_an_outage_of_the_token_endpoint_while_leads_flow_dead_letters_nothing_and_asks_a_handful_of_times(
    simulator: CrmSimulator, tmp_path: Path
) -> None:
    with running(simulator, tmp_path) as h:
        publisher, other = h.publisher(), h.publisher()
        # Four failed token requests in a row: with the back-off (2, 4, 8, 16 s) about half a minute of
        # outage, longer than the test's whole retry schedule (8 attempts, 6.4 s) would survive if the
        # leads spent an attempt each time they were told to wait.
        simulator.faults(publisher).token_fail_next(4, status=503)
        h.send([lead_message(p, n) for n in range(20) for p in (publisher, other)])
        h.start()
        h.wait_for(lambda: len(h.written(other)) == 20, timeout=60)
        h.wait_for(lambda: len(h.written(publisher)) == 20, timeout=120)
        assert h.dead_letters() == []
        assert simulator.token_requests(publisher) <= 6
