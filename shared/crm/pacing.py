"""Client-side pacing per CRM user (architecture §10): as fast as the CRM allows, and no faster.

Dataverse limits each user (the client's ``throttle_key``) to a number of requests per sliding window,
an execution-time budget and 52 concurrent requests; over a limit it answers 429 with ``Retry-After``,
and a request sent before that elapses extends the penalty. The :class:`Pacer` keeps, per key:

- a **rate** (a token bucket, requests per second) found by AIMD: it starts modest
  (``initial_rate``), grows additively while requests sent *at* the paced rate succeed, and halves
  on a 429. Before the CRM has ever pushed back, each success adds ``increase`` req/s (a fast ramp:
  the default window is 300 s, so a publisher's backlog may go out in a burst); after a push-back,
  each success adds ``increase / rate``, i.e. about ``increase`` req/s per second (careful near the
  ceiling just found). A success sent while the bucket still had spare tokens does not grow the rate:
  an idle publisher must not build up a rate it never used and then fire it all at once;
- a **concurrency cap** (``max_concurrent``, below Dataverse's 52);
- the **penalty**: after a 429 nothing is granted for exactly ``Retry-After`` seconds. The penalty
  itself lives in :class:`~shared.crm.penalties.Penalties` (shared across processes, restarts and
  instances); the pacer records every push-back there and checks it in the same critical section that
  grants the slot, right before the request leaves, so no request slips out between a 429 arriving
  and the penalty being consulted.
  After a push-back the bucket holds a single token: requests leave evenly spaced, not in bursts;
- the **request window**, once learnt: Dataverse's 429 for the request limit says which limit it is
  ("Number of requests exceeded the limit of 6000 over time window of 300 seconds."). The pacer
  keeps the send times of the recent requests to each user and, once a 429 has named the window,
  never lets more than that many go within it (plus ``window_margin`` seconds for the time a
  request takes to reach the CRM). AIMD alone keeps probing a sliding window with 429s, each of
  which idles the user for a whole Retry-After and catches the requests in flight; with the window
  known the CRM is used to its limit and does not push back again.

:meth:`Pacer.decide` and :meth:`Pacer.release` are pure decision logic over an injectable clock (the
tests drive them as tables); :meth:`Pacer.acquire` wraps ``decide`` for callers that may wait a
*short moment* (``max_wait``) and raises :class:`~shared.errors.CrmPaced` beyond it: a worker thread is
never parked on one publisher's CRM, so other publishers keep flowing (a paced message waits in the
embedded runtime's backlog, or as a deferred copy that spends no retry attempt).
"""

from __future__ import annotations

import contextlib
import logging
import re
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum

from shared.crm.penalties import Penalties
from shared.errors import CrmPaced

logger = logging.getLogger(__name__)

#: Token arithmetic in floats: a bucket this close to a whole token has it.
_EPSILON = 1e-9


class Wait(StrEnum):
    """Why a request may not go yet."""

    RATE = "rate"
    WINDOW = "window"
    CONCURRENCY = "concurrency"
    PENALTY = "penalty"


@dataclass(frozen=True)
class RequestWindow:
    """A request limit: at most ``limit`` requests in any ``seconds`` long sliding window."""

    limit: int
    seconds: float


#: Dataverse's message for the request limit (error 0x80072322), e.g. "Number of requests exceeded
#: the limit of 6000 over time window of 300 seconds."
_REQUEST_LIMIT = re.compile(
    r"number of requests exceeded the limit of ([\d,]+) over time window of ([\d.]+) seconds", re.IGNORECASE
)


def request_window_of(message: str | None) -> RequestWindow | None:
    """The request limit a Dataverse 429 names, or None when its message names none (the execution
    time or concurrency limit, a proxy's 429, a changed wording). Never raises."""
    match = _REQUEST_LIMIT.search(message or "")
    if match is None:
        return None
    try:
        limit, seconds = int(match.group(1).replace(",", "")), float(match.group(2))
    except ValueError:
        return None
    if limit < 1 or not 0 < seconds <= 24 * 3600:
        return None
    return RequestWindow(limit, seconds)


