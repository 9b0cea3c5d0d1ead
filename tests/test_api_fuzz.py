"""Property-based fuzzing of the API from its own OpenAPI document: hundreds of generated requests —
documented and invented paths, random publisher ids, query strings, headers, keys and JSON (or not)
bodies — over a real socket. None may answer 500, and every answer is JSON with the security headers.

The app runs against the CRM simulator, so a generated connection that happens to be well-formed is
verified for real against a local CRM and never reaches a host outside this machine.
"""

from __future__ import annotations

import json
import string
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared.simulator import CrmSimulator, SimOrg
from tests.fixtures.api import ADMIN_KEY, MARKETPLACE_LEAD, SECURITY_HEADERS, ApiStack, api_stack
from tests.fixtures.simulator import SIM_CLIENT_ID, SIM_CLIENT_SECRET, SIM_PASSWORD, sim_username

EXAMPLES = 350
PUBLISHER = "fuzzpub"

json_scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=40)
json_values = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=20,
)
# The publisher whose key the generator holds comes up often, so requests get past authorisation.
publisher_ids = st.one_of(
    st.just(PUBLISHER),
    st.just(PUBLISHER),
    st.sampled_from(["other-pub", "A.b_c-9", "-bad", "x" * 41, "", "a/b", "ü", "..", "%00"]),
    st.text(max_size=45),
)
field_names = st.sampled_from(
    [
        "url",
        "auth",
        "kind",
        "username",
        "password",
        "tenantId",
        "clientId",
        "clientSecret",
        "queue",
        "reason",
        "publisherId",
        "messageIds",
        "dryRun",
        "confirm",
        "limit",
        "lead",
        "leadId",
        "UserDetails",
        "userDetails",
        "LeadSource",
    ]
) | st.text(max_size=10)


@st.composite
def lead_like(draw: st.DrawFn) -> Any:
    """Mostly lead-shaped objects with random holes, types and extra keys."""
    base: dict[str, Any] = dict(MARKETPLACE_LEAD)
    for name in draw(st.lists(st.sampled_from(list(base)), max_size=3)):
        base[name] = draw(json_values)
    if draw(st.booleans()):
        return {
            "leadId": draw(json_values),
            "publisherId": draw(st.sampled_from([PUBLISHER, "zz", None])),
            "lead": base,
        }
    return base


@st.composite
def connection_like(draw: st.DrawFn, org: SimOrg) -> Any:
    """Connection bodies, from valid (for the simulator's org) to broken in one or more places."""
    url = draw(
        st.sampled_from(
            [
                org.url,
                org.url + "/",
                "http://127.0.0.1/",
                "https://169.254.169.254",
                "https://user@x.crm.dynamics.com.evil",
            ]
        )
        | st.text(max_size=30)
    )
    auth = draw(
        st.sampled_from(
            [
                {"kind": "password", "username": sim_username(org), "password": SIM_PASSWORD},
                {"kind": "password", "username": sim_username(org), "password": "nope"},
                {
                    "kind": "clientSecret",
                    "tenantId": org.tenant_id,
                    "clientId": SIM_CLIENT_ID,
                    "clientSecret": SIM_CLIENT_SECRET,
                },
                {"kind": "clientSecret", "tenantId": "not-a-tenant!", "clientId": "x", "clientSecret": "y"},
                {"kind": "password"},
                {"kind": "oauth"},
            ]
        )
    )
    body: dict[str, Any] = {"url": url, "auth": dict(auth)}
    for name in draw(st.lists(field_names, max_size=2)):
        target = body["auth"] if draw(st.booleans()) else body
        target[name] = draw(json_values)
    return body


def bodies(org: SimOrg, template: str) -> st.SearchStrategy[Any]:
    """Bodies shaped for the route more often than not (so some get through), anything else besides."""
    selection = st.fixed_dictionaries(
        {},
        optional={
            "queue": st.sampled_from(["leads-incoming", "leads-ready", "nope"]) | json_values,
            "reason": st.sampled_from(["CredentialsMissing", "InvalidLead"]) | json_values,
            "publisherId": publisher_ids | json_values,
            "messageIds": st.lists(st.text(max_size=10), max_size=3) | json_values,
            "dryRun": st.booleans() | json_values,
            "confirm": st.booleans() | json_values,
            "limit": st.integers(-5, 2_000_000) | json_values,
        },
    )
    anything = st.one_of(json_values, st.dictionaries(field_names, json_values), lead_like(), connection_like(org))
    if template.endswith("/leads"):
        return lead_like() | lead_like() | anything
    if template.endswith("/connection"):
        return connection_like(org) | connection_like(org) | anything
    if template.startswith("/api/deadletters"):
        return selection | selection | anything
    return anything


