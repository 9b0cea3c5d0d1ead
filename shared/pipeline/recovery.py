"""Releasing a healed CRM's waiting retries early, at the paced rate, never into a penalty.

The retry schedule (5 s, 15 s, 1 min, 5 min …) protects a CRM that is down; once the same CRM answers
successes again, the leads waiting out their slots are only late. :class:`Recovery` watches every
settlement (it is one of the observers :meth:`shared.services.Services.observe` fans out to):

- a retry that reached the CRM (check_solution or write_lead; a 5xx, a timeout, a reset, a 429)
  marks the publisher *failing* and stops any release in progress — what is still scheduled stays on
  its schedule;
- a delivery while failing marks it *healed*: a background thread then releases the publisher's
  scheduled messages on the three stage queues (``Transport.release_scheduled``, earliest due
  first, the write queue first) in rounds every ``interval`` seconds, each round at most what the
  pacer's rate for the CRM user allows in that time, and nothing while the user is in a penalty;
- it stops when nothing is left, or at the next failure. A half-healed CRM (failing one request in
  five) so gets its backlog at the paced rate, with each failure pausing the release until the next
  success — never a herd.

A CRM that heals while no new lead arrives would only be noticed when the earliest retry falls due
(maybe minutes away): so while a publisher is failing, one scheduled message is released as a *canary*
every ``canary_interval`` (never inside a penalty). Its delivery is the success that starts the
release; its failure only spends the one attempt it would have spent later.

A process that never saw the failures (restarted, or another instance met them) still releases: a
delivery for a publisher it holds no state for starts a round at most every ``probe_interval``.
Decisions live in :meth:`observe` and :meth:`step` (no thread needed: tests call ``step``). Stage
logic stays pure: nothing here runs inside a stage.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from shared.crm.pacing import Pacer
from shared.names import PROP_PUBLISHER_ID, QUEUE_INCOMING, QUEUE_READY, QUEUE_VALIDATED
from shared.pipeline.outcomes import Retry, SettleAction, Stage
from shared.pipeline.settle import Settled
from shared.transport.base import Transport

logger = logging.getLogger(__name__)

#: Seconds between release rounds.
RELEASE_INTERVAL = 0.5
#: A delivery for a publisher with no known failure looks for scheduled leads at most this often.
PROBE_INTERVAL = 15.0
#: While failing, one scheduled message is released this often to find out whether the CRM is back.
CANARY_INTERVAL = 30.0
#: Queues released in this order: the leads closest to the CRM first.
RELEASE_ORDER: tuple[str, ...] = (QUEUE_READY, QUEUE_VALIDATED, QUEUE_INCOMING)
#: Stages whose retries mean the CRM itself failed (validate_credentials only talks to Entra).
_CRM_STAGES = frozenset({Stage.CHECK_SOLUTION, Stage.WRITE_LEAD})


@dataclass
class _Track:
    failing: bool = False
    releasing: bool = False
    probed_at: float = float("-inf")
    #: When the CRM last failed or a canary was last released (the canary clock).
    canary_at: float = float("-inf")


class Recovery:
    """Per-publisher recovery detection and the paced release of its scheduled retries. Thread-safe.

    ``key_of`` names the publisher's CRM user (the pacer's key) from what is cached, or None.
    With ``background`` (the default) a releaser thread runs the rounds, started on first need.
    """

    def __init__(
        self,
        transport: Transport,
        pacer: Pacer,
        key_of: Callable[[str], str | None],
        *,
        interval: float = RELEASE_INTERVAL,
        probe_interval: float = PROBE_INTERVAL,
        canary_interval: float = CANARY_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
        background: bool = True,
    ) -> None:
        self._transport = transport
        self._pacer = pacer
        self._key_of = key_of
        self.interval = interval
        self._probe_interval = probe_interval
        self.canary_interval = canary_interval
        self._clock = clock
        self._lock = threading.Lock()
        self._tracks: dict[str, _Track] = {}
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._wake = threading.Event()
        #: False: no releaser thread; the caller runs :meth:`step` (tests drive rounds by hand).
        self._closed = not background
        #: Messages released so far, and the most one round released (for tests and the bench).
        self.released = 0
        self.largest_round = 0

    # -- what settlements say ----------------------------------------------------------------------

    def observe(self, settled: Settled) -> None:
        """Note a settlement (the observer hook). Raises nothing."""
        publisher = settled.message.application_properties.get(PROP_PUBLISHER_ID)
        if publisher is None:
            return
        outcome = settled.outcome
        failed = isinstance(outcome, Retry) and not outcome.not_sent and settled.stage in _CRM_STAGES
        delivered = settled.action is SettleAction.DELIVERED
        if not failed and not delivered:
            return
        start = False
        with self._lock:
            track = self._tracks.setdefault(str(publisher), _Track())
            if failed:
                if track.releasing:
                    logger.info("publisher %s: the CRM failed again; the rest stays on its schedule", publisher)
                track.failing, track.releasing, track.canary_at = True, False, self._clock()
                start = True  # the releaser thread sends the canaries
            elif not track.releasing:
                now = self._clock()
                if track.failing or now - track.probed_at >= self._probe_interval:
                    if track.failing:
                        logger.info("publisher %s: the CRM answers again; releasing its waiting retries", publisher)
                    track.failing, track.releasing, track.probed_at = False, True, now
                    start = True
        if start:
            self._ensure_running()

    def releasing(self, publisher_id: str) -> bool:
        """Whether the publisher's scheduled retries are being released now."""
        with self._lock:
            track = self._tracks.get(publisher_id)
            return track is not None and track.releasing

    # -- one round ---------------------------------------------------------------------------------

    def step(self) -> int:
        """One release round over every healed publisher; returns how many messages it released.
        Broker errors are logged and the publisher is tried again next round. Raises nothing."""
        now = self._clock()
        with self._lock:
            publishers = [publisher for publisher, track in self._tracks.items() if track.releasing]
            canaries = [
                publisher
                for publisher, track in self._tracks.items()
                if track.failing and not track.releasing and now - track.canary_at >= self.canary_interval
            ]
            for publisher in canaries:
                self._tracks[publisher].canary_at = now
        total = 0
        for publisher in publishers:
            try:
                total += self._release(publisher)
            except Exception:  # a broker hiccup must not end the releaser
                logger.warning("publisher %s: releasing scheduled retries failed", publisher, exc_info=True)
        for publisher in canaries:
            try:
                total += self._canary(publisher)
            except Exception:  # a broker hiccup must not end the releaser
                logger.warning("publisher %s: releasing a canary failed", publisher, exc_info=True)
        return total

    def _canary(self, publisher: str) -> int:
        key = self._key_of(publisher)
        if key is not None and self._pacer.penalty_remaining(key) > 0:
            return 0
        for queue in RELEASE_ORDER:
            if self._transport.release_scheduled(queue, publisher, 1):
                logger.info("publisher %s: released one scheduled retry to see whether the CRM is back", publisher)
                return 1
        return 0

    def _budget(self, key: str | None) -> int:
        """What one round may release: the pacer's rate over one interval (at least one)."""
        rate = self._pacer.snapshot(key).rate if key is not None else self._pacer.policy.initial_rate
        return max(1, int(rate * self.interval))

    def _release(self, publisher: str) -> int:
        key = self._key_of(publisher)
        # A penalty wins: nothing is released into a Retry-After (the shared record is consulted).
        if key is not None and self._pacer.penalty_remaining(key) > 0:
            return 0
        budget = self._budget(key)
        released = 0
        for queue in RELEASE_ORDER:
            if released >= budget:
                break
            with self._lock:
                track = self._tracks.get(publisher)
                if track is None or not track.releasing:  # a failure arrived meanwhile
                    break
            released += self._transport.release_scheduled(queue, publisher, budget - released)
        with self._lock:
            self.released += released
            self.largest_round = max(self.largest_round, released)
            track = self._tracks.get(publisher)
            if released < budget and track is not None and track.releasing:
                track.releasing = False  # nothing is left waiting
        if released:
            logger.info("publisher %s: released %d scheduled retries", publisher, released)
        return released

    # -- the releaser thread -----------------------------------------------------------------------

    def _ensure_running(self) -> None:
        with self._lock:
            if self._closed:
                return
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="leadwriter-recovery", daemon=True)
                self._thread.start()
        self._wake.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.step()
            with self._lock:
                idle = not any(track.releasing or track.failing for track in self._tracks.values())
            if idle:
                # Sleep until a publisher heals (or close).
                self._wake.wait()
                self._wake.clear()
            else:
                self._stop.wait(self.interval)

    def close(self, timeout: float = 5.0) -> None:
        """Stop the releaser thread (what is still scheduled stays on its schedule)."""
        with self._lock:
            self._closed = True
            thread = self._thread
        self._stop.set()
        self._wake.set()
        if thread is not None:
            thread.join(timeout)


__all__ = ["CANARY_INTERVAL", "PROBE_INTERVAL", "RELEASE_INTERVAL", "Recovery"]
