"""Crash safety and publisher isolation of the embedded runtime, against the CRM simulator."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from shared.runtime.embedded import wait_until
from shared.simulator import CrmSimulator
from tests.fixtures.harness import lead_message, running, worker_env

#: Every test here runs on the embedded workers and on the registered Functions triggers.
pytestmark = pytest.mark.usefixtures("runtime")




def test_killing_a_worker_mid_flight_loses_nothing_and_writes_nothing_twice(
    simulator: CrmSimulator, tmp_path: Path, worker_processes: list[subprocess.Popen[bytes]]
) -> None:
    with running(simulator, tmp_path) as h:
        publisher = h.publisher()
        simulator.faults(publisher).latency = 0.02  # work is in flight when the kill lands
        total = 300
        h.send([lead_message(publisher, n) for n in range(total)])
        env = worker_env(h)

        def start() -> subprocess.Popen[bytes]:
            process = subprocess.Popen(
                [sys.executable, "-m", "shared.tools.cli", "serve", "--no-api"],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            worker_processes.append(process)
            return process

        for threshold in (40, 120):
            process = start()
            assert wait_until(lambda t=threshold: len(h.written(publisher)) >= t, 90), "worker made no progress"
            process.send_signal(signal.SIGKILL)
            assert process.wait(10) == -signal.SIGKILL
            assert len(h.written(publisher)) < total, "the kill landed before the work was done"

        process = start()
        h.wait_for(lambda: len(h.written(publisher)) == total and h.pending() == 0, timeout=120)
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0, "SIGTERM stops the worker gracefully"

        ids = [record["leadid"] for record in h.written(publisher)]
        assert len(ids) == len(set(ids)) == total
        assert h.dead_letters() == []


def test_a_hanging_crm_does_not_hold_up_another_publishers_leads(simulator: CrmSimulator, tmp_path: Path) -> None:
    with running(simulator, tmp_path, LEADWRITER_CRM_READ_TIMEOUT="3") as h:
        stuck, healthy = h.publisher(), h.publisher()
        simulator.faults(stuck).hang_next(10_000, seconds=6)
        # The stuck publisher's leads are at the head of the queue.
        h.send([lead_message(stuck, n) for n in range(40)] + [lead_message(healthy, n) for n in range(40)])
        h.start(concurrency=8, publisher_concurrency=4)

        h.wait_for(lambda: len(h.written(healthy)) == 40, timeout=60)
        assert h.written(stuck) == [], "every request to the stuck CRM still hangs"

        simulator.faults(stuck).clear()
        h.wait_for(lambda: len(h.written(stuck)) == 40, timeout=90)
        assert h.dead_letters() == []


def test_more_hung_crms_than_worker_threads_do_not_hold_up_the_healthy_publishers(
    simulator: CrmSimulator, tmp_path: Path
) -> None:
    # Six CRMs that never answer against four threads per stage: each may hold a thread until the
    # read timeout, but the healthy publishers' leads must be written before any of them ends (the
    # margin is wide: a shared machine's load must not be what decides the outcome).
    with running(simulator, tmp_path, LEADWRITER_CRM_READ_TIMEOUT="30") as h:
        hung, healthy = [h.publisher() for _ in range(6)], [h.publisher() for _ in range(3)]
        for publisher in hung:
            simulator.faults(publisher).hang_all(60)
        # The hung publishers' leads are at the head of the queue.
        h.send([lead_message(p, n) for n in range(20) for p in [*hung, *healthy]])
        h.start(concurrency=4, publisher_concurrency=4)

        h.wait_for(lambda: all(len(h.written(p)) == 20 for p in healthy), timeout=25)
        assert all(h.written(p) == [] for p in hung)
        assert sum(simulator.requests(p).total for p in hung) <= len(hung), "one request each, unanswered"
        for publisher in hung:
            simulator.faults(publisher).clear()


def test_a_throttled_publisher_does_not_slow_the_others(simulator: CrmSimulator, tmp_path: Path) -> None:
    with running(simulator, tmp_path) as h:
        throttled, others = h.publisher(), [h.publisher() for _ in range(3)]
        simulator.faults(throttled).throttle_next(1, retry_after=30)
        h.send([lead_message(p, n) for n in range(20) for p in [throttled, *others]])
        h.start()
        h.wait_for(lambda: all(len(h.written(p)) == 20 for p in others), timeout=60)
        assert len(h.written(throttled)) == 0, "the throttled publisher waits out its 30 s penalty"
        assert simulator.requests(throttled).during_penalty == 0


def test_sigterm_stops_serve_with_the_api_gracefully(tmp_path: Path) -> None:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LEADWRITER_", "APPLICATIONINSIGHTS_"))}
    env.update(LEADWRITER_DATA_DIR=str(tmp_path / "data"), LEADWRITER_HTTP_PORT=str(port), COLUMNS="200")
    process = subprocess.Popen(
        [sys.executable, "-m", "shared.tools.cli", "serve"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:

        def healthy() -> bool:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    return True
            except OSError:
                return False

        assert wait_until(healthy, 30), "the API did not come up"
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0
    assert b"stopping: in-flight messages finish" in output


def test_a_crm_call_longer_than_the_lock_keeps_its_message_locked_and_writes_once(
    simulator: CrmSimulator, tmp_path: Path
) -> None:
    with running(simulator, tmp_path, LEADWRITER_LOCK_DURATION="1", LEADWRITER_CRM_READ_TIMEOUT="10") as h:
        publisher = h.publisher()
        simulator.faults(publisher).latency = 2.5  # every CRM call outlives the 1 s lock by far
        h.send([lead_message(publisher, n) for n in range(3)])
        h.start()
        h.wait_for(lambda: len(h.written(publisher)) == 3 and h.pending() == 0, timeout=60)
        log = simulator.requests(publisher)
        assert log.solutions == 1, "the solution check was not repeated by a redelivered message"
        assert log.create_multiple_targets + log.batch_operations + log.lead_writes == 3, (
            "no lead was written a second time"
        )
        assert h.dead_letters() == []


def test_two_serve_processes_on_one_data_dir_agree_on_status_and_penalties_and_write_each_lead_once(
    simulator: CrmSimulator, tmp_path: Path, worker_processes: list[subprocess.Popen[bytes]]
) -> None:
    with running(simulator, tmp_path) as h:
        calm, throttled = h.publisher(), h.publisher()
        simulator.faults(throttled).throttle_next(1, retry_after=2)
        total = 120
        h.send([lead_message(p, n) for n in range(total) for p in (calm, throttled)])
        env = worker_env(h)
        for _ in range(2):
            worker_processes.append(
                subprocess.Popen(
                    [sys.executable, "-m", "shared.tools.cli", "serve", "--no-api"],
                    env=env,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )

        h.wait_for(lambda: len(h.written(calm)) >= total and len(h.written(throttled)) >= total, timeout=120)
        h.wait_for(lambda: h.pending() == 0, timeout=60)
        # Each process wrote its own counts to the one state store: together they are every lead.
        h.wait_for(
            lambda: h.services.status.get(calm).delivered + h.services.status.get(throttled).delivered >= 2 * total,
            timeout=30,
        )

        for publisher in (calm, throttled):
            ids = [lead["leadid"] for lead in h.written(publisher)]
            assert len(ids) == len(set(ids)) == total, "each lead once"
            assert h.services.status.get(publisher).delivered == total
        log = simulator.requests(throttled)
        # A request the other process had already sent when the 429 came back may still arrive inside
        # the penalty (in flight, as Dataverse allows); none is sent once the penalty is recorded, so
        # the CRM never extends it over and over.
        assert log.during_penalty <= 2, "neither process sent into the other's penalty once it was recorded"
        assert log.throttled == 1 + log.during_penalty
        assert h.dead_letters() == []

