"""What both stores' job queues decide alike (interface.JobStore), so that the two say and do
the same: the fencing of a run's writes, the refusals of enqueue_job and request_cancel, and
the end of a job cancelled while queued. The SQL stays in each store's modules.

Fencing: a write of run `attempt` (> 0) applies only while the job's stored row is
unfinished at that attempt count; otherwise LeaseLostError, and the write's whole transaction
rolls back. Attempt 0 is not fenced (writes from before the queue, and recovery's own)."""

from __future__ import annotations

from dataclasses import replace

from transfer_service.domain import JobCancelled, JobEvent, JobRecord, JobState
from transfer_service.errors import (
    FailedPreconditionError,
    LeaseLostError,
    ResourceExhaustedError,
)
from transfer_service.store.interface import LeaseRenewal

# The jobs a tenant's quota counts (queued or running).
UNFINISHED_STATES = tuple(state.value for state in JobState if not state.finished)


def check_holder(job_id: str, attempt: int, stored: tuple[str, int] | None) -> None:
    """Raises LeaseLostError unless run `attempt` still holds `job_id`, whose row's (state,
    attempts) are `stored` (None: no row). Attempt 0 always passes."""
    if attempt <= 0:
        return
    if stored is None or JobState(stored[0]).finished or stored[1] != attempt:
        raise LeaseLostError(
            f"job {job_id}: run {attempt} no longer holds the job (it ended, or a later run "
            "took it over after this run's lease expired); nothing more is written for it"
        )


def fencing_tokens(attempt: int, job: JobRecord | None) -> set[int]:
    """The attempts an append_progress is fenced on: its own `attempt` and its row's."""
    return {token for token in (attempt, job.attempt if job is not None else 0) if token > 0}


def known_request(
    stored: JobRecord, stored_digest: str, request_key: str, request_digest: str
) -> JobRecord:
    """enqueue_job with a key the tenant already used: the job it queued (a retried request),
    or FailedPreconditionError when the key came with another request."""
    if stored_digest != request_digest:
        raise FailedPreconditionError(
            f"request_id: {request_key!r} was already used for a different FineTune request "
            f"(job {stored.job_id}); use a new request id for a new request"
        )
    return stored


def check_quota(unfinished: int, max_unfinished: int) -> None:
    """ResourceExhaustedError when a tenant with `unfinished` jobs may queue no more."""
    if unfinished >= max_unfinished:
        raise ResourceExhaustedError(
            f"jobs: {max_unfinished} jobs already queued or running for this tenant; wait "
            "for one to finish or cancel one"
        )


def check_cancellable(record: JobRecord) -> None:
    if record.state.finished:
        raise FailedPreconditionError(
            f"job_id: job {record.job_id} is {record.state.value}; not cancellable"
        )


def cancelled_in_queue(
    record: JobRecord, event: JobEvent, newest_sequence: int
) -> tuple[JobRecord, JobEvent]:
    """A job nobody holds, ended by request_cancel: its final row and its terminal event,
    which is `event` renumbered to follow the log's newest (`newest_sequence`)."""
    sequence = max(newest_sequence, record.last_sequence) + 1
    terminal = replace(event, sequence=sequence)
    reason = event.payload.reason if isinstance(event.payload, JobCancelled) else ""
    final = replace(
        record,
        state=JobState.CANCELLED,
        error=reason,
        last_sequence=sequence,
        updated_time=event.time,
    )
    return final, terminal


def renewal(wanted: list[str], renewed: dict[str, bool]) -> LeaseRenewal:
    """hold_jobs' answer: of `wanted`, those renewed with a cancel requested (`renewed` maps
    each renewed id to its flag), and those not renewed."""
    return LeaseRenewal(
        cancel_requested=[job_id for job_id in wanted if renewed.get(job_id)],
        lost=[job_id for job_id in wanted if job_id not in renewed],
    )
