"""Where HTTP answers become Lead Writer errors: the CRM's in :func:`error_from_response`, Entra's in
:func:`error_from_token_failure`. Nothing else in the package decides what a status means.

Every message is composed here from safe parts (status, OData code, the CRM's own error message,
the Entra error number): never our request body, a header, a token, a password or a client secret.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator, Mapping
from typing import Any

import requests
from azure.core.exceptions import ServiceRequestError, ServiceResponseError

from shared.errors import (
    AuthorityUnavailable,
    CredentialsRejected,
    CrmThrottled,
    CrmUnavailable,
    LeadRejected,
    LeadWriterError,
    PermissionDenied,
)
from shared.http import retry_after_seconds

logger = logging.getLogger(__name__)

#: Dataverse's "duplicate key" error: a create that found the record already there.
DUPLICATE_KEY_CODE = "0x80040237"
_MAX_MESSAGE = 500

_AADSTS = re.compile(r"AADSTS(\d{4,8})")
_ERROR_CODES = re.compile(r'"error_codes"\s*:\s*\[\s*(\d{4,8})')
_TRACE_ID = re.compile(r"Trace ID:\s*([0-9a-fA-F-]{36})")
_OIDC_STATUS = re.compile(r"OIDC Discovery failed on .*?HTTP status: (\d{3})", re.DOTALL)
# MSAL's own HTTP client raises "HTTP Error: 503" (and replays it from its cache) for 429 and 5xx.
_MSAL_HTTP_ERROR = re.compile(r"HTTP Error: (\d{3})")
# Anything that looks like a bearer token or a JWT is cut out of messages a server composed.
_TOKEN_LIKE = re.compile(r"(?i)bearer\s+\S+|eyJ[\w-]+\.[\w-]+\.[\w-]*")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")

#: The way out of MFA and conditional access for a password (ROPC) connection: Microsoft's recommended
#: option, which Dataverse keeps supporting while it deprecates the password flow (architecture §4).
_USE_ENTRA_APP = (
    "switch to a clientSecret connection (Microsoft's recommended option): register an Entra app, add it in "
    "Dynamics as an application user with the Lead Writer role, and store its tenant id, client id and secret"
)

#: Entra error numbers a publisher fixes by changing its credentials or its tenant, with what to tell it:
#: the one wording, used by the stages' dead letters and by live verification alike.
ENTRA_MESSAGES: Mapping[int, str] = {
    50034: "the user account does not exist in this tenant",
    50053: "the account is locked after too many failed sign-ins",
    50055: "the password has expired; set a new one and update the connection",
    50056: "the user has no password in Entra ID (a federated or passwordless account cannot be used)",
    50057: "the user account is disabled: enable it in Entra ID",
    50072: "the account must register for multi-factor authentication, which a password connection cannot "
    f"pass; {_USE_ENTRA_APP}",
    50076: "multi-factor authentication is required for this account, which a password connection cannot "
    f"pass; {_USE_ENTRA_APP}",
    50079: "the account must register for multi-factor authentication, which a password connection cannot "
    f"pass; {_USE_ENTRA_APP}",
    50126: "the password was rejected: check the user name and password of the service account",
    50158: f"an external security challenge (conditional access) is required for this account; {_USE_ENTRA_APP}",
    53003: f"conditional access blocked the sign-in; {_USE_ENTRA_APP}",
    65001: "the application has no consent in this tenant; a tenant administrator must grant it",
    700016: "the application (client id) was not found in this tenant: check the client id and the tenant id",
    7000215: "the client secret was rejected: use the secret's value, not its id, and check that it has not "
    "expired",
    7000222: "the client secret has expired; create a new one and update the connection",
    7000218: "the client id belongs to a confidential application; use a clientSecret connection",
    90002: "the tenant was not found: check the tenant id",
    900023: "the tenant id is not a valid tenant",
    90019: "no tenant could be determined from the user name; give the tenant id",
}


def request_id_of(headers: Mapping[str, str] | None) -> str | None:
    """The CRM's request id (``x-ms-service-request-id``, or ``REQ_ID``) from response headers."""
    if not headers:
        return None
    lowered = {str(name).lower(): value for name, value in headers.items()}
    return lowered.get("x-ms-service-request-id") or lowered.get("req_id") or None


