"""Azure Table Storage as the state port (``azure-data-tables``), in the deployment's storage account.

In Azure the store signs in with the Function App's managed identity (:meth:`TablesStateStore.from_url`
with ``DefaultAzureCredential``; the identity needs *Storage Table Data Contributor*). Against Azurite,
Microsoft's Storage emulator, it takes a connection string (:meth:`TablesStateStore.from_connection_string`).
Neither the connection string nor the account key is ever logged or put into an error.

Each entity is stored as its PartitionKey and RowKey plus one string property, ``json``, holding
``data`` as compact JSON. One string property holds at most 64 KiB (as UTF-16), so larger data is
refused before it is sent (StateValueTooLarge) rather than left to fail in Azure. A second property,
``writer``, holds a random token per write: when the SDK retries a write whose answer was lost, the
retry is refused (409/412) although the first try was applied, and the token lets the store tell its
own write from another writer's, so ``update`` never applies a change twice.

Tables are created on first use (once per process per table: which ones exist is cached). Conditional
writes use the entity's ETag with ``If-Match`` (``MatchConditions.IfNotModified``); the service's
answers are mapped onto the port's errors in one place, :func:`_state_error`.
"""

from __future__ import annotations

import json
import logging
import secrets
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from azure.core import MatchConditions
from azure.core.credentials import TokenCredential
from azure.core.exceptions import AzureError, HttpResponseError, ResourceNotFoundError
from azure.core.pipeline import PipelineContext, PipelineResponse
from azure.data.tables import TableClient, TableEntity, TableServiceClient, UpdateMode

from shared.errors import LeadWriterError
from shared.state.base import (
    DEFAULT_UPDATE_ATTEMPTS,
    Change,
    Entity,
    StateConflict,
    StateNotFound,
    StatePreconditionFailed,
    StateUnavailable,
    decode_data,
    encode_data,
    optimistic_update,
    prefix_upper_bound,
    validate_key,
    validate_table,
)

logger = logging.getLogger(__name__)

#: The property that holds ``data`` as JSON.
DATA_PROPERTY = "json"
#: A random token per write, so a write whose answer was lost can recognise itself (see ``_landed``).
WRITER_PROPERTY = "writer"
#: Entities per page a query asks for (the service's maximum).
_PAGE_SIZE = 1000


def _error_code(exc: HttpResponseError) -> str | None:
    """The service's error code (``TableNotFound``, ``UpdateConditionNotSatisfied`` …), if it sent one."""
    # Some SDK calls decode it onto the error (a TableErrorCode, a str enum); others (create_entity)
    # re-raise the raw error, so fall back to the header, then to the OData body.
    code = getattr(exc, "error_code", None)
    if code:
        return str(getattr(code, "value", code))
    response = getattr(exc, "response", None)
    if response is None:
        return None
    header = (getattr(response, "headers", None) or {}).get("x-ms-error-code")
    if header:
        return str(header)
    try:
        body = json.loads(response.text())
        found = body["odata.error"]["code"]
    except (ValueError, TypeError, KeyError, AttributeError):
        return None
    return str(found) if isinstance(found, str) and found else None


def _state_error(action: str, where: str, exc: AzureError) -> LeadWriterError:
    """The port's error for an SDK error, composed from safe parts only (status, code, request id).

    404 → StateNotFound, 409 → StateConflict, 412 → StatePreconditionFailed; anything else (no
    answer, 401/403 from a missing role assignment, throttling, 5xx, an answer the port gives no
    meaning) → StateUnavailable, so the message is retried and, if it keeps failing, dead-lettered by
    its delivery budget.
    """
    status = exc.status_code if isinstance(exc, HttpResponseError) else None
    code = _error_code(exc) if isinstance(exc, HttpResponseError) else None
    response = getattr(exc, "response", None)
    headers = getattr(response, "headers", None) or {}
    context: dict[str, Any] = {"status": status, "code": code, "request_id": headers.get("x-ms-request-id")}
    if status == 404:
        return StateNotFound(f"state entity {where} does not exist", **context)
    if status == 409:
        return StateConflict(f"state entity {where} exists already", **context)
    if status == 412:
        return StatePreconditionFailed(f"state entity {where} changed since it was read", **context)
    retry_after: float | None
    try:
        retry_after = float(headers["Retry-After"]) if "Retry-After" in headers else None
    except ValueError:
        retry_after = None
    if status in (401, 403):
        detail = "Table Storage refused access (check the identity's Storage Table Data Contributor role)"
    elif status is None:
        detail = f"Table Storage could not be reached ({type(exc).__name__})"
    else:
        detail = "Table Storage failed"
    return StateUnavailable(f"{detail} while trying to {action} {where}", retry_after=retry_after, **context)


