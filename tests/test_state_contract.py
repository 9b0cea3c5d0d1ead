"""The StateStore contract, run against both adapters, then what each adapter and the factory add.

The embedded store runs on a real SQLite file; the Table store runs through the real
``azure-data-tables`` SDK against Azurite (``tests/fixtures/azurite.py``), Microsoft's own emulator.
Every test gets a table of its own. Concurrency is tested with two OS processes, not threads: that is
what two Functions instances are.
"""

from __future__ import annotations

import json
import logging
import os
import stat
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from azure.core.exceptions import ServiceResponseError
from azure.core.pipeline.transport import RequestsTransport
from hypothesis import given
from hypothesis import strategies as st
from pydantic import SecretStr

from shared.errors import ConfigurationError, InvalidInput, RetryLater
from shared.settings import Settings
from shared.state import (
    MAX_VALUE_BYTES,
    EmbeddedStateStore,
    InvalidStateKey,
    StateConflict,
    StateNotFound,
    StatePreconditionFailed,
    StateStore,
    StateUnavailable,
    StateValueTooLarge,
    key_text,
    make_state_store,
    safe_key,
    validate_key,
    validate_table,
)
from shared.state.tables import TablesStateStore
from tests.fixtures.azurite import AZURITE_ACCOUNT_KEY, azurite_connection_string

# A fixture: imported here until tests/conftest.py imports tests.fixtures.azurite like the other fixture modules.
from tests.fixtures.azurite import azurite_table as azurite_table

ROOT = Path(__file__).resolve().parent.parent
BACKENDS = ["embedded", "tables"]


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    value: str = request.param
    return value


@pytest.fixture
def store(backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StateStore]:
    """Each adapter in turn: a fresh SQLite file, or the session's Azurite."""
    made: StateStore
    if backend == "embedded":
        made = EmbeddedStateStore(tmp_path / "state.db")
    else:
        made = TablesStateStore.from_connection_string(request.getfixturevalue("azurite_table"))
    yield made
    made.close()


@pytest.fixture
def table() -> str:
    """A table no other test uses (Azurite lives for the whole session)."""
    return f"t{uuid.uuid4().hex[:16]}"


# -- insert / get ----------------------------------------------------------------------------------


def test_an_inserted_entity_reads_back_with_its_data_and_etag(store: StateStore, table: str) -> None:
    made = store.insert(table, "p1", "r1", {"count": 3, "name": "contoso"})

    found = store.get(table, "p1", "r1")

    assert found is not None
    assert (found.table, found.partition, found.row) == (table, "p1", "r1")
    assert found.data == {"count": 3, "name": "contoso"}
    assert found.etag == made.etag
    assert made.data == found.data


def test_getting_an_entity_that_was_never_written_answers_none(store: StateStore, table: str) -> None:
    assert store.get(table, "p1", "nobody") is None


def test_inserting_an_entity_that_exists_is_a_conflict_and_changes_nothing(store: StateStore, table: str) -> None:
    first = store.insert(table, "p", "r", {"v": 1})

    with pytest.raises(StateConflict):
        store.insert(table, "p", "r", {"v": 2})

    found = store.get(table, "p", "r")
    assert found is not None
    assert (found.data, found.etag) == ({"v": 1}, first.etag)


def test_changing_the_data_an_entity_returned_changes_nothing_stored(store: StateStore, table: str) -> None:
    made = store.insert(table, "p", "r", {"items": [1]})
    made.data["items"].append(2)

    found = store.get(table, "p", "r")
    assert found is not None
    assert found.data == {"items": [1]}


def test_table_names_are_compared_without_regard_to_case(store: StateStore, table: str) -> None:
    store.insert(table.upper(), "p", "r", {"v": 1})

    with pytest.raises(StateConflict):
        store.insert(table.lower(), "p", "r", {"v": 2})
    found = store.get(table.lower(), "p", "r")
    assert found is not None
    assert found.data == {"v": 1}


# -- replace ---------------------------------------------------------------------------------------


