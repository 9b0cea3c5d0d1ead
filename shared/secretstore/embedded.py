"""The embedded secret store: one SQLite file, every value encrypted at rest.

Values are sealed with AES-256-GCM and the (case-folded) secret name as associated data. GCM
authenticates as well as encrypts, and binding the name means a ciphertext copied from one row into
another (say, publisher A's password pasted under publisher B) fails to open instead of silently
handing B's pipeline A's credentials — Fernet alone would accept such a swap.

The key is ``LEADWRITER_SECRET_KEY`` (urlsafe base64 of 32 random bytes) or, when unset, a key file
``secret.key`` beside the database that is created once with mode 0600. Names, content types and
tags are stored in clear: they are not secret (publisher ids and record kinds), and listing needs them.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import secrets
import sqlite3
import stat
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from shared import datadir
from shared.errors import ConfigurationError
from shared.names import SECRET_KEY_FILE, SECRETS_FILE
from shared.secretstore.base import CONTENT_TYPE, validate_secret_name

logger = logging.getLogger(__name__)

KEY_FILE_NAME = SECRET_KEY_FILE
DB_FILE_NAME = SECRETS_FILE
_KEY_BYTES = 32
_NONCE_BYTES = 12
#: First byte of every sealed value, so a future format (or key rotation) can tell records apart.
_FORMAT_V1 = b"\x01"
#: A known plaintext sealed at creation: opening the store with another key fails at start, not on a lead.
_CHECK_NAME = "\x00leadwriter-key-check"
_CHECK_PLAINTEXT = b"leadwriter embedded secret store v1"
_BUSY_TIMEOUT_MS = 30_000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS secrets (
    name TEXT NOT NULL PRIMARY KEY COLLATE NOCASE,
    value BLOB NOT NULL,
    content_type TEXT NOT NULL,
    tags TEXT NOT NULL,
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (
    key TEXT NOT NULL PRIMARY KEY,
    value BLOB NOT NULL
);
"""


def decode_key(key: bytes | str) -> bytes:
    """Turn a configured key into 32 raw bytes.

    Accepts the raw 32 bytes or their urlsafe base64 encoding (what ``LEADWRITER_SECRET_KEY`` holds).
    Raises ConfigurationError when it is neither; the message never contains the key.
    """
    if isinstance(key, bytes) and len(key) == _KEY_BYTES:
        return key
    text = key.decode("ascii", errors="replace") if isinstance(key, bytes) else key
    try:
        raw = base64.urlsafe_b64decode(text.strip().encode("ascii"))
    except (binascii.Error, UnicodeEncodeError, ValueError):
        raw = b""
    if len(raw) != _KEY_BYTES:
        raise ConfigurationError(
            "invalid setting LEADWRITER_SECRET_KEY: expected the urlsafe base64 encoding of 32 random bytes"
        )
    return raw


def generate_key() -> str:
    """A new key in the form ``LEADWRITER_SECRET_KEY`` takes (urlsafe base64 of 32 random bytes)."""
    return base64.urlsafe_b64encode(secrets.token_bytes(_KEY_BYTES)).decode("ascii")


def load_or_create_key_file(key_file: Path) -> bytes:
    """Read the key from ``key_file``, creating it (mode 0600) with a fresh key if it does not exist.

    Raises ConfigurationError naming the file when it is readable by group or others, or does not
    hold a valid key.
    """
    if not key_file.exists():
        _create_key_file(key_file)
    if os.name == "posix":
        mode = stat.S_IMODE(key_file.stat().st_mode)
        if mode & 0o077:
            raise ConfigurationError(
                f"the secret key file {key_file} is accessible by group or others (mode {mode:o}); "
                f"run: chmod 600 {key_file}"
            )
    try:
        return decode_key(key_file.read_bytes())
    except ConfigurationError:
        raise ConfigurationError(f"the secret key file {key_file} does not hold a valid key") from None


