"""A bad day, end to end: the CRM answering 25 % 503, 15 % 429, 5 % hangs and 5 % connection resets
after the write, while ``leadwriter serve`` is SIGKILLed six times during 2,000 leads. It must end with
every lead in the CRM exactly once and nothing left pending or dead-lettered."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

from shared.runtime.embedded import wait_until
from shared.simulator import CrmSimulator
from tests.fixtures.harness import lead_message, running, worker_env

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("runtime")]

LEADS = 2000
KILLS = 6


def test_faults_and_six_kills_during_two_thousand_leads_end_with_every_lead_once_and_nothing_pending(
    simulator: CrmSimulator, tmp_path: Path, worker_processes: list[subprocess.Popen[bytes]]
) -> None:
    # About 45 % of requests fail and spend an attempt (503, 429, hang), and how long the chaos lasts
    # depends on how fast this machine makes progress: on a loaded one it outlasted a ten-attempt
    # schedule, and 0.45^10 per lead over 2,000 leads dead-lettered one now and then. Twenty-four
    # attempts (about three minutes) make that 0.45^24 per lead. The hangs are longer than the read
    # timeout, so the client gives up on them.
    schedule = ",".join(["0.5", "1", "2", "4"] + ["8"] * 20)
    env_overrides = {"LEADWRITER_RETRY_SCHEDULE": schedule, "LEADWRITER_CRM_READ_TIMEOUT": "1.5"}
    with running(simulator, tmp_path, **env_overrides) as h:
        publishers = [h.publisher() for _ in range(4)]
        for publisher in publishers:
            simulator.faults(publisher).chaos(
                fail=0.25, throttle=0.15, hang=0.05, reset_after=0.05, hang_seconds=2.0, retry_after=1.0, seed=7
            )
        h.send([lead_message(publishers[n % 4], n) for n in range(LEADS)])
        env = {**worker_env(h), **env_overrides}

        def start() -> subprocess.Popen[bytes]:
            process = subprocess.Popen(
                [sys.executable, "-m", "shared.tools.cli", "serve", "--no-api"],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            worker_processes.append(process)
            return process

        def written() -> int:
            return sum(len(h.written(p)) for p in publishers)

        for kill in range(KILLS):
            process = start()
            # Kill once it has made progress, at a different point each time.
            target = min(LEADS - 1, written() + 40 + 25 * kill)
            assert wait_until(lambda t=target: written() >= t, 120), "serve made no progress under the faults"
            process.send_signal(signal.SIGKILL)
            assert process.wait(10) == -signal.SIGKILL
        for publisher in publishers:
            simulator.faults(publisher).calm()
        process = start()
        # A dead letter can never become a write, so stop waiting at the first and say why.
        h.wait_for(lambda: (written() == LEADS and h.pending() == 0) or bool(h.dead_letters()), timeout=240)
        assert [(d.reason, d.description) for d in h.dead_letters()] == []
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0

        for publisher in publishers:
            ids = [record["leadid"] for record in h.written(publisher)]
            assert len(ids) == len(set(ids)) == LEADS // 4, "every lead exactly once"
