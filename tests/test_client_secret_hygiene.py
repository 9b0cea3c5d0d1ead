"""No password, client secret or access token in any exception (or its chain) or log line the Dataverse
client produces, in every failure it knows, with logging at DEBUG."""

from __future__ import annotations

import logging
import traceback
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from shared.crm import DataverseClient, LeadWrite, TokenProvider
from shared.crm.connection import ClientSecretAuth, Connection, PasswordAuth
from shared.crm.pacing import Pacer
from shared.errors import LeadWriterError
from shared.settings import Settings
from shared.simulator import CrmSimulator, SimOrg
from tests.fixtures.simulator import SIM_CLIENT_SECRET, SIM_PASSWORD, simulator_settings

# Distinctive secrets so that a leak cannot hide behind a common substring.
USER_PASSWORD = "Pw-" + uuid.uuid4().hex
APP_SECRET = "Sec-" + uuid.uuid4().hex
WRONG_PASSWORD = "WrongPw-" + uuid.uuid4().hex
WRONG_SECRET = "WrongSec-" + uuid.uuid4().hex


def _lead() -> LeadWrite:
    return LeadWrite(uuid.uuid4(), {"subject": "hygiene", "lastname": "Test"})


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    stack: list[BaseException | None] = [exc]
    while stack:
        current = stack.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        stack += [current.__cause__, current.__context__]


class Scenario:
    """One failure case: sets the simulator up, then performs the failing call."""

    def __init__(
        self, simulator: CrmSimulator, org: SimOrg, settings: Settings, tokens: TokenProvider
    ) -> None:
        self.simulator, self.org, self.settings, self.tokens = simulator, org, settings, tokens
        self.user = f"hyg-{uuid.uuid4().hex[:6]}@{org.name}.example"
        self.app = str(uuid.uuid4())
        simulator.add_user(org.name, self.user, USER_PASSWORD)
        simulator.add_app(org.name, self.app, APP_SECRET)

    def user_connection(self, password: str = USER_PASSWORD, *, tenant: bool = True) -> Connection:
        return Connection(
            url=self.org.url,
            auth=PasswordAuth(
                username=self.user, password=password, tenant_id=self.org.tenant_id if tenant else None
            ),
        )

    def app_connection(
        self, secret: str = APP_SECRET, *, client_id: str | None = None, tenant_id: str | None = None
    ) -> Connection:
        return Connection(
            url=self.org.url,
            auth=ClientSecretAuth(
                tenant_id=tenant_id or self.org.tenant_id,
                client_id=client_id or self.app,
                client_secret=secret,
            ),
        )

    def client(self, connection: Connection, settings: Settings | None = None) -> DataverseClient:
        return DataverseClient(
            connection, settings or self.settings, tokens=self.tokens, pacer=Pacer()
        )


def _wrong_password(s: Scenario) -> None:
    s.client(s.user_connection(WRONG_PASSWORD)).whoami()


def _wrong_password_discovered_tenant(s: Scenario) -> None:
    s.client(s.user_connection(WRONG_PASSWORD, tenant=False)).whoami()


def _mfa(s: Scenario) -> None:
    name = f"mfa-{uuid.uuid4().hex[:6]}@{s.org.name}.example"
    s.simulator.add_user(s.org.name, name, USER_PASSWORD, mfa_required=True)
    s.client(Connection(url=s.org.url, auth=PasswordAuth(username=name, password=USER_PASSWORD))).whoami()


def _disabled(s: Scenario) -> None:
    name = f"off-{uuid.uuid4().hex[:6]}@{s.org.name}.example"
    s.simulator.add_user(s.org.name, name, USER_PASSWORD, disabled=True)
    s.client(Connection(url=s.org.url, auth=PasswordAuth(username=name, password=USER_PASSWORD))).whoami()


def _bad_secret(s: Scenario) -> None:
    s.client(s.app_connection(WRONG_SECRET)).whoami()


def _unknown_app(s: Scenario) -> None:
    s.client(s.app_connection(client_id=str(uuid.uuid4()))).whoami()


def _unknown_tenant(s: Scenario) -> None:
    s.client(s.app_connection(tenant_id=str(uuid.uuid4()))).whoami()


def _token_endpoint_down(s: Scenario) -> None:
    name = f"new-{uuid.uuid4().hex[:6]}@{s.org.name}.example"
    s.simulator.add_user(s.org.name, name, USER_PASSWORD)
    s.simulator.faults(s.org.name).token_fail_next(1, status=503)
    s.client(Connection(url=s.org.url, auth=PasswordAuth(username=name, password=USER_PASSWORD))).whoami()


