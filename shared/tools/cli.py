"""The ``leadwriter`` command line (architecture §7, stable command names).

Exit codes scripts can rely on: 0 success, 1 something was refused or failed (a bad input line, a
replay with refusals or errors), 2 usage or configuration error.
"""

from __future__ import annotations

import json
import logging
import signal
import sys
import threading
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, TextIO

import typer
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from shared.errors import CONFIGURATION_REASONS, ConfigurationError, DeadLetterReason
from shared.names import QUEUE_INCOMING, STAGE_QUEUES, STATE_FILE
from shared.ops.deadletters import (
    UNKNOWN_REASON,
    DeadLetterFilter,
    DeadLetterItem,
    ReplayPlanEntry,
    group_counts,
    list_dead_letters,
    plan_replay,
    purge,
    replay,
)
from shared.pipeline.bounds import BoundsExceeded, check_json_text, check_size
from shared.pipeline.messages import envelope
from shared.settings import Settings
from shared.transport.base import OutgoingMessage, Transport

app = typer.Typer(help="Lead Writer: marketplace leads into Dynamics 365 / Dataverse.", no_args_is_help=True)
deadletters_app = typer.Typer(help="See, replay, resend, archive, restore or purge dead letters.", no_args_is_help=True)
app.add_typer(deadletters_app, name="deadletters")

# soft_wrap: an error line stays one line in logs and in what scripts capture, whatever the width.
console = Console(stderr=True, soft_wrap=True)
out = Console()
logger = logging.getLogger(__name__)

SEND_BATCH = 100


def _settings() -> Settings:
    try:
        return Settings.from_env()
    except ConfigurationError as exc:
        console.print(f"[red]configuration error:[/red] {escape(str(exc))}")
        raise typer.Exit(2) from None


def _configure_logging(settings: Settings) -> None:
    logging.basicConfig(
        level=settings.log_level,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
        stream=sys.stderr,
    )
    # azure-core logs request headers at INFO; keep it quiet unless debugging.
    logging.getLogger("azure").setLevel(logging.WARNING)


@app.command()
def serve(
    api: Annotated[bool, typer.Option(help="Serve the HTTP API on LEADWRITER_HTTP_HOST:PORT.")] = True,
    workers: Annotated[bool, typer.Option(help="Run the three stage workers.")] = True,
) -> None:
    """Run the HTTP API and the three stage workers on the configured backends until SIGINT/SIGTERM."""
    from shared.datadir import prepare as prepare_data_dir
    from shared.ops.logfilter import install as install_log_rate_limit
    from shared.ops.telemetry import configure_telemetry
    from shared.services import Services
    from shared.tools.httpserver import connection_cap, raise_fd_limit, server_config

    settings = _settings()
    _configure_logging(settings)
    try:
        configure_telemetry(settings)
    except ConfigurationError as exc:
        console.print(f"[red]configuration error:[/red] {escape(str(exc))}")
        raise typer.Exit(2) from None
    # After telemetry, so its handlers are rate-limited too: a line that can repeat thousands of times
    # a second (an accept error, a refused connection) must not fill the disk.
    install_log_rate_limit()
    # Before anything opens a file: the API's connection cap is computed from what is allowed.
    fd_limit = raise_fd_limit()
    try:
        # A read-only data dir stops serve here, naming it, rather than failing every lead later.
        prepare_data_dir(settings.data_dir)
        services = Services.from_settings(settings)
    except ConfigurationError as exc:
        console.print(f"[red]configuration error:[/red] {escape(str(exc))}")
        raise typer.Exit(2) from None
    runtime = None
    job_worker = None
    if workers:
        runtime = services.stage_runtime().start()
        if settings.runtime == "embedded":
            # With LEADWRITER_RUNTIME=functions the registered run_job trigger consumes the jobs queue.
            from shared.ops.jobs import JobWorker

            job_worker = JobWorker(services.jobs, services.transport).start()
        what = "registered Functions triggers" if settings.runtime == "functions" else "stage workers"
        console.print(f"[green]{what} running[/green]")
    # Our handlers are in place before uvicorn's: uvicorn handles SIGINT/SIGTERM while it runs, then
    # restores the handlers it found and raises the signal again — which must reach these (and let
    # the workers drain below), not the default SIGTERM action that would kill the process first.
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    try:
        if api:
            import uvicorn

            from shared.api.app import create_app

            console.print(f"[green]API on http://{settings.http_host}:{settings.http_port}/api[/green]")
            # Returns after finishing the requests in flight, on SIGINT/SIGTERM.
            uvicorn.Server(
                server_config(
                    create_app(services),
                    host=settings.http_host,
                    port=settings.http_port,
                    max_connections=connection_cap(fd_limit, settings.worker_concurrency),
                )
            ).run()
        else:
            stop.wait()
    finally:
        if runtime is not None:
            console.print("stopping: in-flight messages finish, held ones are released")
            runtime.stop()
        if job_worker is not None:
            job_worker.stop()
        services.close()


