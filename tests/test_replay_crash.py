"""A bulk replay SIGKILLed between a send and its complete loses nothing, and a re-run doubles nothing.

A child process runs the real :func:`shared.ops.deadletters.replay` against the real embedded broker file,
through a thin wrapper of our own port that kills the process right after its Nth send returns, before
the dead letters of that batch are completed. The test then waits (polling the broker, with a deadline)
for the child's dead-letter locks to lapse, runs the replay again, and counts leads in the stage queues.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from shared.names import QUEUE_INCOMING, QUEUE_READY, STAGE_QUEUES
from shared.ops.deadletters import DeadLetterFilter, replay
from shared.pipeline.messages import envelope, hop_message_id
from shared.transport.base import ReceivedMessage
from shared.transport.embedded import EmbeddedBroker

REPO = Path(__file__).resolve().parents[1]
CHILD_LOCK = 0.5
BATCH = 5
LEADS = {QUEUE_INCOMING: [f"in-{i}" for i in range(12)], QUEUE_READY: [f"ready-{i}" for i in range(4)]}

CHILD = """
import os, signal, sys
from pathlib import Path

from shared.ops.deadletters import DeadLetterFilter, replay
from shared.transport.embedded import EmbeddedBroker

path, kill_after, batch = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
broker = EmbeddedBroker(path, lock_duration=float(sys.argv[4]))


class KillAfterSend:
    # Our own port, wrapped: the Nth send is accepted by the broker, then the process dies at once.
    def __init__(self, inner):
        self.inner, self.sends = inner, 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def send(self, queue, messages):
        self.inner.send(queue, messages)
        self.sends += 1
        if self.sends == kill_after:
            os.kill(os.getpid(), signal.SIGKILL)


replay(KillAfterSend(broker), DeadLetterFilter(), batch_size=batch)
sys.exit(3)  # the kill never came: the test must fail
"""


def seed(broker: EmbeddedBroker) -> None:
    for queue, lead_ids in LEADS.items():
        broker.send(queue, [envelope(b'{"lead": {}}', publisher_id="contoso", lead_id=i) for i in lead_ids])
        for message in broker.receive(queue, max_messages=100):
            broker.dead_letter(message, "RetriesExhausted", "CRM down")


def dead_letter_count(broker: EmbeddedBroker) -> int:
    return sum(broker.stats(queue).dead_lettered for queue in STAGE_QUEUES)


def lead_ids_in(broker: EmbeddedBroker, queue: str) -> Counter[str]:
    """Lead ids of every active message of ``queue`` (read with a receive, then released)."""
    messages = broker.receive(queue, max_messages=1000)
    for message in messages:
        broker.abandon(message)
    return Counter(str(m.application_properties["leadId"]) for m in messages)


def wait_until_dead_letters_are_unlocked(broker: EmbeddedBroker, expected: int, *, deadline: float) -> None:
    """Take every dead letter as its lock lapses (the receive itself waits), then release them all."""
    held: dict[int, ReceivedMessage] = {}
    try:
        while len(held) < expected:
            assert time.monotonic() < deadline, f"only {len(held)} of {expected} dead letters were unlocked"
            for queue in STAGE_QUEUES:
                for message in broker.receive_dead_letters(queue, max_messages=100, max_wait=0.1):
                    held[message.sequence_number] = message
    finally:
        for message in held.values():
            broker.abandon(message)


@pytest.mark.parametrize("kill_after_send", [1, 2, 3])
def test_replay_killed_between_send_and_complete_loses_nothing_and_rerun_doubles_nothing(
    tmp_path: Path, kill_after_send: int
) -> None:
    path = tmp_path / "broker.db"
    broker = EmbeddedBroker(path)
    try:
        seed(broker)
        total = sum(len(ids) for ids in LEADS.values())
        assert dead_letter_count(broker) == total

        child = subprocess.run(
            [sys.executable, "-c", CHILD, str(path), str(kill_after_send), str(BATCH), str(CHILD_LOCK)],
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert child.returncode == -signal.SIGKILL, child.stderr

        # Killed mid-replay: some copies were sent whose dead letters are still there (not completed).
        remaining = dead_letter_count(broker)
        sent = lead_ids_in(broker, QUEUE_INCOMING) + lead_ids_in(broker, QUEUE_READY)
        still_dead = {
            str(m.application_properties["leadId"])
            for queue in STAGE_QUEUES
            for m in broker.peek_dead_letters(queue, max_messages=1000)
        }
        assert 0 < remaining <= total
        assert set(sent) & still_dead, "the kill did not fall between a send and its complete"
        assert set(sent) | still_dead == {i for ids in LEADS.values() for i in ids}

        wait_until_dead_letters_are_unlocked(broker, remaining, deadline=time.monotonic() + 30)
        result = replay(broker, DeadLetterFilter(), batch_size=BATCH)

        assert result.errors == []
        assert result.matched == result.replayed == remaining
        assert dead_letter_count(broker) == 0
        for queue, lead_ids in LEADS.items():
            messages = broker.receive(queue, max_messages=1000)
            assert Counter(str(m.application_properties["leadId"]) for m in messages) == Counter(lead_ids)
            assert {m.message_id for m in messages} == {hop_message_id(i, replay=1) for i in lead_ids}
        assert broker.receive("leads-validated", max_messages=1000) == []
    finally:
        broker.close()
