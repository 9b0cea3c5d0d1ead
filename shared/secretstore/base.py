"""The secret port (architecture §2) and what Lead Writer keeps in it.

Adapters are plain name → value stores (:mod:`shared.secretstore.embedded`, encrypted SQLite;
:mod:`shared.secretstore.keyvault`, Azure Key Vault). :class:`ConnectionStore` maps publishers onto
them, so the naming rules live in one place and every adapter inherits them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Protocol, runtime_checkable

from pydantic import ValidationError

from shared.crm.connection import Connection
from shared.errors import InvalidPublisherId as InvalidPublisherId  # re-exported
from shared.errors import InvalidSecretName as InvalidSecretName  # re-exported

#: Publisher ids: what the marketplace and publishers use, bounded so secret names stay ≤ 127 chars.
PUBLISHER_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,39}$")
CONNECTION_PREFIX = "conn-"
CONTENT_TYPE = "application/json"


#: Secret names every adapter accepts: Key Vault's rule, so the embedded store cannot drift from it.
SECRET_NAME_PATTERN = re.compile(r"^[0-9a-zA-Z-]{1,127}$")


def validate_secret_name(name: str) -> str:
    """Return ``name`` if it is a valid secret name; raise InvalidSecretName otherwise.

    Names are compared case-insensitively by every adapter (Key Vault does so).
    """
    if not isinstance(name, str) or not SECRET_NAME_PATTERN.fullmatch(name):
        raise InvalidSecretName("secret names must be 1-127 characters of letters, digits and '-'")
    return name


def validate_publisher_id(publisher_id: str) -> str:
    """Return ``publisher_id`` if valid; raise InvalidPublisherId naming the rule otherwise."""
    if not PUBLISHER_ID_PATTERN.fullmatch(publisher_id):
        raise InvalidPublisherId(
            "publisherId must be 1-40 characters of letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return publisher_id


def secret_name_for(publisher_id: str, prefix: str = CONNECTION_PREFIX) -> str:
    """Map a publisher id to a Key Vault secret name (``[0-9a-zA-Z-]``, ≤ 127), injectively.

    Key Vault names are case-insensitive, so only lowercase letters and digits pass through; every
    other character (uppercase included) becomes ``-xx`` (its hex code). No two publisher ids can
    therefore share a secret: ``Contoso`` → ``conn--43ontoso``, ``contoso`` → ``conn-contoso``.
    """
    validate_publisher_id(publisher_id)
    encoded = "".join(
        ch if ("a" <= ch <= "z" or "0" <= ch <= "9") else f"-{ord(ch):02x}" for ch in publisher_id
    )
    return prefix + encoded


def publisher_id_from_secret_name(name: str, prefix: str = CONNECTION_PREFIX) -> str | None:
    """Invert :func:`secret_name_for`; None for names that are not ours."""
    if not name.startswith(prefix):
        return None
    encoded, out, i = name[len(prefix) :], [], 0
    while i < len(encoded):
        if encoded[i] == "-":
            try:
                out.append(chr(int(encoded[i + 1 : i + 3], 16)))
            except ValueError:
                return None
            i += 3
        else:
            out.append(encoded[i])
            i += 1
    publisher_id = "".join(out)
    return publisher_id if PUBLISHER_ID_PATTERN.fullmatch(publisher_id) else None


@runtime_checkable
class SecretStore(Protocol):
    """A name → value store for secrets. Names are Key Vault-safe (``[0-9a-zA-Z-]``, ≤ 127)."""

    def get(self, name: str) -> str | None:
        """The current value, or None when there is no such secret."""
        ...

    def put(
        self,
        name: str,
        value: str,
        *,
        content_type: str = CONTENT_TYPE,
        tags: Mapping[str, str] | None = None,
    ) -> None:
        """Create or replace a secret."""

    def delete(self, name: str) -> bool:
        """Remove a secret; True if it existed."""
        ...

    def list_names(self, prefix: str = "") -> list[str]:
        """Names of the existing secrets that start with ``prefix``."""
        ...


class ConnectionStore:
    """Publisher connections on top of any :class:`SecretStore`: one secret per publisher."""

    def __init__(self, store: SecretStore) -> None:
        self._store = store
        #: Counts secret-store reads, for the benchmark's "secret-store reads per lead".
        self.reads = 0

    def get(self, publisher_id: str) -> Connection | None:
        """The stored connection, or None. Raises InvalidPublisherId for a malformed id."""
        self.reads += 1
        value = self._store.get(secret_name_for(publisher_id))
        if value is None:
            return None
        try:
            return Connection.model_validate_json(value)
        except ValidationError:
            # A corrupt record is as good as none; never echo its content (it holds the secret).
            return None

    def put(self, publisher_id: str, connection: Connection) -> None:
        self._store.put(
            secret_name_for(publisher_id),
            connection.to_json_with_secrets(),
            content_type=CONTENT_TYPE,
            tags={"publisherId": publisher_id, "kind": connection.auth.kind},
        )

    def delete(self, publisher_id: str) -> bool:
        return self._store.delete(secret_name_for(publisher_id))

    def publishers(self) -> list[str]:
        names = self._store.list_names(CONNECTION_PREFIX)
        return sorted(p for p in (publisher_id_from_secret_name(n) for n in names) if p is not None)