def test_replace_with_the_current_etag_writes_and_gives_a_new_etag(store: StateStore, table: str) -> None:
    first = store.insert(table, "p", "r", {"v": 1})

    second = store.replace(table, "p", "r", {"v": 2}, etag=first.etag)

    assert second.etag != first.etag
    found = store.get(table, "p", "r")
    assert found is not None
    assert (found.data, found.etag) == ({"v": 2}, second.etag)


def test_replace_with_the_same_data_still_gives_a_new_etag(store: StateStore, table: str) -> None:
    first = store.insert(table, "p", "r", {"v": 1})

    second = store.replace(table, "p", "r", {"v": 1}, etag=first.etag)

    assert second.etag != first.etag


def test_replace_with_a_stale_etag_is_refused_and_changes_nothing(store: StateStore, table: str) -> None:
    first = store.insert(table, "p", "r", {"v": 1})
    winner = store.replace(table, "p", "r", {"v": 2}, etag=first.etag)

    with pytest.raises(StatePreconditionFailed):
        store.replace(table, "p", "r", {"v": 3}, etag=first.etag)

    found = store.get(table, "p", "r")
    assert found is not None
    assert (found.data, found.etag) == ({"v": 2}, winner.etag)


def test_replace_of_an_entity_that_is_gone_is_not_found(store: StateStore, table: str) -> None:
    first = store.insert(table, "p", "r", {"v": 1})
    store.delete(table, "p", "r")

    with pytest.raises(StateNotFound):
        store.replace(table, "p", "r", {"v": 2}, etag=first.etag)

    assert store.get(table, "p", "r") is None


# -- upsert ----------------------------------------------------------------------------------------


def test_upsert_creates_then_replaces_whatever_is_there(store: StateStore, table: str) -> None:
    created = store.upsert(table, "p", "r", {"v": 1, "old": True})
    replaced = store.upsert(table, "p", "r", {"v": 2})

    assert replaced.etag != created.etag
    found = store.get(table, "p", "r")
    assert found is not None
    # Replace, not merge: the property the second write did not name is gone.
    assert (found.data, found.etag) == ({"v": 2}, replaced.etag)


# -- delete ----------------------------------------------------------------------------------------


def test_delete_removes_the_entity_and_says_whether_there_was_one(store: StateStore, table: str) -> None:
    store.insert(table, "p", "r", {"v": 1})

    assert store.delete(table, "p", "r") is True
    assert store.get(table, "p", "r") is None
    assert store.delete(table, "p", "r") is False


def test_delete_with_the_current_etag_removes_the_entity(store: StateStore, table: str) -> None:
    made = store.insert(table, "p", "r", {"v": 1})

    assert store.delete(table, "p", "r", etag=made.etag) is True
    assert store.get(table, "p", "r") is None


def test_delete_with_a_stale_etag_is_refused_and_keeps_the_entity(store: StateStore, table: str) -> None:
    first = store.insert(table, "p", "r", {"v": 1})
    store.replace(table, "p", "r", {"v": 2}, etag=first.etag)

    with pytest.raises(StatePreconditionFailed):
        store.delete(table, "p", "r", etag=first.etag)

    found = store.get(table, "p", "r")
    assert found is not None
    assert found.data == {"v": 2}


def test_delete_with_an_etag_of_an_entity_that_is_gone_answers_false(store: StateStore, table: str) -> None:
    made = store.insert(table, "p", "r", {"v": 1})
    store.delete(table, "p", "r")

    assert store.delete(table, "p", "r", etag=made.etag) is False


# -- query -----------------------------------------------------------------------------------------


def _fill(store: StateStore, table: str, keys: list[tuple[str, str]]) -> None:
    for partition, row in keys:
        store.insert(table, partition, row, {"at": f"{partition}|{row}"})


def test_query_of_a_partition_returns_its_rows_in_row_order(store: StateStore, table: str) -> None:
    _fill(store, table, [("b", "2"), ("a", "9"), ("b", "1"), ("c", "0"), ("b", "10")])

    found = store.query(table, "b")

    assert [(e.partition, e.row) for e in found] == [("b", "1"), ("b", "10"), ("b", "2")]
    assert [e.data["at"] for e in found] == ["b|1", "b|10", "b|2"]
    assert all(e.etag for e in found)


