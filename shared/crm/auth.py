"""Tokens for a publisher's CRM (architecture §4): azure-identity credentials, cached per connection.

Failed sign-ins must never lock the publisher's account (Entra's smart lockout locks one after about
ten failures), so the provider asks Entra as rarely as the facts allow:

- a credential Entra **rejected** is remembered per connection fingerprint for
  :data:`REJECTION_BACKOFF_SECONDS`: until the connection changes or that time passes, every caller
  gets :class:`CredentialsRejected` at once, without a sign-in (the leads dead-letter, to be replayed
  when the publisher stores a fixed connection);
- while the token endpoint **fails** (:class:`AuthorityUnavailable`), each principal backs off
  exponentially (:func:`authority_backoff`, a handful of attempts a minute at most): callers get
  :class:`AuthorityBackingOff` (an ``AuthorityUnavailable`` with ``retry_after``) without a request.

Every map the provider keeps is bounded (:data:`MAX_ENTRIES`, least recently used goes first), so
rotated credentials do not accumulate.

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
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

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
from shared.errors import AuthorityUnavailable, CredentialsRejected, CrmPaced, LeadWriterError
from shared.http import new_session
from shared.settings import Settings

logger = logging.getLogger(__name__)

#: Public client id Dynamics documents for ROPC sign-in when the publisher gives none.
DEFAULT_PUBLIC_CLIENT_ID = "51f81489-12ee-4a9e-aaae-a2591f45987d"
#: A token is renewed this long before it expires (or at half its life, for short-lived tokens).
REFRESH_MARGIN_SECONDS = 300.0

#: How long a rejected credential is not tried again (unless the connection changes).
REJECTION_BACKOFF_SECONDS = 15 * 60.0
#: Back-off after the first failure of the token endpoint; doubled per failure up to the maximum.
AUTHORITY_BACKOFF_BASE_SECONDS = 2.0
AUTHORITY_BACKOFF_MAX_SECONDS = 60.0
#: Entries each of the provider's maps holds at most.
MAX_ENTRIES = 4096

_K = TypeVar("_K")
_V = TypeVar("_V")

_GUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_DOMAIN = re.compile(r"(?:[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z][a-z0-9-]{0,61}[a-z0-9]")
_AUTHORIZATION_URI = re.compile(r"""authorization_uri\s*=\s*"?([^",\s]+)"?""", re.IGNORECASE)


class _Credential(Protocol):
    def get_token(self, *scopes: str, **kwargs: Any) -> AccessToken: ...


@dataclass(frozen=True)
class _CachedToken:
    value: str
    refresh_at: float


@dataclass(frozen=True)
class _Rejection:
    error: CredentialsRejected
    until: float


@dataclass(frozen=True)
class _Outage:
    failures: int
    until: float
    error: AuthorityUnavailable


class AuthorityBackingOff(AuthorityUnavailable, CrmPaced):
    """Nothing was sent: the token endpoint failed for this principal lately and is not asked again
    before ``retry_after``. An :class:`AuthorityUnavailable`, and like :class:`CrmPaced` a wait rather
    than a failure, so a runtime holds the message instead of spending one of its retry attempts (an
    outage of the authority must not run a lead out of attempts faster than the schedule would)."""

    def __init__(self, message: str, *, retry_after: float) -> None:
        super().__init__(message, retry_after=retry_after, wait="authority")


class _Lru(Generic[_K, _V]):
    """A dict that holds at most ``limit`` entries, forgetting the least recently used. Not locked."""

    def __init__(self, limit: int = MAX_ENTRIES) -> None:
        self._limit = limit
        self._items: OrderedDict[_K, _V] = OrderedDict()

    def get(self, key: _K) -> _V | None:
        value = self._items.get(key)
        if value is not None:
            self._items.move_to_end(key)
        return value

    def __setitem__(self, key: _K, value: _V) -> None:
        self._items[key] = value
        self._items.move_to_end(key)
        while len(self._items) > self._limit:
            self._items.popitem(last=False)

    def pop(self, key: _K) -> _V | None:
        return self._items.pop(key, None)

    def __len__(self) -> int:
        return len(self._items)


def authority_backoff(failures: int, retry_after: float | None = None) -> float:
    """Seconds to wait after ``failures`` failures in a row of the token endpoint: 2, 4, 8 … 60.

    The endpoint's own ``Retry-After`` wins when it asks for longer. Raises nothing.
    """
    delay = min(AUTHORITY_BACKOFF_MAX_SECONDS, AUTHORITY_BACKOFF_BASE_SECONDS * 2.0 ** max(failures - 1, 0))
    return max(delay, retry_after or 0.0)


