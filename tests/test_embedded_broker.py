"""The embedded broker beyond the Transport contract: durability, processes, wake-ups, ops helpers."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from shared.errors import BrokerClosed, DeadLetterReason
from shared.settings import Settings
from shared.transport import EmbeddedBroker, OutgoingMessage, ReceivedMessage, Transport, make_transport
from shared.transport import embedded as embedded_module
from tests.fixtures.transport import BrokerFactory, FakeClock

QUEUE = "leads-ready"
REPO = Path(__file__).resolve().parents[1]


def message(message_id: str, publisher_id: str = "contoso", **options: object) -> OutgoingMessage:
    properties = {"publisherId": publisher_id, "leadId": message_id, "attempt": 1}
    return OutgoingMessage(
        body=b"{}", message_id=message_id, application_properties=properties, **options  # type: ignore[arg-type]
    )


def drain(broker: EmbeddedBroker, queue: str, expected: int, deadline: float = 20.0) -> list[ReceivedMessage]:
    """Receive until ``expected`` messages arrived or the deadline passed (polling, never sleeping)."""
    ends = time.monotonic() + deadline
    got: list[ReceivedMessage] = []
    while len(got) < expected and time.monotonic() < ends:
        got += broker.receive(queue, max_messages=expected - len(got), max_wait=0.2)
    return got


@pytest.fixture
def child_processes() -> Iterator[list[subprocess.Popen[str]]]:
    started: list[subprocess.Popen[str]] = []
    yield started
    for process in started:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=10)
        for stream in (process.stdin, process.stdout):
            if stream is not None:
                stream.close()


def start_child(started: list[subprocess.Popen[str]], script: str, *args: str) -> subprocess.Popen[str]:
    process = subprocess.Popen(
        [sys.executable, "-c", script, *args],
        cwd=REPO,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    started.append(process)
    return process


# -- durability and processes ----------------------------------------------------------------------

RECEIVE_AND_HOLD = """
import sys
from pathlib import Path
from shared.transport.embedded import EmbeddedBroker

broker = EmbeddedBroker(Path(sys.argv[1]), lock_duration=0.5)
got = broker.receive(sys.argv[2], max_messages=int(sys.argv[3]), max_wait=30)
print(len(got), flush=True)
sys.stdin.read()  # hold the locks until killed
"""


@pytest.mark.slow
def test_sigkilled_receiver_loses_nothing_and_its_messages_come_back_once(
    broker: EmbeddedBroker, child_processes: list[subprocess.Popen[str]]
) -> None:
    ids = [f"lead-{i}" for i in range(20)]
    broker.send(QUEUE, [message(i) for i in ids])
    child = start_child(child_processes, RECEIVE_AND_HOLD, str(broker.path), QUEUE, str(len(ids)))
    assert child.stdout is not None
    assert child.stdout.readline().strip() == str(len(ids))
    assert broker.receive(QUEUE) == []

    child.send_signal(signal.SIGKILL)
    child.wait(timeout=10)
    redelivered = drain(broker, QUEUE, len(ids))

    assert sorted(m.message_id for m in redelivered) == sorted(ids)
    assert {m.delivery_count for m in redelivered} == {2}
    assert broker.receive(QUEUE, max_messages=100) == []
    assert broker.stats(QUEUE).active == len(ids)


SEND_FOREVER = """
import itertools, sys
from pathlib import Path
from shared.transport.base import OutgoingMessage
from shared.transport.embedded import EmbeddedBroker

broker = EmbeddedBroker(Path(sys.argv[1]))
for batch in itertools.count(1):
    broker.send(sys.argv[2], [OutgoingMessage(b"x" * 500, f"b{batch}-{i}") for i in range(10)])
    print(batch, flush=True)
