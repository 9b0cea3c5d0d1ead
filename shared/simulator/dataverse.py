"""The simulated Dataverse Web API of one org (``/api/data/v9.2/``): WhoAmI, the solutions query,
RetrieveUserPrivileges, lead create / update / upsert with their preconditions and column validation,
``$batch``, the bearer challenge, service protection limits and injected faults."""

from __future__ import annotations

import json
import logging
import re
import threading
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any
from urllib.parse import unquote, urlsplit

from shared.simulator import batch as batching
from shared.simulator import metadata
from shared.simulator.faults import Fault
from shared.simulator.limits import Rejection
from shared.simulator.server import Request, Response, parse_target
from shared.simulator.state import ROLE_PRIVILEGES, Directory, OrgState, Principal

logger = logging.getLogger(__name__)

API_PREFIX = "/api/data/v9.2/"

#: Text columns of ``lead`` the simulator knows, with their maximum lengths in UTF-16 code units.
TEXT_COLUMNS: dict[str, int] = {
    "subject": 300,
    "firstname": 50,
    "lastname": 50,
    "emailaddress1": 100,
    "telephone1": 50,
    "companyname": 100,
    "jobtitle": 100,
    "address1_country": 80,
    "description": 2000,
}
OPTION_SET_COLUMN = "leadsourcecode"
#: Two-option (boolean) contact-preference columns of ``lead``.
BOOLEAN_COLUMNS = frozenset({"donotemail", "donotphone", "donotbulkemail", "donotpostalmail", "donotsendmm"})
READ_ONLY_COLUMNS = frozenset({"fullname"})

#: Dataverse's "Cannot insert duplicate key" (-2147220937): a create whose record id is taken.
DUPLICATE_KEY = "0x80040237"

_GUID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
_LEAD_KEY = re.compile(r"^leads\((?:leadid=)?([^)]*)\)$")
_PRIVILEGES = re.compile(
    r"^systemusers\(([^)]*)\)/Microsoft\.Dynamics\.CRM\.RetrieveUserPrivileges(?:\(\))?$", re.IGNORECASE
)
_FILTER_NAME = re.compile(r"uniquename\s+eq\s+'((?:[^']|'')*)'", re.IGNORECASE)

#: What every user has without any role assigned.
BASE_PRIVILEGES = ("prvReadOrganization",)
_PRIVILEGE_IDS = {
    name: str(uuid.uuid5(uuid.NAMESPACE_URL, f"leadwriter-sim:{name}"))
    for name in ROLE_PRIVILEGES + BASE_PRIVILEGES
}
_ENTITY_OTC = {"lead": 4, "solution": 7100}

#: The bulk create action bound to the lead entity set (architecture §4).
CREATE_MULTIPLE = "leads/Microsoft.Dynamics.CRM.CreateMultiple"
_LEAD_TYPE = "Microsoft.Dynamics.CRM.lead"

_JSON_TYPE = "application/json; odata.metadata=minimal"
_ODATA = ("OData-Version", "4.0")


def dataverse_error(
    status: int, code: str, message: str, headers: list[tuple[str, str]] | None = None
) -> Response:
    """A Dataverse-style error answer: ``{"error": {"code": …, "message": …}}``."""
    body = json.dumps({"error": {"code": code, "message": message}}).encode("utf-8")
    return Response(status, body, [("Content-Type", _JSON_TYPE), _ODATA, *(headers or [])])


def _json(status: int, payload: Any, headers: list[tuple[str, str]] | None = None) -> Response:
    body = json.dumps(payload).encode("utf-8")
    return Response(status, body, [("Content-Type", _JSON_TYPE), _ODATA, *(headers or [])])


def utf16_length(text: str) -> int:
    """Length as Dataverse counts it: UTF-16 code units (an emoji outside the BMP counts 2)."""
    return len(text.encode("utf-16-le")) // 2


