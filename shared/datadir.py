"""The data dir (``LEADWRITER_DATA_DIR``, DESIGN §8): private, refused when read-only, watched when full.

What lives there — the embedded broker, the secret store, the status book, 429 penalties — holds names,
e-mail addresses and credentials, so the directory is 0700 and every file in it 0600 (SQLite's
``-wal`` and ``-shm`` files copy their database's mode). :func:`prepare` is called by whatever opens
the directory first; a read-only directory stops the process at start (``ConfigurationError`` naming
it) instead of failing every lead later. A full disk is not a reason to stop — space comes back — so
it is reported: :func:`storage_problem` recognises it in an error, writers turn it into a
:class:`DataDirUnavailable` (503 with ``Retry-After`` at the API, a rescheduled message in a stage),
and :class:`WritableProbe` lets ``/api/health`` say so cheaply.

Imports nothing of Lead Writer but its errors.
"""

from __future__ import annotations

import errno
import logging
import os
import secrets
import sqlite3
import stat
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Final

from shared.errors import ConfigurationError, RetryLater

logger = logging.getLogger(__name__)

DIR_MODE: Final = 0o700
FILE_MODE: Final = 0o600
#: Seconds a caller is asked to wait when the data dir cannot be written now.
RETRY_AFTER_SECONDS: Final = 30.0
#: Seconds :class:`WritableProbe` reuses its last answer (health must stay cheap).
PROBE_CACHE_SECONDS: Final = 5.0
#: Bytes the probe writes: enough to meet a full file system, small enough to cost nothing.
_PROBE_BYTES: Final = 4096
_SQLITE_SUFFIXES: Final = ("", "-wal", "-shm", "-journal")

_FULL = frozenset({errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)})
_READ_ONLY = frozenset({errno.EROFS, errno.EACCES, errno.EPERM})


class DataDirUnavailable(RetryLater):
    """The data dir cannot be written now (full, or made read-only under a running process)."""

    def __init__(self, message: str, *, retry_after: float | None = RETRY_AFTER_SECONDS) -> None:
        super().__init__(message, retry_after=retry_after)


def storage_problem(exc: BaseException) -> str | None:
    """``"full"`` or ``"read-only"`` when ``exc`` (an OSError or a sqlite3 error) says so, else None."""
    if isinstance(exc, OSError):
        if exc.errno in _FULL:
            return "full"
        if exc.errno in _READ_ONLY:
            return "read-only"
        return None
    if isinstance(exc, sqlite3.Error):
        code = getattr(exc, "sqlite_errorcode", None)
        text = str(exc).lower()
        if code == sqlite3.SQLITE_FULL or "database or disk is full" in text:
            return "full"
        if code == sqlite3.SQLITE_READONLY or "readonly database" in text or "read-only" in text:
            return "read-only"
    return None


def unavailable(path: Path, problem: str) -> DataDirUnavailable:
    """The error a writer raises for ``problem`` (from :func:`storage_problem`) in data dir ``path``."""
    return DataDirUnavailable(f"the data dir {path} is {problem}: nothing was stored; retry once there is room")


def _owned(st: os.stat_result) -> bool:
    return not hasattr(os, "getuid") or st.st_uid == os.getuid()


def prepare(path: Path) -> Path:
    """Create the data dir (mode 0700, or tighten it to 0700 when it is ours) and check it is writable.

    Returns the path. Raises ConfigurationError naming the directory when it cannot be created or is
    read-only (a full disk is not refused: see :class:`WritableProbe`).
    """
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True, mode=DIR_MODE)
        st = path.stat()
    except OSError as exc:
        raise ConfigurationError(
            f"the data dir {path} (LEADWRITER_DATA_DIR) cannot be created: {exc.strerror}"
        ) from None
    if not stat.S_ISDIR(st.st_mode):
        raise ConfigurationError(f"the data dir {path} (LEADWRITER_DATA_DIR) is not a directory")
    if os.name == "posix" and _owned(st) and stat.S_IMODE(st.st_mode) != DIR_MODE:
        try:
            path.chmod(DIR_MODE)
        except OSError as exc:
            logger.warning("could not make the data dir %s private: %s", path, exc.strerror)
    problem = probe(path)
    if problem is not None and problem != "full":
        raise ConfigurationError(
            f"the data dir {path} (LEADWRITER_DATA_DIR) is {problem}: Lead Writer stores its queues, "
            "secrets and state there and cannot start without writing to it"
        )
    if problem == "full":
        logger.error("the data dir %s is full: nothing can be stored until there is room", path)
    return path


def private_file(path: Path) -> Path:
    """Make sure ``path`` exists with mode 0600 (created so, or tightened when it is ours).

    For a SQLite database, call it before the first connect: its ``-wal`` and ``-shm`` files copy the
    database's mode. Existing companion files are tightened too. Raises OSError when it cannot be
    created (the caller knows what that means for it; see :func:`storage_problem`).
    """
    path = Path(path)
    if not path.exists():
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT, FILE_MODE))
    if os.name == "posix":
        for suffix in _SQLITE_SUFFIXES:
            companion = path.with_name(path.name + suffix)
            try:
                st = companion.stat()
            except FileNotFoundError:
                continue
            if _owned(st) and stat.S_IMODE(st.st_mode) & 0o077:
                companion.chmod(FILE_MODE)
    return path


def probe(path: Path) -> str | None:
    """Write, flush and remove a small file in ``path``: None when that works, else the problem
    (``"full"``, ``"read-only"``, or ``"not writable (<reason>)"``). Raises nothing."""
    target = Path(path) / f".probe-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
        try:
            os.write(fd, b"\0" * _PROBE_BYTES)
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        return storage_problem(exc) or f"not writable ({exc.strerror})"
    finally:
        try:
            target.unlink(missing_ok=True)
        except OSError:
            logger.debug("could not remove the probe file %s", target)
    return None


class WritableProbe:
    """:func:`probe` of one directory, its answer reused for :data:`PROBE_CACHE_SECONDS`. Thread-safe."""

    def __init__(
        self, path: Path, *, ttl: float = PROBE_CACHE_SECONDS, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.path = Path(path)
        self._ttl = ttl
        self._clock = clock
        self._lock = threading.Lock()
        self._checked_at: float | None = None
        self._answer: str | None = None

    def problem(self) -> str | None:
        """None when the directory was writable at the last probe, else what is wrong. Raises nothing."""
        with self._lock:
            now = self._clock()
            if self._checked_at is None or now - self._checked_at >= self._ttl:
                self._answer = probe(self.path)
                self._checked_at = now
            return self._answer