@dataclass(frozen=True)
class PacingPolicy:
    """The knobs of the pacer; the defaults suit Dataverse's default service protection limits."""

    #: Requests per second to a CRM user we know nothing about yet: the sustained rate of Dataverse's
    #: default request limit (6000 per 300 s).
    initial_rate: float = 20.0
    min_rate: float = 0.5
    #: Far above what one CRM user takes; only bounds the arithmetic.
    max_rate: float = 2000.0
    #: Additive increase (req/s per success before the first push-back, req/s per second after).
    increase: float = 1.0
    #: Multiplicative decrease on a 429.
    decrease: float = 0.5
    #: Requests the bucket lets go back to back before the CRM has pushed back.
    burst: float = 8.0
    #: Requests in flight to one CRM user at most (Dataverse refuses the 53rd).
    max_concurrent: int = 48
    #: Longest :meth:`Pacer.acquire` waits for a slot before it answers "not yet".
    max_wait: float = 0.05
    #: Added to a learnt request window: our send times lead the CRM's arrival times a little.
    window_margin: float = 0.5
    #: Send times kept per key (bounds memory; Dataverse's default limit is 6000 per window).
    history: int = 10_000
    #: How long a caller told "not yet" for lack of a concurrency slot should stay away (a slot
    #: frees when a request in flight ends, which the pacer cannot predict).
    concurrency_wait: float = 0.02

    def __post_init__(self) -> None:
        if not 0 < self.min_rate <= self.initial_rate <= self.max_rate:
            raise ValueError("rates must satisfy 0 < min_rate <= initial_rate <= max_rate")
        if self.increase < 0 or not 0 < self.decrease < 1:
            raise ValueError("increase must be >= 0 and decrease in (0, 1)")
        if self.burst < 1 or not 1 <= self.max_concurrent <= 52:
            raise ValueError("burst must be >= 1 and max_concurrent in 1..52")
        if self.max_wait < 0 or self.concurrency_wait <= 0:
            raise ValueError("max_wait must be >= 0 and concurrency_wait > 0")
        if self.window_margin < 0 or self.history < 1:
            raise ValueError("window_margin must be >= 0 and history >= 1")


@dataclass(frozen=True)
class Permit:
    """A granted slot: hand it back with :meth:`Pacer.release` when the response (or failure) is in.

    ``at_limit`` says the request took the bucket's last token: demand met the paced rate, so a
    success may raise it.
    """

    key: str
    at_limit: bool
    sent_at: float = 0.0


@dataclass(frozen=True)
class Decision:
    """Either a :class:`Permit`, or how long to stay away and why."""

    permit: Permit | None
    wait: float = 0.0
    reason: Wait | None = None

    @property
    def granted(self) -> bool:
        return self.permit is not None


@dataclass
class _KeyState:
    rate: float
    tokens: float
    updated: float
    in_flight: int = 0
    pushed_back: bool = False
    window: RequestWindow | None = None
    sent: deque[float] = field(default_factory=deque)
    #: Requests that were in flight when a 429 came back (they may reach the CRM inside the penalty).
    in_flight_at_push_back: int = 0


@dataclass(frozen=True)
class KeySnapshot:
    """What the pacer holds for one key (for logs, the bench and tests)."""

    rate: float
    tokens: float
    in_flight: int
    penalty_remaining: float
    pushed_back: bool
    window: RequestWindow | None
    in_flight_at_push_back: int


