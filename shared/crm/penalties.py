"""CRM service-protection penalties: after a 429, nothing goes to that CRM user until its
``Retry-After`` has elapsed — from any stage, any process, any instance, and across a restart. The
request window a 429 names is shared alongside, so every instance paces within it from the start.

:class:`Penalties` is the one record of them. The pacer (:mod:`shared.crm.pacing`) consults it before
granting a request and records every push-back in it; nothing else tracks a penalty. It keeps each
penalty's end on the monotonic clock (a wall-clock step cannot cut a penalty short or stretch it) and
shares it through a :class:`PenaltyStore` as a wall-clock time, bounded on the way back in:

- :class:`FilePenaltyStore` — a JSON file in the data dir (the processes of one machine);
- :class:`StatePenaltyStore` — the shared state store (every process on a data dir, every Azure instance);
- :class:`MemoryPenaltyStore` — one process only (tests, tools).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from shared.http import MAX_RETRY_AFTER
from shared.names import TABLE_CRM_LIMITS
from shared.state.base import StateStore

logger = logging.getLogger(__name__)

#: Penalties remembered per process at most (CRM users); the oldest-ending are forgotten first.
MAX_KEYS = 10_000
#: Seconds between looks for a request window another instance learnt, per CRM user.
WINDOW_REFRESH = 5.0
_PENALTY_PARTITION = "penalty"
_WINDOW_PARTITION = "window"


class PenaltyStore(Protocol):
    """Where penalty ends (wall-clock epoch seconds) are shared between processes."""

    #: How often (seconds) :class:`Penalties` may look at the store for one key.
    refresh_interval: float

    def read(self, key: str) -> float | None:
        """The stored end of ``key``'s penalty, or None. Raises on a store failure."""
        ...

    def extend(self, key: str, until: float) -> None:
        """Keep ``until`` unless a later end is stored already. Raises on a store failure."""
        ...

    def read_window(self, key: str) -> tuple[int, float] | None:
        """The request window (limit, seconds) a 429 named for ``key``, or None. Raises on a failure."""
        ...

    def share_window(self, key: str, limit: int, seconds: float) -> None:
        """Record the request window a 429 named. Raises on a store failure."""
        ...


class MemoryPenaltyStore:
    """No sharing: the penalties of this process only."""

    refresh_interval = float("inf")

    def read(self, key: str) -> float | None:
        return None

    def extend(self, key: str, until: float) -> None:
        return None

    def read_window(self, key: str) -> tuple[int, float] | None:
        return None

    def share_window(self, key: str, limit: int, seconds: float) -> None:
        return None


class FilePenaltyStore:
    """A JSON object ``{key: until}`` in one file, replaced atomically; re-read when it changed."""

    refresh_interval = 0.0

    def __init__(self, path: Path, *, wall: Callable[[], float] = time.time) -> None:
        self._path = path
        self._wall = wall
        self._lock = threading.Lock()
        self._mtime = -1.0
        self._data: dict[str, float] = {}

    def _load(self) -> None:
        try:
            mtime = self._path.stat().st_mtime
        except FileNotFoundError:
            return
        if mtime == self._mtime:
            return
        try:
            data = json.loads(self._path.read_text())
        except (OSError, ValueError):
            return
        self._mtime = mtime
        if isinstance(data, dict):
            self._data = {k: float(v) for k, v in data.items() if isinstance(v, int | float)}

    def read(self, key: str) -> float | None:
        with self._lock:
            self._load()
            return self._data.get(key)

    def extend(self, key: str, until: float) -> None:
        with self._lock:
            self._load()
            now = self._wall()
            self._data[key] = max(self._data.get(key, 0.0), until)
            self._data = {k: v for k, v in self._data.items() if v > now}
            self._path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self._path.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as handle:
                handle.write(json.dumps(self._data))
            os.replace(tmp, self._path)
            self._mtime = self._path.stat().st_mtime

    def read_window(self, key: str) -> tuple[int, float] | None:
        # One machine's processes: each learns the window from its own first 429.
        return None

    def share_window(self, key: str, limit: int, seconds: float) -> None:
        return None


