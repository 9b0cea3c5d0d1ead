"""Who may call what (architecture §6): the admin key, publisher keys, and the scope of each.

- No key, or a string that is not a valid key at all → **401** with ``WWW-Authenticate: Bearer``.
- A valid key outside its scope (publisher A's key on publisher B, a publisher key on an admin
  route) → **403**.

Both are decided *before* the request body is read or the path validated, so an unauthorised caller
learns nothing and changes nothing: :class:`GuardedRoute` runs the route's :class:`Guard` first, and
the guard's dependency then only hands the already-decided :class:`Principal` to the endpoint.

Keys are compared in constant time (``hmac.compare_digest`` for the admin key; hashes for publisher
keys in :class:`~shared.ops.apikeys.ApiKeyStore`) and never logged.

Guessing is slowed down per client address (:class:`FailedKeyLimiter`): after
:data:`MAX_FAILED_KEYS` invalid keys within :data:`FAILED_KEY_WINDOW` seconds an address gets **429**
with ``Retry-After`` — before any key it sends is checked — until its failures age out of the window.
Other addresses are never affected. A request whose address is unknown (behind a proxy that does not
pass it) is not limited here: that belongs to the front end.
"""

from __future__ import annotations

import hmac
import logging
import math
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Final

from fastapi import Depends, HTTPException, Request, Response
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.concurrency import run_in_threadpool

from shared.services import Services

logger = logging.getLogger(__name__)

#: Shown in OpenAPI as the security scheme of every guarded route.
bearer_scheme = HTTPBearer(auto_error=False, description="An admin key or a publisher key")

_STATE_KEY = "principal"
_CHALLENGE = {"WWW-Authenticate": "Bearer"}

#: Invalid keys one address may send within the window before it is refused with 429.
MAX_FAILED_KEYS: Final = 10
FAILED_KEY_WINDOW: Final = 60.0
#: Addresses remembered at once; the least recently seen is forgotten first.
MAX_TRACKED_ADDRESSES: Final = 4096
#: Where create_app keeps the app's limiter.
LIMITER_STATE = "failed_keys"


@dataclass(frozen=True)
class Principal:
    """The caller: the admin, or one publisher."""

    admin: bool
    publisher_id: str | None = None

    def may_act_for(self, publisher_id: str) -> bool:
        return self.admin or self.publisher_id == publisher_id


class Unauthenticated(HTTPException):
    """401: no key, or not a valid key."""

    def __init__(self, message: str) -> None:
        super().__init__(401, detail=message, headers=dict(_CHALLENGE))


class Forbidden(HTTPException):
    """403: a valid key used outside its scope."""

    def __init__(self, message: str) -> None:
        super().__init__(403, detail=message)


class TooManyFailedKeys(HTTPException):
    """429: this address sent too many invalid keys lately."""

    def __init__(self, retry_after: float) -> None:
        seconds = max(1, math.ceil(retry_after))
        super().__init__(
            429,
            detail=f"too many invalid API keys from this address; retry after {seconds} s",
            headers={"Retry-After": str(seconds)},
        )


