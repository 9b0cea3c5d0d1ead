"""HTTPS plumbing shared by the authority and the per-org Dataverse listeners.

A :class:`Listener` is a threading HTTP/1.1 server (keep-alive, one daemon thread per connection)
whose TLS handshake runs in the connection's own thread, so a slow or broken client never blocks
the accept loop. Applications are plain callables ``Request -> Response``.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import logging
import socket
import socketserver
import ssl
import struct
import sys
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from email.message import Message
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

logger = logging.getLogger(__name__)

#: Seconds a client has to finish the TLS handshake.
HANDSHAKE_TIMEOUT = 10.0
#: Seconds an idle keep-alive connection is kept open.
IDLE_TIMEOUT = 60.0
#: Largest request body accepted (a $batch of 1000 leads fits easily).
MAX_BODY = 64 * 1024 * 1024


@dataclass
class Request:
    """One HTTP request as the applications see it."""

    method: str
    target: str
    path: str
    query: dict[str, str]
    headers: Message
    body: bytes
    request_id: str

    def header(self, name: str, default: str = "") -> str:
        value = self.headers.get(name)
        return default if value is None else str(value)

    def json(self) -> Any:
        """The body parsed as JSON. Raises ValueError when it is not JSON."""
        return json.loads(self.body.decode("utf-8"))


@dataclass
class Response:
    """One answer. ``reset`` closes the connection with a TCP reset instead of answering."""

    status: int
    body: bytes = b""
    headers: list[tuple[str, str]] = field(default_factory=list)
    reset: bool = False


def json_response(status: int, payload: Any, headers: list[tuple[str, str]] | None = None) -> Response:
    body = json.dumps(payload, separators=(",", ":")).encode("utf-8")
    return Response(status, body, [("Content-Type", "application/json; charset=utf-8"), *(headers or [])])


App = Callable[[Request], Response]


def parse_target(target: str) -> tuple[str, dict[str, str]]:
    """Split a request target into its decoded path and its query (first value of each name)."""
    parts = urlsplit(target)
    query = dict(reversed(parse_qsl(parts.query, keep_blank_values=True)))
    return unquote(parts.path), query


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "Microsoft-HTTPAPI/2.0"
    sys_version = ""
    timeout = IDLE_TIMEOUT
    server: _Server

    def version_string(self) -> str:
        return self.server_version

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("%s %s", self.server.name, format % args)

    def _read_body(self) -> bytes | None:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks: list[bytes] = []
            total = 0
            while True:
                size_line = self.rfile.readline(1024)
                size = int(size_line.split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                total += size
                if total > MAX_BODY:
                    return None
                chunks.append(self.rfile.read(size))
                self.rfile.readline(1024)
        length = int(self.headers.get("Content-Length") or 0)
        if length < 0 or length > MAX_BODY:
            return None
        return self.rfile.read(length) if length else b""

    def _dispatch(self) -> None:
        request_id = str(uuid.uuid4())
        try:
            body = self._read_body()
        except ValueError:
            body = None
        if body is None:
            self.close_connection = True
            self._send(
                json_response(413, {"error": {"code": "", "message": "Request body too large."}}), request_id
            )
            return
        path, query = parse_target(self.path)
        request = Request(self.command, self.path, path, query, self.headers, body, request_id)
        try:
            response = self.server.app(request)
        except Exception:
            logger.exception("%s: unhandled error answering %s %s", self.server.name, self.command, path)
            response = json_response(
                500, {"error": {"code": "0x80040216", "message": "An unexpected error occurred."}}
            )
        if response.reset:
            self._reset()
            return
        self._send(response, request_id)

    def _reset(self) -> None:
        # SO_LINGER with a zero timeout makes close() send RST instead of FIN: the client sees
        # "connection reset by peer" with no answer, as from a dropped load balancer connection.
        self.close_connection = True
        try:
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            socket.socket.close(self.connection)
        except OSError:
            pass

    def _send(self, response: Response, request_id: str) -> None:
        self.send_response(response.status)
        names = {name.lower() for name, _ in response.headers}
        for name, value in response.headers:
            self.send_header(name, value)
        if "req_id" not in names:
            self.send_header("REQ_ID", request_id)
        if "x-ms-service-request-id" not in names:
            self.send_header("x-ms-service-request-id", request_id)
        self.send_header("Content-Length", str(len(response.body)))
        if self.server.stopping.is_set():
            self.close_connection = True
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD" and response.body:
            self.wfile.write(response.body)

    do_GET = do_POST = do_PATCH = do_PUT = do_DELETE = do_HEAD = _dispatch


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], name: str, app: App, stopping: threading.Event) -> None:
        super().__init__(address, _Handler)
        self.name = name
        self.app = app
        self.stopping = stopping
        self.ssl_context: ssl.SSLContext | None = None
        self._connections: set[socket.socket] = set()
        self._lock = threading.Lock()

    def server_bind(self) -> None:
        # HTTPServer.server_bind asks DNS for the bound address's name (getfqdn), which nothing here
        # reads; where the resolver answers slowly that costs ~0.1 s per org (20 s for 200 orgs).
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name = str(host)
        self.server_port = int(port)

    def finish_request(self, request: Any, client_address: Any) -> None:
        context = self.ssl_context
        if context is None:
            return
        try:
            # Responses go out in several writes (status, headers, body); without NODELAY, Nagle and
            # the client's delayed ACK add ~40 ms to every request — latency a real CRM does not have.
            request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            request.settimeout(HANDSHAKE_TIMEOUT)
            conn = context.wrap_socket(request, server_side=True)
        except (OSError, ValueError) as exc:
            logger.debug("%s: TLS handshake with %s failed: %s", self.name, client_address, exc)
            return
        with self._lock:
            self._connections.add(conn)
        try:
            self.RequestHandlerClass(conn, client_address, self)  # type: ignore[arg-type]
        except OSError as exc:
            logger.debug("%s: connection from %s ended: %s", self.name, client_address, exc)
        finally:
            with self._lock:
                self._connections.discard(conn)
            with contextlib.suppress(OSError):
                conn.close()

    def handle_error(self, request: Any, client_address: Any) -> None:
        logger.debug("%s: error on connection from %s", self.name, client_address, exc_info=sys.exc_info())

    def close_connections(self) -> None:
        with self._lock:
            connections = list(self._connections)
        for conn in connections:
            # The plain socket's shutdown (not SSLSocket's, which drops its TLS state under a
            # reader in another thread): wakes any handler blocked reading a keep-alive request.
            with contextlib.suppress(OSError):
                socket.socket.shutdown(conn, socket.SHUT_RDWR)


class Listener:
    """One HTTPS listener. Binds at construction (the port is known at once); serves after :meth:`start`.

    Raises OSError from the constructor when the address cannot be bound.
    """

    def __init__(self, host: str, port: int, name: str, app: App, stopping: threading.Event) -> None:
        self._server = _Server((host, port), name, app, stopping)
        self._thread: threading.Thread | None = None
        self.name = name

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def start(self, context: ssl.SSLContext) -> None:
        self._server.ssl_context = context
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name=self.name, daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(timeout=5)
            self._thread = None
        self._server.server_close()
        self._server.close_connections()


def server_context(cert: str, key: str) -> ssl.SSLContext:
    """A TLS server context for the given PEM certificate chain and key."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert, key)
    return context
