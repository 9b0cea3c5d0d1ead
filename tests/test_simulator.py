"""The CRM simulator speaks the Dataverse Web API and the Entra token endpoint over real HTTPS.

Every request verifies TLS against the simulator's generated CA.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from azure.core.exceptions import ClientAuthenticationError
from azure.identity import ClientSecretCredential, UsernamePasswordCredential

from shared.simulator import CrmSimulator, RequestLog, SimOrg, SimulatorConfigError
from shared.simulator.cli import DEMO_ORG, DEMO_PASSWORD, DEMO_USERNAME, build, environment_lines
from shared.simulator.limits import CONCURRENCY_CODE, EXECUTION_CODE, REQUESTS_CODE, Limits, ServiceProtection
from tests.fixtures.simulator import (
    SIM_CLIENT_ID,
    SIM_CLIENT_SECRET,
    SIM_PASSWORD,
    SIM_PUBLIC_CLIENT_ID,
    sim_username,
    simulator_settings,
    start_simulator,
)

API = "/api/data/v9.2/"
SOLUTION = "MicrosoftMarketplacesLeadIntegrationSolution"
TIMEOUT = 10.0

# The password grant is deprecated upstream; it is still what publishers' service accounts use (architecture §4).
pytestmark = [
    pytest.mark.filterwarnings("ignore:UsernamePasswordCredential is deprecated:DeprecationWarning"),
    pytest.mark.filterwarnings(
        "ignore:This API has been deprecated for public client flows:DeprecationWarning"
    ),
]


# --- helpers -----


def http(
    sim: CrmSimulator, method: str, url: str, token: str | None = None, **kwargs: Any
) -> requests.Response:
    """One request, TLS verified against the simulator's CA, redirects never followed."""
    headers = {"Accept": "application/json", "OData-MaxVersion": "4.0", "OData-Version": "4.0"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    headers.update(kwargs.pop("headers", {}))
    kwargs.setdefault("timeout", TIMEOUT)
    return requests.request(
        method, url, headers=headers, verify=str(sim.ca_path), allow_redirects=False, **kwargs
    )


def app_token(sim: CrmSimulator, org: SimOrg) -> str:
    credential = ClientSecretCredential(
        org.tenant_id,
        SIM_CLIENT_ID,
        SIM_CLIENT_SECRET,
        authority=sim.authority_host,
        disable_instance_discovery=True,
        connection_verify=str(sim.ca_path),
    )
    return credential.get_token(f"{org.url}/.default").token


def password_credential(
    sim: CrmSimulator, org: SimOrg, username: str, password: str
) -> UsernamePasswordCredential:
    return UsernamePasswordCredential(
        SIM_PUBLIC_CLIENT_ID,
        username,
        password,
        tenant_id=org.tenant_id,
        authority=sim.authority_host,
        disable_instance_discovery=True,
        connection_verify=str(sim.ca_path),
    )


def raw_token(sim: CrmSimulator, tenant: str, form: dict[str, str]) -> requests.Response:
    return http(sim, "POST", f"{sim.authority_host}/{tenant}/oauth2/v2.0/token", data=form)


def lead_url(org: SimOrg, lead_id: str) -> str:
    return f"{org.url}{API}leads({lead_id})"


def create_only(
    sim: CrmSimulator, org: SimOrg, token: str, lead_id: str, body: dict[str, Any]
) -> requests.Response:
    return http(sim, "PATCH", lead_url(org, lead_id), token, json=body, headers={"If-None-Match": "*"})


def poll(condition: Callable[[], bool], deadline: float = 5.0) -> None:
    end = time.monotonic() + deadline
    while not condition():
        if time.monotonic() > end:
            raise AssertionError("condition not met before the deadline")
        threading.Event().wait(0.01)


def error_of(response: requests.Response) -> dict[str, str]:
    error: dict[str, str] = response.json()["error"]
    return error


@pytest.fixture
def token(simulator: CrmSimulator, crm_org: SimOrg) -> str:
    return app_token(simulator, crm_org)


# --- authority -----


def test_client_secret_credential_gets_a_token_the_crm_accepts(
    simulator: CrmSimulator, crm_org: SimOrg
) -> None:
    token = app_token(simulator, crm_org)

    response = http(simulator, "GET", f"{crm_org.url}{API}WhoAmI", token)

    assert response.status_code == 200
    assert simulator.token_requests(crm_org.name) == 1


def test_username_password_credential_gets_a_token_the_crm_accepts(
    simulator: CrmSimulator, crm_org: SimOrg
) -> None:
    credential = password_credential(simulator, crm_org, sim_username(crm_org), SIM_PASSWORD)

    token = credential.get_token(f"{crm_org.url}/.default").token
    response = http(simulator, "GET", f"{crm_org.url}{API}WhoAmI", token)

    assert response.status_code == 200
    assert simulator.token_requests(crm_org.name) == 1


def test_password_grant_answers_id_token_and_client_info_for_msal(
    simulator: CrmSimulator, crm_org: SimOrg
) -> None:
    response = raw_token(
        simulator,
        crm_org.tenant_id,
        {
            "grant_type": "password",
            "client_id": SIM_PUBLIC_CLIENT_ID,
            "username": sim_username(crm_org),
            "password": SIM_PASSWORD,
            "scope": f"{crm_org.url}/.default offline_access openid profile",
        },
    )

    body = response.json()
    assert response.status_code == 200
    assert body["token_type"] == "Bearer"
    assert body["expires_in"] == 3599
    claims = json.loads(_b64decode(body["id_token"].split(".")[1]))
    assert claims["tid"] == crm_org.tenant_id
    assert claims["preferred_username"] == sim_username(crm_org)
    assert claims["aud"] == SIM_PUBLIC_CLIENT_ID
    assert json.loads(_b64decode(body["client_info"]))["utid"] == crm_org.tenant_id


def _b64decode(part: str) -> bytes:
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


@pytest.fixture
def troubled_users(simulator: CrmSimulator, crm_org: SimOrg) -> SimOrg:
    simulator.add_user(crm_org.name, f"mfa@{crm_org.name}.example", SIM_PASSWORD, mfa_required=True)
    simulator.add_user(crm_org.name, f"gone@{crm_org.name}.example", SIM_PASSWORD, disabled=True)
    return crm_org


def _form(org: SimOrg, case: str) -> tuple[str, dict[str, str]]:
    scope = f"{org.url}/.default"
    password = {
        "grant_type": "password",
        "client_id": SIM_PUBLIC_CLIENT_ID,
        "scope": scope,
        "username": sim_username(org),
        "password": SIM_PASSWORD,
    }
    secret = {
        "grant_type": "client_credentials",
        "client_id": SIM_CLIENT_ID,
        "client_secret": SIM_CLIENT_SECRET,
        "scope": scope,
    }
    cases = {
        "wrong password": (org.tenant_id, {**password, "password": "not-it"}),
        "unknown user": (org.tenant_id, {**password, "username": f"nobody@{org.name}.example"}),
        "mfa": (org.tenant_id, {**password, "username": f"mfa@{org.name}.example"}),
        "disabled": (org.tenant_id, {**password, "username": f"gone@{org.name}.example"}),
        "bad secret": (org.tenant_id, {**secret, "client_secret": "wrong"}),
        "unknown app": (org.tenant_id, {**secret, "client_id": str(uuid.uuid4())}),
        "unknown tenant": (str(uuid.uuid4()), secret),
    }
    return cases[case]


@pytest.mark.parametrize(
    ("case", "status", "error", "code"),
    [
        ("wrong password", 400, "invalid_grant", 50126),
        ("unknown user", 400, "invalid_grant", 50126),
        ("mfa", 400, "invalid_grant", 50076),
        ("disabled", 400, "invalid_grant", 50057),
        ("bad secret", 401, "invalid_client", 7000215),
        ("unknown app", 400, "unauthorized_client", 700016),
        ("unknown tenant", 400, "invalid_request", 90002),
    ],
)
def test_token_endpoint_refuses_with_entra_error_body(
    simulator: CrmSimulator, troubled_users: SimOrg, case: str, status: int, error: str, code: int
) -> None:
    tenant, form = _form(troubled_users, case)

    response = raw_token(simulator, tenant, form)

    body = response.json()
    assert response.status_code == status
    assert body["error"] == error
    assert body["error_codes"] == [code]
    assert body["error_description"].startswith(f"AADSTS{code}: ")
    assert "\r\nTrace ID: " in body["error_description"]
    assert "\r\nCorrelation ID: " in body["error_description"]
    assert body["trace_id"]
    assert body["correlation_id"]
    assert body["timestamp"]
    assert SIM_PASSWORD not in response.text
    assert SIM_CLIENT_SECRET not in response.text


@pytest.mark.parametrize(
    ("case", "code"),
    [("wrong password", 50126), ("mfa", 50076), ("disabled", 50057)],
)
def test_username_password_credential_reports_the_aadsts_code(
    simulator: CrmSimulator, troubled_users: SimOrg, case: str, code: int
) -> None:
    _, form = _form(troubled_users, case)
    credential = password_credential(simulator, troubled_users, form["username"], form["password"])

    with pytest.raises(ClientAuthenticationError, match=f"AADSTS{code}"):
        credential.get_token(f"{troubled_users.url}/.default")


@pytest.mark.parametrize(("case", "code"), [("bad secret", 7000215), ("unknown app", 700016)])
def test_client_secret_credential_reports_the_aadsts_code(
    simulator: CrmSimulator, crm_org: SimOrg, case: str, code: int
) -> None:
    _, form = _form(crm_org, case)
    credential = ClientSecretCredential(
        crm_org.tenant_id,
        form["client_id"],
        form["client_secret"],
        authority=simulator.authority_host,
        disable_instance_discovery=True,
        connection_verify=str(simulator.ca_path),
    )

    with pytest.raises(ClientAuthenticationError, match=f"AADSTS{code}"):
        credential.get_token(f"{crm_org.url}/.default")


def test_openid_configuration_of_an_unknown_tenant_is_aadsts90002(simulator: CrmSimulator) -> None:
    response = http(
        simulator, "GET", f"{simulator.authority_host}/{uuid.uuid4()}/v2.0/.well-known/openid-configuration"
    )

    assert response.status_code == 400
    assert response.json()["error_codes"] == [90002]


def test_openid_configuration_names_the_token_endpoint(simulator: CrmSimulator, crm_org: SimOrg) -> None:
    response = http(
        simulator,
        "GET",
        f"{simulator.authority_host}/{crm_org.tenant_id}/v2.0/.well-known/openid-configuration",
    )

    assert (
        response.json()["token_endpoint"]
        == f"{simulator.authority_host}/{crm_org.tenant_id}/oauth2/v2.0/token"
    )


def test_user_realm_reports_a_managed_account(simulator: CrmSimulator, crm_org: SimOrg) -> None:
    response = http(
        simulator,
        "GET",
        f"{simulator.authority_host}/common/userrealm/{sim_username(crm_org)}?api-version=1.0",
    )

    assert response.json()["account_type"] == "Managed"
    assert response.json()["domain_name"] == f"{crm_org.name}.example"


def test_token_for_another_org_is_unknown_resource(simulator: CrmSimulator, crm_org: SimOrg) -> None:
    other = simulator.add_org(f"other-{uuid.uuid4().hex[:8]}")

    response = raw_token(
        simulator,
        crm_org.tenant_id,
        {
            "grant_type": "client_credentials",
            "client_id": SIM_CLIENT_ID,
            "client_secret": SIM_CLIENT_SECRET,
            "scope": f"{other.url}/.default",
        },
    )

    assert response.status_code == 400
    assert response.json()["error_codes"] == [500011]


# --- bearer challenge -----


def test_request_without_token_gets_bearer_challenge_naming_the_tenant(
    simulator: CrmSimulator, crm_org: SimOrg
) -> None:
    response = http(simulator, "GET", f"{crm_org.url}{API}WhoAmI")

    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"] == (
        f"Bearer authorization_uri=https://login.microsoftonline.com/{crm_org.tenant_id}/oauth2/authorize, "
        f"resource_id={crm_org.url}/"
    )