def _enqueue_lines(stream: TextIO) -> Iterator[tuple[int, OutgoingMessage | str]]:
    """Yield (line number, message or the reason the line is refused)."""
    for number, line in enumerate(stream, start=1):
        text = line.strip()
        if not text:
            continue
        # The bounds every door applies (shared.pipeline.bounds), checked before parsing: the parser
        # recurses once per level, and a line past them could never be shown as a dead letter.
        try:
            check_size(len(text.encode("utf-8", "surrogatepass")))
            check_json_text(text)
        except BoundsExceeded as exc:
            yield number, str(exc)
            continue
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            yield number, f"not JSON ({exc.msg} at column {exc.colno})"
            continue
        except RecursionError:
            yield number, "not JSON (nested too deeply)"
            continue
        except ValueError as exc:
            # e.g. an integer of more digits than Python converts (4300): refused, not a traceback.
            yield number, f"not JSON ({exc})"
            continue
        if not isinstance(data, dict):
            yield number, f"not a JSON object (a {type(data).__name__})"
            continue
        publisher_id = data.get("publisherId")
        if not isinstance(publisher_id, str) or not publisher_id:
            yield number, "no publisherId"
            continue
        lead_id = data.get("leadId")
        if not isinstance(lead_id, str) or not lead_id:
            # A lead without leadId takes the message id (architecture §3).
            lead_id = str(uuid.uuid4())
        yield number, envelope(text.encode(), publisher_id=publisher_id, lead_id=lead_id)


@app.command()
def enqueue(
    file: Annotated[str, typer.Argument(help="A JSON file (one object, or JSON lines); '-' for stdin.")] = "-",
) -> None:
    """Send lead messages to leads-incoming. Lines that are not JSON objects naming a publisherId are
    reported with their line number and not sent (exit status 1); the pipeline validates the rest."""
    from shared.transport import make_transport

    settings = _settings()
    transport = make_transport(settings)
    refused = sent = 0
    batch: list[OutgoingMessage] = []
    stream: TextIO
    if file == "-":
        stream = sys.stdin
    else:
        try:
            stream = Path(file).open(encoding="utf-8")  # noqa: SIM115 - closed below
        except OSError as exc:
            console.print(f"[red]cannot read {escape(file)}: {escape(str(exc.strerror))}[/red]")
            raise typer.Exit(2) from None
    if file != "-" and _is_single_object(Path(file)):
        stream.close()
        stream = _as_single_line(Path(file))
    total = _count_lines(file) if file != "-" else None
    with Progress(
        TextColumn("enqueue"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        disable=total is None or total < 200,
    ) as progress:
        task = progress.add_task("enqueue", total=total)
        for number, item in _enqueue_lines(stream):
            if isinstance(item, str):
                refused += 1
                console.print(f"[red]line {number}: {escape(item)}; not sent[/red]")
            else:
                batch.append(item)
                if len(batch) >= SEND_BATCH:
                    transport.send(QUEUE_INCOMING, batch)
                    sent += len(batch)
                    batch = []
            progress.update(task, completed=number)
        if batch:
            transport.send(QUEUE_INCOMING, batch)
            sent += len(batch)
    stream.close()
    transport.close()
    out.print(f"sent {sent} message(s) to {QUEUE_INCOMING}; refused {refused}")
    if refused:
        raise typer.Exit(1)


#: A pretty-printed single message is a lead, so it is small; JSON lines files may be any size.
MAX_SINGLE_OBJECT = 4 * 1024 * 1024


def _is_single_object(path: Path) -> bool:
    """True for a file holding one pretty-printed JSON object spread over lines.

    Decided from the first non-blank line alone, so a large JSON lines file is streamed, never read
    whole: a line that is complete JSON on its own means JSON lines.
    """
    try:
        with path.open(encoding="utf-8") as handle:
            first = next((line for line in handle if line.strip()), "")
    except (OSError, UnicodeDecodeError):
        return False
    try:
        check_json_text(first)
        json.loads(first)
        return False
    except json.JSONDecodeError:
        pass
    except (BoundsExceeded, ValueError, RecursionError):
        return False  # a complete line past the bounds: JSON lines, each line judged on its own
    try:
        if path.stat().st_size > MAX_SINGLE_OBJECT:
            return False
        text = path.read_text(encoding="utf-8")
        check_json_text(text)
        return isinstance(json.loads(text), dict)
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return False


def _as_single_line(path: Path) -> TextIO:
    import io

    return io.StringIO(json.dumps(json.loads(path.read_text(encoding="utf-8"))) + "\n")


def _count_lines(file: str) -> int | None:
    try:
        with Path(file).open("rb") as handle:
            return sum(1 for _ in handle)
    except OSError:
        return None


# -- dead letters --------------------------------------------------------------------------------

_REASON_NAMES = ", ".join([*(str(r) for r in DeadLetterReason), UNKNOWN_REASON])
QueueOpt = Annotated[
    list[str] | None, typer.Option("--queue", help=f"Stage queue (repeatable): {', '.join(STAGE_QUEUES)}.")
]
ReasonOpt = Annotated[
    list[str] | None,
    typer.Option("--reason", help=f"Dead-letter reason (repeatable): {_REASON_NAMES} (no reason given)."),
]
PublisherOpt = Annotated[str | None, typer.Option("--publisher", help="Publisher id.")]
MessageIdOpt = Annotated[list[str] | None, typer.Option("--message-id", help="Message id (repeatable).")]
LimitOpt = Annotated[int | None, typer.Option("--limit", min=1, help="At most this many.")]
BeforeOpt = Annotated[
    datetime | None, typer.Option("--enqueued-before", help="Only dead letters enqueued before (ISO time, UTC).")
]
AfterOpt = Annotated[
    datetime | None, typer.Option("--enqueued-after", help="Only dead letters enqueued at or after (ISO time, UTC).")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="One JSON object on stdout (the API's answer shape).")]

