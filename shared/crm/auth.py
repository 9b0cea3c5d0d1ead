"""Tokens for a publisher's CRM (architecture §4): azure-identity credentials, cached per connection.

The authority host always comes from settings (``AZURE_AUTHORITY_HOST``), never from the CRM: the CRM
URL is the publisher's input, and a bearer challenge naming another host would otherwise receive the
password. From the challenge only the tenant is taken, and only when it looks like a tenant.
"""

from __future__ import annotations

import logging
import re
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import requests
from azure.core.credentials import AccessToken
from azure.identity import ClientSecretCredential, UsernamePasswordCredential

from shared.crm.connection import Connection, PasswordAuth
from shared.crm.errors import (
    error_from_network,
    error_from_response,
    error_from_token_failure,
    request_id_of,
)
from shared.crm.urlguard import check_crm_url
from shared.errors import CredentialsRejected, LeadWriterError
from shared.http import new_session
from shared.settings import Settings

logger = logging.getLogger(__name__)

#: Public client id Dynamics documents for ROPC sign-in when the publisher gives none.
DEFAULT_PUBLIC_CLIENT_ID = "51f81489-12ee-4a9e-aaae-a2591f45987d"
#: A token is renewed this long before it expires (or at half its life, for short-lived tokens).
REFRESH_MARGIN_SECONDS = 300.0

_GUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_DOMAIN = re.compile(r"(?:[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z][a-z0-9-]{0,61}[a-z0-9]")
_AUTHORIZATION_URI = re.compile(r"""authorization_uri\s*=\s*"?([^",\s]+)"?""", re.IGNORECASE)


class _Credential(Protocol):
    def get_token(self, *scopes: str, **kwargs: Any) -> AccessToken: ...


@dataclass(frozen=True)
class _CachedToken:
    value: str
    refresh_at: float


def tenant_from_challenge(www_authenticate: str) -> str | None:
    """The tenant named by a bearer challenge's ``authorization_uri``, or None when there is no valid one.

    Only the first path segment is used, and only a GUID or a domain name is accepted; the host of
    ``authorization_uri`` is deliberately ignored.
    """
    match = _AUTHORIZATION_URI.search(www_authenticate)
    if not match:
        return None
    uri = match.group(1)
    if "://" not in uri:
        return None
    path = uri.split("://", 1)[1].partition("/")[2]
    tenant = path.split("/", 1)[0].split("?", 1)[0].lower()
    if _GUID.fullmatch(tenant) or (len(tenant) <= 253 and _DOMAIN.fullmatch(tenant)):
        return tenant
    return None


