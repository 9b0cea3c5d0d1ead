"""Building and parsing OData $batch bodies (multipart/mixed), without a network."""

from __future__ import annotations

import json

import pytest

from shared.crm.batch import (
    BatchFormatError,
    BatchRequest,
    boundary_of,
    build_batch,
    new_boundary,
    parse_batch,
)


def _response(parts: list[str], boundary: str = "batchresponse_1", newline: str = "\r\n") -> bytes:
    """A batch response in Dataverse's shape, with the given line ends."""
    chunks = []
    for part in parts:
        chunks.append(
            f"--{boundary}\nContent-Type: application/http\nContent-Transfer-Encoding: binary\n\n{part}\n"
        )
    text = "".join(chunks) + f"--{boundary}--\n"
    return text.replace("\n", newline).encode()


CREATED = "HTTP/1.1 204 No Content\nOData-Version: 4.0\nOData-EntityId: https://x/leads(1)\n"
EXISTS = (
    "HTTP/1.1 412 Precondition Failed\nContent-Type: application/json; odata.metadata=minimal\n\n"
    '{"error":{"code":"0x80060882","message":"A record with matching key values already exists."}}'
)
INVALID = (
    "HTTP/1.1 400 Bad Request\nContent-Type: application/json\nREQ_ID: 7f1a\n\n"
    '{"error":{"code":"0x80048d19","message":"Invalid property \'nope\' was found in entity \'lead\'."}}'
)


def test_each_operation_is_its_own_top_level_part_in_order() -> None:
    ops = [
        BatchRequest("PATCH", f"https://x/leads({i})", {"If-None-Match": "*"}, f'{{"n":{i}}}'.encode())
        for i in range(3)
    ]
    body = build_batch(ops, "batch_abc")

    assert body.count(b"--batch_abc\r\n") == 3
    assert body.endswith(b"--batch_abc--\r\n")
    assert b"changeset" not in body
    positions = [body.index(f"leads({i}) HTTP/1.1".encode()) for i in range(3)]
    assert positions == sorted(positions)
    assert body.count(b"If-None-Match: *\r\n") == 3


def test_a_built_part_uses_crlf_and_separates_headers_from_body_with_an_empty_line() -> None:
    body = build_batch(
        [BatchRequest("patch", "leads(1)", {"Content-Type": "application/json"}, b'{"a":"\xc3\xa9"}')], "b1"
    )
    expected = (
        b"--b1\r\nContent-Type: application/http\r\nContent-Transfer-Encoding: binary\r\n"
        b"Content-ID: 1\r\n\r\n"
        b"PATCH leads(1) HTTP/1.1\r\nContent-Type: application/json\r\n\r\n"
        b'{"a":"\xc3\xa9"}\r\n--b1--\r\n'
    )
    assert body == expected
    assert b"\n" not in body.replace(b"\r\n", b"")


@pytest.mark.parametrize(
    ("boundary", "op"),
    [
        ("bad boundary with spaces ", BatchRequest("GET", "x")),
        ("", BatchRequest("GET", "x")),
        ("b1", BatchRequest("GET", "x\r\nInjected: 1")),
        ("b1", BatchRequest("GET", "x", {"X-A": "1\nInjected: 1"})),
        ("b1", BatchRequest("PATCH", "x", {}, b"data\r\n--b1--\r\n")),
    ],
)
def test_building_refuses_what_would_break_the_multipart_framing(boundary: str, op: BatchRequest) -> None:
    with pytest.raises(BatchFormatError):
        build_batch([op], boundary)


@pytest.mark.parametrize("newline", ["\r\n", "\n"])
def test_parsing_returns_each_part_status_in_order_with_crlf_or_lf(newline: str) -> None:
    body = _response([CREATED, EXISTS, INVALID], newline=newline)

    parts = parse_batch("multipart/mixed; boundary=batchresponse_1", body)

    assert [p.status for p in parts] == [204, 412, 400]
    assert parts[0].reason == "No Content"
    assert parts[0].headers["odata-version"] == "4.0"
    assert parts[0].body == b""
    assert parts[2].headers["req_id"] == "7f1a"
    assert parts[2].json()["error"]["code"] == "0x80048d19"
    assert parts[1].json()["error"]["message"].startswith("A record with matching key values")


