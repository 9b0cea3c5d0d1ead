"""Dataverse service protection limits, per user per org (architecture §4).

Three limits over a sliding window: number of requests, combined execution time, and concurrent
requests. Going over one answers 429 with ``Retry-After``; a request that arrives before the
Retry-After has elapsed is refused again and restarts the penalty ("sending again extends it").
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

REQUESTS_CODE = "0x80072322"
EXECUTION_CODE = "0x80072321"
CONCURRENCY_CODE = "0x80072326"


@dataclass(frozen=True)
class Limits:
    requests_per_window: int = 6000
    window_seconds: float = 300.0
    execution_seconds_per_window: float = 1200.0
    max_concurrent: int = 52

    def __post_init__(self) -> None:
        if self.requests_per_window < 1 or self.window_seconds <= 0:
            raise ValueError("limits need at least one request over a positive window")
        if self.execution_seconds_per_window <= 0 or self.max_concurrent < 1:
            raise ValueError("execution time and concurrency limits must be positive")


@dataclass(frozen=True)
class ExecutionModel:
    """How much server execution time (milliseconds) an org spends per record written, by the call
    that writes it: a create of its own (``POST``/``PATCH leads``), one part of a ``$batch``, one
    target of ``CreateMultiple``; and per request besides (WhoAmI, queries, the $batch envelope).

    The simulator really spends that time (the response leaves that much later, as on a busy server)
    and charges it to the user's execution-time budget. All zero (the default): only the time the
    handler actually takes is charged. Microsoft's bulk-operations sample puts the ratio at about
    10 : 4 : 1 for one by one, ExecuteMultiple and CreateMultiple (architecture §4).
    """

    create_ms: float = 0.0
    batch_part_ms: float = 0.0
    create_multiple_ms: float = 0.0
    request_ms: float = 0.0

    def __post_init__(self) -> None:
        if min(self.create_ms, self.batch_part_ms, self.create_multiple_ms, self.request_ms) < 0:
            raise ValueError("execution times must not be negative")


@dataclass(frozen=True)
class Rejection:
    """Why a request is refused: the Dataverse error code and message, and the penalty in seconds."""

    code: str
    message: str
    retry_after: float
    during_penalty: bool

    @property
    def retry_after_header(self) -> str:
        return str(max(1, math.ceil(self.retry_after)))


@dataclass
class _UserState:
    requests: deque[float] = field(default_factory=deque)
    executions: deque[tuple[float, float]] = field(default_factory=deque)
    execution_total: float = 0.0
    in_flight: int = 0
    penalty_until: float = 0.0
    penalty_seconds: float = 0.0
    penalty_code: str = REQUESTS_CODE
    penalty_message: str = ""


class ServiceProtection:
    """The limits of one org, kept per principal. Thread-safe."""

    def __init__(self, limits: Limits, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.limits = limits
        self._clock = clock
        self._lock = threading.Lock()
        self._users: dict[str, _UserState] = {}

    def _messages(self) -> dict[str, str]:
        lim = self.limits
        return {
            REQUESTS_CODE: (
                f"Number of requests exceeded the limit of {lim.requests_per_window} "
                f"over time window of {lim.window_seconds:g} seconds."
            ),
            EXECUTION_CODE: (
                "Combined execution time of incoming requests exceeded limit of "
                f"{round(lim.execution_seconds_per_window * 1000):,} milliseconds over time window of "
                f"{lim.window_seconds:g} seconds. Decrease number of concurrent requests or reduce the "
                "duration of requests and try again later."
            ),
            CONCURRENCY_CODE: f"Number of concurrent requests exceeded the limit of {lim.max_concurrent}.",
        }

    def _prune(self, state: _UserState, now: float) -> None:
        horizon = now - self.limits.window_seconds
        while state.requests and state.requests[0] <= horizon:
            state.requests.popleft()
        while state.executions and state.executions[0][0] <= horizon:
            state.execution_total -= state.executions.popleft()[1]

    def admit(self, principal: str) -> Rejection | None:
        """Admit a request of ``principal`` (then :meth:`done` must follow) or say why it is refused."""
        with self._lock:
            now = self._clock()
            state = self._users.setdefault(principal, _UserState())
            if now < state.penalty_until:
                state.penalty_until = now + state.penalty_seconds
                return Rejection(state.penalty_code, state.penalty_message, state.penalty_seconds, True)
            self._prune(state, now)
            lim = self.limits
            code: str | None = None
            wait = 1.0
            if len(state.requests) >= lim.requests_per_window:
                code, wait = REQUESTS_CODE, state.requests[0] + lim.window_seconds - now
            elif state.execution_total >= lim.execution_seconds_per_window:
                code, wait = EXECUTION_CODE, state.executions[0][0] + lim.window_seconds - now
            elif state.in_flight >= lim.max_concurrent:
                code = CONCURRENCY_CODE
            if code is not None:
                seconds = float(max(1, math.ceil(wait)))
                message = self._messages()[code]
                self._start_penalty(state, now, seconds, code, message)
                return Rejection(code, message, seconds, False)
            state.requests.append(now)
            state.in_flight += 1
            return None

    def done(self, principal: str, elapsed: float) -> None:
        """Record the end of an admitted request that ran for ``elapsed`` seconds."""
        with self._lock:
            state = self._users.setdefault(principal, _UserState())
            state.in_flight = max(0, state.in_flight - 1)
            state.executions.append((self._clock(), elapsed))
            state.execution_total += elapsed

    def penalise(self, principal: str, seconds: float) -> Rejection:
        """Start a penalty of ``seconds`` for ``principal`` as if it had hit the request limit."""
        with self._lock:
            state = self._users.setdefault(principal, _UserState())
            message = self._messages()[REQUESTS_CODE]
            self._start_penalty(state, self._clock(), seconds, REQUESTS_CODE, message)
            return Rejection(REQUESTS_CODE, message, seconds, False)

    @staticmethod
    def _start_penalty(state: _UserState, now: float, seconds: float, code: str, message: str) -> None:
        state.penalty_until = now + seconds
        state.penalty_seconds = seconds
        state.penalty_code = code
        state.penalty_message = message

    def in_penalty(self, principal: str) -> bool:
        with self._lock:
            state = self._users.get(principal)
            return state is not None and self._clock() < state.penalty_until
