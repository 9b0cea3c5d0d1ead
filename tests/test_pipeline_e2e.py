"""The pipeline end to end on the embedded backends against the CRM simulator, over real sockets."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from shared.errors import CONFIGURATION_REASONS, DeadLetterReason
from shared.names import QUEUE_READY
from shared.pipeline.lead import lead_record_id, parse_incoming
from shared.pipeline.messages import envelope
from shared.simulator import CrmSimulator
from tests.fixtures.harness import lead_message, running

#: Every test here runs on the embedded workers and on the registered Functions triggers.
pytestmark = pytest.mark.usefixtures("runtime")


def test_varied_leads_for_several_publishers_are_each_written_exactly_once(
    simulator: CrmSimulator, tmp_path: Path
) -> None:
    with running(simulator, tmp_path) as h:
        publishers = [h.publisher(), h.publisher(kind="password"), h.publisher()]
        messages = []
        for n in range(240):
            publisher = publishers[n % 3]
            extra = {}
            if n % 7 == 0:
                extra = {"ActionCode": "PLT", "LeadSource": "AppSource"}
            if n % 11 == 0:
                extra = {"Description": "needs a demo 🚀 " * 300}
            messages.append(lead_message(publisher, n, **extra))
        messages.append(
            {
                "leadId": "test-lead",
                "publisherId": publishers[0],
                "lead": {
                    "UserDetails": {"FirstName": "MSFT_TEST_636573304831318844"},
                    "LeadSource": "AzureMarketplace-INS|contoso.widget-saas",
                },
            }
        )
        h.send(messages)
        h.start()
        expected = Counter(str(m["publisherId"]) for m in messages)
        h.wait_for(lambda: all(len(h.written(p)) == n for p, n in expected.items()), timeout=120)

        for publisher, count in expected.items():
            ids = [record["leadid"] for record in h.written(publisher)]
            assert len(ids) == count == len(set(ids))
        assert h.dead_letters() == []
        test_records = [r for r in h.written(publishers[0]) if "test" in str(r.get("subject", "")).lower()]
        assert test_records, "the marketplace test lead is written, marked as a test"
        record_ids = {str(r["leadid"]).lower() for r in h.written(publishers[0])}
        assert str(lead_record_id(publishers[0], f"{publishers[0]}-00000")) in record_ids


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (b"\xff\xfe not utf-8", "UTF-8"),
        (b"{not json", "JSON"),
        (b"[1, 2, 3]", "object"),
        (json.dumps({"leadId": "x1", "publisherId": "contoso", "lead": {"UserDetails": []}}).encode(), "UserDetails"),
        (
            json.dumps({"leadId": "x2", "publisherId": "contoso", "lead": {"UserDetails": {"Country": "US"}}}).encode(),
            "contact",
        ),
        (json.dumps({"leadId": "x3", "lead": {"UserDetails": {"Email": "a@b.c"}}}).encode(), "publisherId"),
        (b"{" + b'"pad": "' + b"x" * 300_000 + b'"}', "over the limit"),
    ],
)
def test_malformed_input_is_dead_lettered_invalid_lead_with_a_description_naming_the_problem(
    simulator: CrmSimulator, tmp_path: Path, body: bytes, fragment: str
) -> None:
    with running(simulator, tmp_path) as h:
        good = h.publisher()
        h.send([body, lead_message(good, 1)])
        h.start()
        h.wait_for(lambda: len(h.dead_letters()) == 1 and len(h.written(good)) == 1)
        [dead] = h.dead_letters()
        assert dead.reason == DeadLetterReason.INVALID_LEAD
        assert fragment.lower() in (dead.description or "").lower()


def test_each_configuration_failure_lands_in_its_reason(simulator: CrmSimulator, tmp_path: Path) -> None:
    with running(simulator, tmp_path) as h:
        cases = {
            h.publisher(store=False): DeadLetterReason.CREDENTIALS_MISSING,
            h.publisher(wrong_secret=True): DeadLetterReason.CREDENTIALS_REJECTED,
            h.publisher(kind="password", wrong_secret=True): DeadLetterReason.CREDENTIALS_REJECTED,
            h.publisher(solution_version=None): DeadLetterReason.SOLUTION_MISSING,
            h.publisher(solution_version="0.9.1.0"): DeadLetterReason.SOLUTION_VERSION_UNSUPPORTED,
            h.publisher(has_role=False): DeadLetterReason.PERMISSION_DENIED,
        }
        healthy = h.publisher()
        h.send([lead_message(p, n) for n, p in enumerate([*cases, healthy])])
        h.start()
        h.wait_for(lambda: len(h.dead_letters()) == len(cases) and len(h.written(healthy)) == 1)
        reasons = {d.publisher_id: d.reason for d in h.dead_letters()}
        assert reasons == {p: str(r) for p, r in cases.items()}
        for dead in h.dead_letters():
            assert dead.description


def test_a_400_to_the_solution_query_dead_letters_solution_missing_for_auto_replay(
    simulator: CrmSimulator, tmp_path: Path
) -> None:
    with running(simulator, tmp_path) as h:
        publisher = h.publisher()
        # The first CRM requests of a lead's journey are the solution check (the token is Entra's), asked
        # twice: a configuration dead letter is retried once with the connection read fresh.
        simulator.faults(publisher).fail_next(2, status=400)
        h.send([lead_message(publisher, 1)])
        h.start()
        h.wait_for(lambda: len(h.dead_letters()) == 1)
        [dead] = h.dead_letters()
        assert dead.reason == DeadLetterReason.SOLUTION_MISSING
        assert dead.reason in {str(reason) for reason in CONFIGURATION_REASONS}
        assert "solution" in (dead.description or "")


@pytest.mark.parametrize(
    "fault",
    ["fail_503", "throttle", "hang", "reset", "token_503"],
)
def test_transient_faults_end_in_delivery_not_dead_letters(simulator: CrmSimulator, tmp_path: Path, fault: str) -> None:
    with running(simulator, tmp_path) as h:
        publisher = h.publisher()
        faults = simulator.faults(publisher)
        {
            "fail_503": lambda: faults.fail_next(3, 503),
            "throttle": lambda: faults.throttle_next(2, retry_after=1),
            "hang": lambda: faults.hang_next(1, seconds=4),
            "reset": lambda: faults.reset_next(2),
            "token_503": lambda: faults.token_fail_next(2, 503),
        }[fault]()
        h.send([lead_message(publisher, n) for n in range(5)])
        h.start()
        h.wait_for(lambda: len(h.written(publisher)) == 5, timeout=90)
        assert h.dead_letters() == []
        assert len({r["leadid"] for r in h.written(publisher)}) == 5


def test_the_same_lead_sent_twice_or_redelivered_after_its_write_makes_one_record(
    simulator: CrmSimulator, tmp_path: Path
) -> None:
    with running(simulator, tmp_path) as h:
        publisher = h.publisher()
        message = lead_message(publisher, 7)
        h.send([message])
        h.start()
        h.wait_for(lambda: len(h.written(publisher)) == 1)
        # The marketplace sends it again later, and a stage message is delivered again after the write.
        h.send([{**message}])
        normalised = parse_incoming(json.dumps(message).encode()).to_body()
        h.services.transport.send(
            QUEUE_READY, [envelope(normalised, publisher_id=publisher, lead_id=str(message["leadId"]), attempt=9)]
        )
        h.wait_for(lambda: h.pending() == 0)
        assert len(h.written(publisher)) == 1
        assert h.dead_letters() == []


def test_a_stage_that_keeps_failing_unexpectedly_ends_in_retries_exhausted_and_the_worker_goes_on(
    simulator: CrmSimulator, tmp_path: Path
) -> None:
    with running(simulator, tmp_path, LEADWRITER_RETRY_SCHEDULE="0.05,0.05") as h:
        good, broken = h.publisher(), h.publisher()
        original_get = h.services.connections.get

        def get(publisher_id: str):  # type: ignore[no-untyped-def]
            if publisher_id == broken:
                raise RuntimeError("simulated bug in the connection lookup")
            return original_get(publisher_id)

        h.services.connections.get = get  # type: ignore[method-assign]
        h.send([lead_message(broken, 1), lead_message(good, 2)])
        h.start()
        h.wait_for(lambda: len(h.dead_letters()) == 1 and len(h.written(good)) == 1)
        [dead] = h.dead_letters()
        assert dead.reason == DeadLetterReason.RETRIES_EXHAUSTED
        assert "RuntimeError" in (dead.description or "")
        assert "simulated bug" not in (dead.description or ""), "internal error text stays in the logs"


def test_a_throttled_publisher_gets_no_request_during_its_penalty(simulator: CrmSimulator, tmp_path: Path) -> None:
    with running(simulator, tmp_path) as h:
        publisher = h.publisher()
        simulator.faults(publisher).throttle_next(1, retry_after=2)
        h.send([lead_message(publisher, n) for n in range(20)])
        h.start()
        h.wait_for(lambda: len(h.written(publisher)) == 20, timeout=90)
        log = simulator.requests(publisher)
        assert log.throttled >= 1
        assert log.during_penalty == 0
