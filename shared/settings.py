"""Settings (architecture §8): read once from the environment into one frozen, typed object.

A missing or invalid value raises :class:`~shared.errors.ConfigurationError` naming the variable,
so a bad deployment fails at start rather than on the first lead.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator

from shared.errors import ConfigurationError

DEFAULT_AUTHORITY_HOST = "https://login.microsoftonline.com"
DEFAULT_SOLUTION_NAME = "MicrosoftMarketplacesLeadIntegrationSolution"
DEFAULT_MIN_SOLUTION_VERSION = "1.0.0.0"

#: What the Functions host leaves in an app setting when it cannot resolve a Key Vault reference.
KEY_VAULT_REFERENCE_PREFIX = "@Microsoft.KeyVault("
#: Shortest admin key accepted, and the command the error message suggests.
MIN_ADMIN_KEY_LENGTH = 32
MIN_ADMIN_KEY_DISTINCT = 10
GENERATE_ADMIN_KEY = "python3 -c 'import secrets; print(secrets.token_urlsafe(32))'"


def parse_version(text: str) -> tuple[int, ...]:
    """Parse a ``major.minor[.build[.revision]]`` version for numeric comparison.

    Raises ValueError when a part is not a non-negative integer.
    """
    parts = text.strip().split(".")
    if not 2 <= len(parts) <= 4 or not all(p.isdigit() for p in parts):
        raise ValueError(f"not a version of the form major.minor.build.revision: {text!r}")
    numbers = tuple(int(p) for p in parts)
    return numbers + (0,) * (4 - len(numbers))


class Settings(BaseModel):
    """Every setting Lead Writer reads. Field aliases are the environment variable names."""

    model_config = ConfigDict(frozen=True, populate_by_name=True, extra="ignore")

    data_dir: Path = Field(default=Path(".leadwriter"), alias="LEADWRITER_DATA_DIR")
    queue_backend: Literal["embedded", "servicebus"] = Field(default="embedded", alias="LEADWRITER_QUEUE_BACKEND")
    secret_backend: Literal["embedded", "keyvault"] = Field(default="embedded", alias="LEADWRITER_SECRET_BACKEND")
    admin_key: SecretStr | None = Field(default=None, alias="LEADWRITER_ADMIN_KEY")
    crm_allowed_hosts: tuple[str, ...] = Field(default=(), alias="LEADWRITER_CRM_ALLOWED_HOSTS")
    #: Extra ``host:port`` patterns allowed as alert webhooks (same syntax as crm_allowed_hosts).
    webhook_allowed_hosts: tuple[str, ...] = Field(default=(), alias="LEADWRITER_WEBHOOK_ALLOWED_HOSTS")
    #: ``functions`` runs messages through the trigger functions of function_app.py, as the host calls them.
    runtime: Literal["embedded", "functions"] = Field(default="embedded", alias="LEADWRITER_RUNTIME")
    #: Where state shared between instances lives: SQLite in the data dir, or Azure Table Storage.
    state_backend: Literal["embedded", "tables"] = Field(default="embedded", alias="LEADWRITER_STATE_BACKEND")
    #: Table endpoint (``https://<account>.table.core.windows.net``), reached with managed identity.
    tables_url: str | None = Field(default=None, alias="LEADWRITER_TABLES_URL")
    #: Connection string for Azurite (local tests); never used in Azure, where shared keys are off.
    tables_connection_string: SecretStr | None = Field(default=None, alias="LEADWRITER_TABLES_CONNECTION_STRING")
    solution_name: str = Field(default=DEFAULT_SOLUTION_NAME, alias="LEADWRITER_SOLUTION_NAME", min_length=1)
    min_solution_version: str = Field(default=DEFAULT_MIN_SOLUTION_VERSION, alias="LEADWRITER_MIN_SOLUTION_VERSION")
    authority_host: str = Field(default=DEFAULT_AUTHORITY_HOST, alias="AZURE_AUTHORITY_HOST")
    ca_bundle: Path | None = Field(default=None, alias="REQUESTS_CA_BUNDLE")
    servicebus_namespace: str | None = Field(default=None, alias="ServiceBusConnection__fullyQualifiedNamespace")
    keyvault_url: str | None = Field(default=None, alias="KEYVAULT_URL")
    #: Key for the embedded secret store (urlsafe base64 Fernet key); generated into the data dir if unset.
    secret_key: SecretStr | None = Field(default=None, alias="LEADWRITER_SECRET_KEY")
    http_host: str = Field(default="127.0.0.1", alias="LEADWRITER_HTTP_HOST")
    http_port: Annotated[int, Field(ge=1, le=65535)] = Field(default=7071, alias="LEADWRITER_HTTP_PORT")
    #: Messages each stage worker handles at once (embedded runtime).
    worker_concurrency: Annotated[int, Field(ge=1, le=256)] = Field(default=16, alias="LEADWRITER_WORKER_CONCURRENCY")
    #: Requests in flight to one publisher's CRM at once; below Dataverse's 52 concurrent requests.
    publisher_concurrency: Annotated[int, Field(ge=1, le=50)] = Field(
        default=8, alias="LEADWRITER_PUBLISHER_CONCURRENCY"
    )
    #: Leads per ``$batch`` the write stage sends at most (Dataverse takes up to 1000); 1 disables batching.
    max_batch: Annotated[int, Field(ge=1, le=1000)] = Field(default=100, alias="LEADWRITER_MAX_BATCH")
    #: Several leads of one publisher go as one ``CreateMultiple`` (falling back to ``$batch`` parts when
    #: it fails as a whole); off: always ``$batch``.
    create_multiple: bool = Field(default=True, alias="LEADWRITER_CREATE_MULTIPLE")
    crm_connect_timeout: Annotated[float, Field(gt=0)] = Field(default=5.0, alias="LEADWRITER_CRM_CONNECT_TIMEOUT")
    crm_read_timeout: Annotated[float, Field(gt=0)] = Field(default=30.0, alias="LEADWRITER_CRM_READ_TIMEOUT")
    #: Seconds between attempts of a transiently failing message; see shared/pipeline/retry.py.
    retry_schedule: tuple[float, ...] = Field(default=(), alias="LEADWRITER_RETRY_SCHEDULE")
    #: Embedded broker: how long a received message stays locked, and deliveries before MaxDeliveryCountExceeded.
    lock_duration: Annotated[float, Field(gt=0, le=300)] = Field(default=60.0, alias="LEADWRITER_LOCK_DURATION")
    max_delivery_count: Annotated[int, Field(ge=1, le=2000)] = Field(default=10, alias="LEADWRITER_MAX_DELIVERY_COUNT")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(default="INFO", alias="LEADWRITER_LOG_LEVEL")
    appinsights_connection_string: SecretStr | None = Field(default=None, alias="APPLICATIONINSIGHTS_CONNECTION_STRING")

    @field_validator("crm_allowed_hosts", "webhook_allowed_hosts", mode="before")
    @classmethod
    def _split_hosts(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(part.strip().lower() for part in value.split(",") if part.strip())
        return value

    @field_validator("retry_schedule", mode="before")
    @classmethod
    def _split_schedule(cls, value: object) -> object:
        if isinstance(value, str):
            parts = [part.strip() for part in value.split(",") if part.strip()]
            try:
                numbers = tuple(float(part) for part in parts)
            except ValueError:
                raise ValueError("must be comma-separated seconds, e.g. 5,15,60") from None
            if not numbers or any(not math.isfinite(n) or n < 0 for n in numbers):
                raise ValueError("must be one or more non-negative, finite numbers of seconds")
            return numbers
        return value

    @field_validator("admin_key")
    @classmethod
    def _check_admin_key(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not is_strong_admin_key(value.get_secret_value()):
            raise ValueError(
                f"must be at least {MIN_ADMIN_KEY_LENGTH} characters and not trivially guessable "
                f"(no repeated character or pattern); generate one with {GENERATE_ADMIN_KEY}"
            )
        return value

    @field_validator("tables_url")
    @classmethod
    def _check_tables_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        value = value.strip().rstrip("/")
        scheme, sep, rest = value.partition("://")
        if not sep or scheme.lower() != "https":
            raise ValueError(
                "must be the https URL of the Table endpoint, e.g. https://<account>.table.core.windows.net"
            )
        host = rest.split("/", 1)[0]
        # A query would carry a SAS token: the Table endpoint is reached with managed identity only.
        if not host or any(ch in rest for ch in "?#@ \\"):
            raise ValueError("must be a URL without query, fragment or user info (managed identity, no SAS)")
        return "https://" + host.lower() + rest[len(host) :]

    @field_validator("min_solution_version")
    @classmethod
    def _check_version(cls, value: str) -> str:
        parse_version(value)
        return value

    @field_validator("authority_host")
    @classmethod
    def _normalise_authority(cls, value: str) -> str:
        value = value.strip().rstrip("/")
        if "://" not in value:
            value = "https://" + value
        scheme, _, rest = value.partition("://")
        if scheme.lower() != "https":
            raise ValueError("the authority host must use https")
        if not rest or any(ch in rest for ch in "/?#@ \\"):
            raise ValueError("must be a host (and optional port), without path, query or user info")
        return "https://" + rest.lower()

    @property
    def min_version(self) -> tuple[int, ...]:
        return parse_version(self.min_solution_version)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Read settings from ``environ`` (default: the process environment).

        Raises ConfigurationError naming the variable that is missing or invalid.
        """
        env = os.environ if environ is None else environ
        aliases = {field.alias for field in cls.model_fields.values() if field.alias}
        # Empty strings mean "unset": the Functions host writes empty app settings that way.
        values = {name: env[name] for name in aliases if env.get(name, "") != ""}
        for name in sorted(values):
            # The host keeps the literal reference when it cannot resolve it; never use that as a value
            # (above all not as the admin key, which anyone reading the app settings could then send).
            if values[name].strip().casefold().startswith(KEY_VAULT_REFERENCE_PREFIX.casefold()):
                raise ConfigurationError(
                    f"setting {name} is a Key Vault reference that did not resolve: check the app's "
                    "keyVaultReferenceIdentity, its role on the vault and the secret URI (docs/deploy.md)"
                )
        try:
            settings = cls.model_validate(values)
        except ValidationError as exc:
            first = exc.errors()[0]
            name = str(first["loc"][0]) if first["loc"] else "settings"
            raise ConfigurationError(f"invalid setting {name}: {first['msg']}") from None
        settings._check_backends()
        return settings

    def _check_backends(self) -> None:
        if self.queue_backend == "servicebus" and not self.servicebus_namespace:
            raise ConfigurationError(
                "setting ServiceBusConnection__fullyQualifiedNamespace is required "
                "when LEADWRITER_QUEUE_BACKEND=servicebus"
            )
        if self.secret_backend == "keyvault" and not self.keyvault_url:  # noqa: S105 - a backend name, not a secret
            raise ConfigurationError("setting KEYVAULT_URL is required when LEADWRITER_SECRET_BACKEND=keyvault")
        if self.state_backend == "tables" and not (self.tables_url or self.tables_connection_string):
            raise ConfigurationError(
                "setting LEADWRITER_TABLES_URL (managed identity) or LEADWRITER_TABLES_CONNECTION_STRING "
                "(Azurite) is required when LEADWRITER_STATE_BACKEND=tables"
            )


def is_strong_admin_key(key: str) -> bool:
    """True when ``key`` is long enough and not trivially weak (one repeated character or pattern).

    A check against typing mistakes and placeholders, not an entropy estimate: generate keys with
    ``secrets.token_urlsafe(32)``.
    """
    if len(key) < MIN_ADMIN_KEY_LENGTH or len(set(key)) < MIN_ADMIN_KEY_DISTINCT:
        return False
    # A string made of one shorter unit repeated ("abcdabcd...") is found again inside itself doubled.
    return (key + key).find(key, 1) == len(key)