@dataclass
class Call:
    """One Dataverse operation: a top-level request or a part of a ``$batch``."""

    method: str
    path: str
    query: dict[str, str]
    headers: Mapping[str, str]
    body: bytes
    top_level: bool = True
    #: Modelled server execution time (seconds) this call spends, added up by the handlers.
    cost: float = 0.0

    def header(self, name: str) -> str:
        return self.headers.get(name.lower(), "")


def _relative(path: str) -> str | None:
    if path.startswith(API_PREFIX):
        return path[len(API_PREFIX) :]
    if path.rstrip("/") == API_PREFIX.rstrip("/"):
        return ""
    return None


def _kind(method: str, relative: str | None) -> str:
    if relative is None:
        return ""
    lowered = relative.lower()
    if lowered.startswith("whoami"):
        return "whoami"
    if lowered.startswith("solutions"):
        return "solutions"
    if relative == "$batch":
        return "batches"
    if relative == CREATE_MULTIPLE and method == "POST":
        return "create_multiple"
    if relative.startswith("leads") and method in ("POST", "PATCH"):
        return "lead_writes"
    return ""


class DataverseApp:
    """The application behind one org's listener."""

    def __init__(self, org: OrgState, directory: Directory, stopping: threading.Event) -> None:
        self._org = org
        self._directory = directory
        self._stopping = stopping

    # --- request pipeline ------------------------------------------------------------------------

    def __call__(self, request: Request) -> Response:
        org = self._org
        relative = _relative(request.path)
        org.counters.arrive(_kind(request.method, relative))
        try:
            return self._serve(request, relative)
        finally:
            org.counters.leave()

    def _serve(self, request: Request, relative: str | None) -> Response:
        org = self._org
        delay = org.latency + org.faults.latency
        if delay > 0:
            self._stopping.wait(delay)
        response = self._execute(request, relative)
        if org.dop_hint is not None and response.status != 0:
            response.headers.append(("x-ms-dop-hint", str(org.dop_hint)))
        return response

    def _execute(self, request: Request, relative: str | None) -> Response:
        org = self._org
        # The latency stands for the network: the execution-time limit counts only what runs here.
        started = time.monotonic()
        principal, refusal = self._authenticate(request)
        if principal is None:
            fault = org.faults.take(authenticated=False)
            early = self._apply(fault) if fault is not None else None
            return early or refusal or self._challenge()
        rejection = org.limits.admit(principal.key)
        if rejection is not None:
            return self._throttled(rejection)
        try:
            fault = org.faults.take()
            if fault is not None and fault.kind == "throttle":
                return self._throttled(org.limits.penalise(principal.key, fault.seconds))
            early = self._apply(fault) if fault is not None else None
            if early is not None:
                return early
            if relative is None:
                return dataverse_error(
                    404, "0x80060888", f"Resource not found for the segment '{request.path}'."
                )
            headers = {name.lower(): str(value) for name, value in request.headers.items()}
            call = Call(request.method, relative, request.query, headers, request.body)
            call.cost += org.execution.request_ms / 1000
            routed = self._route(call, principal)
            if call.cost > 0:
                # The server really takes that long: a client timing its requests sees the cost.
                self._stopping.wait(call.cost)
            if fault is not None and fault.kind == "reset_after":
                # Carried out, never answered: the client must find out by retrying (idempotently).
                return Response(0, reset=True)
            return routed
        finally:
            spent = time.monotonic() - started
            org.counters.charge(spent)
            org.limits.done(principal.key, spent)

    def _apply(self, fault: Fault) -> Response | None:
        if fault.kind == "reset":
            return Response(0, reset=True)
        if fault.kind == "hang":
            # Stall, then carry on: the request still happens, as on a slow server after the
            # client gave up waiting (which is what makes idempotent retries necessary).
            self._org.faults.stall(fault.seconds, self._stopping)
            return None
        if fault.kind == "redirect":
            return Response(302, b"", [("Location", fault.location), _ODATA])
        if fault.kind == "fail":
            if fault.status == 500:
                return dataverse_error(500, "0x80040216", "An unexpected error occurred.")
            phrase = (
                HTTPStatus(fault.status).phrase if fault.status in HTTPStatus._value2member_map_ else "Error"
            )
            return dataverse_error(
                fault.status, "", f"{phrase}. The service is unable to process the request."
            )
        return None

    def _challenge(self) -> Response:
        org = self._org
        value = (
            f"Bearer authorization_uri=https://login.microsoftonline.com/{org.tenant_id}/oauth2/authorize, "
            f"resource_id={org.url}/"
        )
        return Response(401, b"", [("WWW-Authenticate", value), _ODATA])

    def _authenticate(self, request: Request) -> tuple[Principal | None, Response | None]:
        header = request.header("Authorization")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return None, None
        info = self._directory.resolve_token(token.strip())
        if info is None or info.org != self._org.name:
            return None, None
        with self._org.lock:
            principal = self._org.principals.get(info.principal)
        if principal is None:
            return None, dataverse_error(403, "0x80072560", "The user is not a member of the organization.")
        return principal, None

    def _throttled(self, rejection: Rejection) -> Response:
        counters = self._org.counters
        counters.add("throttled")
        if rejection.during_penalty:
            counters.add("during_penalty")
        return dataverse_error(
            429, rejection.code, rejection.message, [("Retry-After", rejection.retry_after_header)]
        )

    # --- routes ----------------------------------------------------------------------------------

    def _route(self, call: Call, principal: Principal) -> Response:
        path, method = call.path, call.method
        if path == "":
            return _json(
                200,
                {
                    "@odata.context": f"{self._base()}$metadata",
                    "value": [
                        {"name": "leads", "kind": "EntitySet", "url": "leads"},
                        {"name": "solutions", "kind": "EntitySet", "url": "solutions"},
                    ],
                },
            )
        if path.lower() in ("whoami", "whoami()"):
            return self._whoami(principal) if method == "GET" else _method_not_allowed()
        if path == "solutions":
            return self._solutions(call, principal) if method == "GET" else _method_not_allowed()
        if path == "$batch":
            if method != "POST" or not call.top_level:
                return dataverse_error(
                    400, "0x80060888", "A $batch request cannot be nested or sent without POST."
                )
            return self._batch(call, principal)
        if path == "leads":
            return self._create(call, principal) if method == "POST" else _method_not_allowed()
        if path == CREATE_MULTIPLE:
            if method != "POST" or not call.top_level:
                return _method_not_allowed()
            return self._create_multiple(call, principal)
        match = _LEAD_KEY.match(path)
        if match:
            key = match.group(1).strip("'")
            if not _GUID.match(key):
                return dataverse_error(400, "0x80060888", "Bad Request - Error in query syntax.")
            lead_id = key.lower()
            if method == "PATCH":
                return self._patch(call, principal, lead_id)
            if method == "GET":
                return self._get_lead(principal, lead_id)
            return _method_not_allowed()
        match = _PRIVILEGES.match(path)
        if match:
            return self._privileges(principal, match.group(1)) if method == "GET" else _method_not_allowed()
        served = metadata.route(
            self._org, method, path, call.query, self._base(), TEXT_COLUMNS, dataverse_error, _json
        )
        if served is not None:
            return served
        segment = path.split("/", 1)[0].split("(", 1)[0]
        return dataverse_error(404, "0x80060888", f"Resource not found for the segment '{segment}'.")

    def _custom_columns(self) -> dict[str, tuple[str, int | None]]:
        with self._org.lock:
            return dict(self._org.records.columns)

    def _base(self) -> str:
        return f"{self._org.url}{API_PREFIX}"

    def _whoami(self, principal: Principal) -> Response:
        org = self._org
        return _json(
            200,
            {
                "@odata.context": f"{self._base()}$metadata#Microsoft.Dynamics.CRM.WhoAmIResponse",
                "BusinessUnitId": org.business_unit_id,
                "UserId": principal.system_user_id,
                "OrganizationId": org.organization_id,
            },
        )

    def _missing_privilege(self, principal: Principal, privilege: str, entity: str) -> Response:
        user = principal.system_user_id
        return dataverse_error(
            403,
            "0x80040220",
            f"Principal user (Id={user}, type=8, roleCount={1 if principal.has_role else 0}, "
            f"privilegeCount={len(BASE_PRIVILEGES)}, accessMode=0), is missing {privilege} privilege "
            f"(Id={_PRIVILEGE_IDS[privilege]}) on OTC={_ENTITY_OTC[entity]} for entity '{entity}'. "
            f"context.Caller={user}. Consider assigning a role with the required privilege to the user.",
        )

    def _solutions(self, call: Call, principal: Principal) -> Response:
        if not self._org.grants(principal, "prvReadSolution"):
            return self._missing_privilege(principal, "prvReadSolution", "solution")
        org = self._org
        with org.lock:
            version, name = org.solution_version, org.solution_name
        wanted: str | None = None
        filter_text = call.query.get("$filter")
        if filter_text:
            match = _FILTER_NAME.search(filter_text)
            if match is None:
                return dataverse_error(400, "0x80060888", f"Invalid $filter expression: '{filter_text}'.")
            wanted = match.group(1).replace("''", "'")
        rows = []
        if version is not None and (wanted is None or wanted.lower() == name.lower()):
            rows.append(
                {
                    "@odata.etag": 'W/"1"',
                    "uniquename": name,
                    "version": version,
                    "solutionid": org.solution_id,
                }
            )
        return _json(
            200,
            {"@odata.context": f"{self._base()}$metadata#solutions(uniquename,version)", "value": rows},
        )

    def _privileges(self, principal: Principal, user_id: str) -> Response:
        org = self._org
        user_id = user_id.strip("'").lower()
        with org.lock:
            subject = next((p for p in org.principals.values() if p.system_user_id.lower() == user_id), None)
        if subject is None:
            return dataverse_error(404, "0x80040217", f"systemuser With Id = {user_id} Does Not Exist")
        names = BASE_PRIVILEGES + tuple(name for name in ROLE_PRIVILEGES if org.grants(subject, name))
        return _json(
            200,
            {
                "@odata.context": (
                    f"{self._base()}$metadata#Microsoft.Dynamics.CRM.RetrieveUserPrivilegesResponse"
                ),
                "RolePrivileges": [
                    {
                        "Depth": "Basic",
                        "PrivilegeId": _PRIVILEGE_IDS[name],
                        "BusinessUnitId": org.business_unit_id,
                        "PrivilegeName": name,
                    }
                    for name in names
                ],
            },
        )

    # --- leads -----------------------------------------------------------------------------------

    def _entity_id(self, lead_id: str) -> str:
        return f"{self._base()}leads({lead_id})"

    def _written(self, call: Call, record: dict[str, Any], created: bool) -> Response:
        location = self._entity_id(record["leadid"])
        headers = [("OData-EntityId", location)]
        if "return=representation" in call.header("prefer").lower():
            payload = {
                "@odata.context": f"{self._base()}$metadata#leads/$entity",
                "@odata.etag": 'W/"1"',
                **record,
            }
            return _json(
                201 if created else 200, payload, [*headers, ("Preference-Applied", "return=representation")]
            )
        return Response(204, b"", [_ODATA, *headers])

    def _get_lead(self, principal: Principal, lead_id: str) -> Response:
        if not self._org.grants(principal, "prvReadLead"):
            return self._missing_privilege(principal, "prvReadLead", "lead")
        with self._org.lock:
            record = self._org.leads.get(lead_id)
        if record is None:
            return _lead_missing(lead_id)
        return _json(200, {"@odata.context": f"{self._base()}$metadata#leads/$entity", **record})

    def _create(self, call: Call, principal: Principal) -> Response:
        if call.top_level:
            call.cost += self._org.execution.create_ms / 1000
        body, problem = _parse_lead(call.body, self._custom_columns())
        if problem is not None:
            return problem
        if not self._org.grants(principal, "prvCreateLead"):
            return self._missing_privilege(principal, "prvCreateLead", "lead")
        lead_id = str(body.get("leadid") or uuid.uuid4()).lower()
        problem = _check_values(body, self._org.lead_source_codes, self._custom_columns())
        if problem is None:
            problem = metadata.check_lookups(self._org, body, dataverse_error)
        if problem is not None:
            return problem
        with self._org.lock:
            if lead_id in self._org.leads:
                return dataverse_error(412, "0x80040237", "A record with matching key values already exists.")
            record = {**_columns(body), **metadata.lookup_values(body), "leadid": lead_id}
            self._org.leads[lead_id] = record
        return self._written(call, record, created=True)

    def _patch(self, call: Call, principal: Principal, lead_id: str) -> Response:
        if call.top_level:
            call.cost += self._org.execution.create_ms / 1000
        body, problem = _parse_lead(call.body, self._custom_columns())
        if problem is not None:
            return problem
        if "leadid" in body and str(body["leadid"]).lower() != lead_id:
            return dataverse_error(
                400, "0x80060888", "The key in the request body does not match the key in the URL."
            )
        create_only = call.header("if-none-match").strip() == "*"
        update_only = call.header("if-match").strip() == "*"
        org = self._org
        with org.lock:
            existing = org.leads.get(lead_id)
            privilege = "prvWriteLead" if existing is not None and not create_only else "prvCreateLead"
            if not org.grants(principal, privilege):
                return self._missing_privilege(principal, privilege, "lead")
            if create_only and existing is not None:
                return dataverse_error(412, "0x80060882", "A record with matching key values already exists.")
            if update_only and existing is None:
                return _lead_missing(lead_id)
            problem = _check_values(body, org.lead_source_codes, self._custom_columns())
            if problem is None:
                problem = metadata.check_lookups(org, body, dataverse_error)
            if problem is not None:
                return problem
            # A new dict, never an in-place change: a change set's snapshot must stay intact.
            written = {**_columns(body), **metadata.lookup_values(body)}
            record = {**written, "leadid": lead_id} if existing is None else {**existing, **written}
            org.leads[lead_id] = record
        return self._written(call, record, created=existing is None)

    # --- CreateMultiple ---------------------------------------------------------------------------

    def _create_multiple(self, call: Call, principal: Principal) -> Response:
        """``POST leads/Microsoft.Dynamics.CRM.CreateMultiple`` with ``{"Targets": [...]}``: atomic, as
        on a standard table — one target that is refused or already exists fails the whole call and
        nothing is written; otherwise 200 with the ``Ids`` in target order."""
        org = self._org
        try:
            payload = json.loads(call.body.decode("utf-8")) if call.body.strip() else None
        except (UnicodeDecodeError, ValueError):
            return dataverse_error(400, "0x80060888", "Invalid JSON. A token was not recognized in the JSON content.")
        targets = payload.get("Targets") if isinstance(payload, dict) else None
        if not isinstance(targets, list) or not targets:
            return dataverse_error(
                400, "0x80060888", "The parameter 'Targets' of the CreateMultiple action must be a non-empty list."
            )
        org.counters.add("create_multiple_targets", len(targets))
        call.cost += len(targets) * org.execution.create_multiple_ms / 1000
        if not org.grants(principal, "prvCreateLead"):
            return self._missing_privilege(principal, "prvCreateLead", "lead")
        custom = self._custom_columns()
        records: list[dict[str, Any]] = []
        for target in targets:
            if not isinstance(target, dict) or target.get("@odata.type") != _LEAD_TYPE:
                return dataverse_error(
                    400,
                    "0x80048d19",
                    "You must specify the @odata.type annotation 'Microsoft.Dynamics.CRM.lead' with every "
                    "item in the Targets parameter.",
                )
            body, problem = _parse_lead(json.dumps(target).encode("utf-8"), custom)
            if problem is None:
                problem = _check_values(body, org.lead_source_codes, custom)
            if problem is None:
                problem = metadata.check_lookups(org, body, dataverse_error)
            if problem is not None:
                return problem
            lead_id = str(body.get("leadid") or uuid.uuid4()).lower()
            records.append({**_columns(body), **metadata.lookup_values(body), "leadid": lead_id})
        ids = [record["leadid"] for record in records]
        with org.lock:
            if len(set(ids)) != len(ids) or any(lead_id in org.leads for lead_id in ids):
                return dataverse_error(400, DUPLICATE_KEY, "Cannot insert duplicate key.")
            for record in records:
                org.leads[record["leadid"]] = record
        return _json(
            200,
            {"@odata.context": f"{self._base()}$metadata#Microsoft.Dynamics.CRM.CreateMultipleResponse", "Ids": ids},
        )

    # --- $batch ----------------------------------------------------------------------------------

    def _batch(self, call: Call, principal: Principal) -> Response:
        try:
            items = batching.parse_batch(call.header("content-type"), call.body)
        except batching.BatchFormatError as exc:
            return dataverse_error(400, "0x80060888", str(exc))
        count = batching.count_operations(items)
        self._org.counters.add("batch_operations", count)
        call.cost += count * self._org.execution.batch_part_ms / 1000
        if count > batching.MAX_OPERATIONS:
            return dataverse_error(
                400,
                "0x8006088a",
                f"The number of requests in the batch ({count}) exceeds the maximum of "
                f"{batching.MAX_OPERATIONS}.",
            )
        continue_on_error = "odata.continue-on-error" in call.header("prefer").lower()
        results: list[batching.ItemResult] = []
        for item in items:
            if isinstance(item, batching.Operation):
                result = self._operation(item, principal)
                results.append(result)
                failed = result.status >= 400
            else:
                failed = self._change_set(item, principal, results)
            if failed and not continue_on_error:
                break
        content_type, body = batching.render_batch(results)
        return Response(200, body, [("Content-Type", content_type), _ODATA])

    def _change_set(
        self, change_set: batching.ChangeSet, principal: Principal, results: list[batching.ItemResult]
    ) -> bool:
        """Run a change set atomically. Appends its result(s); returns whether it failed."""
        org = self._org
        done: list[batching.OperationResult] = []
        with org.lock:
            snapshot = dict(org.leads)
            for operation in change_set.operations:
                if operation.method == "GET":
                    result = batching.OperationResult(
                        400,
                        [("Content-Type", _JSON_TYPE), _ODATA],
                        b'{"error":{"code":"0x80060888",'
                        b'"message":"GET requests are not allowed in a change set."}}',
                        operation.content_id,
                    )
                else:
                    result = self._operation(operation, principal)
                if result.status >= 400:
                    org.leads = snapshot
                    # A failed change set answers with the failing operation alone.
                    results.append(result)
                    return True
                done.append(result)
        results.append(batching.ChangeSetResult(done))
        return False

    def _operation(self, operation: batching.Operation, principal: Principal) -> batching.OperationResult:
        target = urlsplit(operation.url)
        path = unquote(target.path)
        relative = _relative(path) if path.startswith("/") else path
        if relative is None:
            response = dataverse_error(404, "0x80060888", f"Resource not found for the segment '{path}'.")
        else:
            _, query = parse_target(f"/?{target.query}")
            call = Call(operation.method, relative, query, operation.headers, operation.body, top_level=False)
            response = self._route(call, principal)
        return batching.OperationResult(
            response.status, response.headers, response.body, operation.content_id
        )


