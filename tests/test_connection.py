"""The connection model: what leaves the process, and the fingerprint the caches key on."""

from __future__ import annotations

import pytest
from pydantic import SecretStr

from shared.crm.connection import ClientSecretAuth, Connection, PasswordAuth


def _connection(url: str = "https://contoso.crm4.dynamics.com", secret: str = "s3cret-value") -> Connection:
    return Connection(url=url, auth=ClientSecretAuth(tenant_id="t", client_id="c", client_secret=SecretStr(secret)))


@pytest.mark.parametrize(
    "update",
    [
        {"url": "https://fabrikam.crm4.dynamics.com"},
        {"auth": ClientSecretAuth(tenant_id="t", client_id="c", client_secret=SecretStr("rotated"))},
        {"auth": PasswordAuth(username="svc@contoso.example", password=SecretStr("s3cret-value"))},
    ],
)
def test_the_fingerprint_changes_with_the_url_or_the_credentials_even_on_a_copy(update: dict[str, object]) -> None:
    original = _connection()
    assert original.fingerprint() != original.model_copy(update=update).fingerprint()


def test_the_fingerprint_ignores_the_verification_record_and_reveals_no_secret() -> None:
    original = _connection()
    touched = original.model_copy(update={"updated_at": None})
    assert touched.fingerprint() == original.fingerprint()
    assert "s3cret" not in original.fingerprint()


def test_redacted_and_repr_carry_no_secret() -> None:
    connection = _connection()
    assert "s3cret-value" not in str(connection.redacted())
    assert "s3cret-value" not in repr(connection)
    assert "s3cret-value" in connection.to_json_with_secrets()