def test_query_of_a_whole_table_orders_by_partition_then_row(store: StateStore, table: str) -> None:
    _fill(store, table, [("b", "2"), ("a", "9"), ("b", "1"), ("c", "0")])

    found = store.query(table)

    assert [(e.partition, e.row) for e in found] == [("a", "9"), ("b", "1"), ("b", "2"), ("c", "0")]


def test_query_by_row_prefix_returns_exactly_the_rows_that_start_with_it(store: StateStore, table: str) -> None:
    rows = ["aa", "ab", "ab-1", "abz", "ab~", "abé", "ac", "b", "AB"]
    _fill(store, table, [("p", row) for row in rows] + [("q", "ab-other")])

    found = store.query(table, "p", row_prefix="ab")

    assert [e.row for e in found] == ["ab", "ab-1", "abz", "ab~", "abé"]
    assert [(e.partition, e.row) for e in store.query(table, row_prefix="ab-")] == [("p", "ab-1"), ("q", "ab-other")]


def test_query_with_a_limit_returns_the_first_entities_in_order(store: StateStore, table: str) -> None:
    _fill(store, table, [("p", f"r{i:02d}") for i in (7, 3, 9, 1, 5, 0)] + [("a", "z")])

    assert [e.row for e in store.query(table, "p", limit=3)] == ["r00", "r01", "r03"]
    assert [(e.partition, e.row) for e in store.query(table, limit=2)] == [("a", "z"), ("p", "r00")]
    assert [e.row for e in store.query(table, "p", row_prefix="r0", limit=2)] == ["r00", "r01"]
    assert store.query(table, "p", limit=0) == []


def test_query_of_an_empty_table_or_partition_is_empty(store: StateStore, table: str) -> None:
    assert store.query(table) == []
    store.insert(table, "p", "r", {})
    assert store.query(table, "other") == []
    assert store.query(table, "p", row_prefix="x") == []


# -- update ----------------------------------------------------------------------------------------


def _increment(data: dict[str, Any] | None) -> dict[str, Any]:
    return {"n": (data or {}).get("n", 0) + 1}


def test_update_counts_up_from_nothing(store: StateStore, table: str) -> None:
    assert store.update(table, "counters", "leads", _increment) == {"n": 1}
    assert store.update(table, "counters", "leads", _increment) == {"n": 2}

    found = store.get(table, "counters", "leads")
    assert found is not None
    assert found.data == {"n": 2}


def test_update_returning_none_deletes_the_entity(store: StateStore, table: str) -> None:
    store.insert(table, "p", "r", {"n": 1})

    assert store.update(table, "p", "r", lambda _: None) is None
    assert store.get(table, "p", "r") is None
    # Nothing there and nothing wanted: nothing to do.
    assert store.update(table, "p", "r", lambda _: None) is None


def test_update_that_changes_nothing_writes_nothing(store: StateStore, table: str) -> None:
    made = store.insert(table, "p", "r", {"n": 1})

    assert store.update(table, "p", "r", lambda data: data) == {"n": 1}

    found = store.get(table, "p", "r")
    assert found is not None
    assert found.etag == made.etag


def test_update_reads_again_when_another_writer_wins_in_between(store: StateStore, table: str) -> None:
    # Given a counter at 1, and another writer that sets it to 10 while our first attempt is deciding
    store.insert(table, "p", "c", {"n": 1})
    seen: list[int] = []

    def change(data: dict[str, Any] | None) -> dict[str, Any]:
        assert data is not None
        seen.append(data["n"])
        if len(seen) == 1:
            store.upsert(table, "p", "c", {"n": 10})
        return {"n": data["n"] + 1}

    # When we increment it
    result = store.update(table, "p", "c", change)

    # Then our stale write was refused, and the retry built on the other writer's value
    assert seen == [1, 10]
    assert result == {"n": 11}
    found = store.get(table, "p", "c")
    assert found is not None
    assert found.data == {"n": 11}


