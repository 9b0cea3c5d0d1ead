"""A publisher's CRM connection: the instance URL and the credentials (architecture §6 connection body).

Secrets are :class:`pydantic.SecretStr` so that ``repr``/``str``/logging never reveal them;
:meth:`Connection.redacted` is the only shape that leaves the process (API answers, logs).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from datetime import datetime
from functools import cached_property
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr

_NAME = Annotated[str, Field(min_length=1, max_length=256)]


class PasswordAuth(BaseModel):
    """A service account (ROPC). The tenant is discovered from the CRM's bearer challenge if not given."""

    model_config = ConfigDict(frozen=True, populate_by_name=True, extra="forbid")

    kind: Literal["password"] = "password"
    username: _NAME
    password: SecretStr = Field(min_length=1, max_length=1024)
    tenant_id: str | None = Field(default=None, alias="tenantId", max_length=128)
    client_id: str | None = Field(default=None, alias="clientId", max_length=128)


class ClientSecretAuth(BaseModel):
    """An Entra app registration added to Dataverse as an application user."""

    model_config = ConfigDict(frozen=True, populate_by_name=True, extra="forbid")

    kind: Literal["clientSecret"] = "clientSecret"
    tenant_id: _NAME = Field(alias="tenantId")
    client_id: _NAME = Field(alias="clientId")
    client_secret: SecretStr = Field(alias="clientSecret", min_length=1, max_length=1024)


Auth = Annotated[PasswordAuth | ClientSecretAuth, Field(discriminator="kind")]


class Verification(BaseModel):
    """The result of the last live verification of a connection (stored with it, no secrets)."""

    model_config = ConfigDict(frozen=True, populate_by_name=True)

    ok: bool
    checked_at: datetime = Field(alias="checkedAt")
    reason: str | None = None
    message: str | None = None
    user_id: str | None = Field(default=None, alias="userId")
    solution_version: str | None = Field(default=None, alias="solutionVersion")


class Connection(BaseModel):
    """URL + credentials of one publisher. The URL is checked by the CRM URL guard where it is used."""

    model_config = ConfigDict(frozen=True, populate_by_name=True, extra="forbid")

    url: str = Field(min_length=1, max_length=2048)
    auth: Auth
    verification: Verification | None = None
    updated_at: datetime | None = Field(default=None, alias="updatedAt")

    def secret_value(self) -> str:
        """The secret itself (password or client secret), for the token request only."""
        if isinstance(self.auth, PasswordAuth):
            return self.auth.password.get_secret_value()
        return self.auth.client_secret.get_secret_value()

    def fingerprint(self) -> str:
        """A stable identity for caches (tokens, tenants): changes whenever URL or credentials change.

        A salted hash of the secret participates so that a rotated password gets a new token, but the
        fingerprint itself reveals nothing usable.
        """
        return self._fingerprint

    def model_copy(self, *, update: Mapping[str, Any] | None = None, deep: bool = False) -> Connection:
        """A copy; with ``update`` the cached fingerprint is dropped (the fields it hashes may change)."""
        copied = super().model_copy(update=update, deep=deep)
        copied.__dict__.pop("_fingerprint", None)
        return copied

    @cached_property
    def _fingerprint(self) -> str:
        # Asked several times per lead (client, token and solution caches); the model is frozen.
        material = "\x1f".join(
            [
                self.url.rstrip("/").lower(),
                self.auth.kind,
                getattr(self.auth, "username", "") or "",
                self.auth.tenant_id or "",
                self.auth.client_id or "",
                hashlib.sha256(b"leadwriter-fp\x00" + self.secret_value().encode()).hexdigest(),
            ]
        )
        return hashlib.sha256(material.encode()).hexdigest()[:32]

    def redacted(self) -> dict[str, Any]:
        """The JSON shape that may leave the process: everything except the secret."""
        data = self.model_dump(mode="json", by_alias=True, exclude_none=True)
        data["auth"].pop("password", None)
        data["auth"].pop("clientSecret", None)
        return data

    def to_json_with_secrets(self) -> str:
        """Serialise for the secret store only (Key Vault value / encrypted embedded record)."""
        data = self.model_dump(mode="json", by_alias=True, exclude_none=True)
        data["auth"]["password" if self.auth.kind == "password" else "clientSecret"] = self.secret_value()
        return json.dumps(data, separators=(",", ":"))