class FailedKeyLimiter:
    """Invalid keys per client address in a sliding window (see the module docstring). Thread-safe."""

    def __init__(
        self,
        *,
        limit: int = MAX_FAILED_KEYS,
        window: float = FAILED_KEY_WINDOW,
        max_addresses: int = MAX_TRACKED_ADDRESSES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limit = limit
        self.window = window
        self._max_addresses = max_addresses
        self._clock = clock
        self._lock = threading.Lock()
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()

    def _recent(self, address: str, now: float) -> deque[float] | None:
        failures = self._failures.get(address)
        if failures is None:
            return None
        while failures and now - failures[0] >= self.window:
            failures.popleft()
        if not failures:
            del self._failures[address]
            return None
        return failures

    def retry_after(self, address: str | None) -> float | None:
        """Seconds ``address`` must wait before its keys are checked again, or None when it need not."""
        if address is None:
            return None
        with self._lock:
            now = self._clock()
            failures = self._recent(address, now)
            if failures is None or len(failures) < self.limit:
                return None
            return failures[-self.limit] + self.window - now

    def failed(self, address: str | None) -> None:
        """Count one invalid key from ``address``."""
        if address is None:
            return
        with self._lock:
            now = self._clock()
            failures = self._recent(address, now)
            if failures is None:
                failures = self._failures[address] = deque(maxlen=self.limit)
            failures.append(now)
            self._failures.move_to_end(address)
            while len(self._failures) > self._max_addresses:
                self._failures.popitem(last=False)


def _limiter_of(request: Request) -> FailedKeyLimiter:
    limiter = getattr(request.app.state, LIMITER_STATE, None)
    if not isinstance(limiter, FailedKeyLimiter):
        limiter = FailedKeyLimiter()
        setattr(request.app.state, LIMITER_STATE, limiter)
    return limiter


def _address_of(request: Request) -> str | None:
    return request.client.host if request.client is not None and request.client.host else None


def services_of(request: Request) -> Services:
    """The :class:`Services` the app was built with."""
    services: Services = request.app.state.services
    return services


async def services_dependency(request: Request) -> Services:
    """:func:`services_of` as a route dependency. Async because FastAPI runs a plain function
    dependency on a worker thread: a thread hop per request for reading an attribute."""
    return services_of(request)


def bearer_key(request: Request) -> str | None:
    """The key of an ``Authorization: Bearer <key>`` header (scheme case-insensitive), or None."""
    header = request.headers.get("authorization")
    if not header:
        return None
    scheme, _, key = header.strip().partition(" ")
    key = key.strip()
    if scheme.lower() != "bearer" or not key:
        return None
    return key


def _is_admin_key(services: Services, key: str) -> bool:
    admin = services.settings.admin_key
    if admin is None or not admin.get_secret_value():
        # Without LEADWRITER_ADMIN_KEY nothing is the admin key (architecture §8).
        return False
    return hmac.compare_digest(key.encode("utf-8"), admin.get_secret_value().encode("utf-8"))


async def identify(services: Services, key: str, *, allow_admin: bool = True) -> Principal | None:
    """The principal ``key`` belongs to, or None when it is no valid key.

    Raises SecretStoreUnavailable (via the key store) when publisher keys cannot be checked now.
    """
    if allow_admin and _is_admin_key(services, key):
        return Principal(admin=True)
    # A cached key record is checked here (an HMAC); only a store read goes to a worker thread.
    known, publisher_id = services.api_keys.verify_cached(key)
    if not known:
        publisher_id = await run_in_threadpool(services.api_keys.verify, key)
    if publisher_id is None:
        return None
    return Principal(admin=False, publisher_id=publisher_id)


class Guard:
    """A route's authorisation rule; used as a FastAPI dependency that yields the :class:`Principal`.

    ``admin_only``: only the admin key. Otherwise the admin key or the key of the publisher named by
    the ``publisherId`` path parameter. ``query_key``: a publisher key may also come as ``?key=``
    (the marketplace's HTTPS-endpoint destination can be given only a URL); the admin key never may,
    so it never lands in a URL, a proxy log or browser history.
    """

    def __init__(self, *, admin_only: bool = False, query_key: bool = False) -> None:
        self.admin_only = admin_only
        self.query_key = query_key

    async def authorize(self, request: Request) -> Principal:
        """Decide the request's principal and store it on the request.

        Raises Unauthenticated (401) or Forbidden (403); TooManyFailedKeys (429) for an address that sent
        too many invalid keys lately; SecretStoreUnavailable when keys cannot be read.
        """
        services = services_of(request)
        limiter = _limiter_of(request)
        address = _address_of(request)
        wait = limiter.retry_after(address)
        if wait is not None:
            raise TooManyFailedKeys(wait)
        key, from_query = self._presented_key(request)
        if key is None:
            raise Unauthenticated("an API key is required: send Authorization: Bearer <key>")
        principal = await identify(services, key, allow_admin=not from_query)
        if principal is None:
            limiter.failed(address)
            raise Unauthenticated("the API key is not valid")
        if self.admin_only:
            if not principal.admin:
                raise Forbidden("this route needs the admin key")
        else:
            self.check_scope(principal, request)
        setattr(request.state, _STATE_KEY, principal)
        return principal

    def known_principal(self, request: Request) -> Principal | None:
        """The principal :meth:`authorize` would decide, when that takes no I/O and counts no
        failure: a key that is the admin key or a cached publisher key, allowed on this route for the
        publisher it names, from an address not held back. None otherwise — :meth:`authorize` then
        decides, reads the store, counts a bad key and raises. Raises nothing."""
        services = services_of(request)
        if _limiter_of(request).retry_after(_address_of(request)) is not None:
            return None
        key, from_query = self._presented_key(request)
        if key is None:
            return None
        if not from_query and _is_admin_key(services, key):
            principal = Principal(admin=True)
        else:
            known, publisher_id = services.api_keys.verify_cached(key)
            if not known or publisher_id is None:
                return None
            principal = Principal(admin=False, publisher_id=publisher_id)
        if self.admin_only:
            return principal if principal.admin else None
        try:
            self.check_scope(principal, request)  # a subclass's own scope rule, if it has one
        except Forbidden:
            return None
        return principal

    def _presented_key(self, request: Request) -> tuple[str | None, bool]:
        """The key the request presents, and whether it came as ``?key=`` (only where allowed)."""
        key = bearer_key(request)
        if key is None and self.query_key:
            query_key = request.query_params.get("key")
            if query_key:
                return query_key, True
        return key, False

    def check_scope(self, principal: Principal, request: Request) -> None:
        """The key may act for the publisher the request names (the ``publisherId`` path parameter).
        Raises Forbidden (403)."""
        target = request.path_params.get("publisherId")
        if not isinstance(target, str) or not principal.may_act_for(target):
            raise Forbidden("this key may act only for its own publisher")

    async def __call__(
        self,
        request: Request,
        # Declared so OpenAPI shows the bearer scheme; the key itself is read in authorize().
        _credentials: HTTPAuthorizationCredentials | None = Depends(bearer_scheme),  # noqa: B008
    ) -> Principal:
        principal = getattr(request.state, _STATE_KEY, None)
        if isinstance(principal, Principal):
            return principal
        return await self.authorize(request)


ADMIN = Guard(admin_only=True)
PUBLISHER = Guard()
INGEST = Guard(query_key=True)


class GuardedRoute(APIRoute):
    """An APIRoute that runs its :class:`Guard` before FastAPI reads and validates the request.

    FastAPI parses the body before it solves dependencies, so without this an unauthenticated caller
    would get 422 for a malformed body instead of 401, and learn about the route's schema.
    """

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        guards = [dep.call for dep in self.dependant.dependencies if isinstance(dep.call, Guard)]
        if not guards:
            return handler

        async def guarded(request: Request) -> Response:
            for guard in guards:
                await guard.authorize(request)
            return await handler(request)

        return guarded