#: Dead letters counted up front so a replay or purge progress bar knows its total; past this, it doesn't.
COUNT_SCAN = 100_000
#: A count that is not zero: dead letters are what a person on call must see first.
ALERT = "bold red"
#: The dead-letter core's replay cap (plan_replay/replay default): a count at it is shown in red.
MAX_REPLAYS = 5
#: Who fixes each reason (the runbook's table); anything else is for ops.
FIXED_BY: dict[str, str] = {
    DeadLetterReason.INVALID_LEAD: "nobody: inspect / purge",
    **{str(reason): "the publisher" for reason in CONFIGURATION_REASONS},
}
#: Every table: column rules but no outer frame, titles on the left; it saves the columns 120 needs.
_TABLE: dict[str, Any] = {"box": box.MINIMAL, "pad_edge": False, "title_justify": "left"}


def _filter(
    queue: list[str] | None,
    reason: list[str] | None,
    publisher: str | None,
    message_id: list[str] | None,
    before: datetime | None = None,
    after: datetime | None = None,
) -> DeadLetterFilter:
    try:
        flt = DeadLetterFilter.build(
            queue=queue,
            reason=reason,
            publisher_id=publisher,
            message_ids=message_id,
            enqueued_before=before,
            enqueued_after=after,
        )
    except ValueError as exc:
        console.print(f"[red]{escape(str(exc))}[/red]")
        raise typer.Exit(2) from None
    # Not an error (a broker may use reasons of its own), but a typo would silently match nothing.
    known = {str(r) for r in DeadLetterReason} | {UNKNOWN_REASON}
    for name in sorted((flt.reasons or set()) - known):
        console.print(f"[yellow]note:[/yellow] {escape(name)} is not a known dead-letter reason; it may match nothing")
    return flt


def _source(settings: Settings) -> str:
    """Where the command reads and changes state: the broker (and data dir) it was pointed at."""
    if settings.queue_backend == "servicebus":
        return f"Service Bus namespace {settings.servicebus_namespace}"
    return f"embedded broker in {settings.data_dir.resolve()}"


def _say_source(settings: Settings, extra: str = "") -> None:
    """One line on stderr naming what was read, so a wrong LEADWRITER_DATA_DIR is obvious at 3 a.m."""
    console.print(f"[dim]reading {escape(_source(settings))}[/dim]", highlight=False, soft_wrap=False)
    if extra:
        console.print(f"[dim]reading {escape(extra)}[/dim]", highlight=False, soft_wrap=False)


def _count(value: int) -> Text:
    """A count for a table cell: bold red when it is not zero."""
    return Text(str(value), style=ALERT if value else "")


def _when(value: str, *, short: bool = False) -> str:
    """``2026-12-01T22:31:05Z`` → ``2026-12-01 22:31`` or, ``short``, ``Dec 01 22:31`` (UTC)."""
    if not value:
        return "-"
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00")).astimezone(UTC)
    except ValueError:
        return value
    return moment.strftime("%b %d %H:%M" if short else "%Y-%m-%d %H:%M")


def _summary_table(items: list[DeadLetterItem], title: str) -> Table:
    """Counts by queue, reason and publisher, largest first."""
    summary = Table(title=title, **_TABLE)
    for column in ("queue", "reason", "publisher", "count"):
        summary.add_column(column, justify="right" if column == "count" else "left")
    for (q, r, p), count in sorted(group_counts(items).items(), key=lambda kv: (-kv[1], kv[0][0], kv[0][1])):
        summary.add_row(q, r, p or "-", _count(count))
    return summary


def _detail_table(items: list[DeadLetterItem]) -> Table:
    """One row per dead letter, compact enough for 120 columns: the id to act on, whose, why, when
    (UTC), how often tried and replayed."""
    table = Table(title=f"{len(items)} dead letter(s)", **_TABLE)
    table.add_column("messageId", no_wrap=True)
    table.add_column("publisher", overflow="ellipsis", no_wrap=True, max_width=14)
    table.add_column("reason", no_wrap=True)
    table.add_column("enqueued", no_wrap=True)
    table.add_column("tries", justify="right")
    table.add_column("replays", justify="right")
    for item in items:
        table.add_row(
            item.message_id,
            item.publisher_id or "-",
            item.reason or UNKNOWN_REASON,
            _when(item.to_json()["enqueuedAt"], short=True),
            str(item.delivery_count),
            _count(item.replay_count) if item.replay_count >= MAX_REPLAYS else str(item.replay_count),
        )
    return table


