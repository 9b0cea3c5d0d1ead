"""A rate limit for log lines: the same line at most a few times a second.

A line that can repeat thousands of times a second — an accept error while file descriptors run out,
a refused connection — must not fill the disk. :class:`RateLimitFilter` lets through at most
``per_second`` records of one kind (logger, level and message template) per second; the first one let
through after a suppression says how many were dropped. Installed on the root logger's handlers, so it
sees every record, whichever logger made it. Imports nothing of Lead Writer.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Final

DEFAULT_PER_SECOND: Final = 10
#: Kinds of line remembered at once; the least recent is forgotten first.
MAX_KINDS: Final = 1024


class RateLimitFilter(logging.Filter):
    """At most ``per_second`` records of each kind per one-second window (see the module docstring)."""

    def __init__(self, per_second: int = DEFAULT_PER_SECOND, *, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        if per_second < 1:
            raise ValueError("per_second must be at least 1")
        self.per_second = per_second
        self._clock = clock
        self._lock = threading.Lock()
        # kind → [window start, passed in this window, suppressed since the last line let through]
        self._kinds: OrderedDict[tuple[str, int, str], list[float]] = OrderedDict()

    def filter(self, record: logging.LogRecord) -> bool:
        kind = (record.name, record.levelno, str(record.msg))
        now = self._clock()
        with self._lock:
            state = self._kinds.get(kind)
            if state is None:
                state = [now, 0, 0]
                self._kinds[kind] = state
                if len(self._kinds) > MAX_KINDS:
                    self._kinds.popitem(last=False)
            else:
                self._kinds.move_to_end(kind)
            if now - state[0] >= 1.0:
                state[0], state[1] = now, 0
            if state[1] >= self.per_second:
                state[2] += 1
                return False
            state[1] += 1
            suppressed, state[2] = int(state[2]), 0
        if suppressed:
            record.msg = f"{record.getMessage()} ({suppressed} more like this were suppressed)"
            record.args = None
        return True


def install(root: logging.Logger | None = None, *, per_second: int = DEFAULT_PER_SECOND) -> RateLimitFilter:
    """Add one :class:`RateLimitFilter` to every handler of ``root`` (the root logger by default)."""
    target = root or logging.getLogger()
    limiter = RateLimitFilter(per_second)
    for handler in target.handlers:
        if not any(isinstance(f, RateLimitFilter) for f in handler.filters):
            handler.addFilter(limiter)
    return limiter