def _is_table_missing(exc: ResourceNotFoundError) -> bool:
    return _error_code(exc) == "TableNotFound"


class TablesStateStore:
    """The state port on Azure Table Storage (or Azurite)."""

    def __init__(self, service: TableServiceClient, *, sleep: Callable[[float], None] = time.sleep) -> None:
        """Use ``service`` (see :meth:`from_url`, :meth:`from_connection_string`). ``sleep`` paces
        ``update``'s retries."""
        self._service = service
        self._sleep = sleep
        self._lock = threading.Lock()
        self._tables: dict[str, TableClient] = {}

    @classmethod
    def from_url(cls, url: str, credential: TokenCredential, **client_kwargs: Any) -> TablesStateStore:
        """The store on the account's table endpoint ``url`` (``https://<account>.table.core.windows.net``)
        with ``credential`` (managed identity in Azure). ``client_kwargs`` go to TableServiceClient
        (transport, retry options)."""
        return cls(TableServiceClient(url, credential=credential, **client_kwargs))

    @classmethod
    def from_connection_string(cls, connection_string: str, **client_kwargs: Any) -> TablesStateStore:
        """The store through a connection string (Azurite's well-known development account in tests).
        Raises ValueError for a malformed string, with a text that quotes none of it."""
        try:
            service = TableServiceClient.from_connection_string(connection_string, **client_kwargs)
        except ValueError as exc:
            # The SDK's message could quote the string: say only that it is malformed.
            raise ValueError("the Table Storage connection string is malformed") from exc
        return cls(service)

    def __repr__(self) -> str:
        # The URL names the account, never a key or SAS (connection-string keys go into a policy).
        return f"TablesStateStore({self._service.url.split('?', 1)[0]!r})"

    # -- tables ------------------------------------------------------------------------------------

    def _table(self, table: str) -> TableClient:
        folded = validate_table(table).lower()
        client = self._tables.get(folded)
        if client is not None:
            return client
        with self._lock:
            client = self._tables.get(folded)
            if client is None:
                try:
                    client = self._service.create_table_if_not_exists(table)
                except HttpResponseError as exc:
                    if exc.status_code != 403:
                        raise _table_unavailable(table, exc) from exc
                    # In Azure, Bicep creates the tables and the app's identity holds a data role on
                    # each one, not the right to create tables: use the table as it is.
                    logger.debug("no right to create table %s; using it as deployed", table)
                    client = self._service.get_table_client(table)
                except AzureError as exc:
                    raise _table_unavailable(table, exc) from exc
                self._tables[folded] = client
        return client


    def _forget(self, table: str) -> None:
        with self._lock:
            self._tables.pop(table.lower(), None)

    @contextmanager
    def _mapped(self, action: str, table: str, partition: str | None, row: str | None) -> Iterator[None]:
        where = "/".join(part for part in (table, partition, row) if part is not None)
        try:
            yield
        except ResourceNotFoundError as exc:
            if _is_table_missing(exc):
                # Someone deleted the table under us: the next call creates it again.
                self._forget(table)
            raise _state_error(action, where, exc) from exc
        except AzureError as exc:
            raise _state_error(action, where, exc) from exc

    def _write(self, action: str, table: str, partition: str, row: str, call: Callable[[TableClient], Any]) -> Any:
        """Run a write; if the table vanished since we cached it, create it again and retry once."""
        for attempt in (1, 2):
            client = self._table(table)
            try:
                with self._mapped(action, table, partition, row):
                    return call(client)
            except StateNotFound as exc:
                if attempt == 2 or exc.code != "TableNotFound":
                    raise
        raise AssertionError("unreachable")  # pragma: no cover

    @staticmethod
    def _entity(partition: str, row: str, text: str, writer: str) -> dict[str, Any]:
        return {"PartitionKey": partition, "RowKey": row, DATA_PROPERTY: text, WRITER_PROPERTY: writer}

    def _get_raw(self, table: str, partition: str, row: str) -> TableEntity | None:
        client = self._table(table)
        try:
            with self._mapped("read", table, partition, row):
                found: TableEntity = client.get_entity(partition, row)
        except StateNotFound:
            return None
        return found

    def _landed(self, table: str, partition: str, row: str, writer: str) -> Entity | None:
        """The entity if what is stored is our own write, else None.

        The SDK retries a request whose answer it did not get (a read timeout, a reset connection; a
        PUT always, a POST after 500/503/504). When the first try had been applied, the retry is
        refused — 409 for an insert, 412 for a replace — though the write is ours. Without this check
        ``update`` would take that for a lost race and apply ``change`` twice (a counter counting one
        lead twice).
        """
        found = self._get_raw(table, partition, row)
        if found is None or found.get(WRITER_PROPERTY) != writer:
            return None
        return self._from_service(table, found)

    def _from_service(self, table: str, found: TableEntity) -> Entity:
        text = found.get(DATA_PROPERTY)
        if not isinstance(text, str):
            raise StateUnavailable(f"state entity {table}/{found['PartitionKey']}/{found['RowKey']} has no data")
        return Entity(table, found["PartitionKey"], found["RowKey"], decode_data(text), str(found.metadata["etag"]))

    # -- the port ----------------------------------------------------------------------------------

    def get(self, table: str, partition: str, row: str) -> Entity | None:
        validate_key(partition, "partition")
        validate_key(row, "row")
        found = self._get_raw(table, partition, row)
        return None if found is None else self._from_service(table, found)

    def insert(self, table: str, partition: str, row: str, data: Mapping[str, Any]) -> Entity:
        validate_key(partition, "partition")
        validate_key(row, "row")
        text, writer = encode_data(data), secrets.token_hex(8)
        try:
            meta = self._write(
                "insert", table, partition, row, lambda c: c.create_entity(self._entity(partition, row, text, writer))
            )
        except StateConflict:
            landed = self._landed(table, partition, row, writer)
            if landed is None:
                raise
            return landed
        return Entity(table, partition, row, decode_data(text), str(meta["etag"]))

    def replace(self, table: str, partition: str, row: str, data: Mapping[str, Any], *, etag: str) -> Entity:
        validate_key(partition, "partition")
        validate_key(row, "row")
        text, writer = encode_data(data), secrets.token_hex(8)
        try:
            meta = self._write(
                "replace",
                table,
                partition,
                row,
                lambda c: c.update_entity(
                    self._entity(partition, row, text, writer),
                    mode=UpdateMode.REPLACE,
                    etag=etag,
                    match_condition=MatchConditions.IfNotModified,
                ),
            )
        except StatePreconditionFailed:
            landed = self._landed(table, partition, row, writer)
            if landed is None:
                raise
            return landed
        return Entity(table, partition, row, decode_data(text), str(meta["etag"]))

    def upsert(self, table: str, partition: str, row: str, data: Mapping[str, Any]) -> Entity:
        validate_key(partition, "partition")
        validate_key(row, "row")
        text = encode_data(data)
        meta = self._write(
            "upsert",
            table,
            partition,
            row,
            lambda c: c.upsert_entity(
                self._entity(partition, row, text, secrets.token_hex(8)), mode=UpdateMode.REPLACE
            ),
        )
        return Entity(table, partition, row, decode_data(text), str(meta["etag"]))

    def delete(self, table: str, partition: str, row: str, *, etag: str | None = None) -> bool:
        validate_key(partition, "partition")
        validate_key(row, "row")
        # The SDK swallows 404 on delete; the response hook tells us whether there was an entity, and
        # its context, which the retry policy fills with the history of earlier tries once the call
        # is done, whether an earlier try may have deleted it before its answer was lost.
        statuses: list[int] = []
        contexts: list[PipelineContext] = []

        def seen(response: PipelineResponse[Any, Any]) -> None:
            statuses.append(response.http_response.status_code)
            contexts.append(response.context)

        condition = MatchConditions.Unconditionally if etag is None else MatchConditions.IfNotModified
        self._write(
            "delete",
            table,
            partition,
            row,
            lambda c: c.delete_entity(partition, row, etag=etag, match_condition=condition, raw_response_hook=seen),
        )
        retried = bool(contexts and contexts[-1].get("history"))
        if statuses and statuses[-1] == 404 and etag is not None and retried:
            # A conditional delete retried into 404: the entity read at ``etag`` is gone, most likely
            # by our own first try. Either way what the caller asked for holds.
            return True
        return bool(statuses) and statuses[-1] == 204

    def query(
        self,
        table: str,
        partition: str | None = None,
        *,
        row_prefix: str | None = None,
        limit: int | None = None,
    ) -> list[Entity]:
        if partition is not None:
            validate_key(partition, "partition")
        if row_prefix is not None:
            validate_key(row_prefix, "row_prefix")
        if limit is not None and limit < 0:
            raise ValueError("limit must not be negative")
        if limit == 0:
            return []
        clauses: list[str] = []
        parameters: dict[str, Any] = {}
        if partition is not None:
            clauses.append("PartitionKey eq @partition")
            parameters["partition"] = partition
        if row_prefix:
            clauses.append("RowKey ge @low")
            parameters["low"] = row_prefix
            high = prefix_upper_bound(row_prefix)
            if high is not None:
                clauses.append("RowKey lt @high")
                parameters["high"] = high
        page = _PAGE_SIZE if limit is None else min(limit, _PAGE_SIZE)
        client = self._table(table)
        found: list[Entity] = []
        with self._mapped("query", table, partition, None):
            if clauses:
                pages = client.query_entities(" and ".join(clauses), parameters=parameters, results_per_page=page)
            else:
                pages = client.list_entities(results_per_page=page)
            # The service returns entities in (PartitionKey, RowKey) order, so the first ``limit``
            # it sends are the first ``limit`` we want; stop reading pages there.
            for item in pages:
                entity = self._from_service(table, item)
                if row_prefix and not entity.row.startswith(row_prefix):
                    continue
                found.append(entity)
                if limit is not None and len(found) >= limit:
                    break
        # Sorted here too, in code-point order like the embedded store: the service's order is its own.
        found.sort(key=lambda e: (e.partition, e.row))
        return found

    def update(
        self,
        table: str,
        partition: str,
        row: str,
        change: Change,
        *,
        attempts: int = DEFAULT_UPDATE_ATTEMPTS,
    ) -> dict[str, Any] | None:
        return optimistic_update(self, table, partition, row, change, attempts=attempts, sleep=self._sleep)

    def health(self) -> None:
        try:
            next(iter(self._service.list_tables(results_per_page=1).by_page()), None)
        except AzureError as exc:
            raise _state_error("list tables", "the account", exc) from exc

    def close(self) -> None:
        """Close the HTTP session and every table client."""
        with self._lock:
            clients, self._tables = list(self._tables.values()), {}
        for client in clients:
            client.close()
        self._service.close()

    def __enter__(self) -> TablesStateStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _table_unavailable(table: str, exc: AzureError) -> StateUnavailable:
    error = _state_error("create table", repr(table), exc)
    # A 409 here is "being deleted" (Azure keeps a deleted table's name ~40 s), not an entity
    # conflict: for the caller the store is simply not ready yet.
    if isinstance(error, StateUnavailable):
        return error
    return StateUnavailable(
        f"Table Storage could not create table {table!r}",
        status=error.status,
        code=error.code,
        request_id=error.request_id,
    )