def _print_details(items: list[DeadLetterItem]) -> None:
    """``--wide``: each dead letter as a block of fields, so a long description wraps under its label
    instead of squeezing a table's columns."""
    out.print(f"{len(items)} dead letter(s)")
    for item in items:
        row = item.to_json()
        reason = str(row["reason"] or UNKNOWN_REASON)
        fields = Table.grid(padding=(0, 2))
        fields.add_column(style="dim", no_wrap=True)
        fields.add_column(overflow="fold")
        fields.add_row("leadId", str(row["leadId"] or "-"))
        fields.add_row("publisher", str(row["publisherId"] or "-"))
        fields.add_row("queue", str(row["queue"]))
        fields.add_row("reason", Text.assemble((reason, ALERT), f"  (fixed by: {FIXED_BY.get(reason, 'ops')})"))
        fields.add_row("enqueued", f"{_when(str(row['enqueuedAt'] or ''))} UTC")
        fields.add_row("tries", f"{row['deliveryCount']} delivery attempt(s), replayed {row['replayCount']} time(s)")
        fields.add_row("description", str(row["description"] or "-"))
        out.rule(Text(item.message_id, style="bold"), align="left")
        out.print(fields)


def _emit_json(answer: object) -> None:
    sys.stdout.write(json.dumps(answer, ensure_ascii=False) + "\n")
    sys.stdout.flush()


def _progress(name: str, *, disable: bool) -> Progress:
    return Progress(TextColumn(name), BarColumn(), MofNCompleteColumn(), console=console, disable=disable)


def _matching_total(transport: Transport, flt: DeadLetterFilter, limit: int | None) -> int | None:
    """How many dead letters a sweep will deal with (for the progress bar), or None past COUNT_SCAN."""
    scan = min(limit, COUNT_SCAN) if limit else COUNT_SCAN
    found = len(list_dead_letters(transport, flt, limit=scan))
    return None if found >= COUNT_SCAN else found