def _create_key_file(key_file: Path) -> None:
    key_file.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    # Write the key into a private temporary file first, then hard-link it into place: the link is
    # atomic and fails if the name exists, so two processes starting at once agree on one key and
    # neither can read a half-written file. O_EXCL keeps the temporary file ours alone.
    tmp = key_file.with_name(f".{key_file.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(generate_key().encode("ascii") + b"\n")
            handle.flush()
            os.fsync(handle.fileno())
        try:
            os.link(tmp, key_file)
            logger.info("created secret key file %s", key_file)
        except FileExistsError:
            pass
    finally:
        tmp.unlink(missing_ok=True)


class EmbeddedSecretStore:
    """An encrypted SQLite :class:`~shared.secretstore.base.SecretStore` (WAL; safe across processes).

    Names are case-insensitive, as in Key Vault, so code that works locally behaves the same in Azure.
    """

    def __init__(self, path: Path, key: bytes | None = None, *, key_file: Path | None = None) -> None:
        """Open (or create) the store at ``path``.

        ``key`` is the raw 32-byte key or its urlsafe base64 encoding; without it the key is read from
        ``key_file`` (default ``secret.key`` beside the database), which is created if missing.
        Raises ConfigurationError for an invalid key, an unsafe key file, a key that cannot decrypt
        this store, or a read-only directory.
        """
        self.path = Path(path)
        datadir.prepare(self.path.parent)
        if key is not None:
            raw = decode_key(key)
            self._key_source = "LEADWRITER_SECRET_KEY"
        else:
            key_file = key_file or self.path.parent / KEY_FILE_NAME
            raw = load_or_create_key_file(key_file)
            self._key_source = str(key_file)
        self._aead = AESGCM(raw)
        self._lock = threading.Lock()
        self._conn = self._connect()
        self._check_key()

    def __repr__(self) -> str:
        return f"EmbeddedSecretStore({str(self.path)!r})"

    def _connect(self) -> sqlite3.Connection:
        # SQLite would create the file with the umask's mode; the -wal and -shm files copy the
        # database's mode, so creating it 0600 keeps all three private.
        datadir.private_file(self.path)
        conn = sqlite3.connect(
            self.path, timeout=_BUSY_TIMEOUT_MS / 1000, isolation_level=None, check_same_thread=False
        )
        conn.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}")
        # Switching a new file to WAL, and the first reads while another connection does so, can
        # answer "database is locked" at once without calling the busy handler (SQLite gives up
        # rather than wait on a WAL recovery): stores opened at the same moment retry, within the
        # same bound as the busy timeout.
        deadline = time.monotonic() + _BUSY_TIMEOUT_MS / 1000
        while True:
            try:
                conn.execute("PRAGMA journal_mode = WAL")
                conn.execute("PRAGMA synchronous = NORMAL")
                conn.executescript(_SCHEMA)
                return conn
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    conn.close()
                    raise
                time.sleep(0.05)

    def _check_key(self) -> None:
        with self._locked() as conn:
            row = conn.execute("SELECT value FROM meta WHERE key = 'key-check'").fetchone()
            if row is None:
                # INSERT OR IGNORE: a second process racing to initialise keeps the first check value.
                conn.execute(
                    "INSERT OR IGNORE INTO meta (key, value) VALUES ('key-check', ?)",
                    (self._seal(_CHECK_NAME, _CHECK_PLAINTEXT),),
                )
                row = conn.execute("SELECT value FROM meta WHERE key = 'key-check'").fetchone()
        try:
            self._open(_CHECK_NAME, bytes(row[0]))
        except InvalidTag:
            raise ConfigurationError(
                f"the embedded secret store cannot be decrypted with this key ({self._key_source}); "
                f"use the key it was created with, or move {self.path} aside to start empty"
            ) from None

    @contextmanager
    def _locked(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            try:
                yield self._conn
            except (sqlite3.Error, OSError) as exc:
                # A full disk (or a directory made read-only under us) is transient for the caller:
                # 503 with Retry-After at the API. The statement was rolled back: nothing half-written.
                problem = datadir.storage_problem(exc)
                if problem is None:
                    raise
                logger.error("the secret store %s could not be written: the data dir is %s", self.path, problem)
                raise datadir.unavailable(self.path.parent, problem) from None

    def _aad(self, name: str) -> bytes:
        return b"leadwriter-secret\x00" + name.lower().encode("utf-8")

    def _seal(self, name: str, plaintext: bytes) -> bytes:
        nonce = secrets.token_bytes(_NONCE_BYTES)
        return _FORMAT_V1 + nonce + self._aead.encrypt(nonce, plaintext, self._aad(name))

    def _open(self, name: str, sealed: bytes) -> bytes:
        if sealed[:1] != _FORMAT_V1:
            raise InvalidTag
        nonce, ciphertext = sealed[1 : 1 + _NONCE_BYTES], sealed[1 + _NONCE_BYTES :]
        return self._aead.decrypt(nonce, ciphertext, self._aad(name))

    def get(self, name: str) -> str | None:
        """The value of ``name``, or None.

        Raises InvalidSecretName for a malformed name, ConfigurationError when the stored value does
        not authenticate under this key and name (another key, or a tampered record).
        """
        validate_secret_name(name)
        with self._locked() as conn:
            row = conn.execute("SELECT value FROM secrets WHERE name = ?", (name,)).fetchone()
        if row is None:
            return None
        try:
            return self._open(name, bytes(row[0])).decode("utf-8")
        except InvalidTag:
            raise ConfigurationError(
                f"the embedded secret store cannot be decrypted with this key ({self._key_source}): "
                f"secret {name!r} was written with another key or altered"
            ) from None

    def put(
        self,
        name: str,
        value: str,
        *,
        content_type: str = CONTENT_TYPE,
        tags: Mapping[str, str] | None = None,
    ) -> None:
        """Create or replace ``name``, atomically.

        Raises InvalidSecretName for a malformed name, DataDirUnavailable (a RetryLater) when the data
        dir is full or read-only — and then nothing was stored.
        """
        validate_secret_name(name)
        sealed = self._seal(name, value.encode("utf-8"))
        with self._locked() as conn:
            # The conflict target keeps the first spelling of the name, as Key Vault does.
            conn.execute(
                "INSERT INTO secrets (name, value, content_type, tags, updated_at) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT (name) DO UPDATE SET value = excluded.value, "
                "content_type = excluded.content_type, tags = excluded.tags, "
                "updated_at = excluded.updated_at",
                (name, sealed, content_type, json.dumps(dict(tags or {}), sort_keys=True), time.time()),
            )

    def delete(self, name: str) -> bool:
        """Remove ``name``; True if it existed. Raises InvalidSecretName for a malformed name."""
        validate_secret_name(name)
        with self._locked() as conn:
            cursor = conn.execute("DELETE FROM secrets WHERE name = ?", (name,))
        return cursor.rowcount > 0

    def list_names(self, prefix: str = "") -> list[str]:
        """Names starting with ``prefix`` (compared case-insensitively), sorted."""
        with self._locked() as conn:
            rows = conn.execute("SELECT name FROM secrets").fetchall()
        folded = prefix.lower()
        return sorted(str(name) for (name,) in rows if str(name).lower().startswith(folded))

    def close(self) -> None:
        """Close the database connection."""
        with self._lock:
            self._conn.close()

    def __enter__(self) -> EmbeddedSecretStore:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