def test_token_of_another_org_is_challenged(simulator: CrmSimulator, crm_org: SimOrg, token: str) -> None:
    other = simulator.add_org(f"other-{uuid.uuid4().hex[:8]}")

    response = http(simulator, "GET", f"{other.url}{API}WhoAmI", token)

    assert response.status_code == 401
    assert other.tenant_id in response.headers["WWW-Authenticate"]


def test_expired_token_is_challenged(simulator: CrmSimulator, crm_org: SimOrg, token: str) -> None:
    simulator.expire_tokens(crm_org.name)

    response = http(simulator, "GET", f"{crm_org.url}{API}WhoAmI", token)

    assert response.status_code == 401


def test_invalid_token_is_challenged(simulator: CrmSimulator, crm_org: SimOrg) -> None:
    response = http(simulator, "GET", f"{crm_org.url}{API}WhoAmI", "eyJ0eXAiOiJKV1QifQ.e30.c2ln")

    assert response.status_code == 401


# --- WhoAmI, solutions, privileges -----


def test_whoami_answers_ids_and_service_headers(simulator: CrmSimulator, crm_org: SimOrg, token: str) -> None:
    response = http(simulator, "GET", f"{crm_org.url}{API}WhoAmI", token)

    body = response.json()
    assert {"BusinessUnitId", "UserId", "OrganizationId"} <= body.keys()
    assert body["@odata.context"].endswith("$metadata#Microsoft.Dynamics.CRM.WhoAmIResponse")
    assert uuid.UUID(response.headers["REQ_ID"])
    assert uuid.UUID(response.headers["x-ms-service-request-id"])
    assert response.headers["OData-Version"] == "4.0"
    assert simulator.requests(crm_org.name).whoami == 1


