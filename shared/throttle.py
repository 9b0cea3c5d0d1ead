"""CRM service-protection penalties (DESIGN §5): after a 429, nothing goes to that CRM user until
``Retry-After`` has elapsed — from any stage, and across a restart of the process.

The :class:`Throttle` protocol is what the Dataverse client consults before every request.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol


class Throttle(Protocol):
    def remaining(self, key: str) -> float:
        """Seconds left in the penalty for ``key`` (0 when none)."""
        ...

    def penalise(self, key: str, seconds: float) -> None:
        """Record that ``key`` may not be called for ``seconds`` from now."""


class PenaltyBook:
    """Penalties kept in memory and, when ``path`` is given, in a JSON file a restarted process reads.

    Uses wall-clock time for the persisted end times (a restart loses the monotonic clock).
    """

    def __init__(self, path: Path | None = None, *, clock: Callable[[], float] = time.time) -> None:
        self._path = path
        self._clock = clock
        self._lock = threading.Lock()
        self._until: dict[str, float] = {}
        self._mtime = 0.0
        self._load()

    def _load(self) -> None:
        if self._path is None or not self._path.exists():
            return
        try:
            stat = self._path.stat()
            if stat.st_mtime == self._mtime:
                return
            data = json.loads(self._path.read_text())
            self._mtime = stat.st_mtime
        except (OSError, ValueError):
            return
        if isinstance(data, dict):
            for key, until in data.items():
                if isinstance(until, int | float):
                    self._until[key] = max(self._until.get(key, 0.0), float(until))

    def remaining(self, key: str) -> float:
        with self._lock:
            # Another process (another stage worker) may have recorded a penalty.
            self._load()
            left = self._until.get(key, 0.0) - self._clock()
            return left if left > 0 else 0.0

    def penalise(self, key: str, seconds: float) -> None:
        with self._lock:
            self._load()
            now = self._clock()
            self._until[key] = max(self._until.get(key, 0.0), now + seconds)
            self._until = {k: v for k, v in self._until.items() if v > now}
            if self._path is not None:
                self._path.parent.mkdir(parents=True, exist_ok=True)
                tmp = self._path.with_suffix(f".{os.getpid()}.tmp")
                tmp.write_text(json.dumps(self._until))
                os.replace(tmp, self._path)
                self._mtime = self._path.stat().st_mtime
