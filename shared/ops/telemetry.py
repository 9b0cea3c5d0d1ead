"""Observability (architecture §5): settlement counters, and export to Application Insights.

Three parts, each small:

- :class:`Metrics` counts settlements (forwarded, delivered, rescheduled, dead-lettered by reason) per
  stage, in process, thread-safe, and mirrors each count onto OpenTelemetry counters
  (``leadwriter.leads.*``) when ``opentelemetry-api`` is importable. Until something installs a real
  meter provider those counters are the API's no-op proxies, so counting costs next to nothing.
- :func:`configure_telemetry` installs that provider: with ``APPLICATIONINSIGHTS_CONNECTION_STRING``
  set it calls ``configure_azure_monitor`` once per process, so the log lines of our ``shared.*``
  loggers and the counters reach Application Insights. Without the setting it does nothing and
  imports nothing (``azure.monitor`` costs about a second at start).
- :func:`fan_out` feeds one settlement to several observers (the status book and the metrics), so
  a failing observer can neither hide the others nor be mistaken for a failed settlement.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from shared.errors import ConfigurationError, InvalidInput
from shared.pipeline.outcomes import SettleAction, Stage
from shared.pipeline.settle import Observer, Settled
from shared.settings import Settings

if TYPE_CHECKING:
    from opentelemetry.metrics import Counter as OtelCounter
    from opentelemetry.metrics import Meter

logger = logging.getLogger(__name__)

#: The meter our OpenTelemetry counters are created on.
METER_NAME = "leadwriter"
#: The logger whose records (and its children's) ``configure_azure_monitor`` exports: all of ``shared``.
EXPORTED_LOGGER = "shared"

FORWARDED = SettleAction.FORWARDED
DELIVERED = SettleAction.DELIVERED
RESCHEDULED = SettleAction.RESCHEDULED
DEAD_LETTERED = SettleAction.DEAD_LETTERED
#: Every ``Settled.action``, in pipeline reading order.
ACTIONS: tuple[SettleAction, ...] = tuple(SettleAction)

#: OpenTelemetry counter per settlement action (attributes: ``stage``, and ``reason`` on dead letters).
OTEL_COUNTERS: Mapping[str, tuple[str, str]] = {
    FORWARDED: ("leadwriter.leads.forwarded", "Leads a stage passed on to the next stage queue"),
    DELIVERED: ("leadwriter.leads.delivered", "Leads written to the CRM, or found there already"),
    RESCHEDULED: ("leadwriter.leads.rescheduled", "Transient failures rescheduled with backoff"),
    DEAD_LETTERED: ("leadwriter.leads.deadlettered", "Leads dead-lettered, by stage and reason"),
}


@dataclass(frozen=True)
class MetricsSnapshot:
    """Counts at one moment. Per action: stage → count; dead letters: stage → reason → count."""

    forwarded: Mapping[str, int] = field(default_factory=dict)
    delivered: Mapping[str, int] = field(default_factory=dict)
    rescheduled: Mapping[str, int] = field(default_factory=dict)
    dead_lettered: Mapping[str, Mapping[str, int]] = field(default_factory=dict)

    def total(self, action: str) -> int:
        """All stages' count of ``action`` (one of :data:`ACTIONS`). Raises ValueError for another."""
        if action == DEAD_LETTERED:
            return sum(sum(by_reason.values()) for by_reason in self.dead_lettered.values())
        if action not in ACTIONS:
            raise InvalidInput(f"action: {action!r} is not one of {', '.join(ACTIONS)}", field="action")
        counts: Mapping[str, int] = getattr(self, action)
        return sum(counts.values())

    def dead_lettered_by_reason(self) -> dict[str, int]:
        """Dead letters by reason, all stages together."""
        totals: Counter[str] = Counter()
        for by_reason in self.dead_lettered.values():
            totals.update(by_reason)
        return dict(sorted(totals.items()))

    def to_json(self) -> dict[str, Any]:
        """camelCase, for an API answer or ``--json`` output."""
        return {
            "forwarded": dict(self.forwarded),
            "delivered": dict(self.delivered),
            "rescheduled": dict(self.rescheduled),
            "deadLettered": {stage: dict(reasons) for stage, reasons in self.dead_lettered.items()},
        }


def _otel_counters(meter: Meter | None) -> dict[str, OtelCounter]:
    if meter is None:
        try:
            from opentelemetry import metrics as otel_metrics
        except ImportError:  # opentelemetry-api is optional: the in-process counts still work
            return {}
        # The global provider is a proxy until configure_telemetry installs Azure Monitor's; counters
        # made now start exporting then, so Metrics may be built before or after it.
        meter = otel_metrics.get_meter(METER_NAME)
    return {
        action: meter.create_counter(name, unit="{lead}", description=description)
        for action, (name, description) in OTEL_COUNTERS.items()
    }