class TokenProvider:
    """Obtains and caches tokens per connection (key: ``Connection.fingerprint()``) until about five
    minutes before they expire; caches the discovered tenant per CRM URL.

    Thread-safe; concurrent callers for the same connection share one token request. ``token_requests``
    counts the token requests made (for the benchmark), ``tenant_discoveries`` the challenge requests.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        session: requests.Session | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._settings = settings
        self._session = session or new_session(settings.authority_host)
        self._clock = clock
        self._verify: str | bool = str(settings.ca_bundle) if settings.ca_bundle else True
        self._guard = threading.Lock()
        self._locks: dict[str, threading.Lock] = {}
        self._tokens: dict[str, _CachedToken] = {}
        self._credentials: dict[str, _Credential] = {}
        self._tenants: dict[str, str] = {}
        self.token_requests = 0
        self.tenant_discoveries = 0

    def token(self, connection: Connection) -> str:
        """An access token for the connection's CRM (scope ``<origin>/.default``).

        Raises UnsafeCrmUrl for a URL outside the allowed hosts, CredentialsRejected when Entra refuses
        the credentials (or no tenant can be discovered), AuthorityUnavailable when the token endpoint
        fails or cannot be reached, CrmUnavailable / CrmThrottled / PermissionDenied when tenant
        discovery at the CRM fails.
        """
        key = connection.fingerprint()
        cached = self._cached(key)
        if cached is not None:
            return cached
        with self._lock_for(key):
            # Another caller may have fetched it while this one waited for the lock.
            cached = self._cached(key)
            if cached is not None:
                return cached
            origin = check_crm_url(connection.url, self._settings.crm_allowed_hosts)
            try:
                credential = self._credential(key, connection, origin)
            except ValueError as exc:
                # azure-identity validates the tenant id's characters when the credential is built.
                raise CredentialsRejected("the tenant id is not a valid tenant id or domain") from exc
            with self._guard:
                self.token_requests += 1
            started = self._clock()
            try:
                access = credential.get_token(f"{origin}/.default")
            except Exception as exc:  # every failure is classified; none escapes raw
                # MSAL replays a failed answer from its own cache for a while; a later attempt (a
                # rescheduled message, a rotated password) must reach Entra, so the credential goes.
                with self._guard:
                    self._credentials.pop(key, None)
                error = error_from_token_failure(exc)
                logger.info(
                    "token request for %s failed: %s (%s)", origin, type(error).__name__, error.code or "-"
                )
                raise error from exc
            lifetime = max(float(access.expires_on) - started, 0.0)
            refresh_at = started + max(lifetime - REFRESH_MARGIN_SECONDS, lifetime / 2)
            with self._guard:
                self._tokens[key] = _CachedToken(access.token, refresh_at)
            logger.debug("token obtained for %s, valid %.0f s", origin, lifetime)
            return access.token

    def invalidate(self, connection: Connection) -> None:
        """Forget the cached token (and credential, whose own cache holds the same token) after a 401."""
        key = connection.fingerprint()
        with self._guard:
            self._tokens.pop(key, None)
            self._credentials.pop(key, None)

    def _cached(self, key: str) -> str | None:
        with self._guard:
            cached = self._tokens.get(key)
        if cached is not None and self._clock() < cached.refresh_at:
            return cached.value
        return None

    def _lock_for(self, key: str) -> threading.Lock:
        with self._guard:
            lock = self._locks.get(key)
            if lock is None:
                lock = self._locks[key] = threading.Lock()
            return lock

    def _credential(self, key: str, connection: Connection, origin: str) -> _Credential:
        with self._guard:
            credential = self._credentials.get(key)
        if credential is not None:
            return credential
        options: dict[str, Any] = {
            "authority": self._settings.authority_host,
            "disable_instance_discovery": True,
            "connection_verify": self._verify,
            "connection_timeout": self._settings.crm_connect_timeout,
            "read_timeout": self._settings.crm_read_timeout,
            # Retries belong to the pipeline's schedule (a rescheduled message), not to a blocked worker.
            "retry_total": 0,
        }
        auth = connection.auth
        if isinstance(auth, PasswordAuth):
            tenant = auth.tenant_id or self._discover_tenant(origin)
            with warnings.catch_warnings():
                # ROPC is deprecated upstream; it is still what the publisher's service account needs.
                warnings.simplefilter("ignore", DeprecationWarning)
                credential = UsernamePasswordCredential(
                    auth.client_id or DEFAULT_PUBLIC_CLIENT_ID,
                    auth.username,
                    auth.password.get_secret_value(),
                    tenant_id=tenant,
                    **options,
                )
        else:
            credential = ClientSecretCredential(
                auth.tenant_id, auth.client_id, auth.client_secret.get_secret_value(), **options
            )
        with self._guard:
            self._credentials[key] = credential
        return credential

    def _discover_tenant(self, origin: str) -> str:
        """The tenant from the CRM's bearer challenge (cached per origin).

        Raises CredentialsRejected when the CRM names no valid tenant, CrmUnavailable / CrmThrottled /
        PermissionDenied when the CRM cannot be asked.
        """
        with self._guard:
            tenant = self._tenants.get(origin)
        if tenant is not None:
            return tenant
        operation = "tenant discovery"
        with self._guard:
            self.tenant_discoveries += 1
        started = time.monotonic()
        try:
            response = self._session.get(
                f"{origin}/api/data/v9.2/",
                headers={"Accept": "application/json", "OData-MaxVersion": "4.0", "OData-Version": "4.0"},
                timeout=(self._settings.crm_connect_timeout, self._settings.crm_read_timeout),
                verify=self._verify,
                allow_redirects=False,
            )
        except requests.RequestException as exc:
            raise error_from_network(exc, operation=operation) from exc
        logger.debug(
            "GET %s/api/data/v9.2/ -> %d in %.0f ms (request id %s)",
            origin,
            response.status_code,
            (time.monotonic() - started) * 1000,
            request_id_of(response.headers) or "-",
        )
        challenge = response.headers.get("WWW-Authenticate", "")
        if response.status_code == 401:
            tenant = tenant_from_challenge(challenge)
            if tenant is None:
                raise CredentialsRejected(
                    "the CRM's bearer challenge names no valid tenant; give the tenant id in the connection",
                    status=401,
                    request_id=request_id_of(response.headers),
                )
            with self._guard:
                self._tenants[origin] = tenant
            logger.info("discovered tenant %s for %s", tenant, origin)
            return tenant
        error: LeadWriterError
        if response.status_code < 300:
            error = CredentialsRejected(
                f"the CRM answered HTTP {response.status_code} without a bearer challenge, so no tenant "
                "could be discovered; give the tenant id in the connection",
                status=response.status_code,
                request_id=request_id_of(response.headers),
            )
        else:
            error = error_from_response(
                response.status_code, response.headers, response.content, operation=operation
            )
        raise error