"""


@pytest.mark.slow
def test_sigkilled_sender_leaves_only_whole_batches_and_a_sound_file(
    broker: EmbeddedBroker, child_processes: list[subprocess.Popen[str]]
) -> None:
    child = start_child(child_processes, SEND_FOREVER, str(broker.path), QUEUE)
    assert child.stdout is not None
    confirmed = 0
    while confirmed < 20:
        line = child.stdout.readline()
        assert line, "the sender died before it was killed"
        confirmed = int(line)

    child.send_signal(signal.SIGKILL)
    child.wait(timeout=10)

    stored = broker.stats(QUEUE).active
    assert stored % 10 == 0
    assert stored >= confirmed * 10
    with sqlite3.connect(broker.path) as check:
        assert check.execute("PRAGMA integrity_check").fetchone() == ("ok",)


SEND_ONE = """
import sys
from pathlib import Path
from shared.transport.base import OutgoingMessage
from shared.transport.embedded import EmbeddedBroker

EmbeddedBroker(Path(sys.argv[1])).send(sys.argv[2], [OutgoingMessage(b"{}", "from-another-process")])
"""


@pytest.mark.slow
def test_waiting_receiver_sees_a_message_sent_by_another_process(
    broker: EmbeddedBroker, child_processes: list[subprocess.Popen[str]]
) -> None:
    start_child(child_processes, SEND_ONE, str(broker.path), QUEUE)

    received = broker.receive(QUEUE, max_wait=30)

    assert [m.message_id for m in received] == ["from-another-process"]


def test_database_runs_in_wal_mode(broker: EmbeddedBroker) -> None:
    with sqlite3.connect(broker.path) as check:
        assert check.execute("PRAGMA journal_mode").fetchone() == ("wal",)


def test_messages_locks_and_dead_letters_survive_a_reopen(
    broker_factory: BrokerFactory, fake_clock: FakeClock
) -> None:
    first = broker_factory(clock=fake_clock, lock_duration=10)
    first.send(QUEUE, [message("kept"), message("locked"), message("dead")])
    by_id = {m.message_id: m for m in first.receive(QUEUE, max_messages=3)}
    first.abandon(by_id["kept"])
    first.dead_letter(by_id["dead"], "LeadRejected", "400")
    first.close()

    second = broker_factory(clock=fake_clock, lock_duration=10)

    [kept] = second.receive(QUEUE, max_messages=5)
    assert kept.message_id == "kept"
    second.complete(kept)
    assert [m.message_id for m in second.peek_dead_letters(QUEUE)] == ["dead"]
    fake_clock.advance(11)
    [again] = second.receive(QUEUE, max_messages=5)
    assert (again.message_id, again.delivery_count) == ("locked", 2)


def test_duplicate_detection_survives_a_reopen(broker_factory: BrokerFactory, fake_clock: FakeClock) -> None:
    broker_factory(clock=fake_clock).send(QUEUE, [message("once")])

    broker_factory(clock=fake_clock).send(QUEUE, [message("once")])

    assert broker_factory(clock=fake_clock).stats(QUEUE).active == 1


# -- waking receivers ------------------------------------------------------------------------------


class _ObservedCondition(threading.Condition):
    """Tells the test when a receiver is about to block (it still holds the lock, so a notify waits)."""

    waiting = threading.Event()

    def wait(self, timeout: float | None = None) -> bool:
        self.waiting.set()
        return super().wait(timeout)


@pytest.fixture
def receiver_waiting(monkeypatch: pytest.MonkeyPatch) -> threading.Event:
    """Set once a receiver blocks; polling is turned off so only a wake-up can deliver in time."""

    class ObservedSignal(embedded_module._Signal):
        def __init__(self) -> None:
            super().__init__()
            self.cond = _ObservedCondition()

    _ObservedCondition.waiting = threading.Event()
    monkeypatch.setattr(embedded_module, "_Signal", ObservedSignal)
    monkeypatch.setattr(embedded_module, "POLL_INTERVAL", 3600.0)
    return _ObservedCondition.waiting


def receive_in_thread(broker: EmbeddedBroker, queue: str, results: list[object]) -> threading.Thread:
    def run() -> None:
        try:
            results.extend(broker.receive(queue, max_wait=60))
        except BrokerClosed as exc:
            results.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_waiting_receiver_is_woken_by_a_send_in_this_process(
    broker: EmbeddedBroker, receiver_waiting: threading.Event
) -> None:
    results: list[object] = []
    thread = receive_in_thread(broker, QUEUE, results)
    assert receiver_waiting.wait(timeout=20)

    broker.send(QUEUE, [message("wake")])
    thread.join(timeout=20)

    assert not thread.is_alive()
    assert [m.message_id for m in results if isinstance(m, ReceivedMessage)] == ["wake"]


def test_waiting_receiver_is_woken_by_an_abandon(
    broker: EmbeddedBroker, receiver_waiting: threading.Event
) -> None:
    broker.send(QUEUE, [message("again")])
    [held] = broker.receive(QUEUE)
    results: list[object] = []
    thread = receive_in_thread(broker, QUEUE, results)
    assert receiver_waiting.wait(timeout=20)

    broker.abandon(held)
    thread.join(timeout=20)

    assert not thread.is_alive()
    delivered = [(m.message_id, m.delivery_count) for m in results if isinstance(m, ReceivedMessage)]
    assert delivered == [("again", 2)]


def test_waiting_receivers_all_see_messages_another_broker_sent(broker_factory: BrokerFactory) -> None:
    # A second broker on the file stands in for another process: its sends wake nobody here, so
    # the one polling receiver must find them and hand the polling on until every waiter is served.
    here, elsewhere = broker_factory(), broker_factory()
    results: list[object] = []
    threads = [receive_in_thread(here, QUEUE, results) for _ in range(5)]

    elsewhere.send(QUEUE, [message(f"m{i}") for i in range(5)])
    for thread in threads:
        thread.join(timeout=20)

    assert sorted(m.message_id for m in results if isinstance(m, ReceivedMessage)) == [f"m{i}" for i in range(5)]


def test_closing_the_broker_ends_a_waiting_receive(
    broker: EmbeddedBroker, receiver_waiting: threading.Event
) -> None:
    results: list[object] = []
    thread = receive_in_thread(broker, QUEUE, results)
    assert receiver_waiting.wait(timeout=20)

    broker.close()
    thread.join(timeout=20)

    assert not thread.is_alive()
    assert len(results) == 1
    assert isinstance(results[0], BrokerClosed)


def test_connections_of_finished_threads_are_closed_not_kept(broker: EmbeddedBroker) -> None:
    def use() -> None:
        broker.receive(QUEUE)

    for _ in range(5):
        thread = threading.Thread(target=use)
        thread.start()
        thread.join(timeout=20)

    # Each new connection retires those of finished threads: the main thread's and the last one's remain.
    assert len(broker._connections) == 2


def test_closed_broker_refuses_work(broker: EmbeddedBroker) -> None:
    broker.close()

    with pytest.raises(BrokerClosed, match="closed"):
        broker.send(QUEUE, [message("late")])


# -- queue configuration ---------------------------------------------------------------------------


def test_queue_overrides_apply_to_that_queue_and_persist_in_the_file(
    broker_factory: BrokerFactory, fake_clock: FakeClock
) -> None:
    first = broker_factory(clock=fake_clock, lock_duration=60, max_delivery_count=10)
    first.configure_queue(QUEUE, lock_duration=5, max_delivery_count=1)
    other = broker_factory(clock=fake_clock, lock_duration=60, max_delivery_count=10)
    other.send(QUEUE, [message("short")])
    other.send("leads-incoming", [message("long")])

    [short] = other.receive(QUEUE)
    [long] = other.receive("leads-incoming")
    fake_clock.advance(6)

    assert short.locked_until == datetime.fromtimestamp(fake_clock() - 1, UTC)
    assert long.locked_until == datetime.fromtimestamp(fake_clock() + 54, UTC)
    assert other.receive(QUEUE) == []
    [dead] = other.peek_dead_letters(QUEUE)
    assert dead.dead_letter_reason == DeadLetterReason.MAX_DELIVERY_COUNT_EXCEEDED
    assert dead.dead_letter_description == "Message could not be consumed after 1 delivery attempts."


@pytest.mark.parametrize(
    ("options", "error"),
    [({"lock_duration": 0}, "lock_duration"), ({"max_delivery_count": 0}, "max_delivery_count")],
)
def test_invalid_queue_settings_are_refused(
    broker: EmbeddedBroker, options: dict[str, float], error: str
) -> None:
    with pytest.raises(ValueError, match=error):
        broker.configure_queue(QUEUE, **options)  # type: ignore[arg-type]


def test_receive_refuses_a_batch_of_nothing(broker: EmbeddedBroker) -> None:
    with pytest.raises(ValueError, match="max_messages"):
        broker.receive(QUEUE, max_messages=0)


# -- sending details -------------------------------------------------------------------------------


def test_duplicates_inside_one_batch_are_dropped(broker: EmbeddedBroker) -> None:
    broker.send(QUEUE, [message("same"), message("same"), message("other")])

    assert [m.message_id for m in broker.receive(QUEUE, max_messages=10)] == ["same", "other"]


def test_a_naive_scheduled_time_is_taken_as_utc(broker_factory: BrokerFactory, fake_clock: FakeClock) -> None:
    broker = broker_factory(clock=fake_clock)
    naive_due = datetime.fromtimestamp(fake_clock() + 60, UTC).replace(tzinfo=None)
    broker.send(QUEUE, [message("later", scheduled_enqueue_time=naive_due)])

    fake_clock.advance(59)
    assert broker.receive(QUEUE) == []
    fake_clock.advance(1)
    assert [m.message_id for m in broker.receive(QUEUE)] == ["later"]


def test_time_to_live_counts_from_the_scheduled_time(
    broker_factory: BrokerFactory, fake_clock: FakeClock
) -> None:
    broker = broker_factory(clock=fake_clock)
    due = datetime.fromtimestamp(fake_clock(), UTC) + timedelta(seconds=100)
    broker.send(QUEUE, [message("later", scheduled_enqueue_time=due, time_to_live=30.0)])

    fake_clock.advance(120)

    assert [m.message_id for m in broker.receive(QUEUE)] == ["later"]


def test_stats_count_messages_whose_time_to_live_ran_out_as_dead_letters(
    broker_factory: BrokerFactory, fake_clock: FakeClock
) -> None:
    broker = broker_factory(clock=fake_clock)
    broker.send(QUEUE, [message("brief", time_to_live=5.0), message("lasting")])
    fake_clock.advance(6)

    stats = broker.stats(QUEUE)

    assert (stats.active, stats.dead_lettered) == (1, 1)
    assert dict(stats.dead_lettered_by_reason) == {DeadLetterReason.TTL_EXPIRED: 1}


def test_a_locked_message_does_not_expire_under_its_receiver(
    broker_factory: BrokerFactory, fake_clock: FakeClock
) -> None:
    broker = broker_factory(clock=fake_clock, lock_duration=60)
    broker.send(QUEUE, [message("brief", time_to_live=5.0)])
    [held] = broker.receive(QUEUE)
    fake_clock.advance(6)

    assert broker.stats(QUEUE).active == 1
    broker.complete(held)
    assert broker.stats(QUEUE).dead_lettered == 0


# -- ops helpers -----------------------------------------------------------------------------------


def test_dead_letters_filter_by_reason_publisher_and_limit(broker: EmbeddedBroker) -> None:
    broker.send(
        QUEUE,
        [message("a1", "alpha"), message("a2", "alpha"), message("b1", "beta"), message("a3", "alpha")],
    )
    reasons = {
        "a1": "CredentialsRejected",
        "a2": "InvalidLead",
        "b1": "CredentialsRejected",
        "a3": "CredentialsRejected",
    }
    for received in broker.receive(QUEUE, max_messages=4):
        broker.dead_letter(received, reasons[received.message_id], "because")

    def ids(found: list[ReceivedMessage]) -> list[str]:
        return [m.message_id for m in found]

    assert ids(broker.dead_letters(QUEUE)) == ["a1", "a2", "b1", "a3"]
    assert ids(broker.dead_letters(QUEUE, reason="CredentialsRejected")) == ["a1", "b1", "a3"]
    assert ids(broker.dead_letters(QUEUE, publisher_id="alpha")) == ["a1", "a2", "a3"]
    both = broker.dead_letters(QUEUE, reason="CredentialsRejected", publisher_id="alpha", limit=1)
    assert ids(both) == ["a1"]
    assert broker.dead_letters("leads-incoming") == []
    assert broker.queue_names() == [QUEUE]


def test_pending_count_counts_one_publishers_unfinished_messages(
    broker_factory: BrokerFactory, fake_clock: FakeClock
) -> None:
    broker = broker_factory(clock=fake_clock)
    later = datetime.fromtimestamp(fake_clock() + 60, UTC)
    broker.send(
        QUEUE,
        [
            message("visible", "alpha"),
            message("locked", "alpha"),
            message("done", "alpha"),
            message("dead", "alpha"),
            message("scheduled", "alpha", scheduled_enqueue_time=later),
            message("other", "beta"),
        ],
    )
    by_id = {m.message_id: m for m in broker.receive(QUEUE, max_messages=4)}
    broker.abandon(by_id["visible"])
    broker.complete(by_id["done"])
    broker.dead_letter(by_id["dead"], "LeadRejected", "400")

    assert broker.pending_count(QUEUE, "alpha") == 3
    assert broker.pending_count(QUEUE, "beta") == 1
    assert broker.pending_count("leads-incoming", "alpha") == 0


# -- wiring ----------------------------------------------------------------------------------------


def test_make_transport_builds_an_embedded_broker_in_the_data_dir(tmp_path: Path) -> None:
    data_dir = tmp_path / "nested" / "data"
    settings = Settings.from_env({"LEADWRITER_DATA_DIR": str(data_dir)})

    transport = make_transport(settings)
    try:
        assert isinstance(transport, EmbeddedBroker)
        assert isinstance(transport, Transport)
        assert transport.path == data_dir / "broker.db"
        assert transport.path.exists()
    finally:
        transport.close()


def test_complete_many_removes_the_locked_messages_in_one_go_and_returns_those_whose_lock_ran_out(
    broker_factory: BrokerFactory, fake_clock: FakeClock
) -> None:
    broker = broker_factory(clock=fake_clock, lock_duration=10)
    broker.send(QUEUE, [message("early")])
    [early] = broker.receive(QUEUE)
    fake_clock.advance(6)
    broker.send(QUEUE, [message(f"lead-{n}") for n in range(3)])
    later = broker.receive(QUEUE, max_messages=3)
    fake_clock.advance(5)  # the first lock has run out, the others have not

    lost = broker.complete_many([early, *later])

    assert [m.message_id for m in lost] == ["early"]
    [again] = broker.receive(QUEUE, max_messages=5)
    assert (again.message_id, again.delivery_count) == ("early", 2)
    assert broker.complete_many([]) == []


def test_complete_many_refuses_a_peeked_message_before_removing_anything(broker: EmbeddedBroker) -> None:
    broker.send(QUEUE, [message("locked"), message("dead")])
    locked, dead = broker.receive(QUEUE, max_messages=2)
    broker.dead_letter(dead, "LeadRejected", "400")
    [peeked] = broker.peek_dead_letters(QUEUE)

    with pytest.raises(ValueError, match="peeked"):
        broker.complete_many([locked, peeked])

    assert broker.stats(QUEUE).active == 1, "the locked message is still there"
