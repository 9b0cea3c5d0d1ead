"""OData ``$batch`` bodies (``multipart/mixed``): build a request, parse a response. Pure functions.

Each operation goes in its own top-level part, never in a change set: a change set is atomic, so one
lead that already exists (412) or is refused (400) would roll back every other lead in it (architecture §4).
Responses are read in order; a change-set response nested in the batch is flattened in place.
"""

from __future__ import annotations

import json
import logging
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from shared.errors import InvalidInput

logger = logging.getLogger(__name__)

CRLF = b"\r\n"
#: Dataverse's limit on operations in one $batch.
MAX_BATCH_OPERATIONS = 1000

_BOUNDARY = re.compile(r"""boundary=(?:"([^"]+)"|([^;\s]+))""", re.IGNORECASE)
_STATUS_LINE = re.compile(rb"HTTP/\d(?:\.\d)?\s+(\d{3})(?:\s+(.*))?")
_BLANK_LINE = re.compile(rb"\r?\n\r?\n")
_BOUNDARY_CHARS = re.compile(r"[0-9A-Za-z'()+_,\-./:=?]{1,70}")


class BatchFormatError(InvalidInput):
    """A multipart body that cannot be parsed (or built) as an OData batch."""


@dataclass(frozen=True)
class BatchRequest:
    """One operation of a batch: ``url`` is absolute or relative to the service root."""

    method: str
    url: str
    headers: Mapping[str, str] = field(default_factory=dict)
    body: bytes | None = None


@dataclass(frozen=True)
class BatchResponse:
    """One operation's answer. Header names are lowercased."""

    status: int
    reason: str
    headers: Mapping[str, str]
    body: bytes

    def json(self) -> Any:
        """The body decoded as JSON. Raises ValueError when it is not JSON."""
        return json.loads(self.body)


def new_boundary(prefix: str = "batch") -> str:
    """A fresh boundary; random so that it cannot occur in any part by accident."""
    return f"{prefix}_{uuid.uuid4()}"


def build_batch(operations: Sequence[BatchRequest], boundary: str) -> bytes:
    """The ``multipart/mixed`` body of a batch, each operation in its own top-level part.

    Line ends are CRLF as RFC 2046 requires. Raises BatchFormatError for an invalid boundary, a
    header containing a line break, or a part body containing the boundary delimiter.
    """
    if not _BOUNDARY_CHARS.fullmatch(boundary) or boundary.endswith(" "):
        raise BatchFormatError("invalid multipart boundary")
    delimiter = b"--" + boundary.encode("ascii")
    out: list[bytes] = []
    for index, op in enumerate(operations, start=1):
        out.append(delimiter + CRLF)
        out.append(b"Content-Type: application/http" + CRLF)
        out.append(b"Content-Transfer-Encoding: binary" + CRLF)
        out.append(f"Content-ID: {index}".encode("ascii") + CRLF)
        out.append(CRLF)
        out.append(_line(f"{op.method.upper()} {op.url} HTTP/1.1"))
        for name, value in op.headers.items():
            out.append(_line(f"{name}: {value}"))
        out.append(CRLF)
        if op.body:
            if delimiter in op.body:
                raise BatchFormatError("a part body contains the multipart boundary")
            out.append(op.body)
        out.append(CRLF)
    out.append(delimiter + b"--" + CRLF)
    return b"".join(out)


def boundary_of(content_type: str) -> str:
    """The boundary parameter of a ``multipart/mixed`` content type.

    Raises BatchFormatError when the content type is not multipart or names no boundary.
    """
    if not content_type.lower().lstrip().startswith("multipart/"):
        raise BatchFormatError(f"not a multipart content type: {content_type[:100]!r}")
    match = _BOUNDARY.search(content_type)
    if not match:
        raise BatchFormatError("the multipart content type names no boundary")
    return match.group(1) or match.group(2)


def parse_batch(content_type: str, body: bytes) -> list[BatchResponse]:
    """The operation responses of a batch response, in order; nested change sets are flattened.

    Accepts CRLF or bare LF line ends. Raises BatchFormatError when the body is not a batch response.
    """
    responses: list[BatchResponse] = []
    for part in _split_parts(body, boundary_of(content_type)):
        part_headers, part_body = _split_head(part)
        part_type = part_headers.get("content-type", "")
        if part_type.lower().startswith("multipart/"):
            responses.extend(parse_batch(part_type, part_body))
        else:
            responses.append(_parse_http_response(part_body))
    return responses


def _line(text: str) -> bytes:
    if "\r" in text or "\n" in text:
        raise BatchFormatError("a request line or header contains a line break")
    return text.encode("utf-8") + CRLF


def _split_parts(body: bytes, boundary: str) -> list[bytes]:
    delimiter = b"--" + boundary.encode("ascii")
    # A delimiter only counts at the start of a line; normalising the split keeps CRLF and LF alike.
    lines = body.split(b"\n")
    parts: list[bytes] = []
    current: list[bytes] | None = None
    closed = False
    for raw in lines:
        stripped = raw.rstrip(b"\r").rstrip(b" \t")
        if stripped == delimiter or stripped == delimiter + b"--":
            if current is not None:
                parts.append(_join_part(current))
            if stripped.endswith(b"--") and stripped != delimiter:
                closed = True
                break
            current = []
            continue
        if current is not None:
            current.append(raw)
    if not closed:
        raise BatchFormatError("the batch response has no closing boundary")
    return parts


def _join_part(lines: list[bytes]) -> bytes:
    # The line break before a delimiter belongs to the delimiter (RFC 2046), not to the part.
    text = b"\n".join(lines)
    if text.endswith(b"\r"):
        text = text[:-1]
    return text


def _split_head(part: bytes) -> tuple[dict[str, str], bytes]:
    """Split MIME (or HTTP) headers from the body at the first empty line."""
    match = re.match(rb"\r?\n", part) or _BLANK_LINE.search(part)
    if match:
        head, rest = part[: match.start()], part[match.end() :]
    else:
        head, rest = part, b""
    headers: dict[str, str] = {}
    for raw in head.replace(b"\r\n", b"\n").split(b"\n"):
        line = raw.decode("utf-8", "replace").strip()
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep:
            raise BatchFormatError("a part header line has no ':'")
        headers[name.strip().lower()] = value.strip()
    return headers, rest


def _parse_http_response(part_body: bytes) -> BatchResponse:
    text = part_body.lstrip(b"\r\n")
    first_end = text.find(b"\n")
    status_line = (text if first_end == -1 else text[:first_end]).rstrip(b"\r")
    match = _STATUS_LINE.fullmatch(status_line.strip())
    if not match:
        raise BatchFormatError("a batch part has no HTTP status line")
    rest = b"" if first_end == -1 else text[first_end + 1 :]
    if rest.startswith((b"\r\n", b"\n")):
        headers: dict[str, str] = {}
        body = rest[2:] if rest.startswith(b"\r\n") else rest[1:]
    else:
        headers, body = _split_head(rest)
    return BatchResponse(
        status=int(match.group(1)),
        reason=(match.group(2) or b"").decode("utf-8", "replace").strip(),
        headers=headers,
        body=body.rstrip(b"\r\n"),
    )
