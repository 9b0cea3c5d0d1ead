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
  known the CRM is used to its limit and does not push back again;
- the **execution-time window**, once learnt from its 429 (error ``0x80072321``: "Combined execution
  time of incoming requests exceeded limit of 1,200,000 milliseconds over time window of 300
  seconds."). With ``$batch`` or ``CreateMultiple`` a lead costs a fraction of a request, and this is
  the budget that binds. The cost of a request is **its own duration as the client measured it**
  (from sending to the whole response; Dataverse sends no per-request timing): the network time in
  it keeps the count on the safe side. (A caller may mark cheap reads as ``floor_sample``s, whose
  shortest duration is then taken off every cost as the network's share; the client does not: that
  read's own server time is taken off too, and the bench found short requests undercounted by 13 %
  and more.) The pacer keeps the costs
  of the requests that ended within the window (plus ``window_margin``), assumes each request still
  in flight costs as much as the dearest of the last ``cost_memory``, and grants a request only
  while all of that stays within ``execution_share`` of the budget. An execution-time 429 met after
  the window is known says the count is short: the share is lowered by 5 % each time (to half at
  most);
- the **concurrency limit**, once a 429 named it (``0x80072326``: "Number of concurrent requests
  exceeded the limit of 52."), and the server's ``x-ms-dop-hint`` (its recommended parallelism for
  the org), both as caps on the requests in flight besides ``max_concurrent``.

What one pacer learns is this process's: other processes sending as the same CRM user share the
penalty record (:mod:`shared.crm.penalties`) but not the windows.

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
    EXECUTION = "execution"
    CONCURRENCY = "concurrency"
    PENALTY = "penalty"


@dataclass(frozen=True)
class RequestWindow:
    """A request limit: at most ``limit`` requests in any ``seconds`` long sliding window."""

    limit: int
    seconds: float


@dataclass(frozen=True)
class ExecutionWindow:
    """An execution-time limit: at most ``milliseconds`` of server execution in any ``seconds`` long
    sliding window."""

    milliseconds: float
    seconds: float


@dataclass(frozen=True)
class ConcurrencyLimit:
    """A concurrency limit: at most ``limit`` requests in flight at once."""

    limit: int


#: What a Dataverse 429 may name.
NamedLimit = RequestWindow | ExecutionWindow | ConcurrencyLimit

_EXECUTION_LIMIT = re.compile(
    r"combined execution time of incoming requests exceeded limit of ([\d,]+(?:\.\d+)?) milliseconds "
    r"over time window of ([\d.]+) seconds",
    re.IGNORECASE,
)
_CONCURRENCY_LIMIT = re.compile(r"number of concurrent requests exceeded the limit of ([\d,]+)", re.IGNORECASE)


def limit_of(message: str | None) -> NamedLimit | None:
    """The limit a Dataverse 429's message names — the request window (``0x80072322``), the
    execution-time window (``0x80072321``) or the concurrency limit (``0x80072326``) — or None (a
    proxy's 429, a changed wording). Never raises."""
    window = request_window_of(message)
    if window is not None:
        return window
    text = message or ""
    match = _EXECUTION_LIMIT.search(text)
    if match is not None:
        try:
            milliseconds, seconds = float(match.group(1).replace(",", "")), float(match.group(2))
        except ValueError:
            return None
        if milliseconds <= 0 or not 0 < seconds <= 24 * 3600:
            return None
        return ExecutionWindow(milliseconds, seconds)
    match = _CONCURRENCY_LIMIT.search(text)
    if match is not None:
        limit = int(match.group(1).replace(",", ""))
        return ConcurrencyLimit(limit) if limit >= 1 else None
    return None


def dop_hint_of(value: str | None) -> int | None:
    """The parallelism an ``x-ms-dop-hint`` header recommends, or None when absent or not a positive
    integer. Never raises."""
    try:
        hint = int((value or "").strip())
    except ValueError:
        return None
    return hint if hint >= 1 else None


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
    #: The share of a learnt execution-time budget the pacer spends by its own count at most (the count
    #: is an estimate of the server's; an execution 429 met after the window is known lowers it).
    execution_share: float = 0.9
    #: Recent requests the in-flight estimate looks at: each request in flight is assumed to cost as
    #: much as the dearest of them (under a backlog the batches are full, so that is what they cost).
    cost_memory: int = 16
    #: Whether the server's ``x-ms-dop-hint`` caps the requests in flight.
    honour_dop_hint: bool = True

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
        if not 0 < self.execution_share <= 1 or self.cost_memory < 1:
            raise ValueError("execution_share must be in (0, 1] and cost_memory >= 1")


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
    execution: ExecutionWindow | None = None
    #: The share of the learnt execution budget spent, lowered each time the CRM still pushes back.
    execution_share: float = 1.0
    #: (end time, seconds) of the requests that ended recently, and their sum.
    costs: deque[tuple[float, float]] = field(default_factory=deque)
    cost_total: float = 0.0
    #: The costs of the last few requests; the dearest is what each request in flight is assumed to spend.
    recent_costs: deque[float] = field(default_factory=deque)
    #: The shortest duration of a read (a cheap request): the network's share of every duration.
    floor: float | None = None
    concurrency: int | None = None
    dop_hint: int | None = None


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
    execution: ExecutionWindow | None = None
    #: Execution seconds spent within the learnt window (or recently, before one is learnt).
    execution_spent: float = 0.0
    cost_estimate: float = 0.0
    #: Requests in flight allowed at most (the policy's, a learnt limit's or the dop hint's).
    concurrency_cap: int = 0


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

    def _cap(self, state: _KeyState) -> int:
        cap = self.policy.max_concurrent
        if state.concurrency is not None:
            cap = min(cap, state.concurrency)
        if state.dop_hint is not None and self.policy.honour_dop_hint:
            cap = min(cap, state.dop_hint)
        return max(1, cap)

    def _prune_costs(self, state: _KeyState, now: float) -> None:
        seconds = state.execution.seconds if state.execution is not None else 300.0
        horizon = now - seconds - self.policy.window_margin
        while state.costs and state.costs[0][0] <= horizon:
            state.cost_total -= state.costs.popleft()[1]
        if not state.costs:
            state.cost_total = 0.0

    def _execution_wait(self, state: _KeyState, now: float) -> float:
        """0 when one more request fits the learnt execution budget, else how long until it does."""
        if state.execution is None:
            return 0.0
        self._prune_costs(state, now)
        budget = state.execution.milliseconds / 1000 * state.execution_share
        estimate = max(state.recent_costs, default=0.0)
        excess = state.cost_total + (state.in_flight + 1) * estimate - budget
        if excess <= _EPSILON:
            return 0.0
        span = state.execution.seconds + self.policy.window_margin
        freed = 0.0
        for ended, cost in state.costs:
            freed += cost
            if freed >= excess - _EPSILON:
                # Once this request's cost has left the window, enough of the budget is free again.
                return max(ended + span - now, self.policy.concurrency_wait)
        # What is in flight alone fills the budget: a slot frees when one of them ends.
        return self.policy.concurrency_wait

    def _blocked(self, key: str, state: _KeyState, now: float) -> Decision | None:
        """Why no request to ``key`` may go now (penalty, concurrency, request or execution window),
        or None. Does not take anything."""
        penalty = self.penalties.local_remaining(key)
        if penalty > 0:
            return Decision(None, penalty, Wait.PENALTY)
        if state.in_flight >= self._cap(state):
            return Decision(None, self.policy.concurrency_wait, Wait.CONCURRENCY)
        if state.window is not None:
            span = state.window.seconds + self.policy.window_margin
            while state.sent and state.sent[0] <= now - span:
                state.sent.popleft()
            if len(state.sent) >= state.window.limit:
                # The oldest request that still counts leaves the window then.
                return Decision(None, state.sent[-state.window.limit] + span - now, Wait.WINDOW)
        wait = self._execution_wait(state, now)
        if wait > 0:
            return Decision(None, wait, Wait.EXECUTION)
        return None

    def _decide(self, key: str, now: float) -> Decision:
        state = self._state(key, now)
        blocked = self._blocked(key, state, now)
        if blocked is not None:
            return blocked
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
            blocked = self._blocked(key, state, now)
            if blocked is not None:
                return blocked.wait, 0
            slots = self._cap(state) - state.in_flight
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
        window: NamedLimit | None = None,
        cost: float | None = None,
        floor_sample: bool = False,
        dop_hint: int | None = None,
    ) -> None:
        """Hand back a slot. ``retry_after`` set: the CRM answered 429 (halve the rate, hold the key
        for exactly that long, and keep to ``window`` — the request or execution-time window or the
        concurrency limit — from now on when the 429 named it). Otherwise ``ok``: the CRM took the
        request (grow the rate if it was sent at the limit); not ok (network failure, 5xx): neither
        grow nor shrink. ``cost``: the request's duration in seconds, counted against the
        execution-time window unless it was refused, less the network's share (the shortest duration
        of a ``floor_sample``: a read, whose server time is next to nothing); ``dop_hint``: the
        response's ``x-ms-dop-hint``, a cap on the requests in flight from now on.
        """
        with self._lock:
            now = self._clock()
            state = self._state(permit.key, now)
            state.in_flight = max(0, state.in_flight - 1)
            policy = self.policy
            if dop_hint is not None:
                state.dop_hint = dop_hint
            if cost is not None and retry_after is None:
                self._spend(state, now, max(0.0, cost), floor_sample=floor_sample)
            if retry_after is not None:
                # A refused request did not count toward the CRM's window.
                with contextlib.suppress(ValueError):
                    state.sent.remove(permit.sent_at)
                self._learn(permit.key, state, window)
                self._push_back(permit.key, state, now, retry_after)
            elif ok and permit.at_limit:
                step = policy.increase / state.rate if state.pushed_back else policy.increase
                self._refill(state, now)
                state.rate = min(policy.max_rate, state.rate + step)
            self._lock.notify_all()

    def _spend(self, state: _KeyState, now: float, duration: float, *, floor_sample: bool) -> None:
        if floor_sample:
            state.floor = duration if state.floor is None else min(state.floor, duration)
        # Until a read has shown the network's share, a write is charged its whole duration.
        cost = max(0.0, duration - (state.floor or 0.0))
        self._prune_costs(state, now)
        state.costs.append((now, cost))
        state.cost_total += cost
        if len(state.costs) > self.policy.history:
            state.cost_total -= state.costs.popleft()[1]
        state.recent_costs.append(cost)
        if len(state.recent_costs) > self.policy.cost_memory:
            state.recent_costs.popleft()

    def _learn(self, key: str, state: _KeyState, limit: NamedLimit | None) -> None:
        if isinstance(limit, RequestWindow):
            state.window = limit
            # Shared with the penalty, so another instance keeps to it from its first request.
            self.penalties.share_window(key, limit.limit, limit.seconds)
        elif isinstance(limit, ExecutionWindow):
            if state.execution is None:
                state.execution_share = self.policy.execution_share
            else:
                # Pushed back although the count kept inside: the count is short (a request's
                # duration only estimates its server time), so keep a wider margin from now on.
                state.execution_share = max(0.5, state.execution_share * 0.95)
            state.execution = limit
        elif isinstance(limit, ConcurrencyLimit):
            state.concurrency = limit.limit

    def push_back(self, key: str, retry_after: float, window: NamedLimit | None = None) -> None:
        """The CRM answered 429 outside a permit's own response (e.g. inside a ``$batch``)."""
        with self._lock:
            now = self._clock()
            state = self._state(key, now)
            self._learn(key, state, window)
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
            self._prune_costs(state, now)
            return KeySnapshot(
                rate=state.rate,
                tokens=tokens,
                in_flight=state.in_flight,
                penalty_remaining=self.penalties.local_remaining(key),
                pushed_back=state.pushed_back,
                window=state.window,
                in_flight_at_push_back=state.in_flight_at_push_back,
                execution=state.execution,
                execution_spent=state.cost_total,
                cost_estimate=max(state.recent_costs, default=0.0),
                concurrency_cap=self._cap(state),
            )

    def known_keys(self) -> list[str]:
        """The keys the pacer has seen."""
        with self._lock:
            return list(self._keys)


__all__ = [
    "ConcurrencyLimit",
    "Decision",
    "ExecutionWindow",
    "KeySnapshot",
    "NamedLimit",
    "Pacer",
    "PacingPolicy",
    "Permit",
    "RequestWindow",
    "Wait",
    "dop_hint_of",
    "limit_of",
    "request_window_of",
]