def _method_not_allowed() -> Response:
    return dataverse_error(405, "0x80060888", "The requested resource does not support this HTTP method.")


def _lead_missing(lead_id: str) -> Response:
    return dataverse_error(404, "0x80040217", f"lead With Id = {lead_id} Does Not Exist")


def _columns(body: dict[str, Any]) -> dict[str, Any]:
    return {name: value for name, value in body.items() if name != "leadid" and "@" not in name}


_CUSTOM_TYPES: dict[str, tuple[str, tuple[type, ...]]] = {
    "String": ("Edm.String", (str,)),
    "Memo": ("Edm.String", (str,)),
    "Integer": ("Edm.Int32", (int,)),
    "Picklist": ("Edm.Int32", (int,)),
    "Boolean": ("Edm.Boolean", (bool,)),
    "Double": ("Edm.Double", (int, float)),
}


def _parse_lead(
    raw: bytes, custom: Mapping[str, tuple[str, int | None]] | None = None
) -> tuple[dict[str, Any], Response | None]:
    """Parse a lead body and check its shape: known columns (and the org's custom ones), JSON types, no
    read-only column. Lookup binds (``<column>@odata.bind``) are checked by metadata.check_lookups."""
    try:
        body = json.loads(raw.decode("utf-8")) if raw.strip() else {}
    except (UnicodeDecodeError, ValueError):
        return {}, dataverse_error(
            400, "0x80060888", "Invalid JSON. A token was not recognized in the JSON content."
        )
    if not isinstance(body, dict):
        return {}, dataverse_error(
            400,
            "0x80060888",
            "An unexpected 'StartArray' node was found when reading from the JSON reader. "
            "A 'StartObject' node was expected.",
        )
    for name, value in body.items():
        if name.startswith("@odata.") or name.endswith("@odata.bind"):
            continue
        if name in READ_ONLY_COLUMNS:
            return {}, dataverse_error(
                400,
                "0x80040203",
                f"The '{name}' attribute of the 'lead' entity is read-only and cannot be set.",
            )
        if name in TEXT_COLUMNS or name == "leadid":
            expected = "Edm.String" if name != "leadid" else "Edm.Guid"
            ok = value is None or isinstance(value, str)
            if ok and name == "leadid" and not (isinstance(value, str) and _GUID.match(value)):
                ok = False
        elif name in BOOLEAN_COLUMNS:
            expected = "Edm.Boolean"
            ok = value is None or isinstance(value, bool)
        elif name == OPTION_SET_COLUMN:
            expected = "Edm.Int32"
            ok = value is None or (isinstance(value, int) and not isinstance(value, bool))
        elif custom and name in custom:
            expected, types = _CUSTOM_TYPES.get(custom[name][0], ("Edm.String", (str,)))
            ok = value is None or (isinstance(value, types) and (bool in types or not isinstance(value, bool)))
        else:
            return {}, dataverse_error(
                400,
                "0x80060888",
                f"Could not find a property named '{name}' on type 'Microsoft.Dynamics.CRM.lead'.",
            )
        if not ok:
            if isinstance(value, dict | list):
                node = "StartObject" if isinstance(value, dict) else "StartArray"
                message = (
                    f"An unexpected '{node}' node was found for property named '{name}' when reading "
                    "from the JSON reader. A 'PrimitiveValue' node was expected."
                )
            else:
                message = (
                    f"Cannot convert the literal '{json.dumps(value)}' to the expected type '{expected}'."
                )
            return {}, dataverse_error(400, "0x80060888", message)
    return body, None


def _check_values(
    body: dict[str, Any],
    allowed_codes: frozenset[int],
    custom: Mapping[str, tuple[str, int | None]] | None = None,
) -> Response | None:
    """Check lengths (UTF-16 code units) and the option-set value, as the platform does on save."""
    limits = dict(TEXT_COLUMNS)
    for name, (kind, length) in (custom or {}).items():
        if kind in metadata.TEXT_TYPES and length is not None:
            limits[name] = length
    for name, limit in limits.items():
        value = body.get(name)
        if isinstance(value, str) and utf16_length(value) > limit:
            return dataverse_error(
                400,
                "0x80044331",
                f"A validation error occurred. The length of the '{name}' attribute of the 'lead' entity "
                f"exceeded the maximum allowed length of '{limit}'.",
            )
    code = body.get(OPTION_SET_COLUMN)
    if code is not None and code not in allowed_codes:
        accepted = ",".join(str(v) for v in sorted(allowed_codes))
        return dataverse_error(
            400,
            "0x8004431a",
            f"A validation error occurred. The value {code} of '{OPTION_SET_COLUMN}' on record of type "
            f"'lead' is outside the valid range. Accepted Values: {accepted}",
        )
    return None
