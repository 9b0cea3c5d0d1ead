"""The ``leadwriter`` command line (DESIGN §7, stable command names).

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
from pathlib import Path
from typing import Annotated, TextIO

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from shared.deadletters import DeadLetterFilter, group_counts, list_dead_letters, plan_replay, purge, replay
from shared.errors import ConfigurationError
from shared.messages import envelope
from shared.names import QUEUE_INCOMING, STAGE_QUEUES
from shared.settings import Settings
from shared.transport.base import OutgoingMessage

app = typer.Typer(help="Lead Writer: marketplace leads into Dynamics 365 / Dataverse.", no_args_is_help=True)
deadletters_app = typer.Typer(help="See, replay and purge dead letters.", no_args_is_help=True)
app.add_typer(deadletters_app, name="deadletters")

console = Console(stderr=True)
out = Console()
logger = logging.getLogger(__name__)

SEND_BATCH = 100


def _settings() -> Settings:
    try:
        return Settings.from_env()
    except ConfigurationError as exc:
        console.print(f"[red]configuration error:[/red] {exc}")
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
    from shared.runtime import EmbeddedRuntime
    from shared.services import Services

    settings = _settings()
    _configure_logging(settings)
    services = Services.from_settings(settings)
    runtime = None
    if workers:
        runtime = EmbeddedRuntime(
            services.transport,
            services.pipeline,
            concurrency=settings.worker_concurrency,
            publisher_concurrency=settings.publisher_concurrency,
            observer=services.status.observe,
        ).start()
        console.print("[green]stage workers running[/green]")
    try:
        if api:
            import uvicorn

            from shared.api.app import create_app

            console.print(f"[green]API on http://{settings.http_host}:{settings.http_port}/api[/green]")
            # uvicorn handles SIGINT/SIGTERM itself and returns after finishing requests in flight.
            uvicorn.run(create_app(services), host=settings.http_host, port=settings.http_port, log_level="warning")
        else:
            stop = threading.Event()
            signal.signal(signal.SIGTERM, lambda *_: stop.set())
            signal.signal(signal.SIGINT, lambda *_: stop.set())
            stop.wait()
    finally:
        if runtime is not None:
            console.print("stopping: in-flight messages finish, held ones are released")
            runtime.stop()
        services.close()


def _enqueue_lines(stream: TextIO) -> Iterator[tuple[int, OutgoingMessage | str]]:
    """Yield (line number, message or the reason the line is refused)."""
    for number, line in enumerate(stream, start=1):
        text = line.strip()
        if not text:
            continue
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            yield number, f"not JSON ({exc.msg} at column {exc.colno})"
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
            # A lead without leadId takes the message id (DESIGN §3).
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
            console.print(f"[red]cannot read {file}: {exc.strerror}[/red]")
            raise typer.Exit(2) from None
    if file != "-" and _is_single_object(file):
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
                console.print(f"[red]line {number}: {item}; not sent[/red]")
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


def _is_single_object(file: str) -> bool:
    """A pretty-printed single JSON object spans lines; treat a file that parses whole as one message."""
    try:
        text = Path(file).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return False
    if text.count("\n") <= 1:
        return False
    try:
        return isinstance(json.loads(text), dict)
    except json.JSONDecodeError:
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

QueueOpt = Annotated[list[str] | None, typer.Option("--queue", help="Stage queue (repeatable).")]
ReasonOpt = Annotated[list[str] | None, typer.Option("--reason", help="Dead-letter reason (repeatable).")]
PublisherOpt = Annotated[str | None, typer.Option("--publisher", help="Publisher id.")]
MessageIdOpt = Annotated[list[str] | None, typer.Option("--message-id", help="Message id (repeatable).")]
LimitOpt = Annotated[int | None, typer.Option("--limit", min=1, help="At most this many.")]


def _filter(
    queue: list[str] | None, reason: list[str] | None, publisher: str | None, message_id: list[str] | None
) -> DeadLetterFilter:
    try:
        return DeadLetterFilter.build(queue=queue, reason=reason, publisher_id=publisher, message_ids=message_id)
    except ValueError as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from None


@deadletters_app.command("list")
def deadletters_list(
    queue: QueueOpt = None,
    reason: ReasonOpt = None,
    publisher: PublisherOpt = None,
    message_id: MessageIdOpt = None,
    limit: LimitOpt = 100,
    as_json: Annotated[bool, typer.Option("--json", help="JSON lines instead of tables.")] = False,
) -> None:
    """Show dead letters grouped by reason and publisher, then the messages themselves."""
    from shared.transport import make_transport

    settings = _settings()
    flt = _filter(queue, reason, publisher, message_id)
    transport = make_transport(settings)
    try:
        items = list_dead_letters(transport, flt, limit=limit or 100)
    finally:
        transport.close()
    if as_json:
        for item in items:
            out.print_json(json.dumps(item.to_json()))
        return
    summary = Table(title="Dead letters by reason and publisher")
    for column in ("queue", "reason", "publisher", "count"):
        summary.add_column(column, justify="right" if column == "count" else "left")
    for (q, r, p), count in sorted(group_counts(items).items(), key=lambda kv: (-kv[1], kv[0][0], kv[0][1])):
        summary.add_row(q, r, p or "-", str(count))
    out.print(summary)
    detail = Table(title=f"{len(items)} dead letter(s)")
    for column in (
        "messageId",
        "leadId",
        "publisher",
        "queue",
        "reason",
        "description",
        "enqueued",
        "deliveries",
        "replays",
    ):
        detail.add_column(column, overflow="fold")
    for item in items:
        row = item.to_json()
        detail.add_row(
            str(row["messageId"]),
            str(row["leadId"] or "-"),
            str(row["publisherId"] or "-"),
            str(row["queue"]),
            str(row["reason"] or "-"),
            str(row["description"] or "-")[:120],
            str(row["enqueuedAt"]),
            str(row["deliveryCount"]),
            str(row["replayCount"]),
        )
    out.print(detail)


@deadletters_app.command("replay")
def deadletters_replay(
    queue: QueueOpt = None,
    reason: ReasonOpt = None,
    publisher: PublisherOpt = None,
    message_id: MessageIdOpt = None,
    limit: LimitOpt = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Show what would move where; move nothing.")] = False,
) -> None:
    """Replay dead letters to the queue they died on (new message id, same leadId; the dead letter is
    completed only after its copy was sent). Exit 1 when some were refused or failed."""
    from shared.transport import make_transport

    settings = _settings()
    flt = _filter(queue, reason, publisher, message_id)
    transport = make_transport(settings)
    try:
        if dry_run:
            plan = plan_replay(transport, flt, limit=limit)
            table = Table(title=f"dry run: {len(plan)} dead letter(s) match; nothing moved")
            for column in ("messageId", "queue", "newMessageId", "reason", "publisher", "replays", "refused"):
                table.add_column(column, overflow="fold")
            for entry in plan:
                table.add_row(
                    entry.message_id,
                    entry.queue,
                    entry.new_message_id,
                    entry.reason or "-",
                    entry.publisher_id or "-",
                    str(entry.replay_count),
                    entry.refused or "",
                )
            out.print(table)
            return
        with Progress(TextColumn("replay"), BarColumn(), MofNCompleteColumn(), console=console) as progress:
            task = progress.add_task("replay", total=None)
            result = replay(transport, flt, limit=limit, progress=lambda n: progress.update(task, advance=n))
    finally:
        transport.close()
    out.print(f"matched {result.matched}, replayed {result.replayed}, refused {result.refused}")
    for error in result.errors:
        console.print(f"[red]{error}[/red]")
    if result.refused or result.errors:
        raise typer.Exit(1)


@deadletters_app.command("purge")
def deadletters_purge(
    queue: QueueOpt = None,
    reason: ReasonOpt = None,
    publisher: PublisherOpt = None,
    message_id: MessageIdOpt = None,
    limit: LimitOpt = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Count what would be purged; purge nothing.")] = False,
    yes: Annotated[bool, typer.Option("--yes", help="Confirm: delete the matching dead letters for good.")] = False,
) -> None:
    """Delete dead letters for good. Needs --yes (or --dry-run to only count)."""
    from shared.transport import make_transport

    settings = _settings()
    flt = _filter(queue, reason, publisher, message_id)
    transport = make_transport(settings)
    try:
        if dry_run:
            items = list_dead_letters(transport, flt, limit=limit or 10_000)
            out.print(f"dry run: {len(items)} dead letter(s) match; nothing purged")
            return
        if not yes:
            console.print("[red]purge deletes dead letters for good: add --yes to confirm (or --dry-run)[/red]")
            raise typer.Exit(2)
        with Progress(TextColumn("purge"), BarColumn(), MofNCompleteColumn(), console=console) as progress:
            task = progress.add_task("purge", total=None)
            result = purge(
                transport, flt, confirm=True, limit=limit, progress=lambda n: progress.update(task, advance=n)
            )
    finally:
        transport.close()
    out.print(f"matched {result.matched}, purged {result.purged}")


@app.command()
def stats() -> None:
    """Queue depths and dead letters by reason, per stage queue."""
    from shared.transport import make_transport

    settings = _settings()
    transport = make_transport(settings)
    table = Table(title="Lead Writer queues")
    for column in ("queue", "active", "scheduled", "dead-lettered", "by reason"):
        table.add_column(column)
    try:
        for queue in STAGE_QUEUES:
            s = transport.stats(queue)
            reasons = ", ".join(f"{r}: {n}" for r, n in sorted(s.dead_lettered_by_reason.items())) or "-"
            table.add_row(queue, str(s.active), str(s.scheduled), str(s.dead_lettered), reasons)
    finally:
        transport.close()
    out.print(table)


@app.command("crm-simulator")
def crm_simulator(
    config: Annotated[Path | None, typer.Option(help="JSON file of orgs, users and apps.")] = None,
    host: Annotated[str, typer.Option(help="Loopback address to listen on.")] = "127.0.0.2",
    authority_port: Annotated[int, typer.Option(help="Port of the Entra authority (443 for the password flow).")] = 443,
) -> None:
    """The local Dataverse + Entra ID simulator over HTTPS (DESIGN §9)."""
    from shared.simulator.cli import run

    settings = _settings()
    _configure_logging(settings)
    run(config, settings.data_dir, host, authority_port)


@app.command()
def demo(
    keep: Annotated[bool, typer.Option(help="Keep the demo data dir from an earlier run.")] = False,
) -> None:
    """The main job end to end on the embedded default, against the local CRM simulator."""
    from shared.demo import run_demo

    raise typer.Exit(run_demo(keep=keep))


@app.command()
def bench(
    leads: Annotated[int, typer.Option(min=1, help="Leads to deliver.")] = 2000,
    publishers: Annotated[int, typer.Option(min=1, help="Publishers the leads are spread over.")] = 1,
    latency: Annotated[float, typer.Option(min=0, help="Simulated CRM latency in seconds.")] = 0.05,
    naive_leads: Annotated[int, typer.Option(min=1, help="Leads for the naive deliverer.")] = 100,
    rate: Annotated[float, typer.Option(min=0, help="Leads per second to enqueue (0: all at once).")] = 0.0,
    requests_per_window: Annotated[int, typer.Option(help="Simulated service protection limit.")] = 6000,
    window_seconds: Annotated[float, typer.Option(help="Its sliding window in seconds.")] = 300.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print the figures as JSON.")] = False,
) -> None:
    """Measure delivery against a naive deliverer in the same run (DESIGN §10)."""
    from shared.bench import run_bench

    raise typer.Exit(
        run_bench(
            leads=leads,
            publishers=publishers,
            latency=latency,
            naive_leads=naive_leads,
            rate=rate,
            requests_per_window=requests_per_window,
            window_seconds=window_seconds,
            as_json=as_json,
        )
    )


def main() -> None:
    app()


if __name__ == "__main__":
    main()