def odata_error(body: bytes | str | None) -> tuple[str | None, str | None]:
    """``(code, message)`` of a Dataverse ``{"error": {"code", "message"}}`` body; ``None`` when absent."""
    if not body:
        return None, None
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None, None
    error = data.get("error") if isinstance(data, dict) else None
    if not isinstance(error, dict):
        return None, None
    code, message = error.get("code"), error.get("message")
    return (
        str(code) if isinstance(code, str | int) and str(code) else None,
        _safe_text(message) if isinstance(message, str) and message.strip() else None,
    )


def is_already_there(status: int, body: bytes | str | None) -> bool:
    """True when a create answered that the record exists (412, or the duplicate-key error).

    That means the lead was delivered before: success, not an error (architecture §4).
    """
    if status == 412:
        return True
    if status not in (400, 409, 500):
        return False
    code, message = odata_error(body)
    return (code or "").lower() == DUPLICATE_KEY_CODE or "duplicate key" in (message or "").lower()


def error_from_response(
    status: int,
    headers: Mapping[str, str] | None,
    body: bytes | str | None,
    *,
    operation: str,
    write: bool = False,
) -> LeadWriterError:
    """Map a CRM answer that is not a success to the error the caller acts on.

    ``operation`` names what was attempted ("create lead", "WhoAmI", …) for the message; ``write``
    says whether it wrote a record (a 404 on a write is the lead's problem, on a read the URL's).

    - 3xx: :class:`PermissionDenied`: redirects are never followed, and a CRM that redirects is
      misconfigured (a moved or renamed org) until the publisher updates its URL; a dead letter for
      that reason is replayed once the connection is updated, while retrying would never succeed.
    - 401, 403: :class:`PermissionDenied` (the caller already retried a 401 once with a fresh token).
    - 408, 5xx: :class:`CrmUnavailable`.  429: :class:`CrmThrottled` with ``retry_after``.
    - 400 and any other 4xx on a write: :class:`LeadRejected` with the CRM's message.
    - 404 and other 4xx on a read: :class:`PermissionDenied`: the URL does not lead to a usable org.
    """
    code, crm_message = odata_error(body)
    context: dict[str, Any] = {"status": status, "code": code, "request_id": request_id_of(headers)}
    detail = f": {crm_message}" if crm_message else ""
    if 300 <= status < 400:
        location = _header(headers, "location")
        target = _host_of(location) if location else None
        where = f" to {target}" if target else ""
        return PermissionDenied(
            f"the CRM answered {operation} with a redirect{where}; redirects are never followed "
            "(check the instance URL)",
            **context,
        )
    if status == 429:
        seconds = retry_after_seconds(headers) or 0.0
        return CrmThrottled(
            f"the CRM throttled {operation} (service protection limit); retry after {seconds:g} s",
            retry_after=seconds,
            **context,
        )
    if status == 408 or status >= 500:
        return CrmUnavailable(f"the CRM failed {operation} with HTTP {status}{detail}", **context)
    if status == 401:
        return PermissionDenied(
            f"the CRM refused the token for {operation}: the principal is not a user of this "
            f"environment or lacks the Lead Writer role{detail}",
            **context,
        )
    if status == 403:
        return PermissionDenied(
            f"the CRM denied {operation}: assign the Lead Writer security role to the principal{detail}",
            **context,
        )
    if status == 400 or write:
        return LeadRejected(f"the CRM rejected {operation}{detail}", **context)
    return PermissionDenied(
        f"the CRM answered {operation} with HTTP {status}; check the instance URL{detail}", **context
    )


