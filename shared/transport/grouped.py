"""Group commit for sends: many threads sending at once share one broker send.

The ingest endpoint sends one lead per request, from many request threads at once. On the embedded
broker every send is a write transaction on one SQLite file, and every transaction waits its turn
for the file's one write lock, so a flood of one-lead sends queues behind itself. :class:`GroupSender`
lets the first caller send for everyone who arrived in the meantime — one send, one transaction per
queue — while the others wait for it; then the next waiting caller sends the next group.

Each caller returns only once *its* messages are stored, and gets the exception when their send
failed (a transaction is all or nothing, so a group's failure stores none of it): a request is still
answered 202 only for a lead that is in the broker. Imports nothing but the transport's types.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from shared.transport.base import OutgoingMessage

#: Messages one group send carries at most.
MAX_GROUP = 500


class _Sender(Protocol):
    def send(self, queue: str, messages: Sequence[OutgoingMessage]) -> None: ...


@dataclass(eq=False)
class _Waiting:
    queue: str
    messages: list[OutgoingMessage]
    woken: threading.Event = field(default_factory=threading.Event)
    done: bool = False
    error: BaseException | None = None


class GroupSender:
    """``send`` as the wrapped sender's, with concurrent calls grouped (see the module docstring)."""

    def __init__(self, sender: _Sender, *, max_group: int = MAX_GROUP) -> None:
        if max_group < 1:
            raise ValueError("max_group must be at least 1")
        self._sender = sender
        self._max_group = max_group
        self._lock = threading.Lock()
        self._waiting: deque[_Waiting] = deque()
        self._sending = False
        #: Group sends made, and the calls they carried (for tests and figures).
        self.groups = 0
        self.calls = 0

    def send(self, queue: str, messages: Sequence[OutgoingMessage]) -> None:
        """Store ``messages`` on ``queue``; returns when they are stored. Raises what the wrapped send
        raised for the group they went in (then none of the group's messages on that queue is stored)."""
        me = _Waiting(queue, list(messages))
        with self._lock:
            self._waiting.append(me)
            lead = not self._sending
            self._sending = True
        if not lead:
            me.woken.wait()
            if me.done:
                if me.error is not None:
                    raise me.error
                return
            # Woken without being done: this caller sends the next group.
        self._send_group(me)
        if me.error is not None:
            raise me.error

    def _send_group(self, me: _Waiting) -> None:
        with self._lock:
            group: list[_Waiting] = []
            count = 0
            while self._waiting and (not group or count + len(self._waiting[0].messages) <= self._max_group):
                entry = self._waiting.popleft()
                group.append(entry)
                count += len(entry.messages)
        by_queue: dict[str, list[_Waiting]] = {}
        for entry in group:
            by_queue.setdefault(entry.queue, []).append(entry)
        for queue, entries in by_queue.items():
            try:
                self._sender.send(queue, [m for entry in entries for m in entry.messages])
            except BaseException as exc:  # noqa: BLE001 - handed to each caller of the group, which raises it
                for entry in entries:
                    entry.error = exc
        with self._lock:
            self.groups += 1
            self.calls += len(group)
            following = self._waiting[0] if self._waiting else None
            if following is None:
                self._sending = False
        for entry in group:
            entry.done = True
            if entry is not me:
                entry.woken.set()
        if following is not None:
            following.woken.set()  # it sends the next group


__all__ = ["MAX_GROUP", "GroupSender"]