class Pacer:
    """Per-CRM-user rate, concurrency and penalty decisions. Thread-safe.

    ``clock`` (monotonic seconds) drives every decision, so tests can move time by hand.
    """

    def __init__(
        self,
        policy: PacingPolicy | None = None,
        *,
        penalties: Penalties | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.policy = policy or PacingPolicy()
        #: The one record of 429 penalties; without one given, this pacer's own (one process, its clock).
        self.penalties = penalties or Penalties(clock=clock, wall=clock)
        self._clock = clock
        self._lock = threading.Condition()
        self._keys: dict[str, _KeyState] = {}

    # -- decisions ------------------------------------------------------------------------------

    def _state(self, key: str, now: float) -> _KeyState:
        state = self._keys.get(key)
        if state is None:
            state = _KeyState(rate=self.policy.initial_rate, tokens=self.policy.burst, updated=now)
            # A window another instance learnt (shared with the penalties): keep to it from the start.
            shared = self.penalties.window(key)
            if shared is not None:
                state.window = RequestWindow(*shared)
            self._keys[key] = state
        return state

    def _capacity(self, state: _KeyState) -> float:
        # Once the CRM has pushed back we are near its ceiling: evenly spaced requests, no bursts.
        return 1.0 if state.pushed_back else self.policy.burst

    def _refill(self, state: _KeyState, now: float) -> None:
        if now <= state.updated:  # inside a penalty, tokens are frozen until it ends
            return
        state.tokens = min(self._capacity(state), state.tokens + (now - state.updated) * state.rate)
        state.updated = now

    def decide(self, key: str) -> Decision:
        """Take a slot for one request to ``key`` now, or say how long to wait. Never blocks."""
        with self._lock:
            return self._decide(key, self._clock())

    def _decide(self, key: str, now: float) -> Decision:
        state = self._state(key, now)
        penalty = self.penalties.local_remaining(key)
        if penalty > 0:
            return Decision(None, penalty, Wait.PENALTY)
        if state.in_flight >= self.policy.max_concurrent:
            return Decision(None, self.policy.concurrency_wait, Wait.CONCURRENCY)
        if state.window is not None:
            span = state.window.seconds + self.policy.window_margin
            while state.sent and state.sent[0] <= now - span:
                state.sent.popleft()
            if len(state.sent) >= state.window.limit:
                # The oldest request that still counts leaves the window then.
                return Decision(None, state.sent[-state.window.limit] + span - now, Wait.WINDOW)
        self._refill(state, now)
        if state.tokens < 1.0 - _EPSILON:
            return Decision(None, (1.0 - state.tokens) / state.rate, Wait.RATE)
        state.tokens = max(0.0, state.tokens - 1.0)
        state.in_flight += 1
        state.sent.append(now)
        if len(state.sent) > self.policy.history:
            state.sent.popleft()
        return Decision(Permit(key, at_limit=state.tokens < 1.0 - _EPSILON, sent_at=now))

    def room(self, key: str) -> tuple[float, int]:
        """Without taking anything: how long until a request to ``key`` may go (0 if now), and how
        many may go right now. A caller with a backlog uses it to batch instead of queueing up
        requests that would only be told "not yet"."""
        with self._lock:
            now = self._clock()
            state = self._keys.get(key)
            penalty = self.penalties.local_remaining(key)
            if penalty > 0:
                return penalty, 0
            if state is None:
                return 0.0, int(self.policy.burst)
            slots = self.policy.max_concurrent - state.in_flight
            if slots <= 0:
                return self.policy.concurrency_wait, 0
            tokens = min(self._capacity(state), state.tokens + max(0.0, now - state.updated) * state.rate)
            if tokens < 1.0 - _EPSILON:
                return (1.0 - tokens) / state.rate, 0
            return 0.0, min(slots, int(tokens + _EPSILON))

    def release(
        self,
        permit: Permit,
        *,
        ok: bool,
        retry_after: float | None = None,
        window: RequestWindow | None = None,
    ) -> None:
        """Hand back a slot. ``retry_after`` set: the CRM answered 429 (halve the rate, hold the key
        for exactly that long, and keep to ``window`` from now on when the 429 named it). Otherwise
        ``ok``: the CRM took the request (grow the rate if it was sent at the limit); not ok (network
        failure, 5xx): neither grow nor shrink.
        """
        with self._lock:
            now = self._clock()
            state = self._state(permit.key, now)
            state.in_flight = max(0, state.in_flight - 1)
            policy = self.policy
            if retry_after is not None:
                # A refused request did not count toward the CRM's window.
                with contextlib.suppress(ValueError):
                    state.sent.remove(permit.sent_at)
                if window is not None:
                    state.window = window
                    self.penalties.share_window(permit.key, window.limit, window.seconds)
                self._push_back(permit.key, state, now, retry_after)
            elif ok and permit.at_limit:
                step = policy.increase / state.rate if state.pushed_back else policy.increase
                self._refill(state, now)
                state.rate = min(policy.max_rate, state.rate + step)
            self._lock.notify_all()

    def push_back(self, key: str, retry_after: float, window: RequestWindow | None = None) -> None:
        """The CRM answered 429 outside a permit's own response (e.g. inside a ``$batch``)."""
        with self._lock:
            now = self._clock()
            state = self._state(key, now)
            if window is not None:
                state.window = window
                self.penalties.share_window(key, window.limit, window.seconds)
            self._push_back(key, state, now, retry_after)

    def _push_back(self, key: str, state: _KeyState, now: float, retry_after: float) -> None:
        if self.penalties.local_remaining(key) <= 0:
            # A new push-back. (A 429 inside the penalty answers a request that was in flight with
            # the first one: the same push-back, which extends the penalty but halves nothing.)
            state.in_flight_at_push_back += state.in_flight
            self._refill(state, now)
            state.rate = max(self.policy.min_rate, state.rate * self.policy.decrease)
        self.penalties.penalise(key, max(0.0, retry_after))
        state.pushed_back = True
        # One token, frozen until the penalty is over: the first request goes exactly when it ends
        # (Retry-After, not a moment later), the next ones at the halved rate.
        state.tokens = 1.0
        state.updated = now + self.penalties.local_remaining(key)
        logger.info("CRM user pushed back: holding it %.1f s, pacing at %.1f requests/s", retry_after, state.rate)

    def penalty_remaining(self, key: str) -> float:
        """Seconds left in ``key``'s penalty, looking at the shared record when due (may do I/O, so
        callers ask it before :meth:`acquire`, outside the pacer's lock)."""
        return self.penalties.remaining(key)

    # -- waiting a short moment ---------------------------------------------------------------------

    def acquire(self, key: str, *, max_wait: float | None = None) -> Permit:
        """A slot for ``key``, waiting at most ``max_wait`` seconds (default: the policy's).

        Raises CrmPaced (``retry_after`` = how long to stay away) when no slot frees in time: the
        caller must not send, and should set the work aside rather than block on it.
        """
        limit = self.policy.max_wait if max_wait is None else max_wait
        # The deadline runs on the real clock: it bounds how long a thread is held, whatever the
        # decision clock says.
        deadline = time.monotonic() + limit
        with self._lock:
            while True:
                decision = self._decide(key, self._clock())
                if decision.permit is not None:
                    return decision.permit
                left = deadline - time.monotonic()
                if decision.wait > left:
                    raise CrmPaced(
                        f"not sent: paced ({decision.reason}) for {decision.wait:.2f} s",
                        retry_after=decision.wait,
                        wait=str(decision.reason),
                    )
                self._lock.wait(decision.wait)

    # -- inspection ------------------------------------------------------------------------------

    def snapshot(self, key: str) -> KeySnapshot:
        """The current state of ``key`` (a fresh key's defaults if never used)."""
        with self._lock:
            now = self._clock()
            state = self._keys.get(key) or _KeyState(self.policy.initial_rate, self.policy.burst, now)
            tokens = min(self._capacity(state), state.tokens + max(0.0, now - state.updated) * state.rate)
            return KeySnapshot(
                rate=state.rate,
                tokens=tokens,
                in_flight=state.in_flight,
                penalty_remaining=self.penalties.local_remaining(key),
                pushed_back=state.pushed_back,
                window=state.window,
                in_flight_at_push_back=state.in_flight_at_push_back,
            )

    def known_keys(self) -> list[str]:
        """The keys the pacer has seen."""
        with self._lock:
            return list(self._keys)


__all__ = [
    "Decision",
    "KeySnapshot",
    "Pacer",
    "PacingPolicy",
    "Permit",
    "RequestWindow",
    "Wait",
    "request_window_of",
]
