"""Secret stores: the port (:mod:`.base`), its adapters, and the factory that picks one from settings."""

from __future__ import annotations

import logging

from shared.secretstore.base import (
    CONNECTION_PREFIX,
    CONTENT_TYPE,
    PUBLISHER_ID_PATTERN,
    SECRET_NAME_PATTERN,
    ConnectionStore,
    InvalidPublisherId,
    InvalidSecretName,
    SecretStore,
    publisher_id_from_secret_name,
    secret_name_for,
    validate_publisher_id,
    validate_secret_name,
)
from shared.secretstore.embedded import (
    DB_FILE_NAME,
    KEY_FILE_NAME,
    EmbeddedSecretStore,
    decode_key,
    generate_key,
)
from shared.settings import Settings

logger = logging.getLogger(__name__)

__all__ = [
    "CONNECTION_PREFIX",
    "CONTENT_TYPE",
    "DB_FILE_NAME",
    "KEY_FILE_NAME",
    "PUBLISHER_ID_PATTERN",
    "SECRET_NAME_PATTERN",
    "ConnectionStore",
    "EmbeddedSecretStore",
    "InvalidPublisherId",
    "InvalidSecretName",
    "SecretStore",
    "decode_key",
    "generate_key",
    "make_secret_store",
    "publisher_id_from_secret_name",
    "secret_name_for",
    "validate_publisher_id",
    "validate_secret_name",
]


def make_secret_store(settings: Settings) -> SecretStore:
    """The secret store ``settings`` select (``LEADWRITER_SECRET_BACKEND``).

    ``embedded``: ``secrets.db`` in the data dir, keyed by ``LEADWRITER_SECRET_KEY`` or the data dir's
    ``secret.key``. ``keyvault``: ``KEYVAULT_URL`` with ``DefaultAzureCredential`` (managed identity in
    Azure). Raises ConfigurationError for a missing or invalid key, URL or key file.
    """
    if settings.secret_backend == "keyvault":  # noqa: S105 - a backend name, not a password
        # Imported here so the embedded default never pays for the Azure SDK imports.
        from azure.identity import DefaultAzureCredential

        from shared.errors import ConfigurationError
        from shared.secretstore.keyvault import KeyVaultSecretStore

        if not settings.keyvault_url:
            raise ConfigurationError(
                "setting KEYVAULT_URL is required when LEADWRITER_SECRET_BACKEND=keyvault"
            )
        logger.info("secret store: Key Vault %s", settings.keyvault_url)
        return KeyVaultSecretStore(settings.keyvault_url, DefaultAzureCredential())
    # Decoded here from text, so a 32-character passphrase is refused rather than taken as raw key bytes.
    key = decode_key(settings.secret_key.get_secret_value()) if settings.secret_key else None
    path = settings.data_dir / DB_FILE_NAME
    logger.info("secret store: embedded %s", path)
    return EmbeddedSecretStore(path, key)
