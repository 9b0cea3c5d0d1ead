"""The Dataverse Web API client (architecture §4): WhoAmI, the solution check, and idempotent lead writes.

Every request: the URL guard has passed, the CRM user's penalty and pacing are consulted first (nothing
is sent inside a penalty; the pacer records every 429 in the one penalty record), redirects are never
followed, timeouts are explicit, and a 401 on a cached token
gets exactly one retry with a fresh token. Status codes become errors only in
:mod:`shared.crm.errors`.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import requests

from shared.crm.auth import TokenProvider
from shared.crm.batch import (
    MAX_BATCH_OPERATIONS,
    BatchFormatError,
    BatchRequest,
    BatchResponse,
    build_batch,
    new_boundary,
    parse_batch,
)
from shared.crm.connection import Connection, PasswordAuth
from shared.crm.errors import (
    error_from_network,
    error_from_response,
    is_already_there,
    odata_error,
    request_id_of,
)
from shared.crm.pacing import Pacer, dop_hint_of, limit_of
from shared.crm.urlguard import check_crm_url
from shared.errors import CrmPaced, CrmThrottled, CrmUnavailable, LeadWriterError, SolutionMissing
from shared.http import new_session
from shared.settings import Settings

logger = logging.getLogger(__name__)

API_PATH = "/api/data/v9.2/"
CREATE_LEAD_PRIVILEGE = "prvCreateLead"
#: What the Lead Writer role must grant (architecture §1), with how Dynamics' role editor names each. The User
#: Entity UI Settings ones are needed from Dynamics 365 8.2 on, i.e. by every org of the v9.2 Web API.
LEAD_WRITER_PRIVILEGES: Mapping[str, str] = {
    CREATE_LEAD_PRIVILEGE: "create on Lead (Sales tab)",
    "prvReadSolution": "read on Solution (Customization tab)",
    "prvCreateUserEntityUISettings": "create on User Entity UI Settings (Core Records tab)",
    "prvReadUserEntityUISettings": "read on User Entity UI Settings (Core Records tab)",
    "prvWriteUserEntityUISettings": "write on User Entity UI Settings (Core Records tab)",
}
_CREATED = frozenset({200, 201, 204})
_OPERATION_CREATE = "create lead"
#: The bulk create action on ``lead`` (architecture §4): atomic on a standard table.
CREATE_MULTIPLE_PATH = "leads/Microsoft.Dynamics.CRM.CreateMultiple"
_LEAD_TYPE = "Microsoft.Dynamics.CRM.lead"


@dataclass(frozen=True)
class WhoAmI:
    """The CRM principal the token belongs to."""

    user_id: str
    business_unit_id: str
    organization_id: str


@dataclass(frozen=True)
class LeadWrite:
    """One lead to create: a deterministic id (UUIDv5 of publisherId/leadId) and its lead columns."""

    record_id: uuid.UUID
    columns: Mapping[str, Any]


@dataclass(frozen=True)
class WriteResult:
    """Outcome of one lead write. ``created`` is False when it already existed (delivered before)."""

    record_id: uuid.UUID
    created: bool
    error: LeadWriterError | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


class DataverseClient:
    """One publisher's CRM, through one connection.

    ``request_count`` counts the HTTP requests sent to the CRM (a ``$batch`` counts one).
    """

    def __init__(
        self,
        connection: Connection,
        settings: Settings,
        *,
        tokens: TokenProvider,
        pacer: Pacer | None = None,
        session: requests.Session | None = None,
    ) -> None:
        """Raises UnsafeCrmUrl when the connection's URL is not an allowed CRM host.

        Every request first takes a slot of this CRM user's rate and concurrency from ``pacer`` (one
        shared by every client of the process; a private one when none is given) and raises CrmPaced,
        unsent, when none frees within a short moment or the user is in a penalty.
        """
        self._origin = check_crm_url(connection.url, settings.crm_allowed_hosts)
        self._connection = connection
        self._tokens = tokens
        self._pacer = pacer or Pacer()
        self._session = session or new_session(self._origin)
        self._timeout = (settings.crm_connect_timeout, settings.crm_read_timeout)
        self._verify: str | bool = str(settings.ca_bundle) if settings.ca_bundle else True
        auth = connection.auth
        principal = auth.username if isinstance(auth, PasswordAuth) else auth.client_id
        self._throttle_key = f"{self._origin}|{principal.lower()}"
        self._count_lock = threading.Lock()
        self.request_count = 0
        #: Set once the CRM answered that it has no CreateMultiple for leads.
        self._no_create_multiple = False

    @property
    def origin(self) -> str:
        """The CRM's normalised origin, e.g. ``https://contoso.crm4.dynamics.com``."""
        return self._origin

    @property
    def throttle_key(self) -> str:
        """The key of this CRM user's service-protection penalty: ``<origin>|<principal>``."""
        return self._throttle_key

    def whoami(self) -> WhoAmI:
        """The principal behind the connection.

        Raises CredentialsRejected / AuthorityUnavailable (token), PermissionDenied (401/403, redirect),
        CrmThrottled, CrmUnavailable (network, 5xx, unexpected answer).
        """
        operation = "WhoAmI"
        response = self._request("GET", "WhoAmI", operation=operation)
        if response.status_code != 200:
            raise _failure(response, operation)
        data = self._json(response, operation)
        try:
            return WhoAmI(str(data["UserId"]), str(data["BusinessUnitId"]), str(data["OrganizationId"]))
        except (KeyError, TypeError) as exc:
            raise self._unexpected(response, operation) from exc

    def solution_version(self, unique_name: str) -> str | None:
        """The installed version of the solution ``unique_name``, or None when it is not installed.

        Raises SolutionMissing (with the CRM's message) when the CRM refuses the query itself (400):
        the solution name or the org's solutions table is not what Lead Writer needs, a configuration
        problem that no retry fixes and that the lead did not cause — so it is replayed automatically
        once the connection is fixed, unlike LeadRejected. Otherwise raises like :meth:`whoami`.
        """
        operation = "solution query"
        literal = unique_name.replace("'", "''")
        query = quote(f"uniquename eq '{literal}'", safe="'")
        response = self._request(
            "GET", f"solutions?$filter={query}&$select=uniquename,version", operation=operation
        )
        if response.status_code == 400:
            code, crm_message = odata_error(response.content)
            detail = f": {crm_message}" if crm_message else ""
            raise SolutionMissing(
                f"the CRM refused the query for the Lead Writer solution {unique_name}{detail}; check that the "
                "solution is installed and LEADWRITER_SOLUTION_NAME names it",
                status=400,
                code=code,
                request_id=request_id_of(response.headers),
            )
        if response.status_code != 200:
            raise _failure(response, operation)
        data = self._json(response, operation)
        rows = data.get("value") if isinstance(data, dict) else None
        if not isinstance(rows, list):
            raise self._unexpected(response, operation)
        for row in rows:
            if isinstance(row, dict) and str(row.get("uniquename", "")).lower() == unique_name.lower():
                version = row.get("version")
                return str(version) if version else None
        return None

    def can_create_leads(self, user_id: str) -> bool:
        """Whether the user's privileges (RetrieveUserPrivileges) include ``prvCreateLead``.

        A 403 on the question itself means no. Raises like :meth:`missing_privileges`.
        """
        missing = self.missing_privileges(user_id, (CREATE_LEAD_PRIVILEGE,))
        return missing == []

    def missing_privileges(
        self, user_id: str, required: Sequence[str] = tuple(LEAD_WRITER_PRIVILEGES)
    ) -> list[str] | None:
        """The privileges of ``required`` the user does not hold (RetrieveUserPrivileges), in the order
        of ``required``; ``[]`` when it holds them all, None when the CRM refused the question (403).

        Raises ValueError for a user id that is not a GUID; otherwise raises like :meth:`whoami`.
        """
        operation = "RetrieveUserPrivileges"
        user = uuid.UUID(user_id)
        response = self._request(
            "GET", f"systemusers({user})/Microsoft.Dynamics.CRM.RetrieveUserPrivileges()", operation=operation
        )
        if response.status_code == 403:
            return None
        if response.status_code != 200:
            raise _failure(response, operation)
        data = self._json(response, operation)
        privileges = data.get("RolePrivileges") if isinstance(data, dict) else None
        if not isinstance(privileges, list):
            raise self._unexpected(response, operation)
        held = {str(p.get("PrivilegeName", "")).lower() for p in privileges if isinstance(p, dict)}
        return [name for name in required if name.lower() not in held]

    def get_json(self, path: str, *, operation: str = "query", missing_ok: bool = False) -> Any:
        """``GET <API_PATH><path>`` (path relative to the Web API root, query included) and its JSON body.

        With ``missing_ok``, a 404 (the record does not exist) answers None. Raises LeadRejected (400),
        PermissionDenied (401/403, redirect, or 404 without ``missing_ok``), CrmThrottled, CrmUnavailable
        (network, 5xx, a body that is not JSON), and the token provider's errors.
        """
        response = self._request("GET", path, operation=operation)
        if response.status_code == 404 and missing_ok:
            return None
        if response.status_code != 200:
            raise _failure(response, operation)
        return self._json(response, operation)

    def create_lead(self, lead: LeadWrite) -> WriteResult:
        """Create the lead unless a record with its id exists (``PATCH`` + ``If-None-Match: *``).

        Returns ``created=True`` on 204, ``created=False`` when it already existed (412 or duplicate
        key: delivered before). Raises LeadRejected (400/404), PermissionDenied, CrmThrottled,
        CrmUnavailable, CredentialsRejected or AuthorityUnavailable.
        """
        response = self._request(
            "PATCH",
            f"leads({lead.record_id})",
            operation=_OPERATION_CREATE,
            body=_json_body(lead.columns),
            headers={"If-None-Match": "*"},
        )
        if response.status_code in _CREATED:
            return WriteResult(lead.record_id, created=True)
        if is_already_there(response.status_code, response.content):
            return WriteResult(lead.record_id, created=False)
        raise error_from_response(
            response.status_code, response.headers, response.content, operation=_OPERATION_CREATE, write=True
        )

    def update_lead(self, record_id: uuid.UUID, columns: Mapping[str, Any]) -> None:
        """Update an existing lead (``PATCH`` + ``If-Match: *``: never creates one).

        Raises LeadRejected (400, or 404: the lead is gone), PermissionDenied, CrmThrottled,
        CrmUnavailable, CredentialsRejected or AuthorityUnavailable.
        """
        operation = "update lead"
        response = self._request(
            "PATCH", f"leads({record_id})", operation=operation, body=_json_body(columns), headers={"If-Match": "*"}
        )
        if response.status_code not in _CREATED:
            raise error_from_response(
                response.status_code, response.headers, response.content, operation=operation, write=True
            )

    def create_leads(self, leads: Sequence[LeadWrite]) -> list[WriteResult]:
        """Create many leads in one ``$batch``, each in its own part; results in input order.

        Each lead's own failure is in its result's ``error`` (the others are still written). A failure
        of the whole batch raises like :meth:`create_lead`. Raises ValueError for more than 1000 leads.
        """
        if len(leads) > MAX_BATCH_OPERATIONS:
            raise ValueError(f"a $batch holds at most {MAX_BATCH_OPERATIONS} operations, got {len(leads)}")
        if not leads:
            return []
        operation = f"$batch of {len(leads)} leads"
        boundary = new_boundary()
        body = build_batch(
            [
                BatchRequest(
                    "PATCH",
                    f"{self._origin}{API_PATH}leads({lead.record_id})",
                    {"Content-Type": "application/json", "If-None-Match": "*"},
                    _json_body(lead.columns),
                )
                for lead in leads
            ],
            boundary,
        )
        response = self._request(
            "POST",
            "$batch",
            operation=operation,
            body=body,
            headers={
                "Content-Type": f"multipart/mixed; boundary={boundary}",
                "Prefer": "odata.continue-on-error",
            },
        )
        if response.status_code != 200:
            raise error_from_response(
                response.status_code, response.headers, response.content, operation=operation, write=True
            )
        try:
            parts = parse_batch(response.headers.get("Content-Type", ""), response.content)
        except BatchFormatError as exc:
            raise CrmUnavailable(
                f"the CRM answered the {operation} with an unreadable body ({exc})",
                status=response.status_code,
                request_id=request_id_of(response.headers),
            ) from exc
        if len(parts) > len(leads):
            logger.warning("the CRM answered %d parts for a $batch of %d leads", len(parts), len(leads))
        results = [
            self._part_result(lead, parts[index] if index < len(parts) else None)
            for index, lead in enumerate(leads)
        ]
        throttled = [r.error.retry_after or 0.0 for r in results if isinstance(r.error, CrmThrottled)]
        if throttled:
            self._pacer.push_back(self._throttle_key, max(throttled))
        return results

    def create_many(self, leads: Sequence[LeadWrite]) -> list[WriteResult]:
        """Create many leads in one ``CreateMultiple`` (ids preset, so a retry cannot duplicate them);
        results in input order. It costs the CRM far less execution time per lead than ``$batch``.

        ``CreateMultiple`` is atomic: when it fails as a whole for a reason of the leads themselves
        (one exists already — the duplicate-key error, whatever its status — or one is refused, a
        4xx), nothing was written and the group goes again as :meth:`create_leads` (a ``$batch``
        part per lead with ``If-None-Match: *``), which answers each lead's own outcome. A 429 or a
        5xx is not such a failure: it raises for the whole group (retried later, and a retry after
        an unseen success falls back and finds them there). An org without the action (404/405) is
        remembered and gets ``$batch`` from then on. Raises like :meth:`create_lead`; ValueError for
        more than 1000 leads.
        """
        if len(leads) > MAX_BATCH_OPERATIONS:
            raise ValueError(f"at most {MAX_BATCH_OPERATIONS} leads per call, got {len(leads)}")
        if not leads:
            return []
        if self._no_create_multiple:
            return self.create_leads(leads)
        operation = f"CreateMultiple of {len(leads)} leads"
        targets = [
            {**lead.columns, "leadid": str(lead.record_id), "@odata.type": _LEAD_TYPE} for lead in leads
        ]
        response = self._request(
            "POST", CREATE_MULTIPLE_PATH, operation=operation, body=_json_body({"Targets": targets})
        )
        status = response.status_code
        if status in _CREATED:
            return [WriteResult(lead.record_id, created=True) for lead in leads]
        if status in (404, 405):
            logger.info("the CRM has no CreateMultiple for leads (HTTP %d); using $batch from now on", status)
            self._no_create_multiple = True
            return self.create_leads(leads)
        if bulk_fallback(status, response.content):
            code, _ = odata_error(response.content)
            logger.info(
                "CreateMultiple of %d leads failed as a whole (HTTP %d, %s); writing each in its own $batch part",
                len(leads),
                status,
                code or "no code",
            )
            return self.create_leads(leads)
        raise error_from_response(status, response.headers, response.content, operation=operation, write=True)

    def _part_result(self, lead: LeadWrite, part: BatchResponse | None) -> WriteResult:
        if part is None:
            # Only without continue-on-error would the CRM stop early; treat the rest as not attempted.
            return WriteResult(
                lead.record_id,
                created=False,
                error=CrmUnavailable("the CRM did not answer this lead's part of the $batch"),
            )
        if part.status in _CREATED:
            return WriteResult(lead.record_id, created=True)
        if is_already_there(part.status, part.body):
            return WriteResult(lead.record_id, created=False)
        error = error_from_response(
            part.status, part.headers, part.body, operation=_OPERATION_CREATE, write=True
        )
        return WriteResult(lead.record_id, created=False, error=error)

    def _request(
        self,
        method: str,
        path: str,
        *,
        operation: str,
        body: bytes | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> requests.Response:
        """Send one authorised request; returns the response for any status but 3xx, 401 and 429.

        Raises CrmPaced (a CrmThrottled) without sending while the CRM user is penalised or the pacer
        says "not yet", PermissionDenied on a
        redirect or a second 401, CrmThrottled on 429 (after recording the penalty), CrmUnavailable
        on network failures, and the token provider's errors.
        """
        response: requests.Response | None = None
        for attempt in (1, 2):
            self._check_penalty(operation)
            token = self._tokens.token(self._connection)
            response = self._paced_send(method, path, token, body=body, headers=headers, operation=operation)
            if response.status_code == 401 and attempt == 1:
                # The cached token may have been revoked or the user re-created: one fresh token, once.
                logger.debug("401 from %s on %s; retrying once with a fresh token", self._origin, operation)
                self._tokens.invalidate(self._connection)
                continue
            break
        assert response is not None
        status = response.status_code
        if status == 429 or status == 401 or 300 <= status < 400:
            # A 429's penalty is recorded already: the pacer took it from the response.
            raise error_from_response(status, response.headers, response.content, operation=operation)
        return response

    def _check_penalty(self, operation: str) -> None:
        # Before the token: a penalised CRM user costs no token request either. This read may look
        # at the shared record (another process or instance may have met the 429).
        remaining = self._pacer.penalty_remaining(self._throttle_key)
        if remaining > 0:
            raise CrmPaced(
                f"{operation} not sent: the CRM user is in a service protection penalty "
                f"for {remaining:.1f} s",
                retry_after=remaining,
            )

    def _paced_send(
        self,
        method: str,
        path: str,
        token: str,
        *,
        body: bytes | None,
        headers: Mapping[str, str] | None,
        operation: str,
    ) -> requests.Response:
        # The slot is taken after the token (a slow token endpoint must not hold a CRM slot) and
        # right before the request leaves: the pacer's penalty check and the send are back to back.
        permit = self._pacer.acquire(self._throttle_key)
        started = time.monotonic()
        try:
            response = self._send(method, path, token, body=body, headers=headers, operation=operation)
        except BaseException:
            # A request that failed on the way may still have run on the server: it costs what it took.
            self._pacer.release(permit, ok=False, cost=time.monotonic() - started)
            raise
        # The request's own duration is its execution-time cost (architecture §10): Dataverse sends no
        # per-request timing, and the network time in it keeps the count on the safe side. (Taking the
        # shortest read off as "the network" undercounted short CreateMultiple requests in the bench.)
        cost = time.monotonic() - started
        dop_hint = dop_hint_of(response.headers.get("x-ms-dop-hint"))
        status = response.status_code
        if status != 429:
            self._pacer.release(permit, ok=status < 500, cost=cost, dop_hint=dop_hint)
            return response
        error = error_from_response(status, response.headers, response.content, operation=operation)
        retry_after = error.retry_after if isinstance(error, CrmThrottled) and error.retry_after is not None else 1.0
        # Dataverse names the limit it enforces in the 429 (requests, execution time or concurrency):
        # the pacer keeps to it from now on.
        window = limit_of(odata_error(response.content)[1])
        self._pacer.release(permit, ok=False, retry_after=retry_after, window=window, dop_hint=dop_hint)
        return response

    def _send(
        self,
        method: str,
        path: str,
        token: str,
        *,
        body: bytes | None,
        headers: Mapping[str, str] | None,
        operation: str,
    ) -> requests.Response:
        all_headers = {
            "Accept": "application/json",
            "OData-MaxVersion": "4.0",
            "OData-Version": "4.0",
            "Authorization": f"Bearer {token}",
        }
        if body is not None:
            all_headers["Content-Type"] = "application/json"
        all_headers.update(headers or {})
        with self._count_lock:
            self.request_count += 1
        log_path = path.split("?", 1)[0]
        started = time.monotonic()
        try:
            response = self._session.request(
                method,
                f"{self._origin}{API_PATH}{path}",
                headers=all_headers,
                data=body,
                timeout=self._timeout,
                verify=self._verify,
                allow_redirects=False,
            )
        except requests.RequestException as exc:
            logger.debug(
                "%s %s%s failed after %.0f ms: %s",
                method,
                API_PATH,
                log_path,
                (time.monotonic() - started) * 1000,
                type(exc).__name__,
            )
            raise error_from_network(exc, operation=operation) from exc
        logger.debug(
            "%s %s%s -> %d in %.0f ms (request id %s)",
            method,
            API_PATH,
            log_path,
            response.status_code,
            (time.monotonic() - started) * 1000,
            request_id_of(response.headers) or "-",
        )
        return response

    def _json(self, response: requests.Response, operation: str) -> Any:
        try:
            return response.json()
        except ValueError as exc:
            raise self._unexpected(response, operation) from exc

    def _unexpected(self, response: requests.Response, operation: str) -> CrmUnavailable:
        return CrmUnavailable(
            f"the CRM answered {operation} with an unexpected body",
            status=response.status_code,
            request_id=request_id_of(response.headers),
        )


def bulk_fallback(status: int, body: bytes | str | None) -> bool:
    """Whether a failed ``CreateMultiple`` answer means "write this group lead by lead": the
    duplicate-key error (one lead exists already; Dataverse may send it as a 4xx or a 500) or a 4xx
    that refuses the call (one lead refused). Not a 401/403 (the principal, not the leads), a 429 or
    another 5xx (throttled or failing: the whole group is retried)."""
    if is_already_there(status, body):
        return True
    return 400 <= status < 500 and status not in (401, 403, 408, 429)


def _json_body(columns: Mapping[str, Any]) -> bytes:
    return json.dumps(dict(columns), ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def _failure(response: requests.Response, operation: str) -> LeadWriterError:
    return error_from_response(response.status_code, response.headers, response.content, operation=operation)
