"""Publisher ids → secret names: injective, Key Vault-safe, case-proof, invertible; and ConnectionStore."""

from __future__ import annotations

import re

import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from pydantic import SecretStr

from shared.crm.connection import Connection, PasswordAuth
from shared.secretstore.base import (
    CONNECTION_PREFIX,
    PUBLISHER_ID_PATTERN,
    ConnectionStore,
    InvalidPublisherId,
    publisher_id_from_secret_name,
    secret_name_for,
)
from shared.secretstore.embedded import EmbeddedSecretStore

KEY_VAULT_NAME = re.compile(r"^[0-9a-zA-Z-]{1,127}$")
publisher_ids = st.from_regex(PUBLISHER_ID_PATTERN, fullmatch=True)
prefixes = st.sampled_from([CONNECTION_PREFIX, "key-"])


@given(publisher_ids, prefixes)
@example("a" * 40, "conn-")
@example("A" + "." * 39, "conn-")
def test_every_valid_publisher_id_maps_to_a_key_vault_name(publisher_id: str, prefix: str) -> None:
    assert KEY_VAULT_NAME.fullmatch(secret_name_for(publisher_id, prefix=prefix))


@given(publisher_ids, prefixes)
@example("Contoso", "conn-")
@example("a-2d", "conn-")
def test_the_secret_name_maps_back_to_the_publisher_id(publisher_id: str, prefix: str) -> None:
    assert publisher_id_from_secret_name(secret_name_for(publisher_id, prefix=prefix), prefix=prefix) == (
        publisher_id
    )


@given(publisher_ids, publisher_ids)
@example("Contoso", "contoso")
@example("a-2d", "a--2d")
@example("a.b", "a-2eb")
def test_different_publisher_ids_never_share_a_secret_even_ignoring_case(first: str, second: str) -> None:
    if first == second:
        return
    first_name, second_name = secret_name_for(first), secret_name_for(second)
    assert first_name != second_name
    assert first_name.lower() != second_name.lower()


@given(publisher_ids)
def test_secret_names_are_already_lowercase_so_key_vault_cannot_fold_them(publisher_id: str) -> None:
    name = secret_name_for(publisher_id)
    assert name == name.lower()


@given(st.text(max_size=60).filter(lambda text: not PUBLISHER_ID_PATTERN.fullmatch(text)))
@example("")
@example("x" * 41)
@example("-leading")
@example("contoso\n")
@example("ünïcode")
def test_invalid_publisher_ids_raise(publisher_id: str) -> None:
    with pytest.raises(InvalidPublisherId):
        secret_name_for(publisher_id)


@pytest.mark.parametrize(
    "name", ["other-contoso", "conn-", "conn-bad-zz", "conn-trailing-", "conn--2d", "conn--20space"]
)
def test_names_that_are_not_a_publishers_map_to_none(name: str) -> None:
    assert publisher_id_from_secret_name(name) is None


def _connection(password: str) -> Connection:
    return Connection(
        url="https://contoso.crm.dynamics.com",
        auth=PasswordAuth(username="svc@contoso.com", password=SecretStr(password)),
    )


def test_connection_store_counts_reads(connection_store: ConnectionStore) -> None:
    connection_store.put("contoso", _connection("pw"))
    connection_store.get("contoso")
    connection_store.get("nobody")
    assert connection_store.reads == 2


def test_a_corrupt_connection_record_reads_as_none(
    connection_store: ConnectionStore, embedded_secret_store: EmbeddedSecretStore
) -> None:
    embedded_secret_store.put(secret_name_for("contoso"), '{"url": "https://x", "auth": {"password": "pw"}}')
    assert connection_store.get("contoso") is None


def test_connection_store_refuses_an_invalid_publisher_id(connection_store: ConnectionStore) -> None:
    with pytest.raises(InvalidPublisherId):
        connection_store.get("not valid")
    with pytest.raises(InvalidPublisherId):
        connection_store.put("../etc", _connection("pw"))


def test_a_rotated_password_replaces_the_stored_one(connection_store: ConnectionStore) -> None:
    connection_store.put("contoso", _connection("old-password"))
    connection_store.put("contoso", _connection("new-password"))
    stored = connection_store.get("contoso")
    assert stored is not None
    assert stored.secret_value() == "new-password"