def test_parsing_flattens_a_nested_change_set_response_in_place() -> None:
    changeset = (
        "--changesetresponse_9\nContent-Type: application/http\nContent-Transfer-Encoding: binary\n\n"
        + CREATED
        + "\n--changesetresponse_9\nContent-Type: application/http\n\n"
        + INVALID
        + "\n--changesetresponse_9--\n"
    )
    body = (
        "--batchresponse_1\nContent-Type: application/http\n\n"
        + EXISTS
        + "\n--batchresponse_1\nContent-Type: multipart/mixed; boundary=changesetresponse_9\n\n"
        + changeset
        + "\n--batchresponse_1--\n"
    ).replace("\n", "\r\n")

    parts = parse_batch('multipart/mixed; boundary="batchresponse_1"', body.encode())

    assert [p.status for p in parts] == [412, 204, 400]


def test_a_body_line_that_only_resembles_the_boundary_stays_in_the_body() -> None:
    tricky = 'HTTP/1.1 400 Bad Request\n\n{"error":{"message":"x --batchresponse_1 y"}}'
    parts = parse_batch("multipart/mixed; boundary=batchresponse_1", _response([tricky]))
    assert json.loads(parts[0].body)["error"]["message"] == "x --batchresponse_1 y"


def test_a_json_body_keeps_its_inner_line_breaks() -> None:
    part = 'HTTP/1.1 400 Bad Request\nContent-Type: application/json\n\n{\n  "error": {"message": "m"}\n}'
    parts = parse_batch("multipart/mixed; boundary=b", _response([part], boundary="b"))
    assert parts[0].json() == {"error": {"message": "m"}}


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        ("application/json", b"{}"),
        ("multipart/mixed", b"--x\r\n\r\nHTTP/1.1 204 No Content\r\n--x--\r\n"),
        ("multipart/mixed; boundary=x", b"--x\r\nContent-Type: application/http\r\n\r\nHTTP/1.1 204 OK\r\n"),
        ("multipart/mixed; boundary=x", b"--x\r\n\r\nnot a status\r\n--x--\r\n"),
        ("multipart/mixed; boundary=x", b"--y\r\n\r\nHTTP/1.1 204 No Content\r\n--y--\r\n"),
    ],
)
def test_malformed_batch_responses_raise_batch_format_error(content_type: str, body: bytes) -> None:
    with pytest.raises(BatchFormatError):
        parse_batch(content_type, body)


def test_an_empty_batch_response_has_no_parts() -> None:
    assert parse_batch("multipart/mixed; boundary=x", b"--x--\r\n") == []


@pytest.mark.parametrize(
    ("content_type", "boundary"),
    [
        ("multipart/mixed; boundary=batchresponse_1", "batchresponse_1"),
        ('multipart/mixed; boundary="batch_a b"', "batch_a b"),
        ("Multipart/Mixed;Boundary=b-1;charset=utf-8", "b-1"),
    ],
)
def test_the_boundary_is_read_from_the_content_type(content_type: str, boundary: str) -> None:
    assert boundary_of(content_type) == boundary


def test_a_built_batch_parses_back_as_requests_would_be_framed() -> None:
    boundary = new_boundary()
    body = build_batch([BatchRequest("GET", "WhoAmI"), BatchRequest("GET", "solutions")], boundary)
    # A request batch has the same framing as a response batch; only the first line differs.
    as_response = body.replace(b"GET WhoAmI HTTP/1.1", b"HTTP/1.1 200 OK").replace(
        b"GET solutions HTTP/1.1", b"HTTP/1.1 404 Not Found"
    )
    parts = parse_batch(f"multipart/mixed; boundary={boundary}", as_response)
    assert [p.status for p in parts] == [200, 404]
    assert new_boundary() != boundary