def test_update_reads_again_when_the_entity_appears_before_its_insert(store: StateStore, table: str) -> None:
    calls: list[dict[str, Any] | None] = []

    def change(data: dict[str, Any] | None) -> dict[str, Any]:
        calls.append(data)
        if len(calls) == 1:
            store.insert(table, "p", "c", {"n": 5})
        return _increment(data)

    assert store.update(table, "p", "c", change) == {"n": 6}
    assert calls == [None, {"n": 5}]


def test_update_gives_up_as_unavailable_when_other_writers_keep_winning(store: StateStore, table: str) -> None:
    store.insert(table, "p", "c", {"n": 0})
    calls = 0

    def change(data: dict[str, Any] | None) -> dict[str, Any]:
        nonlocal calls
        calls += 1
        store.upsert(table, "p", "c", {"n": -calls})  # someone else wins every time
        return _increment(data)

    with pytest.raises(StateUnavailable) as raised:
        store.update(table, "p", "c", change, attempts=3)

    assert calls == 3
    assert isinstance(raised.value, RetryLater)
    found = store.get(table, "p", "c")
    assert found is not None
    assert found.data == {"n": -3}


def test_threads_sharing_one_store_lose_no_update(store: StateStore, table: str) -> None:
    threads, count = 4, 25
    errors: list[BaseException] = []

    def work() -> None:
        try:
            for _ in range(count):
                store.update(table, "counters", "threads", _increment)
        except BaseException as exc:  # reported below, with the thread's failure
            errors.append(exc)

    workers = [threading.Thread(target=work) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=120)

    assert not errors
    assert not any(worker.is_alive() for worker in workers)
    found = store.get(table, "counters", "threads")
    assert found is not None
    assert found.data == {"n": threads * count}


_CHILD = """
import json, os, sys
from pathlib import Path

backend, table, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
if backend == "embedded":
    from shared.state.embedded import EmbeddedStateStore
    store = EmbeddedStateStore(Path(os.environ["STATE_TEST_DB"]))
else:
    from shared.state.tables import TablesStateStore
    store = TablesStateStore.from_connection_string(os.environ["STATE_TEST_CONNECTION"])
calls = 0

def increment(data):
    global calls
    calls += 1
    return {"n": (data or {}).get("n", 0) + 1}

store.health()
print("ready", flush=True)
sys.stdin.readline()  # both children start incrementing at once
for _ in range(count):
    store.update(table, "counters", "shared", increment)
print(json.dumps({"calls": calls}), flush=True)
store.close()
"""


