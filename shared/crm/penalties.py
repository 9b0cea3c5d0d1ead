"""CRM service-protection penalties (DESIGN §5): after a 429, nothing goes to that CRM user until
``Retry-After`` has elapsed — from any stage, and across a restart of the process.

The :class:`Throttle` protocol is what the Dataverse client consults before every request.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Protocol

logger = logging.getLogger(__name__)


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


#: Secret-name prefix of shared penalties (Key Vault-safe; distinct from connections and API keys).
PENALTY_PREFIX = "penalty-"


class SharedPenaltyBook:
    """Penalties shared between instances through the secret store (Key Vault in Azure).

    On Azure Functions every instance has its own ``/tmp``: a 429 one instance received must keep the
    others away from that CRM user too. ``penalise`` records the penalty's end in the store as well as
    locally; ``remaining`` answers from the local book and looks at the store at most every
    ``refresh`` seconds per CRM user (a Key Vault read every few seconds, not one per CRM request).
    The store is best effort: when it cannot be read or written, the local book still holds.
    The secret's name is a hash of the CRM user, so no user name or URL is stored in it.
    """

    def __init__(
        self,
        store: SecretStoreLike,
        local: PenaltyBook,
        *,
        refresh: float = 2.0,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._store = store
        self._local = local
        self._refresh = refresh
        self._clock = clock
        self._monotonic = monotonic
        self._checked: dict[str, float] = {}
        self._lock = threading.Lock()

    @staticmethod
    def secret_name(key: str) -> str:
        return PENALTY_PREFIX + hashlib.sha256(key.encode()).hexdigest()[:48]

    def remaining(self, key: str) -> float:
        left = self._local.remaining(key)
        if left > 0:
            return left
        now = self._monotonic()
        with self._lock:
            if now - self._checked.get(key, float("-inf")) < self._refresh:
                return 0.0
            self._checked[key] = now
        try:
            value = self._store.get(self.secret_name(key))
        except Exception:  # noqa: BLE001 - a store outage must not stop deliveries; the local book holds
            logger.warning("shared penalty for a CRM user could not be read; using this instance's only")
            return 0.0
        try:
            until = float(value) if value else 0.0
        except ValueError:
            return 0.0
        seconds = until - self._clock()
        if seconds > 0:
            self._local.penalise(key, seconds)
            return seconds
        return 0.0

    def penalise(self, key: str, seconds: float) -> None:
        self._local.penalise(key, seconds)
        until = self._clock() + seconds
        try:
            current = self._store.get(self.secret_name(key))
            if current and float(current) >= until:
                return
            self._store.put(self.secret_name(key), f"{until:.3f}", content_type="text/plain", tags={"kind": "penalty"})
        except Exception:  # noqa: BLE001 - best effort: this instance is penalised either way
            logger.warning("shared penalty for a CRM user could not be recorded; only this instance holds it")


class SecretStoreLike(Protocol):
    """The part of :class:`shared.secretstore.base.SecretStore` the shared book uses."""

    def get(self, name: str) -> str | None: ...

    def put(
        self, name: str, value: str, *, content_type: str = ..., tags: Mapping[str, str] | None = None
    ) -> None: ...


def penalty_book_for(settings_data_dir: Path, shared_store: SecretStoreLike | None) -> Throttle:
    """The penalty book a process uses: the data dir's file, shared through ``shared_store`` when one
    is given (Key Vault in Azure, where instances do not share a disk)."""
    local = PenaltyBook(settings_data_dir / "penalties.json")
    return local if shared_store is None else SharedPenaltyBook(shared_store, local)