def error_from_network(exc: requests.RequestException, *, operation: str) -> CrmUnavailable:
    """A connection failure, timeout or reset talking to the CRM (always transient)."""
    if isinstance(exc, requests.Timeout):
        what = "timed out"
    elif isinstance(exc, requests.exceptions.SSLError):
        what = "failed TLS verification"
    elif isinstance(exc, requests.ConnectionError):
        what = "could not be reached or reset the connection"
    else:
        what = f"failed ({type(exc).__name__})"
    return CrmUnavailable(f"the CRM {what} during {operation}")


def error_from_token_failure(exc: BaseException) -> LeadWriterError:
    """Map a failed token request (azure-identity / MSAL exception chain) to the error the caller acts on.

    - An Entra error number (``AADSTS…`` or ``error_codes``) → :class:`CredentialsRejected` with
      ``entra_code`` and a message the publisher can act on.
    - Connection failure, timeout, 429 or 5xx from the token endpoint → :class:`AuthorityUnavailable`.
    - Any other 4xx → :class:`CredentialsRejected` without a code; anything else
      → :class:`AuthorityUnavailable` (an unexpected answer is not proof the credentials are wrong).
    """
    chain = list(_chain(exc))
    texts = [str(link) for link in chain]
    status: int | None = None
    headers: Mapping[str, str] | None = None
    for link in chain:
        response = getattr(link, "response", None)
        link_status = getattr(response, "status_code", None)
        if isinstance(link_status, int):
            status = link_status
            headers = getattr(response, "headers", None)
            try:
                texts.append(response.text())  # type: ignore[union-attr]
            except Exception:  # noqa: BLE001 - the body is optional context only
                logger.debug("token error response body unavailable")
            break
    joined = "\n".join(texts)
    trace_id = (match.group(1) if (match := _TRACE_ID.search(joined)) else None)

    network = any(
        isinstance(link, ServiceRequestError | ServiceResponseError | requests.RequestException | OSError)
        for link in chain
    )
    if network and status is None:
        return AuthorityUnavailable(
            "the Entra ID token endpoint could not be reached or timed out", request_id=trace_id
        )
    if status is None and (found := _OIDC_STATUS.search(joined) or _MSAL_HTTP_ERROR.search(joined)):
        status = int(found.group(1))
    if status is not None and (status == 429 or status >= 500):
        return AuthorityUnavailable(
            f"the Entra ID token endpoint failed with HTTP {status}",
            retry_after=retry_after_seconds(headers, default=0.0) or None,
            status=status,
            request_id=trace_id,
        )
    entra_code = _entra_code(joined)
    if entra_code is not None:
        advice = ENTRA_MESSAGES.get(entra_code, "Entra ID refused the credentials")
        return CredentialsRejected(
            f"{advice} (AADSTS{entra_code})",
            entra_code=entra_code,
            status=status,
            code=f"AADSTS{entra_code}",
            request_id=trace_id,
        )
    if status is not None and 400 <= status < 500:
        return CredentialsRejected(
            f"Entra ID refused the credentials (HTTP {status})", status=status, request_id=trace_id
        )
    return AuthorityUnavailable("Entra ID gave an unexpected answer to the token request", status=status)


def _entra_code(text: str) -> int | None:
    match = _AADSTS.search(text) or _ERROR_CODES.search(text)
    return int(match.group(1)) if match else None


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _header(headers: Mapping[str, str] | None, name: str) -> str | None:
    if not headers:
        return None
    for key, value in headers.items():
        if str(key).lower() == name:
            return value
    return None


def _host_of(location: str) -> str | None:
    # Only the host is named: a redirect URL's path or query may carry anything.
    text = location.strip()
    if "://" not in text:
        return None
    host = text.split("://", 1)[1].split("/", 1)[0].split("?", 1)[0].split("#", 1)[0]
    host = host.rsplit("@", 1)[-1]
    return _safe_text(host, limit=255) or None


def _safe_text(text: str, *, limit: int = _MAX_MESSAGE) -> str:
    cleaned = _CONTROL.sub(" ", _TOKEN_LIKE.sub("[redacted]", text)).strip()
    return cleaned if len(cleaned) <= limit else cleaned[: limit - 1] + "…"
