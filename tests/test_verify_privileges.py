"""Setup that tells the truth: the verification report names the exact privilege the
Lead Writer role lacks (read live with RetrieveUserPrivileges from the simulator, whose org config can take
single privileges out of the role), and a password connection stopped by MFA is steered to the Entra app
(clientSecret) option."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from shared.crm import LeadWrite
from shared.crm.client import LEAD_WRITER_PRIVILEGES
from shared.crm.connection import Connection, PasswordAuth
from shared.crm.errors import error_from_token_failure
from shared.errors import CredentialsRejected, PermissionDenied
from shared.pipeline.lead import lead_record_id
from shared.simulator import CrmSimulator, SimOrg
from shared.simulator.config import SimulatorConfigError, parse_org
from tests.fixtures.api import ApiStack, api_stack, client_secret_body, password_body
from tests.fixtures.simulator import SIM_CLIENT_ID, SIM_CLIENT_SECRET, SIM_PASSWORD, sim_username


@pytest.fixture
def stack(simulator: CrmSimulator, tmp_path: Path) -> Iterator[ApiStack]:
    with api_stack(tmp_path / "data", simulator) as running:
        yield running


def _connection(org: SimOrg) -> Connection:
    return Connection(url=org.url, auth=PasswordAuth(username=sim_username(org), password=SIM_PASSWORD))


@pytest.mark.parametrize(
    "privilege",
    [
        "prvCreateLead",
        "prvCreateUserEntityUISettings",
        "prvReadUserEntityUISettings",
        "prvWriteUserEntityUISettings",
    ],
)
def test_a_role_without_one_privilege_fails_verification_naming_exactly_that_privilege(
    stack: ApiStack, simulator: CrmSimulator, crm_org: SimOrg, privilege: str
) -> None:
    simulator.set_missing_privileges(crm_org.name, [privilege])
    answer = stack.client.put(
        f"/api/publishers/{crm_org.name}/connection", json=password_body(crm_org), headers=stack.admin()
    )
    assert answer.status_code == 422, answer.text
    payload = answer.json()
    assert payload["reason"] == "PermissionDenied"
    assert payload["verification"]["checks"]["createLeads"] == "failed"
    assert payload["verification"]["missingPrivileges"] == [privilege]
    assert privilege in payload["message"]
    assert LEAD_WRITER_PRIVILEGES[privilege] in payload["message"]
    others = [name for name in LEAD_WRITER_PRIVILEGES if name != privilege]
    assert not any(name in payload["message"] for name in others)
    assert stack.services.connections.get(crm_org.name) is None


def test_a_role_that_cannot_read_the_solution_fails_at_the_solution_step_naming_prv_read_solution(
    stack: ApiStack, simulator: CrmSimulator, crm_org: SimOrg
) -> None:
    simulator.set_missing_privileges(crm_org.name, ["prvReadSolution"])
    answer = stack.client.put(
        f"/api/publishers/{crm_org.name}/connection",
        json=client_secret_body(crm_org, SIM_CLIENT_ID, SIM_CLIENT_SECRET),
        headers=stack.admin(),
    )
    assert answer.status_code == 422, answer.text
    payload = answer.json()
    assert payload["verification"]["checks"]["solution"] == "failed"
    assert payload["verification"]["missingPrivileges"] == ["prvReadSolution"]
    assert "the application user lacks this privilege of the Lead Writer role: prvReadSolution" in payload["message"]


def test_several_missing_privileges_are_all_named_in_the_order_of_the_role(
    stack: ApiStack, simulator: CrmSimulator, crm_org: SimOrg
) -> None:
    simulator.set_missing_privileges(crm_org.name, ["prvWriteUserEntityUISettings", "prvCreateLead"])
    answer = stack.client.put(
        f"/api/publishers/{crm_org.name}/connection", json=password_body(crm_org), headers=stack.admin()
    )
    assert answer.status_code == 422
    assert answer.json()["verification"]["missingPrivileges"] == ["prvCreateLead", "prvWriteUserEntityUISettings"]
    assert "these privileges of the Lead Writer role" in answer.json()["message"]


def test_a_principal_without_the_role_is_told_to_assign_the_role_not_a_list_of_privileges(
    stack: ApiStack, simulator: CrmSimulator, crm_org: SimOrg
) -> None:
    simulator.set_role(crm_org.name, sim_username(crm_org), False)
    answer = stack.client.put(
        f"/api/publishers/{crm_org.name}/connection", json=password_body(crm_org), headers=stack.admin()
    )
    assert answer.status_code == 422
    assert "lacks the Lead Writer role" in answer.json()["message"]
    assert answer.json()["verification"]["missingPrivileges"] == list(LEAD_WRITER_PRIVILEGES)


def test_the_client_reads_missing_privileges_and_the_simulator_really_withholds_them(
    stack: ApiStack, simulator: CrmSimulator, crm_org: SimOrg
) -> None:
    client = stack.services.pipeline.client(_connection(crm_org))
    user = client.whoami().user_id
    assert client.missing_privileges(user) == []
    assert client.can_create_leads(user) is True

    simulator.set_missing_privileges(crm_org.name, ["prvCreateLead"])
    assert client.missing_privileges(user) == ["prvCreateLead"]
    assert client.can_create_leads(user) is False
    with pytest.raises(PermissionDenied) as denied:
        client.create_lead(LeadWrite(lead_record_id(crm_org.name, "x"), {"lastname": "Lovelace"}))
    assert "prvCreateLead" in denied.value.message
    assert simulator.describe(crm_org.name)["missingPrivileges"] == ["prvCreateLead"]

    # Giving the privilege back makes the same principal whole again.
    simulator.set_missing_privileges(crm_org.name, [])
    assert client.missing_privileges(user) == []


def test_the_simulator_config_and_admin_api_take_single_privileges_out_of_the_role(simulator: CrmSimulator) -> None:
    spec = parse_org({"name": "cfg-privileges", "missingPrivileges": ["prvReadUserEntityUISettings"]})
    assert spec.missing_privileges == ("prvReadUserEntityUISettings",)
    with pytest.raises(SimulatorConfigError, match="missingPrivileges"):
        parse_org({"name": "bad", "missingPrivileges": [1]})
    org = simulator.add_org_spec(spec)
    assert simulator.describe(org.name)["missingPrivileges"] == ["prvReadUserEntityUISettings"]
    with pytest.raises(ValueError, match="prvNoSuchThing"):
        simulator.set_missing_privileges(org.name, ["prvNoSuchThing"])


def test_a_password_connection_stopped_by_mfa_is_steered_to_a_client_secret_connection(
    stack: ApiStack, simulator: CrmSimulator, crm_org: SimOrg
) -> None:
    simulator.set_user_flags(crm_org.name, sim_username(crm_org), mfa_required=True)
    answer = stack.client.put(
        f"/api/publishers/{crm_org.name}/connection", json=password_body(crm_org), headers=stack.admin()
    )
    assert answer.status_code == 422
    assert answer.json()["reason"] == "CredentialsRejected"
    assert "AADSTS50076" in answer.json()["message"]
    assert "clientSecret connection" in answer.json()["message"]


@pytest.mark.parametrize("code", [50076, 50079, 50072, 53003])
def test_entra_advice_for_mfa_and_conditional_access_recommends_the_entra_app_option(code: int) -> None:
    error = error_from_token_failure(RuntimeError(f"AADSTS{code}: the sign-in needs more than a password"))
    assert isinstance(error, CredentialsRejected)
    assert error.entra_code == code
    assert "clientSecret connection (Microsoft's recommended option)" in error.message
    assert "application user with the Lead Writer role" in error.message
