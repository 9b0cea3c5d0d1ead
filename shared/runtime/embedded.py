"""The embedded runtime: the three stage workers on any Transport, the same stage code as Azure.

Each :class:`StageWorker` pulls from its queue into per-publisher backlogs and runs the stage on a
thread pool, with at most ``publisher_concurrency`` messages of one publisher in flight (below
Dataverse's 52 concurrent requests per user). A publisher whose CRM hangs or throttles therefore
occupies at most its own slots: other publishers' messages are received and dispatched around it
(no head-of-line blocking). When a stuck publisher's backlog is full, further messages of it are
deferred (held by a penalty: a copy scheduled for when it ends, spending no retry attempt; a CRM that
hangs: through the retry schedule), so a flood from one publisher cannot fill the worker either.

Many publishers, some of them stuck (a hung CRM, a long penalty), must not add up to a stuck worker:

- a publisher gets one message in flight until some work of it has come back from its CRM (and again
  while its CRM fails or its work in flight has gone unanswered for ``SLOW_AFTER``), and that work is
  one message, so a CRM that hangs from the start blocks one thread and one message, not
  ``publisher_concurrency`` threads or a group of messages;
- work unanswered for ``SLOW_AFTER`` no longer counts against ``concurrency``: the pool has spare
  threads (``THREADS_PER_SLOT`` times ``concurrency`` in all) so that healthy publishers keep their
  ``concurrency`` while hung requests wait for the client's read timeout, and its messages no longer
  count against the worker's capacity, so the worker keeps receiving the others' messages;
- stuck publishers together hold at most half the worker's capacity (one alone: its usual share):
  what a stuck publisher holds beyond its part is deferred without spending an attempt (it never
  reached the CRM; the messages tried, one at a time, spend theirs), so their backlogs cannot fill
  the worker and starve the others.

The write stage takes a publisher's whole backlog (up to the ``LEADWRITER_MAX_BATCH`` setting) as one
``$batch`` when there is one: single requests at low volume, batches under load.

CRM requests are paced per CRM user (:mod:`shared.crm.pacing`). When the pacer or a 429 penalty says "not
yet", the stage returns a ``Retry(not_sent=True)``: nothing reached the CRM, so the messages go back to
the front of their publisher's backlog and that publisher is not dispatched again until the wait is
(nearly) over. Waiting in the backlog rather than rescheduling is deliberate: a rescheduled copy
spends one of the message's retry attempts (a long penalty would end in ``RetriesExhausted``), costs
two broker writes per message and per wait, and loses the message's place in line; a held message
costs nothing but its lock renewals, and no worker thread waits on it, so other publishers flow.

Locks of held and in-flight messages are renewed; on shutdown in-flight messages finish and held
ones are abandoned (delivered again at once) — never lost.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from shared.names import PROP_PUBLISHER_ID
from shared.pipeline.messages import deferrals_of
from shared.pipeline.outcomes import Outcome, Retry, Stage
from shared.pipeline.pipeline import Pipeline
from shared.pipeline.settle import Observer, settle, settle_many
from shared.transport.base import LockLost, ReceivedMessage, Transport

logger = logging.getLogger(__name__)

RECEIVE_WAIT = 0.25
#: Renew a lock when less than this many seconds of it are left.
RENEW_MARGIN = 20.0


#: A publisher with no finished work for this long while at its cap counts as stuck.
STUCK_AFTER = 2.0
#: Work in flight this long is unanswered: its thread no longer counts against ``concurrency``, and its
#: publisher gets no more work in flight until it comes back.
SLOW_AFTER = 1.0
#: The pool's threads per unit of ``concurrency``: the spares hold requests that hang.
THREADS_PER_SLOT = 4
#: Seconds of settlements that give a publisher's pace (how fast its backlog drains).
PACE_WINDOW = 10.0
#: A busy publisher's overflow is put off at least this long, and at most this long.
MIN_OVERFLOW_DELAY = 1.0
MAX_OVERFLOW_DELAY = 60.0
#: Messages of one publisher a non-write stage handles in one go when its backlog is long: their
#: forwards go in one send and their completions in one broker write, not one of each per message.
SETTLE_GROUP = 50
#: The first stage fed a trickle (one POST at a time) waits up to TRICKLE_WAIT seconds for a
#: publisher's backlog to reach TRICKLE_GROUP before dispatching it, and the non-write stages hand out
#: groups of at least that many: a group formed once travels on together (one claim, one send and one
#: complete per stage, one CRM request), so only the first stage waits. Measured against a 20 ms wait
#: in both non-write stages: at 100 leads/s, CPU 2.6 -> 1.5 ms per lead, p99 180 -> 95 ms.
TRICKLE_GROUP = 8
TRICKLE_WAIT = 0.05
#: What a stuck publisher holds beyond its part, while its CRM fails or does not answer, is first put
#: off this long, then twice as long each time (up to MAX_OVERFLOW_DELAY).
FAILING_DEFERRAL = 5.0
#: A publisher with nothing held, nothing in flight and nothing finished for this long is forgotten
#: (checked every FORGET_EVERY seconds): a worker that sees many publishers over its lifetime keeps
#: state only for the active ones. Coming back, it is sent one message first, as a new one is.
IDLE_FORGET = 600.0
FORGET_EVERY = 60.0
#: A held publisher is dispatched this much before its wait ends: the pacer's short wait
#: (PacingPolicy.max_wait) then sends it on time instead of a receive-loop tick late.
HOLD_EARLY = 0.03


@dataclass
class _PublisherState:
    backlog: deque[tuple[ReceivedMessage, float]] = field(default_factory=deque)
    in_flight: int = 0
    last_progress: float = field(default_factory=time.monotonic)
    #: Not dispatched before this (monotonic): the pacer or a penalty said "not yet".
    not_before: float = 0.0
    #: The last work that reached the CRM failed transiently (5xx, timeout, reset): the CRM is failing,
    #: not merely slow or paced.
    failing: bool = False
    #: When recent messages were settled (for the pace at which its backlog drains).
    finished: deque[float] = field(default_factory=lambda: deque(maxlen=2000))
    #: Some work of it came back from its CRM without a transient failure (in this stage).
    proven: bool = False
    #: When each piece of its work in flight started (by a token of the worker's).
    running: dict[int, float] = field(default_factory=dict)

    def unanswered(self, now: float) -> bool:
        """Some of its work in flight has gone unanswered for ``SLOW_AFTER``."""
        return any(now - started > SLOW_AFTER for started in self.running.values())

    def drain_time(self, now: float) -> float:
        """Seconds the backlog and the work in flight need at the pace of the last few seconds."""
        recent = [t for t in self.finished if t > now - PACE_WINDOW]
        pace = len(recent) / PACE_WINDOW
        waiting = len(self.backlog) + self.in_flight
        return waiting / pace if pace > 0 else STUCK_AFTER


class StageWorker:
    """Runs one stage over its queue until :meth:`stop`."""

    def __init__(
        self,
        stage: Stage | str,
        transport: Transport,
        pipeline: Pipeline,
        *,
        concurrency: int = 16,
        publisher_concurrency: int = 8,
        observer: Observer | None = None,
    ) -> None:
        self.stage = Stage(stage)
        self.queue = self.stage.queue
        self.transport = transport
        self.pipeline = pipeline
        self.concurrency = concurrency
        self.publisher_concurrency = min(publisher_concurrency, concurrency)
        #: Messages held (backlog + in flight) at most; a publisher beyond its share is deferred only
        #: while it is stuck (see _receive).
        self.max_batch = pipeline.settings.max_batch
        self.capacity = max(concurrency * 8, self.max_batch * 2 if self.stage is Stage.WRITE_LEAD else 0)
        self.publisher_capacity = max(self.capacity // 2, self.publisher_concurrency)
        self.max_threads = concurrency * THREADS_PER_SLOT
        self.observer = observer
        self.batching = self.stage is Stage.WRITE_LEAD
        self._publishers: dict[str, _PublisherState] = {}
        self._held = 0
        #: Messages being worked on, by id() (ReceivedMessage is not hashable), for lock renewal.
        self._in_flight: dict[int, ReceivedMessage] = {}
        self._busy = 0
        #: Start and message count of every piece of work in flight, by token (the threads it holds).
        self._running: dict[int, tuple[float, int]] = {}
        self._tokens = itertools.count()
        #: Where the next dispatch round starts among the publishers, so each gets its turn first.
        self._rotor = 0
        self._forgotten_at = time.monotonic()
        self._lock = threading.Condition()
        self._stop = threading.Event()
        self._pool = ThreadPoolExecutor(max_workers=self.max_threads, thread_name_prefix=f"lw-{stage}")
        self._thread: threading.Thread | None = None

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> StageWorker:
        self._thread = threading.Thread(target=self.run, name=f"lw-{self.stage}-loop", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float | None = None) -> None:
        """Stop receiving, let in-flight messages finish, release the rest."""
        self._stop.set()
        with self._lock:
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def run(self) -> None:
        while not self._stop.is_set():
            try:
                self._receive()
                self._shed()
                self._dispatch()
                self._renew_locks()
                self._forget_idle()
            except Exception:
                logger.exception("stage %s: receive loop failed; retrying in a second", self.stage)
                self._stop.wait(1.0)
        self._drain()

    # -- the loop ------------------------------------------------------------------------------

    def _receive(self) -> None:
        with self._lock:
            # Messages in work gone unanswered (a CRM that hangs until the read timeout) do not count
            # against the capacity, as their threads do not count against ``concurrency``: otherwise
            # the groups hung publishers hold in flight fill the worker, and it stops receiving the
            # healthy publishers' messages behind them. Bounded all the same: at most ``max_threads``
            # pieces of work are in flight.
            now = time.monotonic()
            hung = sum(size for started, size in self._running.values() if now - started > SLOW_AFTER)
            free = self.capacity - (self._held - hung)
            idle = self._busy == 0 and self._held == 0
        if free <= 0:
            with self._lock:
                self._lock.wait(RECEIVE_WAIT)
            return
        messages = self.transport.receive(
            self.queue, max_messages=min(free, 100), max_wait=RECEIVE_WAIT if idle else 0.0
        )
        if not messages:
            if not idle:
                with self._lock:
                    self._lock.wait(0.02)
            return
        now = time.monotonic()
        deferred: list[tuple[ReceivedMessage, Retry]] = []
        with self._lock:
            stuck_share = self._stuck_share(now)
            for message in messages:
                publisher = str(message.application_properties.get(PROP_PUBLISHER_ID, ""))
                state = self._publishers.setdefault(publisher, _PublisherState())
                # Held for longer than a moment (a penalty): as stuck as a CRM that hangs.
                held_for = state.not_before - now
                stuck = now - state.last_progress > STUCK_AFTER or held_for > STUCK_AFTER
                holds = len(state.backlog) + state.in_flight
                if holds >= self.publisher_capacity and stuck:
                    # Holding more of its messages would crowd out others, so the overflow is put off.
                    deferred.append((message, self._overflow(state, held_for, now)))
                    continue
                if holds >= stuck_share and self._stuck(state, now):
                    deferred.append((message, self._put_off(state, message, now)))
                    continue
                state.backlog.append((message, now))
                self._held += 1
        for message, outcome in deferred:
            self._run_outcome(message, outcome, now)

    def _forget_idle(self, now: float | None = None) -> int:
        """Drop the state of publishers idle for IDLE_FORGET (at most every FORGET_EVERY); how many."""
        now = time.monotonic() if now is None else now
        if now - self._forgotten_at < FORGET_EVERY:
            return 0
        self._forgotten_at = now
        with self._lock:
            idle = [
                publisher
                for publisher, state in self._publishers.items()
                if not state.backlog
                and state.in_flight == 0
                and state.not_before <= now
                and now - state.last_progress > IDLE_FORGET
            ]
            for publisher in idle:
                del self._publishers[publisher]
        return len(idle)

    def _stuck(self, state: _PublisherState, now: float) -> bool:
        """Held by a penalty, its CRM failing, or its work in flight unanswered for a while."""
        return (
            state.not_before - now > STUCK_AFTER
            or state.failing
            or (state.in_flight > 0 and (now - state.last_progress > STUCK_AFTER or state.unanswered(now)))
        )

    def _stuck_share(self, now: float) -> int:
        """What each stuck publisher may hold now: stuck ones together hold at most half the capacity."""
        stuck = sum(1 for state in self._publishers.values() if self._stuck(state, now))
        return min(self.publisher_capacity, max(1, (self.capacity // 2) // max(1, stuck)))

    def _shed(self) -> None:
        """Put off what stuck publishers hold beyond their share (the newest first): held messages
        of a publisher that became stuck would otherwise keep the worker's capacity from the others."""
        now = time.monotonic()
        shed: list[tuple[ReceivedMessage, Retry]] = []
        with self._lock:
            share = self._stuck_share(now)
            for state in self._publishers.values():
                excess = min(len(state.backlog), len(state.backlog) + state.in_flight - share)
                if excess <= 0 or not self._stuck(state, now):
                    continue
                for _ in range(excess):
                    message, _received = state.backlog.pop()
                    shed.append((message, self._put_off(state, message, now)))
                self._held -= excess
        for message, outcome in shed:
            self._run_outcome(message, outcome, now)

    def _put_off(self, state: _PublisherState, message: ReceivedMessage, now: float) -> Retry:
        """What becomes of a message beyond a stuck publisher's part: put off without an attempt (it
        never reached the CRM; only the messages tried spend attempts). Held by a penalty: until it
        ends. A CRM that fails or does not answer: for longer each time the message is put off."""
        held_for = state.not_before - now
        if held_for > STUCK_AFTER:
            return Retry("publisher backlog full: deferred", held_for, not_sent=True)
        if state.failing or state.unanswered(now):
            delay = min(MAX_OVERFLOW_DELAY, FAILING_DEFERRAL * 2 ** min(deferrals_of(message), 6))
            return Retry("publisher backlog full: its CRM is failing", delay, not_sent=True)
        return self._overflow(state, held_for, now)

    @staticmethod
    def _overflow(state: _PublisherState, held_for: float, now: float) -> Retry:
        """What becomes of a message its publisher has no room for.

        Held by a penalty: put off until the hold ends (no attempt spent). A CRM that fails or hangs:
        the retry schedule. A CRM that is healthy but busy (a slow $batch, pacing): back-pressure, not
        a failure — put off, spending no attempt, for about as long as the backlog takes to drain, so
        the CRM is kept busy at its pace instead of idling until a backoff step comes round.
        """
        if held_for > STUCK_AFTER:
            return Retry("publisher backlog full: deferred", held_for, not_sent=True)
        if state.failing:
            return Retry("publisher backlog full: its CRM is failing", None)
        delay = min(max(state.drain_time(now), MIN_OVERFLOW_DELAY), MAX_OVERFLOW_DELAY)
        return Retry("publisher backlog full: deferred", delay, not_sent=True)

    def _dispatch(self) -> None:
        now = time.monotonic()
        with self._lock:
            # Work unanswered for SLOW_AFTER holds a spare thread, not one of the ``concurrency``.
            answering = sum(1 for started, _ in self._running.values() if now - started <= SLOW_AFTER)
            unanswered = len(self._running) - answering
            publishers = list(self._publishers.items())
            if not publishers:
                return
            self._rotor = (self._rotor + 1) % len(publishers)
            for publisher, state in publishers[self._rotor :] + publishers[: self._rotor]:
                if answering >= self.concurrency or len(self._running) >= self.max_threads:
                    break
                if state.not_before > now or not state.backlog:
                    continue
                limit = self.publisher_concurrency
                probing = state.failing or not state.proven or state.unanswered(now)
                if probing:
                    # Until its CRM has answered (again), one message at a time: a CRM that hangs holds
                    # one thread and one message, not a group or a $batch of them.
                    limit = 1
                    if state.failing and unanswered >= self.max_threads - 2 * self.concurrency:
                        continue  # the spares are full of unanswered work: no more probes for now
                if state.in_flight >= limit:
                    continue
                if self.batching:
                    # Ask the pacer first: while it says "not yet" the backlog grows into one larger
                    # $batch, instead of several small requests that would each be told to wait.
                    wait, room = self.pipeline.pacing_room(publisher)
                    if wait > HOLD_EARLY:
                        state.not_before = now + wait - HOLD_EARLY
                        continue
                    limit = min(limit, state.in_flight + max(1, room))
                while (
                    state.backlog
                    and state.in_flight < limit
                    and answering < self.concurrency
                    and len(self._running) < self.max_threads
                ):
                    if probing:
                        take = 1
                    elif self.batching:
                        take = min(len(state.backlog), self.max_batch)
                    else:
                        # A backlog is shared out over the free slots in groups (up to SETTLE_GROUP), each
                        # settled with one send and one complete; a short one in the first stage waits a
                        # moment (TRICKLE_WAIT) to grow, then goes in groups of TRICKLE_GROUP rather than
                        # one per slot.
                        if (
                            self.stage is Stage.VALIDATE_CREDENTIALS
                            and len(state.backlog) < TRICKLE_GROUP
                            and now - state.backlog[0][1] < TRICKLE_WAIT
                        ):
                            break  # a trickle: a moment more, and the next few leads go with it
                        slots = max(1, min(limit - state.in_flight, self.concurrency - answering))
                        take = max(
                            min(len(state.backlog), TRICKLE_GROUP), min(len(state.backlog) // slots, SETTLE_GROUP)
                        )
                    batch = [state.backlog.popleft() for _ in range(take)]
                    if state.in_flight == 0:
                        state.last_progress = now  # the wait for an answer starts now, not when it was idle
                    token = next(self._tokens)
                    self._running[token] = (now, take)
                    state.running[token] = now
                    state.in_flight += 1
                    self._busy += 1
                    answering += 1
                    self._pool.submit(self._work, state, batch, token)

    def _work(self, state: _PublisherState, batch: list[tuple[ReceivedMessage, float]], token: int = -1) -> None:
        held: list[tuple[ReceivedMessage, float]] = []
        hold_for = 0.0
        with self._lock:
            self._in_flight.update((id(m), m) for m, _ in batch)
        try:
            messages = [m for m, _ in batch]
            if len(messages) == 1:
                outcomes: list[Outcome] = [self.pipeline.handle(self.stage, messages[0])]
            elif self.batching:
                outcomes = self.pipeline.write_leads(messages)
            else:
                outcomes = self._handle_group(messages)
            failed = reached = 0
            done: list[tuple[ReceivedMessage, Outcome, float | None]] = []
            for item, outcome in zip(batch, outcomes, strict=False):
                if isinstance(outcome, Retry) and outcome.not_sent:
                    held.append(item)
                    hold_for = max(hold_for, outcome.retry_after or 0.0)
                else:
                    reached += 1
                    failed += isinstance(outcome, Retry)
                    done.append((item[0], outcome, item[1]))
            # A group cut short (see _handle_group): the messages not handled go back to the backlog.
            held.extend(batch[len(outcomes) :])
            if len(done) == 1:
                self._run_outcome(*done[0])
            elif done:
                self._run_outcomes(done)
            if reached:
                state.failing = failed == reached
                state.proven = state.proven or not state.failing
        finally:
            with self._lock:
                now = time.monotonic()
                self._running.pop(token, None)
                state.running.pop(token, None)
                for m, _ in batch:
                    self._in_flight.pop(id(m), None)
                state.in_flight -= 1
                self._busy -= 1
                self._held -= len(batch) - len(held)
                if held:
                    # Back to the front, in their order: paced messages keep their place in line.
                    state.backlog.extendleft(reversed(held))
                    state.not_before = max(state.not_before, now + max(0.0, hold_for - HOLD_EARLY))
                if len(held) < len(batch):
                    state.last_progress = now
                    state.finished.extend([now] * (len(batch) - len(held)))
                self._lock.notify_all()

    def _handle_group(self, messages: list[ReceivedMessage]) -> list[Outcome]:
        """Run the stage on a group of one publisher's messages in turn, stopping after the first
        that is to be retried: a CRM that fails, hangs or paces would fail the rest the same way, one
        timeout after another on this one thread. The outcomes of the messages handled, in order."""
        outcomes: list[Outcome] = []
        for message in messages:
            outcome = self.pipeline.handle(self.stage, message)
            outcomes.append(outcome)
            if isinstance(outcome, Retry):
                break
        return outcomes

    def _run_outcome(self, message: ReceivedMessage, outcome: Outcome, started: float | None) -> None:
        try:
            settle(
                self.stage,
                message,
                outcome,
                sender=self.transport,
                settler=self.transport,
                started=started,
                observer=self.observer,
                schedule=self.pipeline.settings.retry_schedule,
            )
        except LockLost:
            logger.warning("stage %s: lock lost on message %s; it will be redelivered", self.stage, message.message_id)
        except Exception:
            logger.exception(
                "stage %s: settling message %s failed; it will be redelivered", self.stage, message.message_id
            )

    def _run_outcomes(self, done: list[tuple[ReceivedMessage, Outcome, float | None]]) -> None:
        """Settle a group: its forwards in one send, its completions in one broker write."""

        def failed(message: ReceivedMessage, exc: Exception) -> None:
            if isinstance(exc, LockLost):
                logger.warning(
                    "stage %s: lock lost on message %s; it will be redelivered", self.stage, message.message_id
                )
            else:
                logger.error(
                    "stage %s: settling message %s failed (%s); it will be redelivered",
                    self.stage,
                    message.message_id,
                    type(exc).__name__,
                )

        try:
            settle_many(
                self.stage,
                done,
                sender=self.transport,
                settler=self.transport,
                observer=self.observer,
                schedule=self.pipeline.settings.retry_schedule,
                on_error=failed,
            )
        except Exception:
            logger.exception("stage %s: settling %d messages failed; they will be redelivered", self.stage, len(done))

    def _renew_locks(self) -> None:
        """Renew the locks of held *and* in-flight messages that would lapse soon: a slow CRM call (up
        to the read timeout) must not let its message be delivered again while it is being written."""
        margin = min(RENEW_MARGIN, self.pipeline.settings.lock_duration / 2)
        threshold = datetime.now(UTC) + timedelta(seconds=margin)
        with self._lock:
            held = [m for state in self._publishers.values() for m, _ in state.backlog]
            held.extend(self._in_flight.values())
        for message in held:
            if message.locked_until is not None and message.locked_until < threshold:
                try:
                    self.transport.renew_lock(message)
                except LockLost:
                    logger.warning("stage %s: could not renew the lock of %s", self.stage, message.message_id)

    def _drain(self) -> None:
        # In-flight work finishes first (it may put paced messages back into a backlog), then every
        # message still held is released, to be delivered again at once.
        self._pool.shutdown(wait=True)
        with self._lock:
            held = [m for state in self._publishers.values() for m, _ in state.backlog]
            for state in self._publishers.values():
                state.backlog.clear()
        for message in held:
            with contextlib.suppress(LockLost):
                self.transport.abandon(message)


class EmbeddedRuntime:
    """The three stage workers over one transport and one pipeline."""

    def __init__(
        self,
        transport: Transport,
        pipeline: Pipeline,
        *,
        concurrency: int = 16,
        publisher_concurrency: int = 8,
        observer: Observer | None = None,
        stages: tuple[Stage | str, ...] = tuple(Stage),
    ) -> None:
        # A paced message waits in its worker's backlog (the pipeline's pacer says how long).
        self.pacer = pipeline.pacer
        self.workers = [
            StageWorker(
                stage,
                transport,
                pipeline,
                concurrency=concurrency,
                publisher_concurrency=publisher_concurrency,
                observer=observer,
            )
            for stage in stages
        ]

    def start(self) -> EmbeddedRuntime:
        for worker in self.workers:
            worker.start()
        return self

    def stop(self, timeout: float | None = 60.0) -> None:
        for worker in self.workers:
            worker._stop.set()
        for worker in self.workers:
            worker.stop(timeout)

    def __enter__(self) -> EmbeddedRuntime:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.05) -> bool:
    """Poll ``predicate`` until it is true or ``timeout`` passes; True if it became true."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()
