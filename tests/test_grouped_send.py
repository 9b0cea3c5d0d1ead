"""Group commit for sends: concurrent callers share one broker send, each returns only once its
messages are stored, and a failed group's callers all see the failure."""

from __future__ import annotations

import threading
from collections.abc import Sequence

import pytest

from shared.runtime.embedded import wait_until
from shared.transport import EmbeddedBroker, OutgoingMessage
from shared.transport.grouped import GroupSender

QUEUE = "leads-incoming"


def message(n: int) -> OutgoingMessage:
    return OutgoingMessage(body=b"{}", message_id=f"lead-{n}", application_properties={"publisherId": "contoso"})


class GatedSender:
    """Holds its first send until released, so that other callers pile up behind it."""

    def __init__(self, fail: bool = False) -> None:
        self.sends: list[list[str]] = []
        self.entered = threading.Event()
        self.release = threading.Event()
        self.fail = fail

    def send(self, queue: str, messages: Sequence[OutgoingMessage]) -> None:
        if not self.sends:
            self.entered.set()
            assert self.release.wait(10)
        self.sends.append([m.message_id for m in messages])
        if self.fail and len(self.sends) > 1:
            raise OSError("database is locked")


def test_callers_arriving_while_a_send_is_under_way_go_out_together_in_the_next_send() -> None:
    sender = GatedSender()
    grouped = GroupSender(sender)
    first = threading.Thread(target=grouped.send, args=(QUEUE, [message(0)]))
    first.start()
    assert sender.entered.wait(10)
    others = [threading.Thread(target=grouped.send, args=(QUEUE, [message(n)])) for n in range(1, 6)]
    for thread in others:
        thread.start()
    assert wait_until(lambda: len(grouped._waiting) == 5, 10), "the five wait behind the held send"

    sender.release.set()
    for thread in [first, *others]:
        thread.join(10)

    assert sender.sends[0] == ["lead-0"]
    assert sorted(sender.sends[1]) == [f"lead-{n}" for n in range(1, 6)], "the five in one send"
    assert (grouped.groups, grouped.calls) == (2, 6)


def test_every_caller_of_a_failed_group_gets_the_error_and_later_callers_are_not_stuck() -> None:
    sender = GatedSender(fail=True)
    grouped = GroupSender(sender)
    errors: list[BaseException] = []

    def send(n: int) -> None:
        try:
            grouped.send(QUEUE, [message(n)])
        except OSError as exc:
            errors.append(exc)

    first = threading.Thread(target=send, args=(0,))
    first.start()
    assert sender.entered.wait(10)
    others = [threading.Thread(target=send, args=(n,)) for n in (1, 2, 3)]
    for thread in others:
        thread.start()
    assert wait_until(lambda: len(grouped._waiting) == 3, 10)
    sender.release.set()
    for thread in [first, *others]:
        thread.join(10)

    assert len(errors) == 3, "the three of the failed group, not the first caller"
    with pytest.raises(OSError, match="locked"):
        grouped.send(QUEUE, [message(9)])


def test_many_threads_sending_through_the_broker_store_every_message_once(broker: EmbeddedBroker) -> None:
    grouped = GroupSender(broker)
    threads = [
        threading.Thread(target=lambda k=k: [grouped.send(QUEUE, [message(k * 100 + n)]) for n in range(25)])
        for k in range(8)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)

    received = broker.receive(QUEUE, max_messages=500)
    assert sorted(m.message_id for m in received) == sorted(f"lead-{k * 100 + n}" for k in range(8) for n in range(25))
    assert grouped.calls == 200
    assert grouped.groups <= 200