def test_whoami_works_for_a_principal_without_the_role(simulator: CrmSimulator, crm_org: SimOrg) -> None:
    simulator.set_role(crm_org.name, SIM_CLIENT_ID, False)

    response = http(simulator, "GET", f"{crm_org.url}{API}WhoAmI", app_token(simulator, crm_org))

    assert response.status_code == 200


@pytest.mark.parametrize("version", ["1.2.0.0", "0.9.0.0", None])
def test_solution_query_answers_the_installed_version(
    simulator: CrmSimulator, crm_org: SimOrg, token: str, version: str | None
) -> None:
    simulator.set_solution(crm_org.name, version)

    response = http(
        simulator,
        "GET",
        f"{crm_org.url}{API}solutions",
        token,
        params={"$filter": f"uniquename eq '{SOLUTION}'", "$select": "uniquename,version"},
    )

    rows = response.json()["value"]
    assert response.status_code == 200
    assert [row["version"] for row in rows] == ([version] if version else [])
    assert all(row["uniquename"] == SOLUTION and uuid.UUID(row["solutionid"]) for row in rows)
    assert simulator.requests(crm_org.name).solutions == 1


def test_solution_query_for_another_name_is_empty(
    simulator: CrmSimulator, crm_org: SimOrg, token: str
) -> None:
    response = http(
        simulator,
        "GET",
        f"{crm_org.url}{API}solutions",
        token,
        params={"$filter": "uniquename eq 'SomethingElse'"},
    )

    assert response.json()["value"] == []


def test_solution_query_without_the_role_is_forbidden(simulator: CrmSimulator, crm_org: SimOrg) -> None:
    simulator.set_role(crm_org.name, SIM_CLIENT_ID, False)

    response = http(
        simulator,
        "GET",
        f"{crm_org.url}{API}solutions",
        app_token(simulator, crm_org),
        params={"$filter": f"uniquename eq '{SOLUTION}'"},
    )

    assert response.status_code == 403
    assert "prvReadSolution" in error_of(response)["message"]


@pytest.mark.parametrize("has_role", [True, False])
def test_retrieve_user_privileges_lists_prvcreatelead_only_with_the_role(
    simulator: CrmSimulator, crm_org: SimOrg, has_role: bool
) -> None:
    simulator.set_role(crm_org.name, SIM_CLIENT_ID, has_role)
    token = app_token(simulator, crm_org)
    user_id = http(simulator, "GET", f"{crm_org.url}{API}WhoAmI", token).json()["UserId"]

    response = http(
        simulator,
        "GET",
        f"{crm_org.url}{API}systemusers({user_id})/Microsoft.Dynamics.CRM.RetrieveUserPrivileges()",
        token,
    )

    names = {p["PrivilegeName"] for p in response.json()["RolePrivileges"]}
    assert ("prvCreateLead" in names) is has_role


# --- lead writes -----


def test_create_only_patch_creates_once_then_answers_412(
    simulator: CrmSimulator, crm_org: SimOrg, token: str
) -> None:
    lead_id = str(uuid.uuid4())

    first = create_only(simulator, crm_org, token, lead_id, {"lastname": "Lovelace", "subject": "Widget"})
    second = create_only(simulator, crm_org, token, lead_id, {"lastname": "Changed"})

    assert first.status_code == 204
    assert first.headers["OData-EntityId"] == lead_url(crm_org, lead_id).replace(API, API)
    assert second.status_code == 412
    assert error_of(second) == {
        "code": "0x80060882",
        "message": "A record with matching key values already exists.",
    }
    assert simulator.leads(crm_org.name) == [{"leadid": lead_id, "lastname": "Lovelace", "subject": "Widget"}]
    assert simulator.requests(crm_org.name).lead_writes == 2


def test_update_only_patch_of_a_missing_lead_is_404(
    simulator: CrmSimulator, crm_org: SimOrg, token: str
) -> None:
    response = http(
        simulator,
        "PATCH",
        lead_url(crm_org, str(uuid.uuid4())),
        token,
        json={"lastname": "X"},
        headers={"If-Match": "*"},
    )

    assert response.status_code == 404
    assert simulator.leads(crm_org.name) == []


def test_update_only_patch_changes_an_existing_lead(
    simulator: CrmSimulator, crm_org: SimOrg, token: str
) -> None:
    lead_id = str(uuid.uuid4())
    create_only(simulator, crm_org, token, lead_id, {"lastname": "Lovelace"})

    response = http(
        simulator,
        "PATCH",
        lead_url(crm_org, lead_id),
        token,
        json={"firstname": "Ada"},
        headers={"If-Match": "*"},
    )

    assert response.status_code == 204
    assert simulator.leads(crm_org.name) == [{"leadid": lead_id, "lastname": "Lovelace", "firstname": "Ada"}]


def test_bare_patch_is_an_upsert(simulator: CrmSimulator, crm_org: SimOrg, token: str) -> None:
    lead_id = str(uuid.uuid4())

    created = http(simulator, "PATCH", lead_url(crm_org, lead_id), token, json={"lastname": "One"})
    updated = http(simulator, "PATCH", lead_url(crm_org, lead_id), token, json={"lastname": "Two"})

    assert (created.status_code, updated.status_code) == (204, 204)
    assert simulator.leads(crm_org.name) == [{"leadid": lead_id, "lastname": "Two"}]