def principal_of(connection: Connection) -> str:
    """Who signs in, whatever the secret: the key of the token endpoint's back-off."""
    auth = connection.auth
    if isinstance(auth, PasswordAuth):
        return f"user:{auth.username.lower()}"
    return f"app:{auth.tenant_id.lower()}:{auth.client_id.lower()}"


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
    ``clock`` is the wall clock tokens expire by; ``monotonic`` times the back-offs (a clock step must
    neither end nor stretch one).
    """

    def __init__(
        self,
        settings: Settings,
        *,
        session: requests.Session | None = None,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        max_entries: int = MAX_ENTRIES,
    ) -> None:
        self._settings = settings
        self._session = session or new_session(settings.authority_host)
        self._clock = clock
        self._monotonic = monotonic
        self._verify: str | bool = str(settings.ca_bundle) if settings.ca_bundle else True
        self._guard = threading.Lock()
        self._locks: _Lru[str, threading.Lock] = _Lru(max_entries)
        self._tokens: _Lru[str, _CachedToken] = _Lru(max_entries)
        self._credentials: _Lru[str, _Credential] = _Lru(max_entries)
        self._tenants: _Lru[str, str] = _Lru(max_entries)
        self._rejections: _Lru[str, _Rejection] = _Lru(max_entries)
        self._outages: _Lru[str, _Outage] = _Lru(max_entries)
        self.token_requests = 0
        self.tenant_discoveries = 0

    def token(self, connection: Connection) -> str:
        """An access token for the connection's CRM (scope ``<origin>/.default``).

        Raises UnsafeCrmUrl for a URL outside the allowed hosts, CredentialsRejected when Entra refuses
        the credentials (or no tenant can be discovered) — and, without asking again, while such a
        refusal of these very credentials is remembered — AuthorityUnavailable when the token endpoint
        fails or cannot be reached, or (without a request, ``retry_after`` set) while this principal
        backs off after such failures; CrmUnavailable / CrmThrottled / PermissionDenied when tenant
        discovery at the CRM fails.
        """
        key = connection.fingerprint()
        cached = self._cached(key)
        if cached is not None:
            return cached
        self._refuse_if_remembered(key, connection)
        with self._lock_for(key):
            # Another caller may have fetched it (or been refused) while this one waited for the lock.
            cached = self._cached(key)
            if cached is not None:
                return cached
            self._refuse_if_remembered(key, connection)
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
                    self._credentials.pop(key)
                error = error_from_token_failure(exc)
                self._remember_failure(key, connection, error)
                logger.info(
                    "token request for %s failed: %s (%s)", origin, type(error).__name__, error.code or "-"
                )
                raise error from exc
            lifetime = max(float(access.expires_on) - started, 0.0)
            refresh_at = started + max(lifetime - REFRESH_MARGIN_SECONDS, lifetime / 2)
            with self._guard:
                self._tokens[key] = _CachedToken(access.token, refresh_at)
                self._outages.pop(principal_of(connection))
            logger.debug("token obtained for %s, valid %.0f s", origin, lifetime)
            return access.token

    def invalidate(self, connection: Connection) -> None:
        """Forget the cached token (and credential, whose own cache holds the same token) after a 401.

        A remembered rejection stays: only new credentials (a new fingerprint) or time lift it.
        """
        key = connection.fingerprint()
        with self._guard:
            self._tokens.pop(key)
            self._credentials.pop(key)

    def _refuse_if_remembered(self, key: str, connection: Connection) -> None:
        """Raise, without a request, while a rejection of ``key`` or an outage for its principal lasts."""
        now = self._monotonic()
        with self._guard:
            rejection = self._rejections.get(key)
            outage = self._outages.get(principal_of(connection))
        if rejection is not None and now < rejection.until:
            remembered = rejection.error
            raise CredentialsRejected(
                f"{remembered.message}; not tried again for {(rejection.until - now) / 60:.0f} min so that "
                "the account is not locked: store corrected credentials to try at once",
                entra_code=remembered.entra_code,
                status=remembered.status,
                code=remembered.code,
                request_id=remembered.request_id,
            )
        if outage is not None and now < outage.until:
            raise AuthorityBackingOff(
                f"{outage.error.message}; not asked again for {outage.until - now:.0f} s after "
                f"{outage.failures} failure(s) in a row",
                retry_after=outage.until - now,
            )

    def _remember_failure(self, key: str, connection: Connection, error: LeadWriterError) -> None:
        now = self._monotonic()
        principal = principal_of(connection)
        with self._guard:
            if isinstance(error, CredentialsRejected):
                self._rejections[key] = _Rejection(error, now + REJECTION_BACKOFF_SECONDS)
                self._outages.pop(principal)  # the endpoint answered
            elif isinstance(error, AuthorityUnavailable):
                previous = self._outages.get(principal)
                failures = (previous.failures if previous is not None else 0) + 1
                delay = authority_backoff(failures, error.retry_after)
                self._outages[principal] = _Outage(failures, now + delay, error)

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
                lock = threading.Lock()
                self._locks[key] = lock
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
