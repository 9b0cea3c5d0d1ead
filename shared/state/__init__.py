"""Shared state: the port (:mod:`.base`), its adapters, and the factory that picks one from settings.

Owns everything more than one instance must agree on (delivery status, penalties and learned CRM
limits, API key records, settings, replay jobs) as entities with Azure Table semantics: SQLite in the
data dir (:mod:`.embedded`) or Azure Table Storage (:mod:`.tables`). Secrets never go here (they
belong in the secret store). Imports nothing from the stages, the API or ``azure.functions``.
"""

from __future__ import annotations

import logging
from typing import Any

from shared.errors import ConfigurationError
from shared.state.base import (
    MAX_KEY_BYTES,
    MAX_VALUE_BYTES,
    TABLE_NAME_PATTERN,
    Change,
    Entity,
    InvalidStateKey,
    StateConflict,
    StateNotFound,
    StatePreconditionFailed,
    StateStore,
    StateUnavailable,
    StateValueTooLarge,
    key_text,
    optimistic_update,
    safe_key,
    validate_key,
    validate_table,
)
from shared.state.embedded import DB_FILE_NAME, EmbeddedStateStore

logger = logging.getLogger(__name__)

__all__ = [
    "DB_FILE_NAME",
    "MAX_KEY_BYTES",
    "MAX_VALUE_BYTES",
    "TABLE_NAME_PATTERN",
    "Change",
    "EmbeddedStateStore",
    "Entity",
    "InvalidStateKey",
    "StateConflict",
    "StateNotFound",
    "StatePreconditionFailed",
    "StateStore",
    "StateUnavailable",
    "StateValueTooLarge",
    "key_text",
    "make_state_store",
    "optimistic_update",
    "safe_key",
    "validate_key",
    "validate_table",
]


def _secret_text(value: Any) -> str | None:
    """A setting that is a SecretStr (or, before the settings grow the field, plain text) as text."""
    if value is None:
        return None
    getter = getattr(value, "get_secret_value", None)
    text = getter() if callable(getter) else value
    return str(text) if text else None


def make_state_store(settings: Any) -> StateStore:
    """The state store ``settings`` select (``LEADWRITER_STATE_BACKEND``).

    ``embedded`` (the default): ``state.db`` in the data dir. ``tables``: Azure Table Storage at
    ``LEADWRITER_TABLES_URL`` with ``DefaultAzureCredential`` (managed identity in Azure), or through
    ``LEADWRITER_TABLES_CONNECTION_STRING`` (Azurite) — exactly one of the two. Raises
    ConfigurationError naming the setting that is missing or invalid.
    """
    # getattr: the settings object may not have the state fields yet (they arrive with architecture §8's row).
    backend = getattr(settings, "state_backend", "embedded")
    if backend == "tables":
        url = getattr(settings, "tables_url", None) or None
        connection_string = _secret_text(getattr(settings, "tables_connection_string", None))
        if url and connection_string:
            raise ConfigurationError("set only one of LEADWRITER_TABLES_URL and LEADWRITER_TABLES_CONNECTION_STRING")
        # Imported here so the embedded default never pays for the Azure SDK imports.
        from shared.state.tables import TablesStateStore

        if connection_string:
            try:
                store = TablesStateStore.from_connection_string(connection_string)
            except ValueError as exc:
                raise ConfigurationError("invalid setting LEADWRITER_TABLES_CONNECTION_STRING") from exc
            # Never the string itself: it carries the account key.
            logger.info("state store: Table Storage %r (connection string)", store)
            return store
        if url:
            from azure.identity import DefaultAzureCredential

            if not str(url).startswith("https://"):
                raise ConfigurationError(
                    "invalid setting LEADWRITER_TABLES_URL: expected https://<account>.table.core.windows.net"
                )
            logger.info("state store: Table Storage %s (managed identity)", url)
            return TablesStateStore.from_url(str(url), DefaultAzureCredential())
        raise ConfigurationError("setting LEADWRITER_TABLES_URL is required when LEADWRITER_STATE_BACKEND=tables")
    if backend != "embedded":
        raise ConfigurationError("invalid setting LEADWRITER_STATE_BACKEND: expected embedded or tables")
    path = settings.data_dir / DB_FILE_NAME
    logger.info("state store: embedded %s", path)
    return EmbeddedStateStore(path)