@deadletters_app.command("list")
def deadletters_list(
    queue: QueueOpt = None,
    reason: ReasonOpt = None,
    publisher: PublisherOpt = None,
    message_id: MessageIdOpt = None,
    enqueued_before: BeforeOpt = None,
    enqueued_after: AfterOpt = None,
    limit: LimitOpt = 100,
    wide: Annotated[bool, typer.Option("--wide", help="Add leadId, queue and the full description.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="JSON lines (the API's item shape, with the body).")] = False,
) -> None:
    """Show dead letters grouped by queue, reason and publisher, then one row each (compact; --wide for
    details, --json for scripts)."""
    from shared.transport import make_transport

    settings = _settings()
    flt = _filter(queue, reason, publisher, message_id, enqueued_before, enqueued_after)
    _say_source(settings)
    transport = make_transport(settings)
    try:
        items = list_dead_letters(transport, flt, limit=limit or 100)
    finally:
        transport.close()
    if as_json:
        # One compact object per line, no colour: for jq and scripts, whatever the terminal.
        for item in items:
            sys.stdout.write(json.dumps(item.to_json(), ensure_ascii=False) + "\n")
        sys.stdout.flush()
        return
    if not items:
        out.print("no dead letters match")
        return
    out.print(_summary_table(items, "Dead letters by reason and publisher"))
    if wide:
        _print_details(items)
    else:
        out.print(_detail_table(items))
    if limit and len(items) >= limit:
        out.print(f"showing the first {limit}; --limit shows more", style="yellow")


@deadletters_app.command("replay")
def deadletters_replay(
    queue: QueueOpt = None,
    reason: ReasonOpt = None,
    publisher: PublisherOpt = None,
    message_id: MessageIdOpt = None,
    enqueued_before: BeforeOpt = None,
    enqueued_after: AfterOpt = None,
    limit: LimitOpt = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Show what would move where; move nothing.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Replay dead letters to the queue they died on (new message id, same leadId; the dead letter is
    completed only after its copy was sent). Exit 1 when some were refused or failed."""
    from shared.transport import make_transport

    settings = _settings()
    flt = _filter(queue, reason, publisher, message_id, enqueued_before, enqueued_after)
    _say_source(settings)
    transport = make_transport(settings)
    try:
        if dry_run:
            plan = plan_replay(transport, flt, limit=limit)
            refusals = [entry.refused for entry in plan if entry.refused]
            if as_json:
                _emit_json(
                    {
                        "matched": len(plan),
                        "replayed": 0,
                        "refused": len(refusals),
                        "errors": [],
                        "refusals": refusals,
                        "dryRun": True,
                        "plan": [entry.to_json() for entry in plan],
                    }
                )
                return
            _print_plan(plan)
            return
        total = _matching_total(transport, flt, limit)
        with _progress("replay", disable=as_json) as progress:
            task = progress.add_task("replay", total=total)
            # The core reports how many it has dealt with so far (a running total, not a step).
            result = replay(transport, flt, limit=limit, progress=lambda n: progress.update(task, completed=n))
            progress.update(task, completed=result.matched, total=max(result.matched, total or 0))
    finally:
        transport.close()
    if as_json:
        _emit_json(result.to_json())
    else:
        out.print(f"matched {result.matched}, replayed {result.replayed}, refused {result.refused}")
        for refusal in result.refusals:
            console.print(f"[yellow]refused:[/yellow] {escape(refusal)}", soft_wrap=False)
        for error in result.errors:
            console.print(f"[red]{escape(error)}[/red]")
    if result.refused or result.errors:
        raise typer.Exit(1)


def _print_plan(plan: list[ReplayPlanEntry]) -> None:
    """The dry run: each dead letter, the queue its copy goes to, and whether it would be refused.
    The copies' new message ids are in ``--json`` (``plan[].newMessageId``)."""
    table = Table(title=f"dry run: {len(plan)} dead letter(s) match; nothing moved", **_TABLE)
    table.add_column("messageId", no_wrap=True)
    table.add_column("to queue", no_wrap=True)
    table.add_column("reason", no_wrap=True)
    table.add_column("publisher", overflow="ellipsis", no_wrap=True, max_width=12)
    table.add_column("replays", justify="right")
    table.add_column("action", no_wrap=True)
    for entry in plan:
        table.add_row(
            entry.message_id,
            entry.queue,
            entry.reason or "-",
            entry.publisher_id or "-",
            str(entry.replay_count),
            Text("refused", style=ALERT) if entry.refused else "replay",
        )
    out.print(table)
    # The full refusal below the table, where it does not fold the table's rows.
    for entry in plan:
        if entry.refused:
            out.print(f"would refuse: {escape(entry.refused)}", soft_wrap=False)


@deadletters_app.command("purge")
def deadletters_purge(
    queue: QueueOpt = None,
    reason: ReasonOpt = None,
    publisher: PublisherOpt = None,
    message_id: MessageIdOpt = None,
    enqueued_before: BeforeOpt = None,
    enqueued_after: AfterOpt = None,
    limit: LimitOpt = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Count what would be purged; purge nothing.")] = False,
    yes: Annotated[bool, typer.Option("--yes", help="Confirm: delete the matching dead letters for good.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Delete dead letters for good. Needs --yes (or --dry-run to only count). Exit 1 when some failed."""
    from shared.transport import make_transport

    settings = _settings()
    flt = _filter(queue, reason, publisher, message_id, enqueued_before, enqueued_after)
    if not dry_run and not yes:
        console.print("[red]purge deletes dead letters for good: add --yes to confirm (or --dry-run)[/red]")
        raise typer.Exit(2)
    _say_source(settings)
    transport = make_transport(settings)
    try:
        if dry_run:
            items = list_dead_letters(transport, flt, limit=limit or 10_000)
            if as_json:
                _emit_json(
                    {
                        "matched": len(items),
                        "purged": 0,
                        "errors": [],
                        "dryRun": True,
                        "messageIds": [item.message_id for item in items],
                    }
                )
                return
            if items:
                out.print(_summary_table(items, "would be purged"))
            out.print(f"dry run: {len(items)} dead letter(s) match; nothing purged")
            return
        total = _matching_total(transport, flt, limit)
        with _progress("purge", disable=as_json) as progress:
            task = progress.add_task("purge", total=total)
            result = purge(
                transport, flt, confirm=True, limit=limit, progress=lambda n: progress.update(task, completed=n)
            )
            progress.update(task, completed=result.matched, total=max(result.matched, total or 0))
    finally:
        transport.close()
    if as_json:
        _emit_json({**result.to_json(), "dryRun": False})
    else:
        out.print(f"matched {result.matched}, purged {result.purged}")
        for error in result.errors:
            console.print(f"[red]{escape(error)}[/red]")
    if result.errors:
        raise typer.Exit(1)


def _archive_source(settings: Settings) -> str:
    if settings.state_backend == "tables":
        return f"dead-letter archive in Table Storage {settings.tables_url or '(connection string)'}"
    return f"dead-letter archive {(settings.data_dir / STATE_FILE).resolve()}"


@deadletters_app.command("archive")
def deadletters_archive(
    queue: QueueOpt = None,
    reason: ReasonOpt = None,
    publisher: PublisherOpt = None,
    message_id: MessageIdOpt = None,
    enqueued_before: BeforeOpt = None,
    enqueued_after: AfterOpt = None,
    limit: LimitOpt = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Show what would be archived; change nothing.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Discard dead letters into the archive (restorable for 30 days with `deadletters restore`; the
    archive entry is written before the dead letter is removed). Exit 1 when some were refused (over
    64 KiB) or failed."""
    from shared.ops.archive import DeadLetterArchive
    from shared.state import make_state_store
    from shared.transport import make_transport

    settings = _settings()
    flt = _filter(queue, reason, publisher, message_id, enqueued_before, enqueued_after)
    _say_source(settings, _archive_source(settings))
    transport = make_transport(settings)
    state = make_state_store(settings)
    try:
        result = DeadLetterArchive(state).archive(transport, flt, limit=limit, dry_run=dry_run)
    finally:
        transport.close()
        state.close()
    if as_json:
        _emit_json(result.to_json())
    elif dry_run:
        out.print(
            f"dry run: {result.matched} dead letter(s) match, {result.refused} too large to archive; nothing moved"
        )
        for message_id_ in result.message_ids:
            out.print(f"  {message_id_}", highlight=False)
    else:
        out.print(f"matched {result.matched}, archived {result.archived}, refused {result.refused}")
    if not as_json:
        for refusal in result.refusals:
            console.print(f"[yellow]refused:[/yellow] {escape(refusal)}", soft_wrap=False)
        for error in result.errors:
            console.print(f"[red]{escape(error)}[/red]")
    if result.refused or result.errors:
        raise typer.Exit(1)


@deadletters_app.command("archived")
def deadletters_archived(
    queue: QueueOpt = None,
    reason: ReasonOpt = None,
    publisher: PublisherOpt = None,
    message_id: MessageIdOpt = None,
    limit: LimitOpt = 100,
    as_json: Annotated[bool, typer.Option("--json", help="JSON lines (the API's item shape, with the body).")] = False,
) -> None:
    """Show archived dead letters, newest archived first, with when they expire."""
    from shared.ops.archive import DeadLetterArchive
    from shared.state import make_state_store

    settings = _settings()
    flt = _filter(queue, reason, publisher, message_id)
    console.print(f"[dim]reading {escape(_archive_source(settings))}[/dim]", highlight=False, soft_wrap=False)
    state = make_state_store(settings)
    try:
        entries = DeadLetterArchive(state).list(
            queue=list(flt.queues),
            reason=sorted(flt.reasons) if flt.reasons else None,
            publisher_id=flt.publisher_id,
            message_ids=sorted(flt.message_ids) if flt.message_ids else None,
            limit=limit or 100,
        )
    finally:
        state.close()
    if as_json:
        for entry in entries:
            sys.stdout.write(json.dumps(entry.to_json(), ensure_ascii=False) + "\n")
        sys.stdout.flush()
        return
    if not entries:
        out.print("no archived dead letters match")
        return
    table = Table(title=f"{len(entries)} archived dead letter(s)", **_TABLE)
    table.add_column("messageId", no_wrap=True)
    table.add_column("publisher", overflow="ellipsis", no_wrap=True, max_width=14)
    table.add_column("reason", no_wrap=True)
    table.add_column("queue", no_wrap=True)
    table.add_column("archived", no_wrap=True)
    table.add_column("expires", no_wrap=True)
    for entry in entries:
        row = entry.to_json()
        table.add_row(
            entry.message_id,
            entry.item.publisher_id or "-",
            entry.item.reason or UNKNOWN_REASON,
            entry.item.queue,
            _when(row["archivedAt"], short=True),
            _when(row["expiresAt"], short=True),
        )
    out.print(table)


@deadletters_app.command("restore")
def deadletters_restore(
    message_id: MessageIdOpt = None,
    queue: QueueOpt = None,
    reason: ReasonOpt = None,
    publisher: PublisherOpt = None,
    limit: LimitOpt = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Show what would be sent where; send nothing.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Send archived dead letters back to the queue they died on, as a replay does, then take them out
    of the archive. Name at least one filter. Exit 1 when some failed."""
    from shared.ops.archive import DeadLetterArchive
    from shared.state import make_state_store
    from shared.transport import make_transport

    settings = _settings()
    if not (message_id or queue or reason or publisher):
        console.print("[red]name what to restore: --message-id, --queue, --reason or --publisher[/red]")
        raise typer.Exit(2)
    flt = _filter(queue, reason, publisher, message_id)
    _say_source(settings, _archive_source(settings))
    transport = make_transport(settings)
    state = make_state_store(settings)
    try:
        archive = DeadLetterArchive(state)
        entries = archive.list(
            queue=list(flt.queues),
            reason=sorted(flt.reasons) if flt.reasons else None,
            publisher_id=flt.publisher_id,
            message_ids=sorted(flt.message_ids) if flt.message_ids else None,
            limit=limit or 10_000,
        )
        result = archive.restore(transport, entries, dry_run=dry_run)
    finally:
        transport.close()
        state.close()
    if as_json:
        _emit_json(result.to_json())
    else:
        verb = "would restore" if dry_run else "restored"
        out.print(f"matched {result.matched}, {verb} {result.matched if dry_run else result.restored}")
        for step in result.plan if dry_run else []:
            out.print(f"  {step['messageId']} → {step['queue']} as {step['newMessageId']}", highlight=False)
        for error in result.errors:
            console.print(f"[red]{escape(error)}[/red]")
    if result.errors:
        raise typer.Exit(1)


@deadletters_app.command("resend")
def deadletters_resend(
    message_id: Annotated[str, typer.Argument(help="The dead letter's message id.", show_default=False)],
    body: Annotated[
        Path,
        typer.Option(
            "--body", help="A file with the corrected message (JSON); leadId and publisherId may be left out."
        ),
    ],
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only validate the corrected body.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Correct an InvalidLead or LeadRejected dead letter and send it again to the queue it died on
    (validated as a lead first; the dead letter is removed only after the copy was sent). Exit 1 when
    the body is refused, 2 when the dead letter is not there or not editable."""
    from shared.errors import InvalidLead
    from shared.ops.archive import DeadLetterNotFound, NotEditable, resend
    from shared.transport import make_transport

    settings = _settings()
    try:
        text = body.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        console.print(f"[red]cannot read {escape(str(body))}: {escape(str(exc))}[/red]")
        raise typer.Exit(2) from None
    _say_source(settings)
    transport = make_transport(settings)
    try:
        result = resend(transport, message_id, text, dry_run=dry_run)
    except (DeadLetterNotFound, NotEditable) as exc:
        console.print(f"[red]{escape(exc.message)}[/red]")
        raise typer.Exit(2) from None
    except InvalidLead as exc:
        if as_json:
            _emit_json({"error": exc.message, "field": exc.field or "body"})
        console.print(f"[red]refused, nothing sent: {escape(exc.message)}[/red] (field: {escape(exc.field or 'body')})")
        raise typer.Exit(1) from None
    finally:
        transport.close()
    if as_json:
        _emit_json(result.to_json())
    elif dry_run:
        out.print(f"valid: {result.message_id} would go to {result.queue} as {result.new_message_id}; nothing sent")
    else:
        out.print(f"resent {result.message_id} to {result.queue} as {result.new_message_id}")
    if result.error:
        console.print(f"[red]{escape(result.error)}[/red]")
        raise typer.Exit(1)


#: The status book's file in the data dir (shared.services builds it there).


@app.command()
def stats(
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object, shaped like GET /api/stats.")] = False,
) -> None:
    """Queue depths and dead letters by reason per stage queue, and publishers failing on configuration."""
    from shared.ops.status import StatusBook
    from shared.state import make_state_store
    from shared.transport import make_transport

    settings = _settings()
    state_source = (
        f"publisher status in Table Storage {settings.tables_url or '(connection string)'}"
        if settings.state_backend == "tables"
        else f"publisher status {(settings.data_dir / STATE_FILE).resolve()}"
    )
    _say_source(settings, state_source)
    transport = make_transport(settings)
    try:
        queues = [transport.stats(queue) for queue in STAGE_QUEUES]
    finally:
        transport.close()
    # The status book is written by the stage runtimes of this data dir or deployment (`leadwriter serve`).
    state = make_state_store(settings)
    book = StatusBook(state)
    try:
        failing = [s for s in book.all() if s.consecutive_config_failures > 0]
    finally:
        book.close()
        state.close()
    if as_json:
        answer = {
            "queues": [
                {
                    "queue": q.queue,
                    "active": q.active,
                    "scheduled": q.scheduled,
                    "deadLettered": q.dead_lettered,
                    "deadLetteredByReason": dict(sorted(q.dead_lettered_by_reason.items())),
                }
                for q in queues
            ],
            "publishersFailing": [
                {
                    "publisherId": s.publisher_id,
                    "consecutiveConfigFailures": s.consecutive_config_failures,
                    "lastError": s.last_error,
                    "lastErrorReason": s.last_error_reason,
                    "lastErrorAt": s.last_error_at,
                }
                for s in failing
            ],
        }
        sys.stdout.write(json.dumps(answer, ensure_ascii=False) + "\n")
        return
    table = Table(title="Lead Writer queues", **_TABLE)
    for column in ("queue", "active", "scheduled", "dead-lettered", "by reason"):
        table.add_column(column, justify="right" if column in ("active", "scheduled", "dead-lettered") else "left")
    for q in queues:
        reasons = Text(", ".join(f"{r}: {n}" for r, n in sorted(q.dead_lettered_by_reason.items())) or "-")
        if q.dead_lettered:
            reasons.stylize(ALERT)
        table.add_row(q.queue, str(q.active), str(q.scheduled), _count(q.dead_lettered), reasons)
    out.print(table)
    if failing:
        alerts = Table(
            title="Publishers failing on configuration (they fix it: see docs/runbook.md)",
            **_TABLE,
        )
        for column in ("publisher", "consecutive failures", "last reason", "last error", "at (UTC)"):
            alerts.add_column(column, overflow="fold")
        for s in sorted(failing, key=lambda s: -s.consecutive_config_failures):
            alerts.add_row(
                s.publisher_id,
                _count(s.consecutive_config_failures),
                s.last_error_reason or "-",
                (s.last_error or "-")[:160],
                _when(s.last_error_at or ""),
            )
        out.print(alerts)
    else:
        out.print("no publisher is failing on configuration")


def _state_source(settings: Settings, what: str) -> str:
    """The state store a command reads, for the line that names it."""
    if settings.state_backend == "tables":
        return f"{what} in Table Storage {settings.tables_url or '(connection string)'}"
    return f"{what} {(settings.data_dir / STATE_FILE).resolve()}"


@app.command()
def trace(
    lead_id: Annotated[str, typer.Argument(help="The marketplace lead id.", show_default=False)],
    publisher: Annotated[
        str | None, typer.Option("--publisher", help="The lead's publisher (without it: every publisher, a scan).")
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="One JSON object per publisher, shaped like GET /api/leads/{leadId}.")
    ] = False,
) -> None:
    """What happened to a lead: every settlement (stage, outcome, reason, attempt, time, CRM record id).
    Exit 1 when no settlement of it is recorded."""
    from shared.ops.journey import JourneyBook
    from shared.state import make_state_store

    settings = _settings()
    console.print(
        f"[dim]reading {escape(_state_source(settings, 'lead journeys'))}[/dim]", highlight=False, soft_wrap=False
    )
    state = make_state_store(settings)
    book = JourneyBook(state)
    try:
        journeys = [book.get(publisher, lead_id)] if publisher else book.find(lead_id)
    except ValueError as exc:  # an id the state store refuses as a key (InvalidStateKey)
        console.print(f"[red]{escape(str(exc))}[/red]")
        raise typer.Exit(2) from None
    finally:
        book.close()
        state.close()
    journeys = [journey for journey in journeys if journey.events]
    if as_json:
        for journey in journeys:
            _emit_json(journey.to_json())
    for journey in [] if as_json else journeys:
        state_style = {"delivered": "green", "dead-lettered": ALERT}.get(journey.state, "yellow")
        title = Text.assemble(
            f"lead {journey.lead_id} of {journey.publisher_id}: ",
            (journey.state, state_style),
            f"  (CRM record {journey.record_id})" if journey.record_id else "",
        )
        table = Table(title=title, **_TABLE)
        for column in ("at (UTC)", "stage", "outcome", "attempt", "reason / record"):
            table.add_column(column, justify="right" if column == "attempt" else "left", overflow="fold")
        for event in journey.events:
            outcome = Text(event.action, style=ALERT if event.action == "dead-lettered" else "")
            detail = event.reason or ""
            if event.record_id:
                detail = f"record {event.record_id}" + (" (created)" if event.created else " (already there)")
            elif event.description:
                detail = f"{detail}: {event.description}" if detail else event.description
            if event.delay is not None:
                detail = f"{detail} (again in {event.delay:g} s)".strip()
            attempt = str(event.attempt) + (f" r{event.replay_count}" if event.replay_count else "")
            table.add_row(event.at.replace("T", " ")[:23], event.stage, outcome, attempt, detail[:300] or "-")
        out.print(table)
    if not journeys:
        where = f" of publisher {publisher}" if publisher else ""
        console.print(f"[yellow]no settlement of lead {escape(lead_id)}{escape(where)} is recorded[/yellow]")
        raise typer.Exit(1)


@app.command("crm-simulator")
def crm_simulator(
    config: Annotated[Path | None, typer.Option(help="JSON file of orgs, users and apps.")] = None,
    host: Annotated[str, typer.Option(help="Loopback address to listen on.")] = "127.0.0.2",
    authority_port: Annotated[int, typer.Option(help="Port of the Entra authority (443 for the password flow).")] = 443,
) -> None:
    """The local Dataverse + Entra ID simulator over HTTPS (architecture §9)."""
    from shared.simulator.cli import run

    settings = _settings()
    _configure_logging(settings)
    run(config, settings.data_dir, host, authority_port)


@app.command()
def demo(
    keep: Annotated[bool, typer.Option(help="Keep the demo data dir from an earlier run.")] = False,
) -> None:
    """The main job end to end on the embedded default, against the local CRM simulator."""
    from shared.tools.demo import run_demo

    raise typer.Exit(run_demo(keep=keep))


@app.command()
def bench(
    scenario: Annotated[
        str,
        typer.Option(
            help="throughput (default), nobatch, limits, execution, overhead, isolation, memory, heal, "
            "endtoend or publishers; see BENCHMARKS.md."
        ),
    ] = "throughput",
    leads: Annotated[int | None, typer.Option(min=1, help="Leads to deliver (default: the scenario's).")] = None,
    publishers: Annotated[int | None, typer.Option(min=1, help="Publishers the leads are spread over.")] = None,
    latency: Annotated[float | None, typer.Option(min=0, help="Simulated CRM latency in seconds.")] = None,
    naive_leads: Annotated[int | None, typer.Option(min=0, help="Leads for the naive deliverer (0: skip it).")] = None,
    rate: Annotated[float | None, typer.Option(min=0, help="Leads per second to enqueue (0: all at once).")] = None,
    requests_per_window: Annotated[int | None, typer.Option(min=1, help="Simulated service protection limit.")] = None,
    window_seconds: Annotated[float | None, typer.Option(min=1, help="Its sliding window in seconds.")] = None,
    max_batch: Annotated[
        int | None, typer.Option(min=1, max=1000, help="Leads per $batch at most (1: no batching).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print every figure and target as JSON.")] = False,
) -> None:
    """Measure delivery in one scenario, against a naive deliverer where it applies (architecture §10).

    Options given override the scenario's values.
    """
    from shared.tools.bench import run_bench

    raise typer.Exit(
        run_bench(
            scenario=scenario,
            leads=leads,
            publishers=publishers,
            latency=latency,
            naive_leads=naive_leads,
            rate=rate,
            requests_per_window=requests_per_window,
            window_seconds=window_seconds,
            max_batch=max_batch,
            as_json=as_json,
        )
    )


def main() -> None:
    app()


if __name__ == "__main__":
    main()