def test_post_creates_and_a_second_post_with_the_same_id_is_a_duplicate(
    simulator: CrmSimulator, crm_org: SimOrg, token: str
) -> None:
    lead_id = str(uuid.uuid4())

    first = http(
        simulator, "POST", f"{crm_org.url}{API}leads", token, json={"leadid": lead_id, "lastname": "A"}
    )
    second = http(
        simulator, "POST", f"{crm_org.url}{API}leads", token, json={"leadid": lead_id, "lastname": "B"}
    )

    assert first.status_code == 204
    assert first.headers["OData-EntityId"].endswith(f"leads({lead_id})")
    assert second.status_code == 412
    assert error_of(second)["code"] == "0x80040237"
    assert [lead["lastname"] for lead in simulator.leads(crm_org.name)] == ["A"]


def test_post_without_id_generates_one(simulator: CrmSimulator, crm_org: SimOrg, token: str) -> None:
    response = http(simulator, "POST", f"{crm_org.url}{API}leads", token, json={"lastname": "A"})

    (lead,) = simulator.leads(crm_org.name)
    assert response.headers["OData-EntityId"].endswith(f"leads({lead['leadid']})")


@pytest.mark.parametrize(
    ("body", "code", "fragment"),
    [
        ({"nickname": "x"}, "0x80060888", "Could not find a property named 'nickname'"),
        ({"firstname": 5}, "0x80060888", "Edm.String"),
        ({"leadsourcecode": "8"}, "0x80060888", "Edm.Int32"),
        ({"leadsourcecode": True}, "0x80060888", "Edm.Int32"),
        ({"firstname": "a" * 51}, "0x80044331", "maximum allowed length of '50'"),
        ({"firstname": "\U0001f600" * 26}, "0x80044331", "'firstname'"),
        ({"description": "d" * 2001}, "0x80044331", "maximum allowed length of '2000'"),
        ({"leadsourcecode": 99}, "0x8004431a", "outside the valid range"),
        ({"fullname": "Ada Lovelace"}, "0x80040203", "read-only"),
    ],
)
def test_invalid_lead_is_refused_with_400_and_not_written(
    simulator: CrmSimulator, crm_org: SimOrg, token: str, body: dict[str, Any], code: str, fragment: str
) -> None:
    response = create_only(simulator, crm_org, token, str(uuid.uuid4()), {"lastname": "L", **body})

    assert response.status_code == 400
    assert error_of(response)["code"] == code
    assert fragment in error_of(response)["message"]
    assert simulator.leads(crm_org.name) == []


def test_lengths_count_utf16_code_units(simulator: CrmSimulator, crm_org: SimOrg, token: str) -> None:
    # 25 emoji are 50 UTF-16 code units: exactly the firstname limit.
    response = create_only(simulator, crm_org, token, str(uuid.uuid4()), {"firstname": "\U0001f600" * 25})

    assert response.status_code == 204


def test_lead_source_codes_follow_the_org(simulator: CrmSimulator) -> None:
    name = f"custom-{uuid.uuid4().hex[:8]}"
    org = simulator.add_org(name, lead_source_codes=[8, 100000000])
    simulator.add_app(name, SIM_CLIENT_ID, SIM_CLIENT_SECRET)
    token = app_token(simulator, org)

    accepted = create_only(simulator, org, token, str(uuid.uuid4()), {"leadsourcecode": 100000000})
    refused = create_only(simulator, org, token, str(uuid.uuid4()), {"leadsourcecode": 10})

    assert (accepted.status_code, refused.status_code) == (204, 400)


def test_lead_write_without_the_role_is_forbidden(simulator: CrmSimulator, crm_org: SimOrg) -> None:
    simulator.set_role(crm_org.name, sim_username(crm_org), False)
    token = (
        password_credential(simulator, crm_org, sim_username(crm_org), SIM_PASSWORD)
        .get_token(f"{crm_org.url}/.default")
        .token
    )

    response = create_only(simulator, crm_org, token, str(uuid.uuid4()), {"lastname": "L"})

    assert response.status_code == 403
    assert error_of(response)["code"] == "0x80040220"
    assert "missing prvCreateLead privilege" in error_of(response)["message"]
    assert simulator.leads(crm_org.name) == []


# --- $batch -----


def batch_body(org: SimOrg, items: list[Any], boundary: str = "batch_abc") -> bytes:
    """Items: (method, lead_id, body, headers) tuples, or lists of them for a change set."""
    lines: list[str] = []

    def operation(op: tuple[str, str, dict[str, Any], dict[str, str]], content_id: int | None) -> list[str]:
        method, lead_id, body, headers = op
        part = ["Content-Type: application/http", "Content-Transfer-Encoding: binary"]
        if content_id is not None:
            part.append(f"Content-ID: {content_id}")
        part += ["", f"{method} {lead_url(org, lead_id)} HTTP/1.1", "Content-Type: application/json"]
        part += [f"{k}: {v}" for k, v in headers.items()]
        part += ["", json.dumps(body)]
        return part

    for item in items:
        lines.append(f"--{boundary}")
        if isinstance(item, list):
            lines += ["Content-Type: multipart/mixed; boundary=changeset_xyz", ""]
            for i, op in enumerate(item, 1):
                lines.append("--changeset_xyz")
                lines += operation(op, i)
            lines.append("--changeset_xyz--")
        else:
            lines += operation(item, None)
    lines.append(f"--{boundary}--")
    return ("\r\n".join(lines) + "\r\n").encode()


def post_batch(
    sim: CrmSimulator, org: SimOrg, token: str, items: list[Any], *, continue_on_error: bool
) -> requests.Response:
    headers = {"Content-Type": "multipart/mixed; boundary=batch_abc"}
    if continue_on_error:
        headers["Prefer"] = "odata.continue-on-error"
    return http(sim, "POST", f"{org.url}{API}$batch", token, data=batch_body(org, items), headers=headers)


def part_statuses(response: requests.Response) -> list[int]:
    return [int(line.split()[1]) for line in response.text.splitlines() if line.startswith("HTTP/1.1 ")]