class Penalties:
    """The penalty of each CRM user (``<origin>|<principal>``). Thread-safe.

    ``remaining`` answers from memory and looks at the store at most every ``refresh`` seconds per
    key; ``local_remaining`` never does I/O (the pacer asks it under its lock). The store is best
    effort: when it cannot be read or written, this process's record still holds.
    """

    def __init__(
        self,
        store: PenaltyStore | None = None,
        *,
        refresh: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self._store: PenaltyStore = store or MemoryPenaltyStore()
        self._refresh = self._store.refresh_interval if refresh is None else refresh
        self._clock = clock
        self._wall = wall
        self._lock = threading.Lock()
        self._until: dict[str, float] = {}
        self._checked: dict[str, float] = {}
        #: Request windows the CRM named in a 429 (limit, seconds), learnt here or by another instance.
        self._windows: dict[str, tuple[int, float]] = {}
        self._window_checked: dict[str, float] = {}

    def local_remaining(self, key: str) -> float:
        """Seconds left in ``key``'s penalty as this process knows it (0 when none); no I/O."""
        with self._lock:
            left = self._until.get(key, 0.0) - self._clock()
        return left if left > 0 else 0.0

    def remaining(self, key: str) -> float:
        """Seconds left in ``key``'s penalty, consulting the store when it is due. Raises nothing."""
        left = self.local_remaining(key)
        if left > 0:
            return left
        now = self._clock()
        with self._lock:
            last = self._checked.get(key)
            if last is not None and now - last < self._refresh:
                return 0.0
            self._checked[key] = now
            self._bound(self._checked)
        try:
            until = self._store.read(key)
            window = self._store.read_window(key) if self._window_due(key, now) else None
        except Exception:  # noqa: BLE001 - a store outage must not stop deliveries; our own record holds
            logger.warning("the shared penalty of a CRM user could not be read; using this process's record")
            return 0.0
        if window is not None:
            with self._lock:
                self._windows[key] = window
        if until is None:
            return 0.0
        seconds = min(until - self._wall(), MAX_RETRY_AFTER)
        if seconds <= 0:
            return 0.0
        self._hold(key, seconds)
        return seconds

    def penalise(self, key: str, seconds: float) -> None:
        """Record that ``key`` may not be called for ``seconds`` from now, here and in the store."""
        seconds = min(max(seconds, 0.0), MAX_RETRY_AFTER)
        self._hold(key, seconds)
        try:
            self._store.extend(key, self._wall() + seconds)
        except Exception:  # noqa: BLE001 - best effort: this process is held either way
            logger.warning("the penalty of a CRM user could not be shared; only this process holds it")

    def _window_due(self, key: str, now: float) -> bool:
        """Whether to look for a window another instance learnt: not once one is known, and at most
        every WINDOW_REFRESH seconds (the penalty is read before every request on one machine)."""
        with self._lock:
            if key in self._windows:
                return False
            last = self._window_checked.get(key)
            if last is not None and now - last < WINDOW_REFRESH:
                return False
            self._window_checked[key] = now
            self._bound(self._window_checked)
            return True

    def window(self, key: str) -> tuple[int, float] | None:
        """The request window (limit, seconds) known for ``key`` — learnt here, or read from the
        store by :meth:`remaining` (another instance met the 429). No I/O."""
        with self._lock:
            return self._windows.get(key)

    def share_window(self, key: str, limit: int, seconds: float) -> None:
        """Record the request window a 429 named for ``key``, here and in the store (best effort)."""
        with self._lock:
            self._windows[key] = (limit, seconds)
            if len(self._windows) > MAX_KEYS:
                self._windows.pop(next(iter(self._windows)))
        try:
            self._store.share_window(key, limit, seconds)
        except Exception:  # noqa: BLE001 - best effort: this process keeps to it either way
            logger.warning("the request window of a CRM user could not be shared; only this process knows it")

    def _hold(self, key: str, seconds: float) -> None:
        with self._lock:
            until = self._clock() + seconds
            self._until[key] = max(self._until.get(key, 0.0), until)
            self._bound(self._until)

    @staticmethod
    def _bound(table: dict[str, float]) -> None:
        if len(table) > MAX_KEYS:
            for key in sorted(table, key=table.__getitem__)[: len(table) - MAX_KEYS]:
                del table[key]


class StatePenaltyStore:
    """Penalty ends in the shared state store (table ``crmlimits``, one row per CRM user): what every
    Azure instance, and every process on one data dir, consults. The row key is a hash of the CRM
    user, so no user name or URL is stored; extending keeps the later end (an ETag-conditional
    read-modify-write, so two instances meeting a 429 at once lose neither)."""

    def __init__(self, store: StateStore, *, refresh_interval: float = 1.0) -> None:
        self._store = store
        self.refresh_interval = refresh_interval

    @staticmethod
    def row(key: str) -> str:
        return hashlib.sha256(key.encode()).hexdigest()[:48]

    def read(self, key: str) -> float | None:
        entity = self._store.get(TABLE_CRM_LIMITS, _PENALTY_PARTITION, self.row(key))
        if entity is None:
            return None
        until = entity.data.get("until")
        return float(until) if isinstance(until, int | float) else None

    def extend(self, key: str, until: float) -> None:
        def later(current: dict[str, Any] | None) -> dict[str, Any]:
            stored = (current or {}).get("until")
            if isinstance(stored, int | float) and stored >= until:
                return dict(current or {})
            return {"until": until}

        self._store.update(TABLE_CRM_LIMITS, _PENALTY_PARTITION, self.row(key), later)

    def read_window(self, key: str) -> tuple[int, float] | None:
        entity = self._store.get(TABLE_CRM_LIMITS, _WINDOW_PARTITION, self.row(key))
        if entity is None:
            return None
        limit, seconds = entity.data.get("limit"), entity.data.get("seconds")
        if isinstance(limit, int) and isinstance(seconds, int | float) and limit > 0 and seconds > 0:
            return limit, float(seconds)
        return None

    def share_window(self, key: str, limit: int, seconds: float) -> None:
        self._store.upsert(
            TABLE_CRM_LIMITS, _WINDOW_PARTITION, self.row(key), {"limit": int(limit), "seconds": float(seconds)}
        )