class Metrics:
    """Settlement counters, fed by :meth:`observe` (a settlement observer). Thread-safe.

    ``meter``: where the OpenTelemetry counters are made (default: the global meter provider's
    ``leadwriter`` meter); ``otel=False`` keeps the counts in process only.
    """

    def __init__(self, meter: Meter | None = None, *, otel: bool = True) -> None:
        self._lock = threading.Lock()
        self._counts: Counter[tuple[str, str, str | None]] = Counter()
        self._otel = _otel_counters(meter) if otel else {}

    def observe(self, settled: Settled) -> None:
        """Count one settlement. Raises nothing for an action it does not know (it is counted as is)."""
        # Only a dead letter's reason is a closed set (architecture §5); a rescheduled one's "reason" is the
        # error text, which would make one time series per message if it became an attribute.
        reason = str(settled.reason or "Unknown") if settled.action == DEAD_LETTERED else None
        with self._lock:
            self._counts[(settled.action, settled.stage, reason)] += 1
        counter = self._otel.get(settled.action)
        if counter is not None:
            attributes = {"stage": settled.stage} if reason is None else {"stage": settled.stage, "reason": reason}
            counter.add(1, attributes)

    def snapshot(self) -> MetricsSnapshot:
        """The counts so far."""
        with self._lock:
            counts = dict(self._counts)
        per_action: dict[str, dict[str, int]] = {action: {} for action in (FORWARDED, DELIVERED, RESCHEDULED)}
        dead: dict[str, dict[str, int]] = {}
        for (action, stage, reason), count in sorted(counts.items(), key=_pipeline_order):
            if action == DEAD_LETTERED:
                dead.setdefault(stage, {})[reason or "Unknown"] = count
            elif action in per_action:
                per_action[action][stage] = count
        return MetricsSnapshot(
            forwarded=per_action[FORWARDED],
            delivered=per_action[DELIVERED],
            rescheduled=per_action[RESCHEDULED],
            dead_lettered=dead,
        )


def _pipeline_order(item: tuple[tuple[str, str, str | None], int]) -> tuple[int, str, str]:
    (_, stage, reason), _count = item
    order: list[str] = list(Stage)
    return (order.index(stage) if stage in order else len(order), stage, reason or "")


def fan_out(*observers: Observer) -> Observer:
    """One observer that calls each of ``observers`` in turn. Raises nothing.

    The message is settled before observers run, so an observer's failure (a locked status database)
    is logged and the others still run; it must not surface as a failed settlement, which the
    runtime would report as "will be redelivered".
    """

    def observe(settled: Settled) -> None:
        for observer in observers:
            try:
                observer(settled)
            except Exception:
                logger.exception(
                    "settlement observer %s failed for message %s on %s; the message itself is settled",
                    getattr(observer, "__qualname__", type(observer).__name__),
                    settled.message.message_id,
                    settled.stage,
                )

    return observe


_configure_lock = threading.Lock()
_configured = False


def configure_telemetry(settings: Settings) -> bool:
    """Send logs of the ``shared`` loggers and the ``leadwriter.*`` metrics to Application Insights.

    Does nothing, and imports nothing, when ``settings.appinsights_connection_string`` is unset. With
    it, calls ``azure.monitor.opentelemetry.configure_azure_monitor`` once per process (later calls
    return at once); in Azure the exporter authenticates with the managed identity named by
    ``APPLICATIONINSIGHTS_AUTHENTICATION_STRING``, which it reads itself. Returns True when export is on.

    Raises:
        ConfigurationError: Azure Monitor refused the connection string (the message names the
            setting, never its value).
    """
    global _configured
    if settings.appinsights_connection_string is None:
        return False
    with _configure_lock:
        if _configured:
            return True
        try:
            from azure.monitor.opentelemetry import configure_azure_monitor
        except ImportError:
            logger.warning(
                "APPLICATIONINSIGHTS_CONNECTION_STRING is set but azure-monitor-opentelemetry is not installed; "
                "logs and metrics stay local (pip install azure-monitor-opentelemetry)"
            )
            return False
        # Imported here: shared.api's package imports the app, which imports the services, which import this.
        from shared.api.logredact import redacting_span_processor

        secret = settings.appinsights_connection_string.get_secret_value()
        try:
            configure_azure_monitor(
                connection_string=secret,
                logger_name=EXPORTED_LOGGER,
                # Request spans carry the full URL, and an ingest URL carries ?key=: redacted as they start.
                span_processors=[redacting_span_processor()],
            )
        except ValueError as exc:
            raise ConfigurationError(
                f"invalid setting APPLICATIONINSIGHTS_CONNECTION_STRING: {_safe_detail(exc, secret)}"
            ) from None
        _configured = True
    logger.info("telemetry: logs of %r and leadwriter.* metrics go to Application Insights", EXPORTED_LOGGER)
    return True


def _safe_detail(exc: Exception, secret: str) -> str:
    """The exporter's complaint, unless it quotes any part of the connection string."""
    text = str(exc).replace("\n", " ")[:200]
    values = [part.partition("=")[2].strip() for part in secret.split(";")]
    parts = [value for value in values if len(value) >= 8]
    if not text or secret in text or any(value in text for value in parts):
        return f"Azure Monitor refused it ({type(exc).__name__})"
    return text