def test_two_processes_incrementing_one_counter_lose_no_update(
    backend: str, store: StateStore, table: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    count = 50
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    if backend == "embedded":
        assert isinstance(store, EmbeddedStateStore)
        env["STATE_TEST_DB"] = str(store.path)
    else:
        # Through the environment, not argv: a connection string does not belong in a process list.
        env["STATE_TEST_CONNECTION"] = request.getfixturevalue("azurite_table")
    children = [
        subprocess.Popen(
            [sys.executable, "-c", _CHILD, backend, table, str(count)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            env=env,
        )
        for _ in range(2)
    ]
    try:
        for child in children:
            assert child.stdout is not None
            ready = child.stdout.readline().strip()
            assert ready == "ready", child.communicate(timeout=60)[1]
        for child in children:
            assert child.stdin is not None
            child.stdin.write("go\n")
            child.stdin.flush()
        results = [child.communicate(timeout=240) for child in children]
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
                child.wait()

    for child, (out, err) in zip(children, results, strict=True):
        assert child.returncode == 0, err
        assert json.loads(out.strip().splitlines()[-1])["calls"] >= count
    found = store.get(table, "counters", "shared")
    assert found is not None
    assert found.data == {"n": 2 * count}


# -- names and values ------------------------------------------------------------------------------

AWKWARD_TEXTS = [
    "a/b",
    "back\\slash",
    "#hash?query",
    "100%",
    "%2F",
    "tab\there\nnewline",
    "\x00nul\x7fdel\x85nel",
    "https://contoso.crm4.dynamics.com/api/data/v9.2/leads?$top=1#frag",
    "Zoë Ångström 日本 🚀",
    'it\'s "quoted"',
    "",
]


@pytest.mark.parametrize("text", AWKWARD_TEXTS)
def test_keys_made_with_safe_key_round_trip_any_text(store: StateStore, table: str, text: str) -> None:
    partition, row = safe_key(text), safe_key(text + "/row")

    made = store.insert(table, partition, row, {"text": text})

    found = store.get(table, partition, row)
    assert found is not None
    assert found.data == {"text": text}
    assert [(e.partition, e.row) for e in store.query(table, partition)] == [(partition, row)]
    assert [e.row for e in store.query(table, partition, row_prefix=safe_key(text))] == [row]
    assert key_text(row) == text + "/row"
    replaced = store.replace(table, partition, row, {"text": "again"}, etag=made.etag)
    assert store.delete(table, partition, row, etag=replaced.etag) is True
    assert store.get(table, partition, row) is None


@pytest.mark.parametrize("key", ["100%", "%2F", "it's", "''", "~!$&()*+,;=:@", " spaced "])
def test_keys_with_unusual_but_allowed_characters_work_in_every_operation(
    store: StateStore, table: str, key: str
) -> None:
    made = store.insert(table, key, key, {"v": 1})
    replaced = store.replace(table, key, key, {"v": 2}, etag=made.etag)

    assert [e.row for e in store.query(table, key, row_prefix=key)] == [key]
    assert store.delete(table, key, key, etag=replaced.etag) is True
    assert store.get(table, key, key) is None


@pytest.mark.parametrize("key", ["a/b", "a\\b", "a#b", "a?b", "a\tb", "a\x7fb", "x" * 513])
def test_keys_with_characters_table_storage_refuses_are_refused_before_any_write(
    store: StateStore, table: str, key: str
) -> None:
    with pytest.raises(InvalidStateKey) as raised:
        store.insert(table, key, "r", {})
    assert isinstance(raised.value, InvalidInput)
    with pytest.raises(InvalidStateKey):
        store.upsert(table, "p", key, {})
    with pytest.raises(InvalidStateKey):
        store.query(table, key)
    assert store.query(table) == []


@pytest.mark.parametrize("name", ["ab", "1abc", "has-dash", "under_score", "x" * 64, "tables", "Tables", ""])
def test_table_names_outside_table_storage_rules_are_refused(store: StateStore, name: str) -> None:
    with pytest.raises(InvalidStateKey):
        store.insert(name, "p", "r", {})
    with pytest.raises(InvalidStateKey):
        store.get(name, "p", "r")


def test_unicode_and_nested_values_round_trip(store: StateStore, table: str) -> None:
    data = {
        "name": "Zoë Ångström",
        "city": "東京",
        "emoji": "🚀✅",
        "nested": {"list": [1, 2.5, True, None, "ü"], "empty": {}},
        "big": 2**53,
        "neg": -1.25e-7,
    }

    store.insert(table, "p", "r", data)

    found = store.get(table, "p", "r")
    assert found is not None
    assert found.data == data


def test_data_that_fills_one_table_property_is_stored(store: StateStore, table: str) -> None:
    # {"v":"…"} is 8 characters of JSON around the value; 2 bytes each as UTF-16.
    data = {"v": "x" * (MAX_VALUE_BYTES // 2 - 8)}

    store.insert(table, "p", "r", data)

    found = store.get(table, "p", "r")
    assert found is not None
    assert found.data == data


@pytest.mark.parametrize("value", ["x" * (MAX_VALUE_BYTES // 2), "🚀" * (MAX_VALUE_BYTES // 4)])
def test_data_too_large_for_one_table_property_is_refused_and_nothing_is_written(
    store: StateStore, table: str, value: str
) -> None:
    # The embedded store refuses it too: what works locally must not break on Table Storage.
    with pytest.raises(StateValueTooLarge, match=r"at most 65536"):
        store.insert(table, "p", "r", {"v": value})
    with pytest.raises(StateValueTooLarge):
        store.upsert(table, "p", "r", {"v": value})

    assert store.get(table, "p", "r") is None


def test_data_that_is_not_json_is_refused(store: StateStore, table: str) -> None:
    with pytest.raises(TypeError):
        store.insert(table, "p", "r", {"when": object()})
    with pytest.raises(TypeError):
        store.insert(table, "p", "r", {"nan": float("nan")})
    assert store.get(table, "p", "r") is None


def test_a_store_that_answers_is_healthy(store: StateStore) -> None:
    store.health()


@given(st.text(max_size=40), st.text(max_size=40))
def test_safe_key_is_injective_always_valid_and_undone_by_key_text(a: str, b: str) -> None:
    assert validate_key(safe_key(a)) == safe_key(a)
    assert (safe_key(a) == safe_key(b)) == (a == b)
    assert key_text(safe_key(a)) == a
    assert "%" not in safe_key(a)
    assert "'" not in safe_key(a)


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("contoso.crm4.dynamics.com", "contoso.crm4.dynamics.com"),
        ("user@contoso.com", "user@contoso.com"),
        ("https://contoso.crm4.dynamics.com/", "https:!2F!2Fcontoso.crm4.dynamics.com!2F"),
        ("a/b", "a!2Fb"),
        ("50%", "50!25"),
        ("it's", "it!27s"),
        ("!2F", "!212F"),
        ("#?\\", "!23!3F!5C"),
        ("\t\x85", "!09!85"),
        ("Zoë ~ 東京", "Zoë ~ 東京"),
    ],
)
def test_safe_key_escapes_only_what_it_must(text: str, key: str) -> None:
    assert safe_key(text) == key


@pytest.mark.parametrize("name", ["abc", "Counters", "penalties2", "A" + "b" * 62])
def test_table_names_within_the_rules_are_accepted(name: str) -> None:
    assert validate_table(name) == name


# -- the embedded adapter --------------------------------------------------------------------------


def test_the_embedded_store_file_is_private_to_its_owner(tmp_path: Path) -> None:
    path = tmp_path / "data" / "state.db"
    with EmbeddedStateStore(path) as store:
        store.insert("abc", "p", "r", {"v": 1})

    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_the_embedded_store_keeps_its_data_across_reopening(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    with EmbeddedStateStore(path) as store:
        made = store.insert("abc", "p", "r", {"v": 1})
    with EmbeddedStateStore(path) as store:
        found = store.get("abc", "p", "r")

    assert found == made


def test_a_closed_embedded_store_is_unavailable(tmp_path: Path) -> None:
    store = EmbeddedStateStore(tmp_path / "state.db")
    store.close()

    with pytest.raises(StateUnavailable):
        store.get("abc", "p", "r")


# -- the Table adapter -----------------------------------------------------------------------------


def test_an_unreachable_table_endpoint_is_unavailable_and_the_error_names_no_key(
    unused_tcp_port: int, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    store = TablesStateStore.from_connection_string(azurite_connection_string(unused_tcp_port), retry_total=0)

    with pytest.raises(StateUnavailable) as raised:
        store.get("abc", "p", "r")
    with pytest.raises(StateUnavailable):
        store.health()

    assert "could not be reached" in str(raised.value)
    assert AZURITE_ACCOUNT_KEY not in str(raised.value)
    assert AZURITE_ACCOUNT_KEY not in repr(store)
    assert AZURITE_ACCOUNT_KEY not in caplog.text
    store.close()


def test_a_malformed_connection_string_is_refused_without_quoting_it() -> None:
    with pytest.raises(ValueError, match="malformed") as raised:
        TablesStateStore.from_connection_string("AccountKey=hunter2-not-a-connection-string")
    assert "hunter2" not in str(raised.value)


def test_a_table_deleted_under_the_store_is_created_again_on_the_next_write(azurite_table: str, table: str) -> None:
    with TablesStateStore.from_connection_string(azurite_table) as store:
        store.insert(table, "p", "r", {"v": 1})
        # Azurite frees a deleted table's name at once (Azure takes ~40 s and answers 409 meanwhile).
        from azure.data.tables import TableServiceClient

        with TableServiceClient.from_connection_string(azurite_table) as service:
            service.delete_table(table)

        # A write first (the store still believes the table exists), then a read.
        store.insert(table, "p", "r", {"v": 2})
        found = store.get(table, "p", "r")
        assert found is not None
        assert found.data == {"v": 2}

        service_table = TableServiceClient.from_connection_string(azurite_table)
        service_table.delete_table(table)
        service_table.close()
        assert store.get(table, "p", "r") is None
        assert store.query(table) == []


class _LosesFirstAnswer(RequestsTransport):
    """A transport that delivers the first ``method`` request, then loses the service's answer, as a
    read timeout or a reset connection does; the SDK's retry policy then sends the request again."""

    def __init__(self, method: str) -> None:
        super().__init__()
        self.method = method
        self.lost = 0

    def send(self, request: Any, **kwargs: Any) -> Any:
        response = super().send(request, **kwargs)
        if request.method == self.method and not self.lost:
            self.lost += 1
            raise ServiceResponseError("the answer was lost (test transport)")
        return response


def test_a_replace_whose_answer_was_lost_is_applied_once(azurite_table: str, table: str) -> None:
    # Given a replace that reaches the service, but whose answer never comes back
    transport = _LosesFirstAnswer("PUT")
    with TablesStateStore.from_connection_string(azurite_table, transport=transport, retry_backoff_factor=0) as store:
        store.insert(table, "p", "c", {"n": 1})

        # When a counter is incremented (the SDK retries the PUT, which now fails its If-Match)
        result = store.update(table, "p", "c", _increment)

        # Then the store recognises its own write rather than incrementing a second time
        assert transport.lost == 1
        assert result == {"n": 2}
        found = store.get(table, "p", "c")
        assert found is not None
        assert found.data == {"n": 2}


def test_a_conditional_delete_whose_answer_was_lost_still_reports_the_delete(azurite_table: str, table: str) -> None:
    transport = _LosesFirstAnswer("DELETE")
    with TablesStateStore.from_connection_string(azurite_table, transport=transport, retry_backoff_factor=0) as store:
        made = store.insert(table, "p", "r", {"v": 1})

        assert store.delete(table, "p", "r", etag=made.etag) is True
        assert transport.lost == 1
        assert store.get(table, "p", "r") is None


# -- the factory -----------------------------------------------------------------------------------


def test_the_factory_builds_the_embedded_store_in_the_data_dir_by_default(tmp_path: Path) -> None:
    settings = Settings(LEADWRITER_DATA_DIR=tmp_path)

    store = make_state_store(settings)

    assert isinstance(store, EmbeddedStateStore)
    assert store.path == tmp_path / "state.db"
    store.close()


def test_the_factory_builds_the_table_store_from_a_connection_string_and_never_logs_it(
    azurite_table: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    settings = SimpleNamespace(
        state_backend="tables", tables_url=None, tables_connection_string=SecretStr(azurite_table)
    )

    store = make_state_store(settings)

    assert isinstance(store, TablesStateStore)
    store.health()
    store.close()
    assert AZURITE_ACCOUNT_KEY not in caplog.text


@pytest.mark.parametrize(
    ("settings", "names"),
    [
        (SimpleNamespace(state_backend="tables", tables_url=None, tables_connection_string=None), "TABLES_URL"),
        (
            SimpleNamespace(
                state_backend="tables",
                tables_url="https://acct.table.core.windows.net",
                tables_connection_string=SecretStr("UseDevelopmentStorage=true"),
            ),
            "TABLES_CONNECTION_STRING",
        ),
        (
            SimpleNamespace(state_backend="tables", tables_url="http://acct.example", tables_connection_string=None),
            "TABLES_URL",
        ),
        (SimpleNamespace(state_backend="redis", data_dir=Path(".")), "STATE_BACKEND"),
    ],
)
def test_the_factory_names_the_setting_that_is_missing_or_invalid(settings: Any, names: str) -> None:
    with pytest.raises(ConfigurationError, match=names):
        make_state_store(settings)


@pytest.fixture
def unused_tcp_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port