@st.composite
def requests_from(
    draw: st.DrawFn, operations: list[tuple[str, str, dict[str, Any]]], org: SimOrg, keys: dict[str, str]
) -> dict[str, Any]:
    method, template, operation = draw(st.sampled_from(operations))
    # Key routes get publishers of their own: re-issuing or revoking the generator's keys would turn
    # every later request into a 401 and the fuzzing would stop at the door.
    target = draw(
        publisher_ids.filter(lambda p: p not in (PUBLISHER, "other-pub")) if "/keys" in template else publisher_ids
    )
    path = template.replace("{publisherId}", quote(target, safe=""))
    params: dict[str, str] = {}
    for parameter in operation.get("parameters", []):
        if parameter["in"] == "query" and draw(st.booleans()):
            params[parameter["name"]] = draw(
                st.sampled_from(["true", "false", "0", "1000", "-1", "leads-incoming", keys["publisher"], ""])
                | st.text(max_size=20)
            )
    if draw(st.booleans()):
        params[draw(st.text(string.ascii_letters, min_size=1, max_size=8))] = draw(st.text(max_size=10))
    authorization = draw(
        st.sampled_from([f"Bearer {ADMIN_KEY}", f"Bearer {keys['publisher']}"])
        | st.sampled_from(
            [
                None,
                f"Bearer {keys['other']}",
                "Bearer lw_fuzzpub_00000000_forged",
                "Bearer",
                "Basic Zm9vOmJhcg==",
            ]
        )
        | st.text(string.printable.strip(), max_size=30).map(lambda text: f"Bearer {text}")
    )
    # h11 refuses header values with surrounding whitespace before they are sent.
    headers = {"Authorization": authorization.strip()} if authorization and authorization.strip() else {}
    raw = draw(st.booleans()) and draw(st.integers(0, 9)) == 0
    content: bytes | None = None
    json_body: Any = None
    if method in ("POST", "PUT", "DELETE", "PATCH"):
        if raw:
            content = draw(st.binary(max_size=200))
        else:
            json_body = draw(bodies(org, template))
    headers["Content-Type"] = draw(
        st.sampled_from(["application/json", "application/json; charset=utf-8", "text/plain", ""])
    )
    if not headers["Content-Type"]:
        del headers["Content-Type"]
    return {"method": method, "url": path, "params": params, "headers": headers, "content": content, "json": json_body}


def check(answer: httpx.Response) -> None:
    """The invariants of every answer."""
    request = answer.request
    assert answer.status_code != 500, f"{request.method} {request.url}: {answer.text}"
    assert answer.status_code < 500 or (answer.status_code == 503 and answer.headers.get("Retry-After")), answer.text
    for name, value in SECURITY_HEADERS.items():
        assert answer.headers.get(name) == value
    if answer.status_code != 204 and request.method != "HEAD":
        assert answer.headers["content-type"].startswith("application/json")
        assert "Traceback" not in answer.text
    if answer.status_code == 401:
        assert answer.headers["WWW-Authenticate"] == "Bearer"


@pytest.fixture(scope="module")
def fuzz_org(simulator: CrmSimulator) -> SimOrg:
    org = simulator.add_org(PUBLISHER)
    simulator.add_user(org.name, sim_username(org), SIM_PASSWORD)
    simulator.add_app(org.name, SIM_CLIENT_ID, SIM_CLIENT_SECRET)
    return org


@pytest.fixture(scope="module")
def stack(simulator: CrmSimulator, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiStack]:
    with api_stack(tmp_path_factory.mktemp("fuzz") / "data", simulator) as running:
        yield running


def test_generated_requests_from_the_openapi_document_never_get_a_500(stack: ApiStack, fuzz_org: SimOrg) -> None:
    document = stack.client.get("/api/openapi.json").json()
    operations = [
        (method.upper(), path, operation)
        for path, item in document["paths"].items()
        for method, operation in item.items()
    ]
    keys = {"publisher": stack.key_for(PUBLISHER), "other": stack.key_for("other-pub")}
    sent: list[int] = []

    @settings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(request=requests_from(operations, fuzz_org, keys))
    def fuzz(request: dict[str, Any]) -> None:
        content = request["content"]
        if request["json"] is not None:
            # Serialised here, not by httpx: NaN and Infinity go out as the tokens Python's parser accepts.
            content = json.dumps(request["json"]).encode()
        answer = stack.client.request(
            request["method"], request["url"], params=request["params"], headers=request["headers"], content=content
        )
        sent.append(answer.status_code)
        check(answer)

    fuzz()
    assert len(sent) >= EXAMPLES
    # The generator reaches past authentication into the routes, not only 401s.
    assert {200, 401, 403, 422} <= set(sent), sorted(set(sent))


def test_invented_paths_and_methods_never_get_a_500(stack: ApiStack) -> None:
    sent: list[int] = []
    segment = st.text(string.ascii_letters + string.digits + "-._~%{}", max_size=12)

    @settings(max_examples=150, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(
        method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"]),
        segments=st.lists(segment, max_size=6),
        authorization=st.sampled_from([None, f"Bearer {ADMIN_KEY}", "Bearer junk"]),
    )
    def fuzz(method: str, segments: list[str], authorization: str | None) -> None:
        path = "/" + "/".join(["api", *segments])
        headers = {"Authorization": authorization} if authorization else {}
        answer = stack.client.request(method, path, headers=headers)
        sent.append(answer.status_code)
        check(answer)

    fuzz()
    assert len(sent) >= 150
    assert 404 in sent


def test_the_data_dir_is_never_exposed_by_a_path(stack: ApiStack) -> None:
    for path in ("/api/../secrets.db", "/api/%2e%2e/broker.db", "/api/publishers/..%2f..%2fsecret.key/status"):
        answer = stack.client.get(path, headers={"Authorization": f"Bearer {ADMIN_KEY}"})
        assert answer.status_code in (404, 422)
        check(answer)
    assert Path(stack.data_dir).exists()
