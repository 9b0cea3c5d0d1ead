"""The state port (architecture §2, STYLE habits 8 and 12): an entity store with Azure Table semantics.

An entity is addressed by ``(table, partition, row)`` and holds a JSON object (``data``) plus an
``etag`` that changes on every write. Writes that two instances can race on are conditional on the
etag (``replace``, ``delete(etag=…)``); :func:`optimistic_update` builds a lost-update-free
read-modify-write on top of them, which is what counters and penalty extensions use.

Every adapter enforces the same naming and size rules (Azure Tables' rules), so code that works on
the embedded default cannot break when it meets Table Storage:

* table names: ``^[A-Za-z][A-Za-z0-9]{2,62}$``, not ``tables``, compared case-insensitively;
* partition and row keys: no ``/ \\ # ?`` and no control characters, at most 1 KiB (as UTF-16, which
  is how Table Storage counts); :func:`safe_key` turns any text into such a key, injectively;
* ``data``: a JSON object whose serialised form fits one string property, 64 KiB as UTF-16.

Errors (to move into ``shared/errors.py`` when merging)::

    LeadWriterError
    ├── RetryLater
    │   └── StateUnavailable         the store could not be reached or failed; also after
    │                                ``update`` ran out of attempts
    ├── InvalidInput
    │   └── InvalidStateKey          a table name or key outside the rules above
    ├── StateConflict                insert of an entity that exists
    ├── StatePreconditionFailed      the etag no longer matches: another writer won
    ├── StateNotFound                replace of an entity that does not exist (any more)
    └── StateValueTooLarge           ``data`` does not fit one Table property

This module imports nothing from Azure and nothing from the stages that use the port.
"""

from __future__ import annotations

import json
import logging
import random
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from shared.errors import InvalidInput, LeadWriterError, RetryLater

logger = logging.getLogger(__name__)

#: Table names every adapter accepts (Azure Tables' rule; ``tables`` is reserved there).
TABLE_NAME_PATTERN = re.compile(r"^[A-Za-z][A-Za-z0-9]{2,62}$")
_RESERVED_TABLE_NAMES = frozenset({"tables"})

#: Characters Table Storage refuses in PartitionKey and RowKey: ``/ \ # ?`` and control characters
#: (U+0000-U+001F, U+007F-U+009F).
_FORBIDDEN_KEY_CHARS = re.compile(r"[/\\#?\x00-\x1f\x7f-\x9f]")
#: ``safe_key`` escapes the forbidden characters, its own escape character ``!``, and two that are
#: allowed but have a history of trouble in Table keys: ``%`` (some Table APIs once decoded it a second
#: time; Azurite and Storage Explorer had bugs with it) and ``'`` (doubled inside OData key literals).
_SAFE_KEY_ESCAPE = "!"
_ESCAPED_BY_SAFE_KEY = re.compile(r"[!%'/\\#?\x00-\x1f\x7f-\x9f]")
_SAFE_KEY_SEQUENCE = re.compile(r"!([0-9A-F]{2})")
#: Table Storage's key limit: 1 KiB, counted as UTF-16 (512 characters of the Basic Multilingual Plane).
MAX_KEY_BYTES = 1024
#: Table Storage's limit for one string property: 64 KiB as UTF-16 (32 Ki characters of the BMP).
#: ``data`` travels as one such property (``json``), so its serialised form must fit.
MAX_VALUE_BYTES = 64 * 1024

#: How often :func:`optimistic_update` reads and tries again before it gives up.
DEFAULT_UPDATE_ATTEMPTS = 20


class StateUnavailable(RetryLater):
    """The state store could not be reached or failed; try again later."""


class StateConflict(LeadWriterError):
    """``insert`` of an entity that already exists."""


class StatePreconditionFailed(LeadWriterError):
    """A conditional write was refused: the entity's etag no longer matches (another writer won)."""


class StateNotFound(LeadWriterError):
    """A conditional write addressed an entity that does not exist (any more)."""


class StateValueTooLarge(LeadWriterError):
    """``data`` serialises to more than one Table Storage string property holds (64 KiB as UTF-16)."""


class InvalidStateKey(InvalidInput):
    """A table name, partition key or row key outside the rules every adapter shares."""


@dataclass(frozen=True)
class Entity:
    """One stored entity. ``data`` is a fresh dict per read: changing it changes nothing stored."""

    table: str
    partition: str
    row: str
    data: dict[str, Any]
    etag: str


