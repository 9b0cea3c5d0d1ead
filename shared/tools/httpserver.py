"""How ``leadwriter serve`` runs uvicorn so that no client can take the process down.

- **A request must arrive in time.** uvicorn times out an idle keep-alive connection, but not a
  connection that never sends anything, nor one that trickles its headers or body a byte at a time.
  :class:`GuardedH11Protocol` gives every request :data:`REQUEST_READ_TIMEOUT` seconds, counted from
  the connection (or the end of the previous answer), to arrive whole; a connection that is late is
  closed.
- **Connections are capped well below the file-descriptor limit.** The stage workers need sockets to
  the CRMs, the authority and the secret store, and the broker its files: the API may hold at most
  :func:`connection_cap` connections, which leaves them :data:`WORKER_FD_RESERVE` and more. At the cap
  a new connection first evicts the oldest one that has no request in flight (an idle or trickling
  client), so ``/api/health`` still answers while idle sockets pile up; only when every held
  connection is busy is the new one closed at once.
- :func:`raise_fd_limit` lifts the soft ``RLIMIT_NOFILE`` to the hard one at start.

The log line that can repeat thousands of times a second (a refused connection) goes through
:mod:`shared.ops.logfilter`'s rate limit like every other line.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, ClassVar, Final

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

try:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    HTTPTOOLS = True
except ImportError:  # pragma: no cover - httptools is a dependency; h11 is uvicorn's own fallback
    HttpToolsProtocol = H11Protocol  # type: ignore[misc,assignment]
    HTTPTOOLS = False

logger = logging.getLogger(__name__)

#: Seconds a request (request line, headers and body) has to arrive whole.
REQUEST_READ_TIMEOUT: Final = 15.0
#: Seconds an idle keep-alive connection is kept.
KEEP_ALIVE_TIMEOUT: Final = 5
#: Bytes of request line and headers h11 buffers before it answers 431/400 (h11's default is 16 KiB).
MAX_HEADER_BYTES: Final = 16 * 1024
#: File descriptors kept free of the API for the stage workers, the broker and the log, at least.
WORKER_FD_RESERVE: Final = 256
#: The API never holds more connections than this, whatever the fd limit.
MAX_CONNECTIONS: Final = 1000


def raise_fd_limit() -> int:
    """Raise the soft ``RLIMIT_NOFILE`` to the hard limit; the soft limit now in force.

    Raises nothing: where the limit cannot be read or raised (another OS), the current one stands.
    """
    try:
        import resource
    except ImportError:  # pragma: no cover - Windows
        return 1024
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:
            logger.warning("could not raise the open-file limit from %d: %s", soft, type(exc).__name__)
    return int(soft) if soft != resource.RLIM_INFINITY else 65536


def connection_cap(fd_limit: int, worker_concurrency: int) -> int:
    """Connections the API may hold: half of what the workers leave free, within the bounds above.

    Each stage worker may hold a CRM socket, an authority socket and a secret-store socket at once.
    Raises nothing.
    """
    free = fd_limit - (WORKER_FD_RESERVE + 3 * worker_concurrency)
    return max(1, min(MAX_CONNECTIONS, free // 2))


class _ConnectionGuard:
    """The request-read deadline and the connection cap, over either of uvicorn's HTTP protocols
    (module docstring). The protocol says when the request in hand is whole (:meth:`_request_whole`)."""

    max_connections: ClassVar[int] = MAX_CONNECTIONS
    read_timeout: ClassVar[float] = REQUEST_READ_TIMEOUT
    # What the uvicorn protocol it is mixed into provides.
    loop: asyncio.AbstractEventLoop
    transport: asyncio.Transport
    connections: set[Any]
    cycle: Any

    def _guard_init(self) -> None:
        self._read_deadline: asyncio.TimerHandle | None = None
        self._opened = 0.0

    def _request_whole(self) -> bool:
        raise NotImplementedError

    # -- connection cap ----------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:
        super().connection_made(transport)  # type: ignore[misc]
        self._opened = self.loop.time()
        if len(self.connections) > self.max_connections and not self._evict_one_idle():
            logger.warning("refusing a connection: every one of the %d allowed is busy", self.max_connections)
            self.transport.abort()
            return
        self._arm_read_deadline()

    def _idle(self) -> bool:
        """No request in flight: nothing received yet, or trickling a request not yet whole."""
        return self.cycle is None or self.cycle.response_complete

    def _evict_one_idle(self) -> bool:
        idle = [
            other
            for other in self.connections
            if other is not self and isinstance(other, _ConnectionGuard) and other._idle()
        ]
        if not idle:
            return False
        oldest = min(idle, key=lambda other: other._opened)
        logger.warning("at the cap of %d connections: closing the oldest idle one", self.max_connections)
        oldest._close()
        # connection_lost (which takes it out of the set) runs on the next loop turn; count it gone now.
        self.connections.discard(oldest)
        return True

    # -- request-read deadline ---------------------------------------------------------------------

    def _arm_read_deadline(self) -> None:
        self._cancel_read_deadline()
        self._read_deadline = self.loop.call_later(self.read_timeout, self._read_timed_out)

    def _cancel_read_deadline(self) -> None:
        if self._read_deadline is not None:
            self._read_deadline.cancel()
            self._read_deadline = None

    def _read_timed_out(self) -> None:
        self._read_deadline = None
        if not self._request_whole() and not self.transport.is_closing():
            logger.info("closing a connection whose request did not arrive within %.0f s", self.read_timeout)
            self._close()

    def _close(self) -> None:
        self._cancel_read_deadline()
        if not self.transport.is_closing():
            self.transport.abort()

    def on_response_complete(self) -> None:
        super().on_response_complete()  # type: ignore[misc]
        if not self.transport.is_closing():
            # The next request on this connection gets a deadline of its own. uvicorn's keep-alive
            # timer alone is not enough: any byte received cancels it, so a trickle would hold on.
            self._opened = self.loop.time()
            self._arm_read_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_read_deadline()
        super().connection_lost(exc)  # type: ignore[misc]


class GuardedH11Protocol(_ConnectionGuard, H11Protocol):  # type: ignore[misc]
    """uvicorn's h11 protocol with the guard; h11 itself bounds the request line and headers
    (``h11_max_incomplete_event_size``). The class attributes are set by :func:`guarded_protocol`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._guard_init()

    def _request_whole(self) -> bool:
        return self.conn.their_state not in (h11.IDLE, h11.SEND_BODY)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._request_whole():
            self._cancel_read_deadline()  # the request is whole; the app has it


