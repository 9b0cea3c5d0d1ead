"""Publisher API keys (architecture §6): issued once, stored only as salted hashes, compared in constant time.

A key reads ``lw_<publisher>_<key id>_<secret>``: ``<publisher>`` is the publisher's secret-name
suffix (``secret_name_for(publisher_id, prefix="key-")`` without the prefix), so :meth:`verify` finds
the one record to check without scanning; ``<key id>`` is 8 hex digits that name the key in logs and
support requests without revealing it; ``<secret>`` is ``secrets.token_urlsafe(32)`` (256 random bits).
Each publisher has at most one key: issuing replaces the previous one.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import secrets
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Protocol

from shared.cache import TtlCache
from shared.names import TABLE_API_KEYS
from shared.secretstore.base import (
    CONTENT_TYPE,
    InvalidPublisherId,
    publisher_id_from_secret_name,
    secret_name_for,
    validate_publisher_id,
)
from shared.state.base import StateStore, safe_key

logger = logging.getLogger(__name__)

KEY_PREFIX = "lw_"
RECORD_PREFIX = "key-"
#: Longer than any key we issue (a 40-character publisher id encodes to at most 120 characters).
MAX_KEY_LENGTH = 256
_RECORD_VERSION = 1
#: Seconds a key record (or its absence) read from the store is reused. In Azure the store is Key
#: Vault, whose transaction budget every instance shares: a request must not cost a vault read. A key
#: revoked through another instance stops working here within this time.
RECORD_TTL = 30.0
_RECORD_ROW = "key"
_NO_RECORD = ""


def _digest(salt: bytes, key: str) -> str:
    # A fast keyed hash is enough here: the key carries 256 random bits, so guessing it from a leaked
    # record is infeasible at any hash speed. Slow hashes (scrypt, bcrypt) protect low-entropy human
    # passwords, and would only add latency to every authenticated request. The whole key is hashed,
    # publisher part included, so a key with its publisher part altered (in case, say) never verifies.
    return hmac.new(salt, key.encode("utf-8"), hashlib.sha256).hexdigest()


class ApiKeyStore:
    """Publisher API keys: issued once, stored only as salted hashes (record "key-<publisher secret-name
    suffix>" via secret_name_for(publisher_id, prefix="key-")) in a :class:`RecordStore` — the shared
    state store in a running service — compared in constant time, revocable."""

    def __init__(self, store: RecordStore, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._store = store
        self._records: TtlCache[str, str] = TtlCache(clock)

    def issue(self, publisher_id: str) -> str:
        """A new key for ``publisher_id``, replacing any previous one. Shown once: only its hash is kept.

        Raises InvalidPublisherId for a malformed id; the secret store's errors pass through.
        """
        validate_publisher_id(publisher_id)
        name = secret_name_for(publisher_id, prefix=RECORD_PREFIX)
        key_id = secrets.token_hex(4)
        key = f"{KEY_PREFIX}{name[len(RECORD_PREFIX):]}_{key_id}_{secrets.token_urlsafe(32)}"
        salt = secrets.token_bytes(16)
        record = {
            "v": _RECORD_VERSION,
            "publisherId": publisher_id,
            "keyId": key_id,
            "salt": salt.hex(),
            "hash": _digest(salt, key),
            "createdAt": datetime.now(UTC).isoformat(),
        }
        self._store.put(
            name,
            json.dumps(record, separators=(",", ":")),
            content_type=CONTENT_TYPE,
            tags={"publisherId": publisher_id, "kind": "apiKey", "keyId": key_id},
        )
        self._records.pop(name)
        logger.info("issued API key %s for publisher %s", key_id, publisher_id)
        return key

    def verify(self, key: str) -> str | None:
        """The publisher id ``key`` belongs to, or None for any key that is not a current valid key.

        Never raises for bad input; the secret store's own errors (e.g. SecretStoreUnavailable) pass
        through, so an outage is not mistaken for a wrong key.
        """
        parsed = self._parse(key)
        if parsed is None:
            return None
        name = parsed[1]
        value = self._records.get(name)
        if value is None:
            value = self._store.get(name) or _NO_RECORD
            self._records.put(name, value, RECORD_TTL)
        return self._match(key, parsed, value)

    def verify_cached(self, key: str) -> tuple[bool, str | None]:
        """``(True, verify(key))`` when the answer needs no read of the store (the key is malformed, or
        its record is cached), else ``(False, None)``: lets an event loop check a key without handing
        the check to a worker thread. Never raises."""
        parsed = self._parse(key)
        if parsed is None:
            return True, None
        value = self._records.get(parsed[1])
        if value is None:
            return False, None
        return True, self._match(key, parsed, value)

    @staticmethod
    def _match(key: str, parsed: tuple[str, str, str], value: str) -> str | None:
        publisher_id, name, key_id = parsed
        if value == _NO_RECORD:
            return None
        try:
            record = json.loads(value)
            salt = bytes.fromhex(record["salt"])
            expected = str(record["hash"])
            owner = record["publisherId"]
            stored_key_id = record["keyId"]
        except (ValueError, KeyError, TypeError):
            logger.warning("API key record %s is unreadable; treating it as no key", name)
            return None
        matches = hmac.compare_digest(_digest(salt, key).encode("ascii"), expected.encode("ascii", "replace"))
        if not matches or owner != publisher_id or stored_key_id != key_id:
            return None
        return publisher_id

    def revoke(self, publisher_id: str) -> bool:
        """Remove the publisher's key; True if it had one. Raises InvalidPublisherId for a malformed id."""
        name = secret_name_for(publisher_id, prefix=RECORD_PREFIX)
        revoked = self._store.delete(name)
        self._records.pop(name)
        if revoked:
            logger.info("revoked the API key of publisher %s", publisher_id)
        return revoked

    @staticmethod
    def _parse(key: object) -> tuple[str, str, str] | None:
        """(publisher id, record name, key id) from a well-formed key, else None."""
        if not isinstance(key, str) or len(key) > MAX_KEY_LENGTH or not key.startswith(KEY_PREFIX):
            return None
        parts = key[len(KEY_PREFIX) :].split("_", 2)
        if len(parts) != 3 or not all(parts):
            return None
        suffix, key_id, _secret = parts
        name = RECORD_PREFIX + suffix
        publisher_id = publisher_id_from_secret_name(name, prefix=RECORD_PREFIX)
        if publisher_id is None:
            return None
        try:
            # Only the canonical encoding names a record: Key Vault would match "key-CONTOSO" to
            # "key-contoso" case-insensitively, and the hash check should not be the only guard.
            if secret_name_for(publisher_id, prefix=RECORD_PREFIX) != name:
                return None
        except InvalidPublisherId:
            return None
        return publisher_id, name, key_id


class RecordStore(Protocol):
    """Where key records are kept: the part of a secret store's interface this module uses."""

    def get(self, name: str) -> str | None: ...

    def put(
        self, name: str, value: str, *, content_type: str = ..., tags: Mapping[str, str] | None = None
    ) -> None: ...

    def delete(self, name: str) -> bool: ...


class StateRecords:
    """Key records in the shared state store (table ``apikeys``): a record is a hash and a salt, not a
    secret, so it belongs with the state every instance shares rather than in Key Vault. A record
    still in the secret store (written by an earlier version) is read from there once and moved."""

    def __init__(self, state: StateStore, legacy: RecordStore | None = None) -> None:
        self._state = state
        self._legacy = legacy

    def get(self, name: str) -> str | None:
        entity = self._state.get(TABLE_API_KEYS, safe_key(name), _RECORD_ROW)
        if entity is not None:
            value = entity.data.get("record")
            return value if isinstance(value, str) else None
        if self._legacy is None:
            return None
        value = self._legacy.get(name)
        if value is not None:
            self.put(name, value)
            self._legacy.delete(name)
        return value

    def put(
        self, name: str, value: str, *, content_type: str = CONTENT_TYPE, tags: Mapping[str, str] | None = None
    ) -> None:
        self._state.upsert(TABLE_API_KEYS, safe_key(name), _RECORD_ROW, {"record": value, **dict(tags or {})})

    def delete(self, name: str) -> bool:
        removed = self._state.delete(TABLE_API_KEYS, safe_key(name), _RECORD_ROW)
        if self._legacy is not None and self._legacy.delete(name):
            removed = True
        return removed