def test_batch_with_continue_on_error_reports_each_part(
    simulator: CrmSimulator, crm_org: SimOrg, token: str
) -> None:
    existing, new1, new2 = (str(uuid.uuid4()) for _ in range(3))
    create_only(simulator, crm_org, token, existing, {"lastname": "Old"})
    inm = {"If-None-Match": "*"}

    response = post_batch(
        simulator,
        crm_org,
        token,
        [
            ("PATCH", new1, {"lastname": "A"}, inm),
            ("PATCH", existing, {"lastname": "B"}, inm),
            ("PATCH", str(uuid.uuid4()), {"firstname": "x" * 51}, inm),
            ("PATCH", new2, {"lastname": "C"}, inm),
        ],
        continue_on_error=True,
    )

    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("multipart/mixed; boundary=batchresponse_")
    assert part_statuses(response) == [204, 412, 400, 204]
    assert "0x80060882" in response.text
    assert [lead["lastname"] for lead in simulator.leads(crm_org.name)] == ["Old", "A", "C"]
    log = simulator.requests(crm_org.name)
    assert (log.batches, log.batch_operations, log.lead_writes) == (1, 4, 1)


def test_batch_without_continue_on_error_stops_at_the_first_failure(
    simulator: CrmSimulator, crm_org: SimOrg, token: str
) -> None:
    inm = {"If-None-Match": "*"}

    response = post_batch(
        simulator,
        crm_org,
        token,
        [
            ("PATCH", str(uuid.uuid4()), {"lastname": "A"}, inm),
            ("PATCH", str(uuid.uuid4()), {"bad": 1}, inm),
            ("PATCH", str(uuid.uuid4()), {"lastname": "C"}, inm),
        ],
        continue_on_error=False,
    )

    assert part_statuses(response) == [204, 400]
    assert [lead["lastname"] for lead in simulator.leads(crm_org.name)] == ["A"]


def test_failing_change_set_rolls_back_all_its_operations(
    simulator: CrmSimulator, crm_org: SimOrg, token: str
) -> None:
    existing = str(uuid.uuid4())
    create_only(simulator, crm_org, token, existing, {"lastname": "Old"})
    inm = {"If-None-Match": "*"}

    response = post_batch(
        simulator,
        crm_org,
        token,
        [
            [
                ("PATCH", str(uuid.uuid4()), {"lastname": "A"}, inm),
                ("PATCH", existing, {"lastname": "B"}, inm),
            ],
            ("PATCH", str(uuid.uuid4()), {"lastname": "C"}, inm),
        ],
        continue_on_error=True,
    )

    assert part_statuses(response) == [412, 204]
    assert "Content-ID: 2" in response.text
    assert [lead["lastname"] for lead in simulator.leads(crm_org.name)] == ["Old", "C"]


def test_successful_change_set_answers_each_operation_by_content_id(
    simulator: CrmSimulator, crm_org: SimOrg, token: str
) -> None:
    inm = {"If-None-Match": "*"}

    response = post_batch(
        simulator,
        crm_org,
        token,
        [
            [
                ("PATCH", str(uuid.uuid4()), {"lastname": "A"}, inm),
                ("PATCH", str(uuid.uuid4()), {"lastname": "B"}, inm),
            ]
        ],
        continue_on_error=False,
    )

    assert part_statuses(response) == [204, 204]
    assert "boundary=changesetresponse_" in response.text
    assert "Content-ID: 1" in response.text
    assert "Content-ID: 2" in response.text
    assert len(simulator.leads(crm_org.name)) == 2


def test_batch_over_1000_operations_is_refused(simulator: CrmSimulator, crm_org: SimOrg, token: str) -> None:
    ops: list[Any] = [("PATCH", str(uuid.uuid4()), {"lastname": "A"}, {}) for _ in range(1001)]

    response = post_batch(simulator, crm_org, token, ops, continue_on_error=True)

    assert response.status_code == 400
    assert simulator.leads(crm_org.name) == []


def test_batch_counts_as_one_request_toward_the_limit(simulator: CrmSimulator) -> None:
    name = f"limited-{uuid.uuid4().hex[:8]}"
    org = simulator.add_org(name, requests_per_window=1, window_seconds=300)
    simulator.add_app(name, SIM_CLIENT_ID, SIM_CLIENT_SECRET)
    token = app_token(simulator, org)

    response = post_batch(
        simulator,
        org,
        token,
        [("PATCH", str(uuid.uuid4()), {"lastname": "A"}, {}) for _ in range(5)],
        continue_on_error=True,
    )

    assert part_statuses(response) == [204] * 5
    assert http(simulator, "GET", f"{org.url}{API}WhoAmI", token).status_code == 429


# --- service protection limits -----


def test_exceeding_the_request_limit_answers_429_and_retrying_early_extends_the_penalty(
    simulator: CrmSimulator,
) -> None:
    name = f"limited-{uuid.uuid4().hex[:8]}"
    org = simulator.add_org(name, requests_per_window=3, window_seconds=60)
    simulator.add_app(name, SIM_CLIENT_ID, SIM_CLIENT_SECRET)
    token = app_token(simulator, org)
    whoami = f"{org.url}{API}WhoAmI"

    statuses = [http(simulator, "GET", whoami, token).status_code for _ in range(3)]
    throttled = http(simulator, "GET", whoami, token)
    again = http(simulator, "GET", whoami, token)

    assert statuses == [200, 200, 200]
    assert throttled.status_code == 429
    assert error_of(throttled) == {
        "code": "0x80072322",
        "message": "Number of requests exceeded the limit of 3 over time window of 60 seconds.",
    }
    assert 1 <= int(throttled.headers["Retry-After"]) <= 60
    assert again.status_code == 429
    log = simulator.requests(name)
    assert (log.throttled, log.during_penalty, log.total) == (2, 1, 5)


def test_limits_are_per_user(simulator: CrmSimulator, crm_org: SimOrg) -> None:
    name = f"limited-{uuid.uuid4().hex[:8]}"
    org = simulator.add_org(name, requests_per_window=1)
    simulator.add_app(name, SIM_CLIENT_ID, SIM_CLIENT_SECRET)
    simulator.add_user(name, f"svc@{name}.example", SIM_PASSWORD)
    app = app_token(simulator, org)
    user = (
        password_credential(simulator, org, f"svc@{name}.example", SIM_PASSWORD)
        .get_token(f"{org.url}/.default")
        .token
    )

    codes = [http(simulator, "GET", f"{org.url}{API}WhoAmI", t).status_code for t in (app, app, user)]

    assert codes == [200, 429, 200]


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_request_window_slides_and_admits_again_after_the_penalty() -> None:
    clock = FakeClock()
    limits = ServiceProtection(Limits(requests_per_window=2, window_seconds=10), clock=clock)
    for _ in range(2):
        assert limits.admit("u") is None
        limits.done("u", 0.1)
        clock.now += 1

    rejection = limits.admit("u")
    assert rejection is not None
    assert rejection.code == REQUESTS_CODE
    assert rejection.retry_after_header == "8"
    clock.now += rejection.retry_after

    assert limits.admit("u") is None


