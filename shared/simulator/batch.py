"""OData ``$batch`` bodies (``multipart/mixed``): parsing requests and rendering responses.

A batch holds operations (``application/http`` parts, each a whole HTTP request) and change sets
(nested ``multipart/mixed`` parts whose operations carry a ``Content-ID``).
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass, field
from email.message import Message
from http import HTTPStatus

MAX_OPERATIONS = 1000


class BatchFormatError(ValueError):
    """The batch body is not a well-formed multipart/mixed OData batch."""


@dataclass
class Operation:
    """One request inside a batch."""

    method: str
    url: str
    headers: dict[str, str]
    body: bytes
    content_id: str | None = None


@dataclass
class ChangeSet:
    operations: list[Operation] = field(default_factory=list)


Item = Operation | ChangeSet


@dataclass
class OperationResult:
    """The answer to one operation, rendered as an ``application/http`` part."""

    status: int
    headers: list[tuple[str, str]]
    body: bytes
    content_id: str | None = None


@dataclass
class ChangeSetResult:
    results: list[OperationResult]


ItemResult = OperationResult | ChangeSetResult


def boundary_of(content_type: str) -> str | None:
    """The ``boundary`` parameter of a ``multipart/mixed`` content type, or None."""
    message = Message()
    message["Content-Type"] = content_type
    if message.get_content_type() != "multipart/mixed":
        return None
    boundary = message.get_param("boundary")
    return boundary if isinstance(boundary, str) and boundary else None


_BLANK = re.compile(rb"\r?\n\r?\n")


def _split_head(data: bytes) -> tuple[list[str], bytes]:
    match = _BLANK.search(data)
    if match is None:
        head, rest = data, b""
    else:
        head, rest = data[: match.start()], data[match.end() :]
    lines = [line.rstrip("\r") for line in head.decode("utf-8", "replace").split("\n")]
    return lines, rest


def _headers(lines: list[str]) -> dict[str, str]:
    headers: dict[str, str] = {}
    for line in lines:
        if not line.strip():
            continue
        name, sep, value = line.partition(":")
        if not sep:
            raise BatchFormatError(f"malformed header line in batch part: {line[:80]!r}")
        headers[name.strip().lower()] = value.strip()
    return headers


def _parts(body: bytes, boundary: str) -> list[bytes]:
    delimiter = b"--" + boundary.encode("latin-1")
    pieces = body.split(delimiter)
    if len(pieces) < 2:
        raise BatchFormatError("the batch body does not contain its boundary")
    parts: list[bytes] = []
    for piece in pieces[1:]:
        if piece.startswith(b"--"):
            break
        # The CRLF before a delimiter belongs to the delimiter (RFC 2046), as does the line end after it.
        if piece.startswith(b"\r\n"):
            piece = piece[2:]
        elif piece.startswith(b"\n"):
            piece = piece[1:]
        if piece.endswith(b"\r\n"):
            piece = piece[:-2]
        elif piece.endswith(b"\n"):
            piece = piece[:-1]
        parts.append(piece)
    return parts


def _operation(part_headers: dict[str, str], payload: bytes) -> Operation:
    lines, body = _split_head(payload)
    while lines and not lines[0].strip():
        lines.pop(0)
    if not lines:
        raise BatchFormatError("a batch part holds no request line")
    request_line = lines[0].split()
    if len(request_line) < 2:
        raise BatchFormatError(f"malformed request line in batch part: {lines[0][:80]!r}")
    return Operation(
        method=request_line[0].upper(),
        url=request_line[1],
        headers=_headers(lines[1:]),
        body=body,
        content_id=part_headers.get("content-id"),
    )


def parse_batch(content_type: str, body: bytes) -> list[Item]:
    """Parse a ``$batch`` request body. Raises BatchFormatError when it is malformed."""
    boundary = boundary_of(content_type)
    if boundary is None:
        raise BatchFormatError("a $batch request needs Content-Type multipart/mixed with a boundary")
    items: list[Item] = []
    for part in _parts(body, boundary):
        head, payload = _split_head(part)
        headers = _headers(head)
        part_type = headers.get("content-type", "")
        nested = boundary_of(part_type)
        if nested is not None:
            change_set = ChangeSet()
            for inner in _parts(payload, nested):
                inner_head, inner_payload = _split_head(inner)
                inner_headers = _headers(inner_head)
                if not inner_headers.get("content-type", "").lower().startswith("application/http"):
                    raise BatchFormatError("change set parts must be application/http")
                change_set.operations.append(_operation(inner_headers, inner_payload))
            items.append(change_set)
        elif part_type.lower().startswith("application/http"):
            items.append(_operation(headers, payload))
        else:
            raise BatchFormatError(f"unsupported batch part content type {part_type!r}")
    return items


def count_operations(items: list[Item]) -> int:
    return sum(len(item.operations) if isinstance(item, ChangeSet) else 1 for item in items)


def _render_operation(result: OperationResult) -> bytes:
    lines = ["Content-Type: application/http", "Content-Transfer-Encoding: binary"]
    if result.content_id is not None:
        lines.append(f"Content-ID: {result.content_id}")
    reason = HTTPStatus(result.status).phrase if result.status in HTTPStatus._value2member_map_ else ""
    lines += ["", f"HTTP/1.1 {result.status} {reason}".rstrip()]
    lines += [f"{name}: {value}" for name, value in result.headers]
    lines += ["", ""]
    return "\r\n".join(lines).encode("utf-8") + result.body + b"\r\n"


def render_batch(results: list[ItemResult]) -> tuple[str, bytes]:
    """Render batch results as a ``multipart/mixed`` body. Returns (content type, body)."""
    boundary = f"batchresponse_{uuid.uuid4()}"
    out: list[bytes] = []
    for item in results:
        out.append(f"--{boundary}\r\n".encode())
        if isinstance(item, OperationResult):
            out.append(_render_operation(item))
            continue
        inner = f"changesetresponse_{uuid.uuid4()}"
        out.append(f"Content-Type: multipart/mixed; boundary={inner}\r\n\r\n".encode())
        for result in item.results:
            out.append(f"--{inner}\r\n".encode())
            out.append(_render_operation(result))
        out.append(f"--{inner}--\r\n".encode())
    out.append(f"--{boundary}--\r\n".encode())
    return f"multipart/mixed; boundary={boundary}", b"".join(out)
