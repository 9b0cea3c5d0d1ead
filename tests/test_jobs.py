"""Sweeps too large for one request run as jobs: 202 with a job id, the work on the jobs queue's
consumer (the serve job worker, or the registered run_job trigger), progress at GET /api/jobs/{id}."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from shared.names import QUEUE_INCOMING, QUEUE_JOBS, QUEUE_VALIDATED
from shared.ops import jobs as jobs_module
from shared.ops.deadletters import DeadLetterFilter, list_dead_letters
from shared.ops.jobs import Jobs, JobWorker, wait_for_job
from shared.runtime.embedded import wait_until
from shared.runtime.functions import FunctionsRuntime
from shared.transport.base import Transport
from tests.fixtures.api import ApiStack, api_stack
from tests.fixtures.deadletters import dead_letter


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[ApiStack]:
    with api_stack(tmp_path / "data") as running:
        running.services.jobs.inline_limit = 5
        yield running


def _dead_letters(transport: Transport, queue: str) -> int:
    return transport.stats(queue).dead_lettered


def test_a_small_replay_still_answers_200_inside_the_request(stack: ApiStack) -> None:
    dead_letter(stack.services.transport, QUEUE_INCOMING, "contoso", "RetriesExhausted", 3)

    answer = stack.client.post("/api/deadletters/replay", json={"publisherId": "contoso"}, headers=stack.admin())

    assert answer.status_code == 200
    assert answer.json()["replayed"] == 3


@pytest.mark.parametrize("consumer", ["job worker", "run_job trigger"])
def test_a_large_replay_answers_202_and_a_job_replays_every_dead_letter_in_steps(
    stack: ApiStack, monkeypatch: pytest.MonkeyPatch, consumer: str
) -> None:
    monkeypatch.setattr(jobs_module, "STEP_LIMIT", 7)
    transport = stack.services.transport
    dead_letter(transport, QUEUE_INCOMING, "contoso", "RetriesExhausted", 12)
    dead_letter(transport, QUEUE_VALIDATED, "contoso", "RetriesExhausted", 6)
    dead_letter(transport, QUEUE_INCOMING, "fabrikam", "RetriesExhausted", 2)

    answer = stack.client.post("/api/deadletters/replay", json={"publisherId": "contoso"}, headers=stack.admin())

    assert answer.status_code == 202, answer.text
    job_id, matched = answer.json()["jobId"], answer.json()["matched"]
    assert matched == 18
    assert stack.client.get(f"/api/jobs/{job_id}", headers=stack.admin()).json()["state"] == "queued"
    runner = (
        JobWorker(stack.services.jobs, transport, wait=0.05)
        if consumer == "job worker"
        else FunctionsRuntime(stack.services)
    ).start()
    try:
        job = wait_for_job(stack.services.jobs, job_id, timeout=60)
    finally:
        runner.stop()

    assert job is not None
    assert job.state == "done", job
    progress = stack.client.get(f"/api/jobs/{job_id}", headers=stack.admin()).json()
    assert (progress["processed"], progress["replayed"], progress["refused"]) == (18, 18, 0)
    assert job.steps == 3
    waiting = DeadLetterFilter.build(reason="RetriesExhausted")
    left = {(item.publisher_id, item.queue) for item in list_dead_letters(transport, waiting, limit=100)}
    assert left == {("fabrikam", QUEUE_INCOMING)}, "only the other publisher's dead letters stay"
    # The stages received the copies (with the run_job trigger, the registered stage triggers ran them
    # too, and, the publisher having no connection, dead-lettered them anew: not replayed again).
    again = list_dead_letters(transport, DeadLetterFilter.build(reason="CredentialsMissing"), limit=100)
    queued = transport.stats(QUEUE_INCOMING).active + transport.stats(QUEUE_VALIDATED).active
    assert queued + len(again) == 18


def test_a_large_purge_runs_as_a_job_and_a_redelivered_step_does_nothing_twice(stack: ApiStack) -> None:
    transport = stack.services.transport
    dead_letter(transport, QUEUE_INCOMING, "contoso", "InvalidLead", 9)
    answer = stack.client.post(
        "/api/deadletters/purge", json={"reason": "InvalidLead", "confirm": True}, headers=stack.admin()
    )
    assert answer.status_code == 202
    job_id = answer.json()["jobId"]
    [first] = transport.receive(QUEUE_JOBS, max_messages=1)
    jobs = stack.services.jobs

    assert jobs.handle(first) is None, "one step was enough"
    assert jobs.handle(first) is None, "a redelivered step of a finished job is a no-op"
    transport.complete(first)

    job = jobs.get(job_id)
    assert job is not None
    assert (job.state, job.purged, job.processed) == ("done", 9, 9)
    assert _dead_letters(transport, QUEUE_INCOMING) == 0


def test_an_unknown_job_is_404_and_a_malformed_id_is_422(stack: ApiStack) -> None:
    assert stack.client.get("/api/jobs/0123abcd", headers=stack.admin()).status_code == 404
    assert stack.client.get("/api/jobs/not-hex!", headers=stack.admin()).status_code == 422
    assert stack.client.get("/api/jobs/0123abcd").status_code == 401


def test_a_job_record_is_in_the_shared_state_store(stack: ApiStack) -> None:
    dead_letter(stack.services.transport, QUEUE_INCOMING, "contoso", "InvalidLead", 6)
    job_id = stack.client.post("/api/deadletters/replay", json={}, headers=stack.admin()).json()["jobId"]

    other = Jobs(stack.services.state, stack.services.transport)
    job = other.get(job_id)

    assert job is not None
    assert (job.kind, job.matched) == ("replay", 6)
    assert json.loads(json.dumps(job.to_json()))["jobId"] == job_id
    assert wait_until(lambda: stack.services.transport.stats(QUEUE_JOBS).active == 1, 5)
