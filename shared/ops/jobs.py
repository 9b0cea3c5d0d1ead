"""Sweeps too long for one HTTP request run as jobs (an HTTP-triggered function must answer within
230 s in Azure): replay and purge over many dead letters, and the auto-replay after a connection fix.

A sweep that matches at most :data:`INLINE_LIMIT` dead letters runs in the request. A larger one is
a **job**: its record goes to the state store (table ``replayjobs``), a message naming it to the
queue ``leadwriter-jobs``, and the answer is 202 with the job id. The job runs where messages are
consumed — the ``run_job`` Functions trigger in Azure, the job worker of ``leadwriter serve`` on one
machine — in steps of at most :data:`STEP_LIMIT` dead letters: each step records its progress, and
sends the message for the next step before completing its own (the settle order of the stages), so
a crash repeats at most one step, which replay and purge make harmless (what was replayed or purged
is no longer dead-lettered).
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from shared.errors import InvalidFilter, LockLost
from shared.names import QUEUE_JOBS, TABLE_REPLAY_JOBS
from shared.ops.deadletters import DeadLetterFilter, list_dead_letters, purge, replay
from shared.state.base import StateStore
from shared.transport.base import OutgoingMessage, ReceivedMessage, Transport

logger = logging.getLogger(__name__)

#: A sweep matching at most this many dead letters runs inside the request.
INLINE_LIMIT = 1000
#: Dead letters one job step takes on (well inside a function's time limit).
STEP_LIMIT = 2000
#: A job's ``matched`` counts the dead letters up to this many (a peek that stays quick).
COUNT_LIMIT = 50_000
_PARTITION = "job"

JobKind = Literal["replay", "purge"]
JobState = Literal["queued", "running", "done", "failed"]


@dataclass
class Job:
    """A sweep's record: what it selects, how far it got."""

    job_id: str
    kind: JobKind
    selection: dict[str, Any]
    matched: int
    state: JobState = "queued"
    processed: int = 0
    replayed: int = 0
    purged: int = 0
    refused: int = 0
    errors: list[str] = field(default_factory=list)
    steps: int = 0
    created_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat())
    updated_at: str | None = None

    def to_json(self) -> dict[str, Any]:
        """The answer of ``GET /api/jobs/{jobId}``."""
        answer: dict[str, Any] = {
            "jobId": self.job_id,
            "kind": self.kind,
            "state": self.state,
            "matched": self.matched,
            "processed": self.processed,
            "refused": self.refused,
            "errors": self.errors[-20:],
            "createdAt": self.created_at,
            "updatedAt": self.updated_at,
        }
        if self.kind == "replay":
            answer["replayed"] = self.replayed
        else:
            answer["purged"] = self.purged
        return answer

    def to_data(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "selection": self.selection,
            "matched": self.matched,
            "state": self.state,
            "processed": self.processed,
            "replayed": self.replayed,
            "purged": self.purged,
            "refused": self.refused,
            "errors": self.errors[-100:],
            "steps": self.steps,
            "createdAt": self.created_at,
            "updatedAt": self.updated_at,
        }

    @classmethod
    def from_data(cls, job_id: str, data: Mapping[str, Any]) -> Job:
        return cls(
            job_id=job_id,
            kind=data["kind"],
            selection=dict(data.get("selection") or {}),
            matched=int(data.get("matched", 0)),
            state=data.get("state", "queued"),
            processed=int(data.get("processed", 0)),
            replayed=int(data.get("replayed", 0)),
            purged=int(data.get("purged", 0)),
            refused=int(data.get("refused", 0)),
            errors=list(data.get("errors") or []),
            steps=int(data.get("steps", 0)),
            created_at=str(data.get("createdAt", "")),
            updated_at=data.get("updatedAt"),
        )


def selection_of(flt: DeadLetterFilter, *, before: datetime) -> dict[str, Any]:
    """A filter as JSON (what a job record keeps), limited to what was enqueued before ``before``: a
    replayed lead that dies again while the job runs is a new dead letter, not one to replay again."""
    cut = min(flt.enqueued_before, before) if flt.enqueued_before is not None else before
    return {
        "queue": list(flt.queues),
        "reason": sorted(flt.reasons) if flt.reasons is not None else None,
        "publisherId": flt.publisher_id,
        "messageIds": sorted(flt.message_ids) if flt.message_ids is not None else None,
        "enqueuedBefore": cut.isoformat(),
        "enqueuedAfter": flt.enqueued_after.isoformat() if flt.enqueued_after is not None else None,
    }


def filter_of(selection: Mapping[str, Any]) -> DeadLetterFilter:
    before, after = selection.get("enqueuedBefore"), selection.get("enqueuedAfter")
    return DeadLetterFilter.build(
        queue=selection.get("queue"),
        reason=selection.get("reason"),
        publisher_id=selection.get("publisherId"),
        message_ids=selection.get("messageIds"),
        enqueued_before=datetime.fromisoformat(before) if before else None,
        enqueued_after=datetime.fromisoformat(after) if after else None,
    )