def _missing_role(s: Scenario) -> None:
    s.simulator.set_role(s.org.name, s.user, False)
    s.client(s.user_connection()).create_lead(_lead())


def _bad_column(s: Scenario) -> None:
    s.client(s.app_connection()).create_lead(LeadWrite(uuid.uuid4(), {"nosuchcolumn": USER_PASSWORD[:3]}))


def _throttled_twice(s: Scenario) -> None:
    client = s.client(s.app_connection())
    client.whoami()
    s.simulator.faults(s.org.name).throttle_next(1, retry_after=30)
    try:
        client.create_lead(_lead())
    except LeadWriterError:
        client.create_lead(_lead())


def _server_error(s: Scenario) -> None:
    client = s.client(s.user_connection())
    client.whoami()
    s.simulator.faults(s.org.name).fail_next(1, status=503)
    client.create_leads([_lead(), _lead()])


def _hang(s: Scenario) -> None:
    settings = simulator_settings(s.simulator, Path(s.settings.data_dir), LEADWRITER_CRM_READ_TIMEOUT="0.5")
    client = s.client(s.app_connection(), settings)
    client.whoami()
    s.simulator.faults(s.org.name).hang_next(1, seconds=2)
    client.whoami()


def _reset(s: Scenario) -> None:
    client = s.client(s.user_connection())
    client.whoami()
    s.simulator.faults(s.org.name).reset_next(1)
    client.create_lead(_lead())


def _redirect(s: Scenario) -> None:
    client = s.client(s.app_connection())
    client.whoami()
    s.simulator.faults(s.org.name).redirect_next(1, "https://attacker.example/collect")
    client.whoami()


def _revoked_then_refused(s: Scenario) -> None:
    client = s.client(s.user_connection())
    client.whoami()
    s.simulator.expire_tokens(s.org.name)
    s.simulator.set_role(s.org.name, s.user, False)
    client.create_lead(_lead())


SCENARIOS: dict[str, Callable[[Scenario], None]] = {
    "wrong password": _wrong_password,
    "wrong password, discovered tenant": _wrong_password_discovered_tenant,
    "mfa": _mfa,
    "disabled": _disabled,
    "bad secret": _bad_secret,
    "unknown app": _unknown_app,
    "unknown tenant": _unknown_tenant,
    "token endpoint 503": _token_endpoint_down,
    "missing role": _missing_role,
    "bad column": _bad_column,
    "throttled twice": _throttled_twice,
    "server error on batch": _server_error,
    "hang": _hang,
    "reset": _reset,
    "redirect": _redirect,
    "revoked token, then refused": _revoked_then_refused,
}


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_no_secret_or_token_appears_in_errors_or_logs(
    name: str, simulator: CrmSimulator, crm_org: SimOrg, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = simulator_settings(simulator, tmp_path)
    tokens = TokenProvider(settings)
    scenario = Scenario(simulator, crm_org, settings, tokens)
    # Tokens that were really issued in this test, so that a leak of one would be caught.
    issued = [tokens.token(scenario.user_connection()), tokens.token(scenario.app_connection())]
    caplog.set_level(logging.DEBUG)

    with pytest.raises(LeadWriterError) as caught:
        SCENARIOS[name](scenario)

    texts: list[str] = []
    for link in _chain(caught.value):
        texts += [str(link), repr(link), repr(getattr(link, "args", ()))]
    texts.append("".join(traceback.format_exception(caught.value)))
    for record in caplog.records:
        texts.append(record.getMessage())
        if record.exc_info:
            texts.append("".join(traceback.format_exception(*record.exc_info)))
    texts.append(caplog.text)
    forbidden = {
        "user password": USER_PASSWORD,
        "app secret": APP_SECRET,
        "wrong password": WRONG_PASSWORD,
        "wrong secret": WRONG_SECRET,
        "simulator password": SIM_PASSWORD,
        "simulator secret": SIM_CLIENT_SECRET,
    }
    for index, token in enumerate(issued + _tokens_issued_since(tokens, scenario)):
        forbidden[f"access token {index}"] = token
        forbidden[f"access token {index} (signature)"] = token.rsplit(".", 1)[-1]
    everything = "\n".join(texts)
    leaks = [label for label, secret in forbidden.items() if secret and secret in everything]
    assert leaks == []
    assert caplog.records, "the scenario logged nothing at DEBUG: the check proved nothing"


def _tokens_issued_since(tokens: TokenProvider, scenario: Scenario) -> list[str]:
    """Tokens the provider holds now (a scenario may have renewed one)."""
    found: list[str] = []
    for connection in (scenario.user_connection(), scenario.app_connection()):
        try:
            found.append(tokens.token(connection))
        except LeadWriterError:
            continue
    return found