class GuardedHttpToolsProtocol(_ConnectionGuard, HttpToolsProtocol):  # type: ignore[misc]
    """uvicorn's httptools protocol (the C parser: less CPU per request than h11) with the guard, and
    the bound on request line and headers that h11 applies itself: more than
    :data:`MAX_HEADER_BYTES` before the headers end is answered 400 and closed, as h11 answers it."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._guard_init()
        self._whole = False
        #: Bytes received of the request line and headers of the request being read (None: past them).
        self._head_bytes: int | None = 0

    def _request_whole(self) -> bool:
        return self._whole

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        # Counted after parsing, so that a body arriving with its headers is not counted as them.
        if self._head_bytes is not None and not self.transport.is_closing():
            self._head_bytes += len(data)
            if self._head_bytes > MAX_HEADER_BYTES:
                self._cancel_read_deadline()
                self.send_400_response("Invalid HTTP request received.")

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._whole = False
        self._head_bytes = 0

    def on_headers_complete(self) -> None:
        self._head_bytes = None
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._whole = True
        self._cancel_read_deadline()  # the request is whole; the app has it


def guarded_protocol(
    *, max_connections: int, read_timeout: float = REQUEST_READ_TIMEOUT
) -> type[GuardedHttpToolsProtocol] | type[GuardedH11Protocol]:
    """The guarded protocol bound to these limits: over httptools when it is installed (it is a
    dependency; h11 stays uvicorn's own fallback). Raises ValueError below 1."""
    if max_connections < 1 or read_timeout <= 0:
        raise ValueError("max_connections and read_timeout must be positive")
    base: type[GuardedHttpToolsProtocol] | type[GuardedH11Protocol] = (
        GuardedHttpToolsProtocol if HTTPTOOLS else GuardedH11Protocol
    )
    return type(
        f"Bound{base.__name__}",
        (base,),
        {"max_connections": max_connections, "read_timeout": read_timeout},
    )


def server_config(
    app: Any,
    *,
    host: str,
    port: int,
    max_connections: int,
    read_timeout: float = REQUEST_READ_TIMEOUT,
    **options: Any,
) -> uvicorn.Config:
    """The uvicorn config ``serve`` runs: the guarded protocol, keep-alive and header limits, no access log.

    Raises ValueError for limits below 1.
    """
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        http=guarded_protocol(max_connections=max_connections, read_timeout=read_timeout),
        # uvicorn answers 503 once connections *or* tasks reach it; the guard keeps connections at or
        # below the cap, so one more leaves the 503 to requests in flight.
        limit_concurrency=max_connections + 1,
        timeout_keep_alive=KEEP_ALIVE_TIMEOUT,
        h11_max_incomplete_event_size=MAX_HEADER_BYTES,
        # Pending connections wait in the kernel, holding no descriptor of ours; a short queue would
        # only drop clients the cap could have served by evicting an idle one.
        backlog=2048,
        # uvicorn's access log carries the query string, and with it an ingest ?key=.
        access_log=False,
        log_level=options.pop("log_level", "warning"),
        # Our logging setup (and its rate limit) stays in place.
        log_config=None,
        **options,
    )