#: ``change`` for :meth:`StateStore.update`: the current data (None when absent) → the new data
#: (None deletes). It may be called more than once (once per attempt), so it must not have effects.
Change = Callable[[dict[str, Any] | None], Mapping[str, Any] | None]


@runtime_checkable
class StateStore(Protocol):
    """The state port. Every method raises StateUnavailable when the store cannot answer, and
    InvalidStateKey for a table name or key outside the rules (see the module docstring)."""

    def get(self, table: str, partition: str, row: str) -> Entity | None:
        """The entity, or None when there is none."""
        ...

    def insert(self, table: str, partition: str, row: str, data: Mapping[str, Any]) -> Entity:
        """Create the entity. Raises StateConflict when it exists, StateValueTooLarge."""
        ...

    def replace(self, table: str, partition: str, row: str, data: Mapping[str, Any], *, etag: str) -> Entity:
        """Replace the entity's data if its etag is still ``etag``.

        Raises StatePreconditionFailed when it is not (another writer won; nothing changes),
        StateNotFound when the entity is gone, StateValueTooLarge.
        """
        ...

    def upsert(self, table: str, partition: str, row: str, data: Mapping[str, Any]) -> Entity:
        """Create or replace the entity, unconditionally. Raises StateValueTooLarge."""
        ...

    def delete(self, table: str, partition: str, row: str, *, etag: str | None = None) -> bool:
        """Delete the entity; True if there was one. With ``etag``, only if it still matches:
        raises StatePreconditionFailed (and deletes nothing) when it does not."""
        ...

    def query(
        self,
        table: str,
        partition: str | None = None,
        *,
        row_prefix: str | None = None,
        limit: int | None = None,
    ) -> list[Entity]:
        """Entities of ``table`` (of one ``partition``, rows starting with ``row_prefix``), at most
        ``limit``, ordered by (partition, row) in code-point order."""
        ...

    def update(
        self,
        table: str,
        partition: str,
        row: str,
        change: Change,
        *,
        attempts: int = DEFAULT_UPDATE_ATTEMPTS,
    ) -> dict[str, Any] | None:
        """Read-modify-write without lost updates (see :func:`optimistic_update`); returns the data
        written (None when ``change`` deleted or left nothing). Raises StateUnavailable when
        ``attempts`` ran out, StateValueTooLarge."""
        ...

    def health(self) -> None:
        """Return if the store answers; raise StateUnavailable otherwise."""
        ...

    def close(self) -> None:
        """Release connections. The store must not be used afterwards."""
        ...


# -- names -----------------------------------------------------------------------------------------


def validate_table(name: str) -> str:
    """Return ``name`` if it is a table name every adapter accepts; raise InvalidStateKey otherwise."""
    if not isinstance(name, str) or not TABLE_NAME_PATTERN.fullmatch(name):
        raise InvalidStateKey("table names must be 3-63 letters and digits, starting with a letter", field="table")
    if name.lower() in _RESERVED_TABLE_NAMES:
        raise InvalidStateKey(f"table name {name!r} is reserved by Table Storage", field="table")
    return name


def validate_key(key: str, field: str = "key") -> str:
    """Return ``key`` if it is a partition or row key every adapter accepts; raise InvalidStateKey.

    Use :func:`safe_key` to turn arbitrary text (a URL, a user name) into a valid key.
    """
    if not isinstance(key, str):
        raise InvalidStateKey(f"{field} must be a string", field=field)
    if _FORBIDDEN_KEY_CHARS.search(key):
        raise InvalidStateKey(
            f"{field} must not contain '/', '\\', '#', '?' or control characters (use safe_key)", field=field
        )
    if _utf16_size(key) > MAX_KEY_BYTES:
        raise InvalidStateKey(f"{field} is longer than {MAX_KEY_BYTES} bytes as UTF-16", field=field)
    return key


def safe_key(text: str) -> str:
    """Escape ``text`` into a valid key, injectively: each forbidden character, and ``!``, ``%`` and
    ``'``, becomes ``!XX`` (its code in hex); nothing else changes. :func:`key_text` undoes it.

    Because the escape character is escaped too, two different texts never share a key, and keys of
    plain text (letters, digits, ``-``, ``.``, ``:``, ``@``, any non-ASCII letter) stay readable:
    ``https://contoso.crm4.dynamics.com/`` → ``https:!2F!2Fcontoso.crm4.dynamics.com!2F``. The result
    can still be longer than a key may be; the store refuses that with InvalidStateKey.
    """
    return _ESCAPED_BY_SAFE_KEY.sub(_escape, text)