def test_request_during_penalty_restarts_it() -> None:
    clock = FakeClock()
    limits = ServiceProtection(Limits(requests_per_window=1, window_seconds=10), clock=clock)
    assert limits.admit("u") is None
    limits.done("u", 0.0)
    first = limits.admit("u")
    assert first is not None
    clock.now += first.retry_after - 1

    again = limits.admit("u")
    clock.now += first.retry_after - 1

    assert again is not None
    assert again.during_penalty
    assert limits.in_penalty("u")


def test_combined_execution_time_limit_answers_its_own_code() -> None:
    clock = FakeClock()
    limits = ServiceProtection(Limits(execution_seconds_per_window=5, window_seconds=60), clock=clock)
    assert limits.admit("u") is None
    limits.done("u", 6.0)

    rejection = limits.admit("u")

    assert rejection is not None
    assert rejection.code == EXECUTION_CODE
    assert "5,000 milliseconds" in rejection.message


def test_concurrency_limit_answers_its_own_code() -> None:
    limits = ServiceProtection(Limits(max_concurrent=2), clock=FakeClock())
    assert limits.admit("u") is None
    assert limits.admit("u") is None

    rejection = limits.admit("u")

    assert rejection is not None
    assert rejection.code == CONCURRENCY_CODE
    assert rejection.message == "Number of concurrent requests exceeded the limit of 2."


# --- faults -----


def test_fail_next_answers_dataverse_errors_then_recovers(
    simulator: CrmSimulator, crm_org: SimOrg, token: str
) -> None:
    simulator.faults(crm_org.name).fail_next(2, 503)
    url = f"{crm_org.url}{API}WhoAmI"

    responses = [http(simulator, "GET", url, token) for _ in range(3)]

    assert [r.status_code for r in responses] == [503, 503, 200]
    assert set(responses[0].json()["error"]) == {"code", "message"}
    assert responses[0].headers["OData-Version"] == "4.0"


def test_hang_next_times_the_client_out_but_still_writes_the_lead(
    simulator: CrmSimulator, crm_org: SimOrg, token: str
) -> None:
    simulator.faults(crm_org.name).hang_next(1, 1.0)
    lead_id = str(uuid.uuid4())

    with pytest.raises(requests.ReadTimeout):
        http(
            simulator,
            "PATCH",
            lead_url(crm_org, lead_id),
            token,
            json={"lastname": "Slow"},
            headers={"If-None-Match": "*"},
            timeout=(TIMEOUT, 0.2),
        )

    poll(lambda: len(simulator.leads(crm_org.name)) == 1)
    assert create_only(simulator, crm_org, token, lead_id, {"lastname": "Slow"}).status_code == 412


def test_hang_all_stalls_every_request_through_the_admin_api_until_cleared(
    simulator: CrmSimulator, crm_org: SimOrg, token: str
) -> None:
    response = admin(simulator, "POST", f"orgs/{crm_org.name}/faults", json={"hang_all": {"seconds": 30}})
    assert response.status_code == 200
    url = f"{crm_org.url}{API}WhoAmI"

    for _ in range(2):
        with pytest.raises(requests.ReadTimeout):
            http(simulator, "GET", url, token, timeout=(TIMEOUT, 0.2))
    assert simulator.faults(crm_org.name).pending() == {"hang_all": 1}

    admin(simulator, "POST", f"orgs/{crm_org.name}/faults", json={"clear": True})
    assert http(simulator, "GET", url, token).status_code == 200


def test_a_request_stalled_by_a_hang_carries_on_when_the_faults_are_cleared(
    simulator: CrmSimulator, crm_org: SimOrg, token: str
) -> None:
    simulator.faults(crm_org.name).hang_all(300)
    answers: list[int] = []
    url = f"{crm_org.url}{API}WhoAmI"

    def call() -> None:
        answers.append(http(simulator, "GET", url, token, timeout=60).status_code)

    stalled = threading.Thread(target=call)
    stalled.start()
    poll(lambda: simulator.requests(crm_org.name).total == 1)
    assert answers == [], "the request is stalled"

    simulator.faults(crm_org.name).clear()
    stalled.join(30)
    assert answers == [200], "answered long before the hang's 300 s"


def test_reset_next_drops_the_connection_without_an_answer(
    simulator: CrmSimulator, crm_org: SimOrg, token: str
) -> None:
    simulator.faults(crm_org.name).reset_next(1)

    with pytest.raises(requests.ConnectionError):
        http(simulator, "GET", f"{crm_org.url}{API}WhoAmI", token)

    assert http(simulator, "GET", f"{crm_org.url}{API}WhoAmI", token).status_code == 200


def test_throttle_next_answers_429_and_starts_the_users_penalty(
    simulator: CrmSimulator, crm_org: SimOrg, token: str
) -> None:
    simulator.faults(crm_org.name).throttle_next(1, retry_after=30)
    url = f"{crm_org.url}{API}WhoAmI"

    first = http(simulator, "GET", url, token)
    second = http(simulator, "GET", url, token)

    assert (first.status_code, first.headers["Retry-After"]) == (429, "30")
    assert error_of(first)["code"] == "0x80072322"
    assert second.status_code == 429
    log = simulator.requests(crm_org.name)
    assert (log.throttled, log.during_penalty) == (2, 1)


def test_throttle_penalty_ends_after_retry_after(
    simulator: CrmSimulator, crm_org: SimOrg, token: str
) -> None:
    simulator.faults(crm_org.name).throttle_next(1, retry_after=0.2)
    url = f"{crm_org.url}{API}WhoAmI"
    assert http(simulator, "GET", url, token).status_code == 429

    end = time.monotonic() + 0.25
    poll(lambda: time.monotonic() > end)

    assert http(simulator, "GET", url, token).status_code == 200
    assert simulator.requests(crm_org.name).during_penalty == 0


def test_redirect_next_answers_302_which_is_not_followed(
    simulator: CrmSimulator, crm_org: SimOrg, token: str
) -> None:
    simulator.faults(crm_org.name).redirect_next(1, "https://evil.example/steal")

    response = http(simulator, "GET", f"{crm_org.url}{API}WhoAmI", token)

    assert response.status_code == 302
    assert response.headers["Location"] == "https://evil.example/steal"


