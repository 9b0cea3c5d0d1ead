"""The ``leadwriter`` command line, run as the real entry point in a subprocess (architecture §7).

Each test points ``LEADWRITER_DATA_DIR`` at ``tmp_path`` (embedded broker), seeds dead letters through
the same transport the CLI builds (send, receive, dead-letter: the broker's own path to a dead letter),
runs one command, and checks its output, its exit code (0 done, 1 refused or failed, 2 usage or
configuration) and what the broker holds afterwards.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

from shared.errors import DeadLetterReason
from shared.names import (
    PROP_LEAD_ID,
    PROP_REPLAY_COUNT,
    QUEUE_INCOMING,
    QUEUE_READY,
    QUEUE_VALIDATED,
    STAGE_QUEUES,
    STATE_FILE,
)
from shared.ops.status import StatusBook
from shared.pipeline.messages import envelope
from shared.pipeline.outcomes import Reject
from shared.pipeline.settle import settle
from shared.settings import Settings
from shared.state import EmbeddedStateStore
from shared.transport import make_transport
from shared.transport.base import ReceivedMessage, Transport

REPO = Path(__file__).resolve().parent.parent
#: The console script ``pip install -e .`` puts next to the interpreter; ``-m shared.tools.cli`` if absent.
SCRIPT = Path(sys.executable).with_name("leadwriter")
COMMAND = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "shared.tools.cli"]


@dataclass(frozen=True)
class Seed:
    queue: str
    lead_id: str
    publisher_id: str
    reason: str
    replays: int = 0


#: Several queues, reasons and publishers; tailspin's dead letter is at the replay cap (5).
SEEDS: tuple[Seed, ...] = (
    Seed(QUEUE_INCOMING, "in-1", "contoso", DeadLetterReason.INVALID_LEAD),
    Seed(QUEUE_INCOMING, "in-2", "fabrikam", DeadLetterReason.CREDENTIALS_REJECTED),
    Seed(QUEUE_VALIDATED, "val-1", "contoso", DeadLetterReason.SOLUTION_MISSING),
    Seed(QUEUE_READY, "ready-1", "contoso", DeadLetterReason.LEAD_REJECTED),
    Seed(QUEUE_READY, "ready-2", "fabrikam", DeadLetterReason.RETRIES_EXHAUSTED),
    Seed(QUEUE_READY, "ready-3", "contoso", DeadLetterReason.LEAD_REJECTED),
    Seed(QUEUE_READY, "capped-1", "tailspin", DeadLetterReason.RETRIES_EXHAUSTED, replays=5),
)
ALL_IDS = {seed.lead_id if not seed.replays else f"{seed.lead_id}.r{seed.replays}" for seed in SEEDS}


@dataclass
class Cli:
    env: dict[str, str]
    transport: Transport

    def run(self, *args: str, stdin: str | None = None, env: Mapping[str, str] | None = None) -> Result:
        completed = subprocess.run(
            [*COMMAND, *args],
            cwd=REPO,
            env={**self.env, **(env or {})},
            input=stdin,
            capture_output=True,
            encoding="utf-8",
            timeout=60,
            check=False,
        )
        return Result(completed.returncode, completed.stdout, completed.stderr)

    def dead_letter_ids(self, queue: str | None = None) -> set[str]:
        queues = [queue] if queue else list(STAGE_QUEUES)
        return {m.message_id for q in queues for m in self.transport.peek_dead_letters(q, max_messages=1000)}

    def receive_all(self, queue: str) -> list[ReceivedMessage]:
        return self.transport.receive(queue, max_messages=100)

    def seed(self, seed: Seed) -> None:
        body = {"leadId": seed.lead_id, "publisherId": seed.publisher_id, "lead": {"UserDetails": {"FirstName": "Ada"}}}
        message = envelope(
            json.dumps(body).encode(), publisher_id=seed.publisher_id, lead_id=seed.lead_id, replay=seed.replays
        )
        self.transport.send(seed.queue, [message])
        [received] = self.transport.receive(seed.queue, max_messages=1)
        self.transport.dead_letter(received, seed.reason, f"seeded {seed.reason}")


@dataclass(frozen=True)
class Result:
    code: int
    stdout: str
    stderr: str


@pytest.fixture
def cli(tmp_path: Path) -> Iterator[Cli]:
    # Only this test's settings: nothing inherited may point the CLI at another broker or at Azure.
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("LEADWRITER_", "APPLICATIONINSIGHTS_", "ServiceBusConnection"))
    }
    env.update(
        LEADWRITER_DATA_DIR=str(tmp_path / "data"),
        COLUMNS="200",  # rich tables are as wide as this, so cells are not folded
        NO_COLOR="1",
        PYTHONIOENCODING="utf-8",
    )
    transport = make_transport(Settings.from_env(env))
    try:
        yield Cli(env, transport)
    finally:
        transport.close()


@pytest.fixture
def seeded(cli: Cli) -> Cli:
    for seed in SEEDS:
        cli.seed(seed)
    assert cli.dead_letter_ids() == ALL_IDS
    return cli


def table_rows(text: str) -> list[list[str]]:
    """The body rows of the rich tables in ``text`` (column rules, no frame), as lists of cell texts.

    A header is the row just above a ``╶──┼──╴`` rule; it is left out.
    """
    rows: list[list[str]] = []
    for line in text.splitlines():
        if "┼" in line:
            rows.pop()  # the header row above the rule
        elif "│" in line and line.strip(" │"):
            rows.append([cell.strip() for cell in line.split("│")])
    return rows


def longest_line(text: str) -> int:
    return max((len(line) for line in text.splitlines()), default=0)


# -- enqueue ----------------------------------------------------------------------------------------


def test_enqueue_sends_good_lines_and_reports_bad_ones_by_line_number_with_exit_1(cli: Cli, tmp_path: Path) -> None:
    leads = tmp_path / "leads.jsonl"
    leads.write_text(
        "\n".join(
            [
                json.dumps({"publisherId": "contoso", "leadId": "lead-1", "lead": {}}),
                json.dumps(["not", "an", "object"]),
                json.dumps({"leadId": "lead-3", "lead": {}}),
                "",
                json.dumps({"publisherId": "fabrikam", "lead": {}}),
            ]
        )
        + "\n",
        encoding="utf-8",
    )

    result = cli.run("enqueue", str(leads))

    assert result.code == 1
    assert "sent 2 message(s) to leads-incoming; refused 2" in result.stdout
    assert re.search(r"line 2: not a JSON object.*not sent", result.stderr)
    assert re.search(r"line 3: no publisherId.*not sent", result.stderr)
    assert "line 5" not in result.stderr
    sent = cli.receive_all(QUEUE_INCOMING)
    assert sorted(str(m.application_properties["publisherId"]) for m in sent) == ["contoso", "fabrikam"]
    assert "lead-1" in {m.message_id for m in sent}, "the leadId is the message id"


@pytest.mark.parametrize("first", [False, True], ids=["hostile-lines-inside", "hostile-first-line"])
@pytest.mark.parametrize("stdin", [False, True], ids=["file", "stdin"])
def test_enqueue_reports_lines_nested_too_deep_or_with_huge_integers_and_sends_the_rest(
    cli: Cli, tmp_path: Path, first: bool, stdin: bool
) -> None:
    good = [json.dumps({"publisherId": "contoso", "leadId": f"good-{n}", "lead": {}}) for n in range(3)]
    hostile = [
        '{"publisherId": "contoso", "leadId": "deep-300", "x": ' + "[" * 300 + "]" * 300 + "}",
        '{"publisherId": "contoso", "leadId": "deep-1000", "x": ' + "[" * 1000 + "]" * 1000 + "}",
        '{"publisherId": "contoso", "leadId": "digits", "n": ' + "7" * 5000 + "}",
    ]
    lines = [*hostile, *good] if first else [good[0], *hostile, good[1], good[2]]
    text = "\n".join(lines) + "\n"
    if stdin:
        result = cli.run("enqueue", "-", stdin=text)
    else:
        path = tmp_path / "hostile.jsonl"
        path.write_text(text, encoding="utf-8")
        result = cli.run("enqueue", str(path))

    assert result.code == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert "sent 3 message(s) to leads-incoming; refused 3" in result.stdout
    numbers = [lines.index(line) + 1 for line in hostile]
    assert re.search(rf"line {numbers[0]}: .*nested more than 32 levels.*not sent", result.stderr)
    assert re.search(rf"line {numbers[1]}: .*nested more than 32 levels.*not sent", result.stderr)
    assert re.search(rf"line {numbers[2]}: not JSON .*digits.*not sent", result.stderr)
    assert sorted(m.message_id for m in cli.receive_all(QUEUE_INCOMING)) == ["good-0", "good-1", "good-2"]


def test_enqueue_dash_reads_json_lines_from_stdin(cli: Cli) -> None:
    lines = "".join(json.dumps({"publisherId": "contoso", "leadId": f"stdin-{n}"}) + "\n" for n in range(3))

    result = cli.run("enqueue", "-", stdin=lines)

    assert result.code == 0, result.stderr
    assert "sent 3 message(s)" in result.stdout
    assert {m.message_id for m in cli.receive_all(QUEUE_INCOMING)} == {"stdin-0", "stdin-1", "stdin-2"}


def test_enqueue_sends_a_pretty_printed_single_object_as_one_message(cli: Cli, tmp_path: Path) -> None:
    lead = {"publisherId": "contoso", "leadId": "pretty-1", "lead": {"UserDetails": {"FirstName": "Ada"}}}
    path = tmp_path / "lead.json"
    path.write_text(json.dumps(lead, indent=2), encoding="utf-8")

    result = cli.run("enqueue", str(path))

    assert result.code == 0, result.stderr
    [message] = cli.receive_all(QUEUE_INCOMING)
    assert message.message_id == "pretty-1"
    assert json.loads(message.body) == lead


def test_enqueue_of_a_missing_file_exits_2_and_sends_nothing(cli: Cli, tmp_path: Path) -> None:
    result = cli.run("enqueue", str(tmp_path / "missing.jsonl"))

    assert result.code == 2
    assert "cannot read" in result.stderr
    assert "missing.jsonl" in result.stderr
    assert cli.transport.stats(QUEUE_INCOMING).active == 0


# -- deadletters list -------------------------------------------------------------------------------


def test_list_shows_dead_letters_grouped_by_reason_and_publisher(seeded: Cli) -> None:
    result = seeded.run("deadletters", "list")

    assert result.code == 0, result.stderr
    summary = result.stdout.split("dead letter(s)")[0]
    counts = {tuple(row[:3]): int(row[3]) for row in table_rows(summary)}
    assert counts == {
        (QUEUE_INCOMING, "InvalidLead", "contoso"): 1,
        (QUEUE_INCOMING, "CredentialsRejected", "fabrikam"): 1,
        (QUEUE_VALIDATED, "SolutionMissing", "contoso"): 1,
        (QUEUE_READY, "LeadRejected", "contoso"): 2,
        (QUEUE_READY, "RetriesExhausted", "fabrikam"): 1,
        (QUEUE_READY, "RetriesExhausted", "tailspin"): 1,
    }
    assert table_rows(summary)[0][:4] == [QUEUE_READY, "LeadRejected", "contoso", "2"], "largest group first"
    assert "7 dead letter(s)" in result.stdout


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ((), ALL_IDS),
        (("--queue", QUEUE_READY), {"ready-1", "ready-2", "ready-3", "capped-1.r5"}),
        (("--reason", "LeadRejected", "--reason", "InvalidLead"), {"in-1", "ready-1", "ready-3"}),
        (("--publisher", "fabrikam", "--queue", QUEUE_READY), {"ready-2"}),
    ],
    ids=["everything", "one-queue", "two-reasons", "publisher-and-queue"],
)
def test_list_json_prints_one_object_per_line_for_exactly_the_filtered_dead_letters(
    seeded: Cli, args: tuple[str, ...], expected: set[str]
) -> None:
    result = seeded.run("deadletters", "list", "--json", *args)

    assert result.code == 0, result.stderr
    items = [json.loads(line) for line in result.stdout.splitlines()]
    assert {item["messageId"] for item in items} == expected
    for item in items:
        assert {"messageId", "leadId", "publisherId", "queue", "reason", "description", "enqueuedAt"} <= set(item)
        assert item["body"]["leadId"] == item["leadId"]


def test_list_of_an_unknown_queue_exits_2_naming_the_stage_queues(seeded: Cli) -> None:
    result = seeded.run("deadletters", "list", "--queue", "leads-nowhere")

    assert result.code == 2
    assert "leads-nowhere" in result.stderr
    assert all(queue in result.stderr for queue in STAGE_QUEUES)
    assert result.stdout == ""


# -- deadletters replay -----------------------------------------------------------------------------


def test_replay_dry_run_shows_what_would_move_where_and_moves_nothing(seeded: Cli) -> None:
    result = seeded.run("deadletters", "replay", "--dry-run", "--queue", QUEUE_READY)

    assert result.code == 0, result.stderr
    rows = {row[0]: row for row in table_rows(result.stdout)}
    assert set(rows) == {"ready-1", "ready-2", "ready-3", "capped-1.r5"}
    assert rows["ready-1"][1] == QUEUE_READY, "the queue it died on"
    assert rows["ready-1"][-1] == "replay"
    assert rows["capped-1.r5"][-1] == "refused"
    assert re.search(r"would refuse: .*capped-1\.r5.*replay cap is 5", result.stdout)
    assert "nothing moved" in result.stdout
    assert seeded.dead_letter_ids() == ALL_IDS
    assert all(seeded.transport.stats(queue).active == 0 for queue in STAGE_QUEUES)


def test_replay_with_filters_moves_only_the_selected_dead_letters_under_new_ids(seeded: Cli) -> None:
    result = seeded.run("deadletters", "replay", "--reason", "LeadRejected", "--publisher", "contoso")

    assert result.code == 0, result.stderr
    assert "matched 2, replayed 2, refused 0" in result.stdout
    assert seeded.dead_letter_ids() == ALL_IDS - {"ready-1", "ready-3"}
    replayed = {m.message_id: m for m in seeded.receive_all(QUEUE_READY)}
    assert set(replayed) == {"ready-1.r1", "ready-3.r1"}
    copy = replayed["ready-1.r1"]
    assert copy.application_properties[PROP_LEAD_ID] == "ready-1"
    assert copy.application_properties[PROP_REPLAY_COUNT] == 1
    assert not any(name.startswith("DeadLetter") for name in copy.application_properties)
    assert all(seeded.transport.stats(queue).active == 0 for queue in (QUEUE_INCOMING, QUEUE_VALIDATED))


def test_replay_of_a_dead_letter_at_the_replay_cap_is_refused_with_exit_1(seeded: Cli) -> None:
    result = seeded.run("deadletters", "replay", "--publisher", "tailspin")

    assert result.code == 1
    assert "matched 1, replayed 0, refused 1" in result.stdout
    assert re.search(r"refused: .*capped-1\.r5.*replay cap is 5", result.stderr)
    assert seeded.dead_letter_ids() == ALL_IDS
    assert seeded.transport.stats(QUEUE_READY).active == 0


# -- deadletters purge ------------------------------------------------------------------------------


def test_purge_without_yes_exits_2_and_purges_nothing(seeded: Cli) -> None:
    result = seeded.run("deadletters", "purge", "--reason", "InvalidLead")

    assert result.code == 2
    assert "--yes" in result.stderr
    assert seeded.dead_letter_ids() == ALL_IDS


def test_purge_dry_run_counts_the_selection_and_purges_nothing(seeded: Cli) -> None:
    result = seeded.run("deadletters", "purge", "--dry-run", "--publisher", "contoso")

    assert result.code == 0, result.stderr
    assert "dry run: 4 dead letter(s) match; nothing purged" in result.stdout
    assert seeded.dead_letter_ids() == ALL_IDS


def test_purge_with_yes_removes_only_the_filtered_dead_letters(seeded: Cli) -> None:
    result = seeded.run("deadletters", "purge", "--yes", "--publisher", "fabrikam")

    assert result.code == 0, result.stderr
    assert "matched 2, purged 2" in result.stdout
    # The progress bar counts dead letters dealt with (2), not the sum of its running totals.
    assert re.search(r"purge\b.*\b2/2\b", result.stderr), "the bar knows its total"
    assert seeded.dead_letter_ids() == ALL_IDS - {"in-2", "ready-2"}


# -- stats and settings -----------------------------------------------------------------------------


def fail_on_configuration(cli: Cli, publisher_id: str, times: int) -> None:
    """Dead-letter leads of ``publisher_id`` as the stage worker does: settle(), observed by the status book."""
    state = EmbeddedStateStore(Path(cli.env["LEADWRITER_DATA_DIR"]) / STATE_FILE)
    status = StatusBook(state)
    for n in range(times):
        lead_id = f"{publisher_id}-{n}"
        cli.transport.send(QUEUE_INCOMING, [envelope(b"{}", publisher_id=publisher_id, lead_id=lead_id)])
        [message] = cli.transport.receive(QUEUE_INCOMING, max_messages=1)
        outcome = Reject(DeadLetterReason.CREDENTIALS_REJECTED, "Entra refused the password (AADSTS50126)")
        transport = cli.transport
        settle("validate_credentials", message, outcome, sender=transport, settler=transport, observer=status.observe)
    status.close()
    state.close()


def test_stats_shows_depths_dead_letters_by_reason_and_publishers_failing_on_configuration(seeded: Cli) -> None:
    seeded.transport.send(QUEUE_VALIDATED, [envelope(b"{}", publisher_id="contoso", lead_id="waiting-1")])
    fail_on_configuration(seeded, "northwind", 2)

    result = seeded.run("stats")

    assert result.code == 0, result.stderr
    rows = {row[0]: row[1:] for row in table_rows(result.stdout)}
    assert rows[QUEUE_INCOMING] == ["0", "0", "4", "CredentialsRejected: 3, InvalidLead: 1"]
    assert rows[QUEUE_VALIDATED] == ["1", "0", "1", "SolutionMissing: 1"]
    assert rows[QUEUE_READY] == ["0", "0", "4", "LeadRejected: 2, RetriesExhausted: 2"]
    assert "Publishers failing on configuration" in result.stdout
    assert rows["northwind"][:3] == ["2", "CredentialsRejected", "Entra refused the password (AADSTS50126)"]


def test_stats_json_has_the_api_shape_for_scripts(seeded: Cli) -> None:
    fail_on_configuration(seeded, "northwind", 1)

    result = seeded.run("stats", "--json")

    assert result.code == 0, result.stderr
    answer = json.loads(result.stdout)
    assert [q["queue"] for q in answer["queues"]] == list(STAGE_QUEUES)
    assert answer["queues"][2] == {
        "queue": QUEUE_READY,
        "active": 0,
        "scheduled": 0,
        "deadLettered": 4,
        "deadLetteredByReason": {"LeadRejected": 2, "RetriesExhausted": 2},
    }
    [failing] = answer["publishersFailing"]
    assert failing["publisherId"] == "northwind"
    assert failing["consecutiveConfigFailures"] == 1
    assert failing["lastErrorReason"] == "CredentialsRejected"


@pytest.mark.parametrize("command", [("stats",), ("deadletters", "list")])
def test_a_bad_setting_exits_2_naming_the_variable(cli: Cli, command: tuple[str, ...]) -> None:
    result = cli.run(*command, env={"LEADWRITER_QUEUE_BACKEND": "bogus"})

    assert result.code == 2
    assert "configuration error" in result.stderr
    assert "LEADWRITER_QUEUE_BACKEND" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("option", "expected"),
    [("--enqueued-after", set()), ("--enqueued-before", ALL_IDS)],
)
def test_list_filters_by_enqueued_time(seeded: Cli, option: str, expected: set[str]) -> None:
    result = seeded.run("deadletters", "list", "--json", "--limit", "1000", option, "2999-01-01T00:00:00")

    assert result.code == 0, result.stderr
    assert {json.loads(line)["messageId"] for line in result.stdout.splitlines()} == expected


# -- readable at night: 120 columns, styles, where it read, JSON for scripts -------------------------

AT_120 = {"COLUMNS": "120"}


@pytest.mark.parametrize(
    "command",
    [
        ("deadletters", "list"),
        ("deadletters", "list", "--wide"),
        ("deadletters", "replay", "--dry-run"),
        ("deadletters", "purge", "--dry-run"),
        ("stats",),
        ("deadletters", "list", "--help"),
        ("deadletters", "replay", "--help"),
        ("deadletters", "purge", "--help"),
        ("stats", "--help"),
    ],
    ids=lambda command: " ".join(command),
)
def test_every_line_fits_120_columns(seeded: Cli, command: tuple[str, ...]) -> None:
    seeded.seed(Seed(QUEUE_READY, "a-long-lead-id-0123456789abcdef-0123", "contoso-international", "LeadRejected"))

    result = seeded.run(*command, env=AT_120)

    assert result.code == 0, result.stderr
    assert longest_line(result.stdout) <= 120, result.stdout
    assert longest_line(result.stderr) <= 120, result.stderr


def test_list_is_compact_by_default_and_wide_adds_lead_id_queue_and_description(seeded: Cli) -> None:
    compact = seeded.run("deadletters", "list", "--reason", "LeadRejected", env=AT_120)
    wide = seeded.run("deadletters", "list", "--reason", "LeadRejected", "--wide", env=AT_120)

    assert compact.code == wide.code == 0
    detail = compact.stdout.split("dead letter(s)")[1]
    assert [row[:3] for row in table_rows(detail)] == [
        ["ready-1", "contoso", "LeadRejected"],
        ["ready-3", "contoso", "LeadRejected"],
    ]
    assert "seeded LeadRejected" not in compact.stdout, "descriptions only with --wide"
    assert "seeded LeadRejected" in wide.stdout
    assert re.search(r"queue\s+leads-ready", wide.stdout)
    assert re.search(r"reason\s+LeadRejected\s+\(fixed by: ops\)", wide.stdout)


def test_non_zero_dead_letter_counts_are_bold_red(seeded: Cli) -> None:
    colour = {"NO_COLOR": "", "FORCE_COLOR": "1", "TERM": "xterm-256color", **AT_120}
    env = {name: value for name, value in {**seeded.env, **colour}.items() if value}
    result = subprocess.run(
        [*COMMAND, "stats"], cwd=REPO, env=env, capture_output=True, encoding="utf-8", timeout=60, check=False
    )

    assert result.returncode == 0, result.stderr
    bold_red = "\x1b[1;31m"
    incoming = next(line for line in result.stdout.splitlines() if QUEUE_INCOMING in line)
    validated = next(line for line in result.stdout.splitlines() if QUEUE_VALIDATED in line)
    assert re.search(r"\x1b\[1;31m\s*2\b", incoming), incoming
    assert bold_red in validated, "1 dead letter is not zero either"


@pytest.mark.parametrize(
    "command",
    [
        ("deadletters", "list"),
        ("deadletters", "replay", "--dry-run"),
        ("deadletters", "purge", "--dry-run"),
        ("stats",),
    ],
    ids=lambda command: " ".join(command),
)
def test_every_command_that_reads_state_says_which_data_dir_it_read(seeded: Cli, command: tuple[str, ...]) -> None:
    data_dir = str(Path(seeded.env["LEADWRITER_DATA_DIR"]).resolve())

    result = seeded.run(*command, "--json", env=AT_120)

    assert result.code == 0, result.stderr
    assert f"reading embedded broker in {data_dir}" in result.stderr
    assert "reading" not in result.stdout, "stdout stays machine-readable"


def test_replay_json_answers_the_api_shape_and_exit_1_on_refusals(seeded: Cli) -> None:
    dry = seeded.run("deadletters", "replay", "--dry-run", "--json", "--queue", QUEUE_READY)
    done = seeded.run("deadletters", "replay", "--json", "--queue", QUEUE_READY)

    assert dry.code == 0, dry.stderr
    plan = json.loads(dry.stdout)
    assert plan["dryRun"] is True
    assert plan["matched"] == 4
    assert plan["refused"] == 1
    assert {entry["messageId"]: entry["newMessageId"] for entry in plan["plan"]}["ready-1"] == "ready-1.r1"
    assert done.code == 1, "the capped dead letter is refused"
    answer = json.loads(done.stdout)
    assert answer == {
        "matched": 4,
        "replayed": 3,
        "refused": 1,
        "errors": [],
        "refusals": answer["refusals"],
        "dryRun": False,
    }
    assert "capped-1.r5" in answer["refusals"][0]
    assert seeded.dead_letter_ids(QUEUE_READY) == {"capped-1.r5"}


def test_purge_json_answers_the_api_shape(seeded: Cli) -> None:
    dry = seeded.run("deadletters", "purge", "--dry-run", "--json", "--publisher", "fabrikam")
    done = seeded.run("deadletters", "purge", "--yes", "--json", "--publisher", "fabrikam")

    assert dry.code == done.code == 0
    assert json.loads(dry.stdout) == {
        "matched": 2,
        "purged": 0,
        "errors": [],
        "dryRun": True,
        "messageIds": ["in-2", "ready-2"],
    }
    assert json.loads(done.stdout) == {"matched": 2, "purged": 2, "errors": [], "dryRun": False}
    assert seeded.dead_letter_ids() == ALL_IDS - {"in-2", "ready-2"}


def test_replay_progress_bar_knows_its_total(seeded: Cli) -> None:
    result = seeded.run("deadletters", "replay", "--reason", "LeadRejected")

    assert result.code == 0, result.stderr
    assert re.search(r"replay\b.*\b2/2\b", result.stderr)


@pytest.mark.parametrize("command", [("deadletters", "list"), ("deadletters", "replay"), ("deadletters", "purge")])
def test_help_lists_the_valid_queues_and_reasons(cli: Cli, command: tuple[str, ...]) -> None:
    result = cli.run(*command, "--help", env={"COLUMNS": "200"})

    assert result.code == 0
    text = " ".join(result.stdout.split())
    for name in [*STAGE_QUEUES, *(str(reason) for reason in DeadLetterReason), "Unknown"]:
        assert name in text, name