def key_text(key: str) -> str:
    """The text :func:`safe_key` made ``key`` from."""
    return _SAFE_KEY_SEQUENCE.sub(lambda match: chr(int(match.group(1), 16)), key)


def _escape(match: re.Match[str]) -> str:
    # Every escaped character is at most U+009F, so two hex digits always suffice.
    return f"{_SAFE_KEY_ESCAPE}{ord(match.group()):02X}"


def _utf16_size(text: str) -> int:
    # "surrogatepass": a lone surrogate still counts as the two bytes it would take.
    return len(text.encode("utf-16-le", "surrogatepass"))


# -- values ----------------------------------------------------------------------------------------


def encode_data(data: Mapping[str, Any]) -> str:
    """``data`` as the compact JSON text the adapters store.

    Raises TypeError for data that is not a JSON object of JSON values (NaN and infinities included,
    which JSON cannot carry), StateValueTooLarge when the text exceeds MAX_VALUE_BYTES as UTF-16.
    """
    if not isinstance(data, Mapping):
        raise TypeError(f"state data must be a mapping, not {type(data).__name__}")
    try:
        text = json.dumps(dict(data), ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    except ValueError as exc:
        raise TypeError(f"state data is not JSON-serialisable: {exc}") from exc
    size = _utf16_size(text)
    if size > MAX_VALUE_BYTES:
        raise StateValueTooLarge(
            f"state data serialises to {size} bytes as UTF-16; one Table Storage property holds at most "
            f"{MAX_VALUE_BYTES} (split it over several rows)"
        )
    return text


def decode_data(text: str) -> dict[str, Any]:
    """The stored JSON text back as a fresh dict."""
    value = json.loads(text)
    if not isinstance(value, dict):
        raise StateUnavailable("a stored state entity does not hold a JSON object")
    return value


def prefix_upper_bound(prefix: str) -> str | None:
    """The smallest string above every string that starts with ``prefix`` (for a range query
    ``prefix <= key < bound``), or None when there is none to express (empty prefix, or one
    ending in U+10FFFF). Incrementing the last character keeps the bound right in both code-point
    and UTF-16 order; callers still check ``startswith`` for the rare characters where the two differ.
    """
    if not prefix:
        return None
    last = ord(prefix[-1])
    if last >= 0x10FFFF:
        return None
    nxt = last + 1
    if 0xD800 <= nxt <= 0xDFFF:
        # Skip the surrogate range: no key character lies inside it.
        nxt = 0xE000
    return prefix[:-1] + chr(nxt)


# -- optimistic read-modify-write ------------------------------------------------------------------


def _backoff(attempt: int) -> float:
    # Full jitter: two writers that collided must not retry in step, or they collide again.
    return random.uniform(0.0, min(0.002 * 2**attempt, 0.2))


def optimistic_update(
    store: StateStore,
    table: str,
    partition: str,
    row: str,
    change: Change,
    *,
    attempts: int = DEFAULT_UPDATE_ATTEMPTS,
    sleep: Callable[[float], None] = time.sleep,
) -> dict[str, Any] | None:
    """Apply ``change`` to the entity's data without losing a concurrent writer's update.

    Each attempt reads the entity, calls ``change`` on (a copy of) its data, and writes the result
    conditionally: ``insert`` when there was none, ``replace``/``delete`` on the etag read. When
    another writer got in between (conflict, stale etag, vanished entity) it reads again, after a
    short jittered pause. A result equal to what is stored writes nothing. Returns the data now
    stored (None when there is none). Raises StateUnavailable after ``attempts`` lost races.
    """
    if attempts < 1:
        raise ValueError("attempts must be at least 1")
    for attempt in range(attempts):
        if attempt:
            sleep(_backoff(attempt))
        current = store.get(table, partition, row)
        wanted = change(None if current is None else dict(current.data))
        new = None if wanted is None else dict(wanted)
        try:
            if current is None:
                if new is None:
                    return None
                return store.insert(table, partition, row, new).data
            if new is None:
                if store.delete(table, partition, row, etag=current.etag):
                    return None
                continue  # gone already: someone else deleted it; decide again on what is there now
            if new == current.data:
                return new
            return store.replace(table, partition, row, new, etag=current.etag).data
        except (StateConflict, StatePreconditionFailed, StateNotFound):
            logger.debug("state update of %s/%s/%s lost a race (attempt %d)", table, partition, row, attempt + 1)
    raise StateUnavailable(f"state update of {table!r} gave up after {attempts} attempts: other writers kept winning")
