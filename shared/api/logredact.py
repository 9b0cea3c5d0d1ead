"""Keys out of the server's logs and traces (architecture §6: a ``?key=`` never appears in a log line or a
telemetry record).

The marketplace's HTTPS-endpoint destination can carry the publisher key only in the URL, and the
server around the app logs URLs: uvicorn's access log writes the path *with* its query string, its
trace-level ASGI log dumps the scope (query string and headers), and OpenTelemetry's ASGI/FastAPI
instrumentation puts the full URL on each request span. Our own request log
(:mod:`shared.api.middleware`) names only the route template, so it needs none of this.

- :class:`RedactingFilter` rewrites a log record in place, before any handler formats it: the values
  of key-like query parameters (``key``, ``code``, …) and of ``Authorization`` / ``Bearer`` become
  ``[redacted]``. :func:`install_log_redaction` puts it on uvicorn's loggers; :func:`create_app` calls
  it, so every server of the app gets it.
- :func:`redacting_span_processor` does the same to the URL attributes of spans as they end; the
  telemetry setup (:mod:`shared.ops.telemetry`) hands it to Azure Monitor.

This module imports nothing of the app; OpenTelemetry's SDK only when a span processor is asked for.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import unquote_plus

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor

REDACTED: Final = "[redacted]"

#: Query parameters whose values are credentials: ours (``key``), the Functions host's (``code``), and
#: the usual others, in lower case.
SENSITIVE_PARAMETERS: Final = frozenset(
    {"key", "code", "sig", "apikey", "api_key", "api-key", "access_token", "subscription-key", "token"}
)
#: The loggers of the server around the app (uvicorn); each gets the filter (a logger's filters do not
#: see records propagated from its children, so the children are named too).
SERVER_LOGGERS: Final = ("uvicorn", "uvicorn.error", "uvicorn.access", "uvicorn.asgi")
#: Span attributes that carry a URL or part of one (old and new OpenTelemetry semantic conventions).
URL_ATTRIBUTES: Final = ("http.url", "http.target", "url.full", "url.query", "url.path")

_NAMES = "|".join(re.escape(name) for name in sorted(SENSITIVE_PARAMETERS, key=len, reverse=True))
# A query string after "?" (the parameter names are decoded before they are compared: "%6Bey" is key).
_QUERY = re.compile(r"\?([^\s\"'<>#]*)")
# "key=value" anywhere else (a scope dump's query_string=b'key=…').
_PAIR = re.compile(rf"(?<![\w.-])({_NAMES})=(?!\[redacted\])([^&\s\"',;)\]}}]*)", re.IGNORECASE)
_AUTHORIZATION = re.compile(r"(authorization[\"']?\s*[:=,]\s*\(?\s*(?-i:b)?[\"']?)([^\"'\r\n]*)", re.IGNORECASE)
_BEARER = re.compile(r"\b(bearer|basic)\s+[A-Za-z0-9\-._~+/]+=*", re.IGNORECASE)


def _redact_query(match: re.Match[str]) -> str:
    parts = []
    for part in match.group(1).split("&"):
        name, equals, _value = part.partition("=")
        if equals and unquote_plus(name).strip().lower() in SENSITIVE_PARAMETERS:
            part = f"{name}={REDACTED}"
        parts.append(part)
    return "?" + "&".join(parts)


def redact(text: str) -> str:
    """``text`` with key-like query values, ``Authorization`` values and bearer tokens replaced by
    ``[redacted]``. Raises nothing."""
    if "=" not in text and "earer" not in text.lower() and "uthorization" not in text.lower():
        return text  # the common case, cheaply
    text = _QUERY.sub(_redact_query, text)
    text = _PAIR.sub(lambda m: f"{m.group(1)}={REDACTED}", text)
    text = _AUTHORIZATION.sub(lambda m: m.group(1) + REDACTED, text)
    return _BEARER.sub(lambda m: f"{m.group(1)} {REDACTED}", text)


def _redact_value(value: Any) -> Any:
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, bool | int | float) or value is None:
        return value
    # A dict, bytes or any object: formatted by %s it would show its text, so it is replaced by that text,
    # redacted (only when redaction changed something, so %r and %d of harmless values stay as they were).
    text = str(value)
    cleaned = redact(text)
    return cleaned if cleaned != text else value


class RedactingFilter(logging.Filter):
    """Rewrites each record's message, arguments and traceback text so no key or token is in them.

    The arguments keep their shape (uvicorn's access formatter unpacks them); a record is never dropped.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            if isinstance(record.msg, str):
                record.msg = redact(record.msg)
            args = record.args
            if isinstance(args, tuple):
                record.args = tuple(_redact_value(arg) for arg in args)
            elif isinstance(args, Mapping):
                record.args = {name: _redact_value(value) for name, value in args.items()}
            if record.exc_info and not record.exc_text:
                record.exc_text = logging.Formatter().formatException(record.exc_info)
            if record.exc_text:
                record.exc_text = redact(record.exc_text)
        except Exception:  # noqa: BLE001 - a filter must never lose a log line; fall back to the rendered text
            record.msg, record.args = redact(str(record.msg)), None
        return True


def install_log_redaction(logger_names: Iterable[str] = SERVER_LOGGERS) -> None:
    """Put a :class:`RedactingFilter` on each named logger (once; calling again adds nothing).

    Called by :func:`~shared.api.app.create_app`; a server that configures its logging afterwards keeps
    the filters (``logging.config.dictConfig`` replaces handlers, not filters). Raises nothing.
    """
    for name in logger_names:
        target = logging.getLogger(name)
        if not any(isinstance(existing, RedactingFilter) for existing in target.filters):
            target.addFilter(RedactingFilter())


def redacting_span_processor() -> SpanProcessor:
    """An OpenTelemetry span processor that redacts the URL attributes of each span as it ends
    (:data:`URL_ATTRIBUTES`), before the exporting processors added after it see the span.

    The instrumentations set those attributes again after the span started, so redacting at the start
    is not enough, and an ended span's attributes are frozen: the processor gives the ended span it hands
    on a redacted copy of them. Raises ImportError without the OpenTelemetry SDK.
    """
    from opentelemetry.attributes import BoundedAttributes
    from opentelemetry.sdk.trace import SpanProcessor

    class RedactingSpanProcessor(SpanProcessor):
        def on_end(self, span: ReadableSpan) -> None:
            attributes = dict(span.attributes or {})
            changed = False
            for name in URL_ATTRIBUTES:
                value = attributes.get(name)
                if isinstance(value, str):
                    cleaned = redact(value)
                    if cleaned != value:
                        attributes[name], changed = cleaned, True
            if changed:
                # The ReadableSpan is this end's own copy, handed to each processor in turn.
                span._attributes = BoundedAttributes(attributes=attributes, immutable=True)

    return RedactingSpanProcessor()
