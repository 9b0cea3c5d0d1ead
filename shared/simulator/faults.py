"""Fault injection for one simulated org: what the next CRM (or token) requests suffer.

Faults queue in the order they were asked for: ``fail_next(1); throttle_next(1)`` makes the next
request fail and the one after it be throttled. Token-endpoint faults have their own queue.
"""

from __future__ import annotations

import random
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Literal

FaultKind = Literal["fail", "hang", "reset", "reset_after", "throttle", "redirect"]


@dataclass(frozen=True)
class Fault:
    """One injected fault: its kind and the status (fail), seconds (hang, throttle) or location (redirect)."""

    kind: FaultKind
    status: int = 503
    seconds: float = 0.0
    location: str = ""


class Faults:
    """Thread-safe, mutable fault settings of one org's CRM (and its tenant's token endpoint)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        #: Notified by :meth:`clear`: requests stalled by a hang end then (the CRM has recovered).
        self._cleared = threading.Condition(self._lock)
        self._clears = 0
        self._latency = 0.0
        self._queue: deque[Fault] = deque()
        self._token: deque[int] = deque()
        #: Chaos: (cumulative probability, fault) per kind, drawn for every request no queued fault takes.
        self._chaos: list[tuple[float, Fault]] = []
        self._random = random.Random()
        #: Every ``_every``-th request with no queued fault fails with ``_every_status`` (0: off).
        self._every = 0
        self._every_status = 503
        self._every_count = 0
        #: > 0: every CRM request with no queued fault stalls this long (a CRM that hangs).
        self._hang_all = 0.0

    @property
    def latency(self) -> float:
        """Seconds added to every CRM request (on top of the org's configured latency)."""
        with self._lock:
            return self._latency

    @latency.setter
    def latency(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("latency must not be negative")
        with self._lock:
            self._latency = float(seconds)

    def _add(self, n: int, fault: Fault) -> None:
        if n < 0:
            raise ValueError("n must not be negative")
        with self._lock:
            self._queue.extend([fault] * n)

    def fail_next(self, n: int, status: int = 503) -> None:
        """Answer the next ``n`` CRM requests with ``status`` and a Dataverse-style error body.

        Raises ValueError for a status that is not 4xx/5xx.
        """
        if not 400 <= status <= 599:
            raise ValueError("fail_next needs an error status (4xx or 5xx)")
        self._add(n, Fault("fail", status=status))

    def fail_one_in(self, n: int, status: int = 503) -> None:
        """From now on, fail one CRM request in ``n`` (when no queued fault applies) with ``status``: a
        half-healed CRM. ``n`` = 0 turns it off. Raises ValueError for a negative ``n`` or a status
        that is not 4xx/5xx."""
        if n < 0:
            raise ValueError("n must not be negative")
        if not 400 <= status <= 599:
            raise ValueError("fail_one_in needs an error status (4xx or 5xx)")
        with self._lock:
            self._every, self._every_status, self._every_count = n, status, 0

    def hang_next(self, n: int, seconds: float) -> None:
        """Stall the next ``n`` CRM requests for ``seconds`` before handling them (the client times out,
        but the request is still carried out afterwards, as a slow real server would)."""
        self._add(n, Fault("hang", seconds=float(seconds)))

    def hang_all(self, seconds: float) -> None:
        """From now on stall every CRM request (when no queued fault applies) for ``seconds`` before
        handling it: a CRM that accepts connections and does not answer, until :meth:`clear`. The
        client's read timeout is what bounds it. Raises ValueError for a negative ``seconds``."""
        if seconds < 0:
            raise ValueError("seconds must not be negative")
        with self._lock:
            self._hang_all = float(seconds)

    def reset_next(self, n: int) -> None:
        """Drop the next ``n`` CRM connections with a TCP reset and no answer."""
        self._add(n, Fault("reset"))

    def throttle_next(self, n: int, retry_after: float = 5) -> None:
        """Answer the next ``n`` CRM requests 429 with ``Retry-After`` and start that user's penalty.

        The header carries ``retry_after`` rounded up to whole seconds (at least 1); the penalty itself
        lasts exactly ``retry_after`` seconds, so tests may use fractions.
        """
        if retry_after <= 0:
            raise ValueError("retry_after must be positive")
        self._add(n, Fault("throttle", seconds=float(retry_after)))

    def chaos(
        self,
        *,
        fail: float = 0.0,
        throttle: float = 0.0,
        hang: float = 0.0,
        reset_after: float = 0.0,
        hang_seconds: float = 5.0,
        retry_after: float = 1.0,
        seed: int | None = None,
    ) -> None:
        """From now on each CRM request draws its fault: ``fail`` (503), ``throttle`` (429 with
        ``retry_after``), ``hang`` (stall ``hang_seconds``, then carry on) or ``reset_after`` (the request
        is carried out, then the connection is reset: the client never hears it succeeded), each with
        its probability; :meth:`calm` (or :meth:`clear`) ends it. Raises ValueError when they add up
        to more than 1."""
        kinds = [
            (fail, Fault("fail", status=503)),
            (throttle, Fault("throttle", seconds=float(retry_after))),
            (hang, Fault("hang", seconds=float(hang_seconds))),
            (reset_after, Fault("reset_after")),
        ]
        if any(p < 0 for p, _ in kinds) or sum(p for p, _ in kinds) > 1:
            raise ValueError("chaos probabilities must be non-negative and add up to at most 1")
        table, total = [], 0.0
        for probability, fault in kinds:
            if probability > 0:
                total += probability
                table.append((total, fault))
        with self._lock:
            self._chaos = table
            self._random = random.Random(seed)

    def calm(self) -> None:
        """End :meth:`chaos` (queued faults stay)."""
        with self._lock:
            self._chaos = []

    def redirect_next(self, n: int, location: str) -> None:
        """Answer the next ``n`` CRM requests ``302 Found`` with ``Location: location``."""
        self._add(n, Fault("redirect", location=location))

    def token_fail_next(self, n: int, status: int = 503) -> None:
        """Fail the next ``n`` token requests for this org's tenant with ``status``."""
        if not 400 <= status <= 599:
            raise ValueError("token_fail_next needs an error status (4xx or 5xx)")
        if n < 0:
            raise ValueError("n must not be negative")
        with self._lock:
            self._token.extend([status] * n)

    def clear(self) -> None:
        """Drop every pending fault and the added latency; requests stalled by a hang carry on now."""
        with self._lock:
            self._latency = 0.0
            self._queue.clear()
            self._token.clear()
            self._chaos = []
            self._every = self._every_count = 0
            self._hang_all = 0.0
            self._clears += 1
            self._cleared.notify_all()

    def stall(self, seconds: float, stopping: threading.Event) -> None:
        """Hold a request for ``seconds``, or until :meth:`clear` or ``stopping`` (checked every
        quarter second), whichever comes first."""
        deadline = time.monotonic() + seconds
        with self._lock:
            clears = self._clears
            while self._clears == clears and not stopping.is_set():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return
                self._cleared.wait(min(remaining, 0.25))

    def take(self, *, authenticated: bool = True) -> Fault | None:
        """The fault for the request that just arrived, if any (consumes it).

        A throttle needs a user to penalise, so an unauthenticated request leaves it queued.
        """
        with self._lock:
            if self._queue and (authenticated or self._queue[0].kind != "throttle"):
                return self._queue.popleft()
            if self._hang_all:
                return Fault("hang", seconds=self._hang_all)
            if self._chaos and authenticated:
                draw = self._random.random()
                for limit, fault in self._chaos:
                    if draw < limit:
                        return fault
            if self._every and authenticated:
                self._every_count += 1
                if self._every_count % self._every == 0:
                    return Fault("fail", status=self._every_status)
            return None

    def take_token_failure(self) -> int | None:
        """The status the token request that just arrived must fail with, if any (consumes it)."""
        with self._lock:
            return self._token.popleft() if self._token else None

    def pending(self) -> dict[str, int]:
        """How many faults of each kind are still queued (for the admin API)."""
        with self._lock:
            counts: dict[str, int] = {}
            for fault in self._queue:
                counts[fault.kind] = counts.get(fault.kind, 0) + 1
            if self._token:
                counts["token_fail"] = len(self._token)
            if self._hang_all:
                counts["hang_all"] = 1
            return counts