class Jobs:
    """Submit, read and run sweep jobs over the shared state store and the jobs queue."""

    def __init__(self, state: StateStore, transport: Transport, *, inline_limit: int = INLINE_LIMIT) -> None:
        self._state = state
        self._transport = transport
        #: Sweeps matching more than this many dead letters become jobs.
        self.inline_limit = inline_limit

    def count_matching(self, flt: DeadLetterFilter, *, up_to: int) -> int:
        """How many dead letters ``flt`` matches, counting no further than ``up_to`` (a peek)."""
        return len(list_dead_letters(self._transport, flt, limit=up_to))

    def too_large(self, flt: DeadLetterFilter, limit: int | None = None) -> int | None:
        """How many dead letters ``flt`` matches when that is too many for one request (run it as a
        job), else None (run it here). ``limit`` is the caller's own cap on the sweep."""
        if limit is not None and limit <= self.inline_limit:
            return None
        matched = self.count_matching(flt, up_to=COUNT_LIMIT)
        return matched if matched > self.inline_limit else None

    def submit(self, kind: JobKind, flt: DeadLetterFilter, matched: int) -> Job:
        """Record a job and queue its first step. Raises what the state store or the transport raise."""
        job = Job(
            job_id=uuid.uuid4().hex, kind=kind, selection=selection_of(flt, before=datetime.now(UTC)), matched=matched
        )
        self._state.insert(TABLE_REPLAY_JOBS, _PARTITION, job.job_id, job.to_data())
        self._transport.send(QUEUE_JOBS, [_step_message(job.job_id, 0)])
        logger.info("%s job %s queued: about %d dead letters", kind, job.job_id, matched)
        return job

    def get(self, job_id: str) -> Job | None:
        entity = self._state.get(TABLE_REPLAY_JOBS, _PARTITION, job_id)
        return Job.from_data(job_id, entity.data) if entity is not None else None

    def run_step(self, job_id: str, step: int) -> bool:
        """Run one step of the job; True when another step is needed. A job already done (a
        redelivered message) does nothing."""
        job = self.get(job_id)
        if job is None or job.state in ("done", "failed") or job.steps > step:
            return False
        self._save(job, state="running")
        try:
            flt = filter_of(job.selection)
            if job.kind == "replay":
                result = replay(self._transport, flt, limit=STEP_LIMIT)
                done = result.replayed
                job.replayed += result.replayed
                job.refused += result.refused
                job.errors += result.errors
                matched = result.matched
            else:
                purged = purge(self._transport, flt, confirm=True, limit=STEP_LIMIT)
                done = purged.purged
                job.purged += purged.purged
                job.errors += purged.errors
                matched = purged.matched
        except InvalidFilter as exc:
            job.errors.append(str(exc))
            self._save(job, state="failed")
            return False
        job.processed += matched
        job.steps = step + 1
        # Another step only while this one made progress: what was refused stays dead-lettered and
        # would otherwise be matched again and again.
        more = matched >= STEP_LIMIT and done > 0
        self._save(job, state="running" if more else "done")
        return more

    def _save(self, job: Job, *, state: JobState) -> None:
        job.state = state
        job.updated_at = datetime.now(UTC).isoformat()
        self._state.upsert(TABLE_REPLAY_JOBS, _PARTITION, job.job_id, job.to_data())

    def handle(self, message: ReceivedMessage) -> OutgoingMessage | None:
        """Run the step ``message`` names; the message for the next step, if any (send it before
        completing this one)."""
        try:
            body = json.loads(message.body)
            job_id, step = str(body["jobId"]), int(body.get("step", 0))
        except (ValueError, KeyError, TypeError):
            logger.warning("a jobs message that names no job was dropped: %s", message.message_id)
            return None
        return _step_message(job_id, step + 1) if self.run_step(job_id, step) else None


def _step_message(job_id: str, step: int) -> OutgoingMessage:
    # The id names the step: a redelivered step sends the same next message, which duplicate
    # detection drops.
    return OutgoingMessage(
        body=json.dumps({"jobId": job_id, "step": step}).encode(),
        message_id=f"job-{job_id}-{step}",
        application_properties={"jobId": job_id},
    )


class JobWorker:
    """The jobs queue's consumer on one machine (``leadwriter serve``): one step at a time."""

    def __init__(self, jobs: Jobs, transport: Transport, *, wait: float = 0.5) -> None:
        self._jobs = jobs
        self._transport = transport
        self._wait = wait
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lw-jobs", daemon=True)

    def start(self) -> JobWorker:
        self._thread.start()
        return self

    def stop(self, timeout: float | None = 60.0) -> None:
        self._stop.set()
        self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                for message in self._transport.receive(QUEUE_JOBS, max_messages=1, max_wait=self._wait):
                    settle_job(self._jobs, self._transport, message, renew=self._transport.renew_lock)
            except Exception:
                logger.exception("job worker: a step failed; its message is delivered again")
                self._stop.wait(1.0)


def settle_job(
    jobs: Jobs,
    transport: Transport,
    message: ReceivedMessage,
    *,
    renew: Callable[[ReceivedMessage], None] | None = None,
    complete: Callable[[ReceivedMessage], None] | None = None,
) -> None:
    """Run the step, send the next step's message, then complete this one. ``renew`` (a callable
    taking the message) keeps its lock while the step runs; ``complete`` defaults to the transport's."""
    stop = threading.Event()

    def keep_lock() -> None:
        while renew is not None and not stop.wait(10.0):
            try:
                renew(message)
            except LockLost:
                return

    keeper = threading.Thread(target=keep_lock, name="lw-job-lock", daemon=True)
    keeper.start()
    try:
        following = jobs.handle(message)
    finally:
        stop.set()
        keeper.join()
    if following is not None:
        transport.send(QUEUE_JOBS, [following])
    (complete or transport.complete)(message)


def wait_for_job(jobs: Jobs, job_id: str, timeout: float) -> Job | None:
    """Poll until the job is done or failed (tools and tests)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = jobs.get(job_id)
        if job is not None and job.state in ("done", "failed"):
            return job
        time.sleep(0.1)
    return jobs.get(job_id)