def test_token_fail_next_fails_the_tenants_token_endpoint(simulator: CrmSimulator, crm_org: SimOrg) -> None:
    simulator.faults(crm_org.name).token_fail_next(1, 503)
    form = {
        "grant_type": "client_credentials",
        "client_id": SIM_CLIENT_ID,
        "client_secret": SIM_CLIENT_SECRET,
        "scope": f"{crm_org.url}/.default",
    }

    failed = raw_token(simulator, crm_org.tenant_id, form)
    recovered = raw_token(simulator, crm_org.tenant_id, form)

    assert failed.status_code == 503
    assert failed.json()["error"] == "temporarily_unavailable"
    assert recovered.status_code == 200
    assert simulator.token_requests(crm_org.name) == 2


def test_latency_delays_but_does_not_fail_requests(
    simulator: CrmSimulator, crm_org: SimOrg, token: str
) -> None:
    faults = simulator.faults(crm_org.name)
    faults.latency = 0.05

    response = http(simulator, "GET", f"{crm_org.url}{API}WhoAmI", token)

    assert response.status_code == 200
    assert faults.latency == 0.05
    faults.clear()
    assert faults.latency == 0.0


def test_concurrent_requests_are_served_and_counted(
    simulator: CrmSimulator, crm_org: SimOrg, token: str
) -> None:
    simulator.faults(crm_org.name).latency = 0.2
    results: list[int] = []

    def write() -> None:
        results.append(
            create_only(simulator, crm_org, token, str(uuid.uuid4()), {"lastname": "P"}).status_code
        )

    threads = [threading.Thread(target=write) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(TIMEOUT)

    assert results == [204] * 8
    log = simulator.requests(crm_org.name)
    assert log.lead_writes == 8
    assert 2 <= log.max_in_flight <= 8
    assert len(simulator.leads(crm_org.name)) == 8


# --- admin API -----


def admin(sim: CrmSimulator, method: str, path: str, **kwargs: Any) -> requests.Response:
    return http(sim, method, f"{sim.authority_host}/_simulator/{path}", **kwargs)


def test_admin_api_lists_orgs_without_secrets(simulator: CrmSimulator, crm_org: SimOrg) -> None:
    response = admin(simulator, "GET", "orgs")

    orgs = {org["name"]: org for org in response.json()["orgs"]}
    assert orgs[crm_org.name]["url"] == crm_org.url
    assert orgs[crm_org.name]["users"][0]["username"] == sim_username(crm_org)
    assert SIM_PASSWORD not in response.text
    assert SIM_CLIENT_SECRET not in response.text


def test_admin_api_reads_leads_and_request_counters(
    simulator: CrmSimulator, crm_org: SimOrg, token: str
) -> None:
    lead_id = str(uuid.uuid4())
    create_only(simulator, crm_org, token, lead_id, {"lastname": "L"})

    leads = admin(simulator, "GET", f"orgs/{crm_org.name}/leads").json()["value"]
    counters = admin(simulator, "GET", f"orgs/{crm_org.name}/requests").json()

    assert leads == [{"leadid": lead_id, "lastname": "L"}]
    assert RequestLog(**counters) == simulator.requests(crm_org.name)


def test_admin_api_injects_faults(simulator: CrmSimulator, crm_org: SimOrg, token: str) -> None:
    response = admin(
        simulator,
        "POST",
        f"orgs/{crm_org.name}/faults",
        json={"fail_next": {"n": 1, "status": 500}, "throttle_next": {"n": 1, "retry_after": 7}},
    )

    first = http(simulator, "GET", f"{crm_org.url}{API}WhoAmI", token)
    second = http(simulator, "GET", f"{crm_org.url}{API}WhoAmI", token)

    assert response.json()["pending"] == {"fail": 1, "throttle": 1}
    assert (first.status_code, second.status_code) == (500, 429)
    assert second.headers["Retry-After"] == "7"


def test_admin_api_refuses_unknown_fault_settings_and_changes_nothing(
    simulator: CrmSimulator, crm_org: SimOrg
) -> None:
    response = admin(simulator, "POST", f"orgs/{crm_org.name}/faults", json={"fail_next": 1, "explode": True})

    assert response.status_code == 400
    assert simulator.faults(crm_org.name).pending() == {}


def test_admin_api_sets_solution_and_role(simulator: CrmSimulator, crm_org: SimOrg) -> None:
    admin(simulator, "PUT", f"orgs/{crm_org.name}/solution", json={"version": None})
    admin(simulator, "PUT", f"orgs/{crm_org.name}/roles/{SIM_CLIENT_ID}", json={"hasRole": False})

    described = admin(simulator, "GET", f"orgs/{crm_org.name}").json()

    assert described["solutionVersion"] is None
    assert described["apps"][0]["hasRole"] is False


def test_admin_api_creates_an_org_that_serves(simulator: CrmSimulator) -> None:
    name = f"admin-{uuid.uuid4().hex[:8]}"
    created = admin(
        simulator,
        "POST",
        "orgs",
        json={
            "name": name,
            "solutionVersion": "1.2.0.0",
            "apps": [{"clientId": SIM_CLIENT_ID, "clientSecret": SIM_CLIENT_SECRET}],
        },
    )
    org = simulator.org(name)

    response = http(simulator, "GET", f"{org.url}{API}WhoAmI", app_token(simulator, org))

    assert created.status_code == 201
    assert response.status_code == 200


def test_admin_api_answers_404_for_an_unknown_org(simulator: CrmSimulator) -> None:
    assert admin(simulator, "GET", "orgs/no-such-org/leads").status_code == 404


# --- config, certificates, lifecycle, CLI -----


@pytest.fixture
def config_simulator(tmp_path: Path) -> Iterator[CrmSimulator]:
    tenant = str(uuid.uuid4())
    config = {
        "orgs": [
            {
                "name": "fabrikam",
                "tenantId": tenant,
                "solutionVersion": "1.2.0.0",
                "latency": 0,
                "limits": {"requestsPerWindow": 2, "windowSeconds": 300, "maxConcurrent": 52},
                "users": [{"username": "svc@fabrikam.example", "password": SIM_PASSWORD, "hasRole": True}],
                "apps": [{"clientId": SIM_CLIENT_ID, "clientSecret": SIM_CLIENT_SECRET, "hasRole": False}],
            }
        ]
    }
    path = tmp_path / "simulator.json"
    path.write_text(json.dumps(config))
    sim = CrmSimulator.from_config(path, tmp_path, host="127.0.0.1", authority_port=0)
    with sim:
        yield sim


def test_config_file_defines_orgs_users_apps_and_limits(config_simulator: CrmSimulator) -> None:
    sim = config_simulator
    org = sim.org("fabrikam")
    token = app_token(sim, org)
    solutions = f"{org.url}{API}solutions"

    statuses = [
        http(sim, "GET", f"{org.url}{API}WhoAmI", token).status_code,
        http(sim, "GET", solutions, token).status_code,
        http(sim, "GET", f"{org.url}{API}WhoAmI", token).status_code,
    ]

    assert sim.authority_host.startswith("https://127.0.0.1:")
    assert statuses == [200, 403, 429]
    assert sim.describe("fabrikam")["users"][0]["username"] == "svc@fabrikam.example"


@pytest.mark.parametrize(
    ("config", "field"),
    [
        ({"orgs": [{"tenantId": "x"}]}, "orgs[0].name"),
        ({"orgs": [{"name": "a", "users": [{"username": "u"}]}]}, "orgs[0].users[0].password"),
        (
            {"orgs": [{"name": "a", "limits": {"requestsPerWindow": "many"}}]},
            "orgs[0].limits.requestsPerWindow",
        ),
    ],
)
def test_invalid_config_names_the_field(tmp_path: Path, config: dict[str, Any], field: str) -> None:
    with pytest.raises(SimulatorConfigError, match=field.replace("[", r"\[").replace("]", r"\]")):
        CrmSimulator.from_config(config, tmp_path, host="127.0.0.1", authority_port=0)


def test_the_server_certificate_is_refused_without_the_simulator_ca(
    simulator: CrmSimulator, crm_org: SimOrg
) -> None:
    with pytest.raises(requests.exceptions.SSLError):
        requests.get(f"{crm_org.url}{API}WhoAmI", timeout=TIMEOUT, verify=True)


def test_the_ca_is_reused_by_a_restarted_simulator(tmp_path: Path) -> None:
    with CrmSimulator(tmp_path, host="127.0.0.1", authority_port=0) as first:
        ca = first.ca_path.read_bytes()
    with CrmSimulator(tmp_path, host="127.0.0.1", authority_port=0) as second:
        org = second.add_org("again")
        response = http(second, "GET", f"{org.url}{API}WhoAmI")

    assert second.ca_path.read_bytes() == ca
    assert response.status_code == 401


def test_a_stopped_simulator_refuses_connections(tmp_path: Path) -> None:
    sim = CrmSimulator(tmp_path, host="127.0.0.1", authority_port=0).start()
    org = sim.add_org("short")
    http(sim, "GET", f"{org.url}{API}WhoAmI")  # leaves a keep-alive connection behind

    sim.stop()

    with pytest.raises(requests.ConnectionError):
        http(sim, "GET", f"{org.url}{API}WhoAmI")


def test_the_fixture_moves_to_the_next_loopback_address_when_443_is_taken(
    simulator: CrmSimulator, tmp_path: Path
) -> None:
    n = int(simulator.host.rsplit(".", 1)[1])

    second = start_simulator(tmp_path, first=n)
    try:
        assert second.host != simulator.host
    finally:
        second.stop()


def test_cli_build_makes_the_demo_org_and_the_environment_lines(tmp_path: Path) -> None:
    sim, credentials = build(None, tmp_path, "127.0.0.1", 0)
    with sim:
        lines = environment_lines(sim)
        org = sim.org(DEMO_ORG)
        # A raw password grant: azure-identity's realm lookup needs the authority on port 443.
        granted = raw_token(
            sim,
            org.tenant_id,
            {
                "grant_type": "password",
                "client_id": SIM_PUBLIC_CLIENT_ID,
                "username": DEMO_USERNAME,
                "password": DEMO_PASSWORD,
                "scope": f"{org.url}/.default",
            },
        )
        response = http(sim, "GET", f"{org.url}{API}WhoAmI", granted.json()["access_token"])

    assert lines == [
        f"export AZURE_AUTHORITY_HOST={sim.authority_host}",
        f"export REQUESTS_CA_BUNDLE={sim.ca_path}",
        "export LEADWRITER_CRM_ALLOWED_HOSTS=127.0.0.1:*",
    ]
    assert any(DEMO_USERNAME in line for line in credentials)
    assert response.status_code == 200


def test_cli_run_serves_until_sigterm_and_stops_cleanly(tmp_path: Path) -> None:
    code = (
        "import sys; from pathlib import Path; from shared.simulator.cli import run; "
        "run(None, Path(sys.argv[1]), '127.0.0.1', 0)"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "COLUMNS": "200"}
    process = subprocess.Popen(
        [sys.executable, "-c", code, str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        lines: list[str] = []
        assert process.stdout is not None
        for line in process.stdout:
            lines.append(line)
            if "Press Ctrl+C" in line:
                break
        process.send_signal(signal.SIGTERM)
        process.wait(TIMEOUT)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()

    output = "".join(lines)
    assert process.returncode == 0
    assert "export AZURE_AUTHORITY_HOST=https://127.0.0.1:" in output
    assert "export LEADWRITER_CRM_ALLOWED_HOSTS=127.0.0.1:*" in output
    assert "contoso" in output


def test_simulator_settings_point_lead_writer_at_the_simulator(
    simulator: CrmSimulator, tmp_path: Path
) -> None:
    settings = simulator_settings(simulator, tmp_path, LEADWRITER_MIN_SOLUTION_VERSION="1.1.0.0")

    assert settings.authority_host == simulator.authority_host
    assert settings.ca_bundle == simulator.ca_path
    assert settings.crm_allowed_hosts == (f"{simulator.host}:*",)
    assert settings.data_dir == tmp_path
    assert settings.min_solution_version == "1.1.0.0"


def test_the_contact_preference_columns_take_booleans_only(
    simulator: CrmSimulator, crm_org: SimOrg, token: str
) -> None:
    body = {"lastname": "Lovelace", "donotemail": True, "donotphone": False}
    ok = create_only(simulator, crm_org, token, str(uuid.uuid4()), body)
    assert ok.status_code == 204
    bad = create_only(simulator, crm_org, token, str(uuid.uuid4()), {"lastname": "Lovelace", "donotemail": "yes"})
    assert bad.status_code == 400
    assert "Edm.Boolean" in bad.json()["error"]["message"]
