"""HTTP server hardening: connections that send nothing or trickle their headers are
timed out, the API's connections are capped below what the workers need, ``/api/health`` and the stage
workers keep going meanwhile, and a line that repeats thousands of times a second is rate-limited.

Against uvicorn run with the very config ``leadwriter serve`` builds (in-process, so the test can read
the server's connection count), and against a real ``serve`` subprocess. Loopback only; a few hundred
sockets at most.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import uvicorn

from shared.api import create_app
from shared.ops.logfilter import RateLimitFilter
from shared.runtime.embedded import wait_until
from shared.services import Services
from shared.simulator import CrmSimulator
from shared.tools.httpserver import (
    MAX_CONNECTIONS,
    MAX_HEADER_BYTES,
    WORKER_FD_RESERVE,
    connection_cap,
    server_config,
)
from tests.fixtures.api import make_settings
from tests.fixtures.harness import Harness, lead_message

CAP = 40
READ_TIMEOUT = 1.0
PARTIAL_REQUEST = b"GET /api/health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: "


@dataclass
class Served:
    server: uvicorn.Server
    url: str
    port: int

    def connections(self) -> int:
        return len(self.server.server_state.connections)


@contextmanager
def served(services: Services) -> Iterator[Served]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = server_config(
        create_app(services), host="127.0.0.1", port=port, max_connections=CAP, read_timeout=READ_TIMEOUT
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        assert wait_until(lambda: server.started, timeout=10), "uvicorn did not start"
        yield Served(server, f"http://127.0.0.1:{port}", port)
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


def open_sockets(port: int, count: int, first_bytes: bytes = b"") -> list[socket.socket]:
    sockets = []
    for _ in range(count):
        client = socket.create_connection(("127.0.0.1", port), timeout=5)
        if first_bytes:
            client.sendall(first_bytes)
        client.setblocking(False)
        sockets.append(client)
    return sockets


def closed_by_server(client: socket.socket, trickle: bool) -> bool:
    """True once the server has closed ``client``; a trickling client sends one more header byte first."""
    try:
        if trickle:
            client.send(b"x")
        # Non-blocking: b"" once closed, BlockingIOError while open (no select(): fds may pass 1024).
        return client.recv(1024) == b""
    except (ConnectionResetError, BrokenPipeError):
        return True
    except BlockingIOError:
        return False


def wait_all_closed(idle: list[socket.socket], slow: list[socket.socket], timeout: float) -> None:
    open_idle, open_slow = list(idle), list(slow)

    def sweep() -> bool:
        open_idle[:] = [s for s in open_idle if not closed_by_server(s, trickle=False)]
        open_slow[:] = [s for s in open_slow if not closed_by_server(s, trickle=True)]
        return not open_idle and not open_slow

    assert wait_until(sweep, timeout), f"still open: {len(open_idle)} idle, {len(open_slow)} trickling"


def test_idle_and_trickling_connections_are_capped_and_timed_out_while_health_and_workers_go_on(
    simulator: CrmSimulator, tmp_path: Path
) -> None:
    harness = Harness(simulator, tmp_path / "data")
    with ExitStack() as stack:
        stack.callback(harness.services.close)
        stack.callback(harness.stop)
        publisher = harness.publisher()
        live = stack.enter_context(served(harness.services))
        idle = open_sockets(live.port, 300)
        slow = open_sockets(live.port, 100, PARTIAL_REQUEST)
        for client in idle + slow:
            stack.callback(client.close)
        # At the cap a new connection is accepted and then the oldest idle one closed: for a moment
        # there may be one more than the cap.
        assert live.connections() <= CAP + 1

        # Health answers at once, on a fresh connection each time, however many idle sockets wait.
        for _ in range(5):
            with httpx.Client(base_url=live.url, timeout=10) as client:
                assert client.get("/api/health").status_code == 200
            assert live.connections() <= CAP + 1

        # The workers deliver meanwhile.
        harness.send([lead_message(publisher, n) for n in range(10)])
        harness.start()
        harness.wait_for(lambda: len(harness.written(publisher)) == 10)

        wait_all_closed(idle, slow, timeout=60)
        assert wait_until(lambda: live.connections() == 0, timeout=10)


@contextmanager
def served_with_a_client(tmp_path: Path, timeout: float) -> Iterator[tuple[Served, socket.socket]]:
    """The API served over fresh services, and one raw socket connected to it."""
    services = Services.from_settings(make_settings(tmp_path / "data"))
    with ExitStack() as stack:
        stack.callback(services.close)
        live = stack.enter_context(served(services))
        client = socket.create_connection(("127.0.0.1", live.port), timeout=timeout)
        stack.callback(client.close)
        yield live, client


def test_a_keep_alive_connection_that_trickles_its_next_request_is_closed(tmp_path: Path) -> None:
    with served_with_a_client(tmp_path, timeout=5) as (_live, client):
        client.sendall(b"GET /api/health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert client.recv(65536).startswith(b"HTTP/1.1 200")
        client.sendall(PARTIAL_REQUEST)
        client.setblocking(False)
        wait_all_closed([], [client], timeout=30)


def _recv_all(client: socket.socket) -> bytes:
    chunks = []
    while chunk := client.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def test_headers_over_the_limit_are_refused_400_and_closed_while_a_large_body_is_read(tmp_path: Path) -> None:
    with served_with_a_client(tmp_path, timeout=10) as (live, client):
        client.sendall(b"GET /api/health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"a" * (MAX_HEADER_BYTES + 1024))
        assert _recv_all(client).startswith(b"HTTP/1.1 400")

        # A body ten times the header limit, sent with its headers in one write, is a body: it reaches
        # the app (which refuses the lead for its content, not the request for its size).
        body = b'{"lead": {"x": "' + b"b" * (10 * MAX_HEADER_BYTES) + b'"}}'
        with httpx.Client(base_url=live.url, timeout=10) as http:
            answer = http.post("/api/publishers/contoso/leads", content=body)
        assert answer.status_code == 401


def test_at_the_cap_a_new_connection_evicts_the_oldest_idle_one_so_health_answers(tmp_path: Path) -> None:
    services = Services.from_settings(make_settings(tmp_path / "data"))
    with ExitStack() as stack:
        stack.callback(services.close)
        live = stack.enter_context(served(services))
        idle = open_sockets(live.port, CAP)
        for client in idle:
            stack.callback(client.close)
        assert live.connections() <= CAP
        with httpx.Client(base_url=live.url, timeout=10) as client:
            assert client.get("/api/health").status_code == 200
        assert live.connections() <= CAP


@pytest.mark.parametrize(
    ("fd_limit", "workers", "cap"),
    [
        (1024, 16, (1024 - WORKER_FD_RESERVE - 48) // 2),
        (20_000, 16, MAX_CONNECTIONS),
        (300, 16, 1),
        (1_048_576, 256, MAX_CONNECTIONS),
    ],
)
def test_the_connection_cap_leaves_the_workers_their_file_descriptors(fd_limit: int, workers: int, cap: int) -> None:
    assert connection_cap(fd_limit, workers) == cap
    assert connection_cap(fd_limit, workers) < fd_limit - WORKER_FD_RESERVE or cap == 1


def test_a_line_repeated_thousands_of_times_a_second_is_let_through_a_few_times_then_counted() -> None:
    now = [100.0]
    limiter = RateLimitFilter(10, clock=lambda: now[0])
    text = "socket.accept() out of system resource"
    records = [logging.LogRecord("asyncio", logging.ERROR, __file__, 1, text, None, None) for _ in range(5000)]
    assert sum(limiter.filter(record) for record in records) == 10
    other = logging.LogRecord("shared.x", logging.INFO, __file__, 1, "something else %s", ("happened",), None)
    assert limiter.filter(other)
    now[0] += 1.0
    summary = logging.LogRecord("asyncio", logging.ERROR, __file__, 1, text, None, None)
    assert limiter.filter(summary)
    assert summary.getMessage() == f"{text} (4990 more like this were suppressed)"


def test_serve_times_out_connections_that_send_nothing_and_still_answers_health(tmp_path: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LEADWRITER_", "APPLICATIONINSIGHTS_"))}
    env.update(LEADWRITER_DATA_DIR=str(tmp_path / "data"), LEADWRITER_HTTP_PORT=str(port), COLUMNS="200")
    process = subprocess.Popen(
        [sys.executable, "-m", "shared.tools.cli", "serve", "--no-workers"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    sockets: list[socket.socket] = []
    try:

        def healthy() -> bool:
            try:
                return httpx.get(f"http://127.0.0.1:{port}/api/health", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        assert wait_until(healthy, 30), "the API did not come up"
        idle = open_sockets(port, 200)
        slow = open_sockets(port, 100, PARTIAL_REQUEST)
        sockets = idle + slow
        assert healthy()
        wait_all_closed(idle, slow, timeout=60)
        assert healthy()
    finally:
        for client in sockets:
            client.close()
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
