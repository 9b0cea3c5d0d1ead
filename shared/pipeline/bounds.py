"""How deep and how large a lead body may be, in one place (DESIGN §6: bodies over 256 KiB → 413).

Parsing uses these bounds to refuse a body at the door (:func:`check_json_text`, :func:`check_value`);
every path that shows a stored body (dead-letter listings, the status route, the CLI) uses
:func:`display_json`, which never recurses past :data:`MAX_DEPTH`: a body nested deeper is shown as
its text, cut, with a note. A marketplace lead is three levels deep; 32 leaves room for any
envelope a caller may wrap around it and stays far below every recursive serialiser's own limit
(Python's ~1000, pydantic-core's ~255), so no body that passes here can make one of them fail.

Depth is measured without recursion: from the text by a scan of the brackets outside string
literals, and from a parsed value by an explicit stack. Imports nothing of Lead Writer.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from itertools import accumulate
from typing import Any, Final

#: The largest body accepted anywhere (the HTTP API answers 413 above it, the queue path dead-letters).
MAX_BODY_BYTES: Final = 256 * 1024
#: The deepest nesting of arrays and objects accepted anywhere; the top-level object is depth 1.
MAX_DEPTH: Final = 32
#: Characters of a body's text shown when the body is too deep (or too large) to show as JSON.
DISPLAY_TEXT_CHARS: Final = 2000

# A JSON string literal (escapes included). Unterminated strings leave their quote behind, which the
# bracket scan ignores: the depth of broken JSON is only ever an upper bound, and json.loads refuses it.
_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
_DELTA = {"[": 1, "{": 1, "]": -1, "}": -1}


class BoundsExceeded(ValueError):
    """A body deeper than :data:`MAX_DEPTH` or larger than :data:`MAX_BODY_BYTES`; the text says which."""


def text_depth(text: str) -> int:
    """The deepest nesting of ``[``/``{`` in JSON text, ignoring brackets inside string literals.

    Linear in the text and never recursive. Raises nothing.
    """
    brackets = _NOT_BRACKET.sub("", _STRING.sub("", text))
    return max(0, max(accumulate(_DELTA[char] for char in brackets), default=0))


def value_depth(value: Any, *, stop_after: int = MAX_DEPTH) -> int:
    """The nesting depth of a parsed JSON value (a scalar is 0, ``{}`` is 1), never recursing.

    Stops counting once past ``stop_after`` (the answer is then ``stop_after + 1``), so a
    pathological value costs no more than a legal one. Raises nothing.
    """
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, Mapping):
            children: Any = item.values()
        elif isinstance(item, list | tuple):
            children = item
        else:
            continue
        deepest = max(deepest, depth)
        if deepest > stop_after:
            return stop_after + 1
        stack.extend((child, depth + 1) for child in children)
    return deepest


def _too_deep(depth: int) -> BoundsExceeded:
    return BoundsExceeded(f"nested more than {MAX_DEPTH} levels deep (JSON arrays and objects)")


def check_size(size: int) -> None:
    """Raises BoundsExceeded when ``size`` bytes are over :data:`MAX_BODY_BYTES`."""
    if size > MAX_BODY_BYTES:
        raise BoundsExceeded(f"body is {size} bytes, over the limit of {MAX_BODY_BYTES} bytes")


def check_json_text(text: str) -> None:
    """Raises BoundsExceeded when JSON ``text`` is nested deeper than :data:`MAX_DEPTH`.

    Call it before ``json.loads``: the parser recurses once per level.
    """
    depth = text_depth(text)
    if depth > MAX_DEPTH:
        raise _too_deep(depth)


def check_value(value: Any) -> None:
    """Raises BoundsExceeded when a parsed value is nested deeper than :data:`MAX_DEPTH`.

    Call it before serialising a value someone else parsed (``json.dumps`` recurses once per level).
    """
    depth = value_depth(value)
    if depth > MAX_DEPTH:
        raise _too_deep(depth)


def display_json(body: bytes | str) -> tuple[Any, str | None]:
    """A stored body for display: (parsed JSON, None) when it is within the bounds, else
    (its text cut to :data:`DISPLAY_TEXT_CHARS`, a note saying why).

    Non-JSON text comes back as the text itself with no note; callers handle bytes that are not UTF-8
    before calling. Never recurses past :data:`MAX_DEPTH`. Raises UnicodeDecodeError for bytes that
    are not UTF-8.
    """
    text = body.decode("utf-8") if isinstance(body, bytes) else body
    note: str | None = None
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > MAX_BODY_BYTES:
        note = f"the body is {size} bytes, over the limit of {MAX_BODY_BYTES} bytes"
    elif text_depth(text) > MAX_DEPTH:
        note = f"the body is nested more than {MAX_DEPTH} levels deep"
    else:
        try:
            return json.loads(text), None
        except (ValueError, RecursionError):
            return text, None
    return _cut(text), f"{note}; shown as text, cut to {DISPLAY_TEXT_CHARS} characters"


def _cut(text: str) -> str:
    return text if len(text) <= DISPLAY_TEXT_CHARS else text[:DISPLAY_TEXT_CHARS] + "…"
