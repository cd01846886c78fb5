"""Start-up recovery: brings the job table and the event log back into agreement after a
process died without running its shutdown (SIGKILL, out-of-memory kill, power loss).

  * A job left QUEUED or RUNNING reads FAILED (ABORTED), with a `failed` event saying so.
  * A job in a final state whose log has no terminal event gets the one its state implies.
    The server finishes a job in one store transaction (LocalStore.finish_job), so only a
    store written by older code, which saved the row and the event separately, has these;
    without the event a WatchJob replay would never end.
Every repair is itself one finish_job transaction, so a kill during recovery leaves work for
the next start, never a half-repaired job.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from datetime import UTC, datetime

from service.domain import (
    EventPayload,
    JobCancelled,
    JobCompleted,
    JobEvent,
    JobFailed,
    JobRecord,
    JobState,
    TrainingMetrics,
    TrainingProgress,
)
from service.errors import ServiceError
from service.store.interface import Store

log = logging.getLogger(__name__)

INTERRUPTED_REASON = "the server stopped while this job was running; its head was not saved"


def recover_jobs(store: Store) -> None:
    """Settles every job a previous process left inconsistent (see the module docstring)."""
    for job in store.list_jobs():
        if job.state.finished:
            _end_event_log(store, job)
        else:
            _fail_interrupted(store, job)


def _fail_interrupted(store: Store, job: JobRecord) -> None:
    payload = JobFailed(INTERRUPTED_REASON, "ABORTED")
    _finish(store, job, JobState.FAILED, payload, _last_sequence(store, job))
    log.warning("job %s was interrupted by a restart; marked failed", job.job_id)


def _end_event_log(store: Store, job: JobRecord) -> None:
    # A finished job's row carries its terminal event's sequence, so this reads one row;
    # without the terminal event it reads what was logged after the row was last written.
    logged = store.events_after(job.job_id, max(job.last_sequence - 1, 0))
    if logged and logged[-1].terminal:
        return
    last_sequence = logged[-1].sequence if logged else job.last_sequence
    payload = _terminal_payload(store, job)
    _finish(store, job, job.state, payload, last_sequence)
    log.warning(
        "job %s read %s without a terminal event; appended one", job.job_id, job.state.value
    )


def _terminal_payload(store: Store, job: JobRecord) -> EventPayload:
    if job.state is JobState.SUCCEEDED:
        try:
            metrics = store.get_head(job.head_id).metrics
        except ServiceError:  # the head was deleted since (or never readable): what is known
            metrics = _metrics_from_progress(job.progress)
        return JobCompleted(job.head_id, metrics)
    if job.state is JobState.CANCELLED:
        return JobCancelled(job.error or "cancelled")
    # The failure's status code was only ever in the event that is missing.
    return JobFailed(job.error or "failed; the reason was not recorded", "ABORTED")


def _metrics_from_progress(progress: TrainingProgress | None) -> TrainingMetrics:
    if progress is None:
        return TrainingMetrics(0.0, 0.0, None, None, 0, 0, False, 0.0)
    return TrainingMetrics(
        train_loss=progress.train_loss,
        train_accuracy=progress.train_accuracy,
        validation_loss=progress.validation_loss,
        validation_accuracy=progress.validation_accuracy,
        best_epoch=progress.epoch,
        epochs_run=progress.epoch,
        stopped_early=False,
        training_seconds=progress.elapsed_seconds,
    )


def _last_sequence(store: Store, job: JobRecord) -> int:
    # The job row is not rewritten for every per-step progress event, so the event log, not
    # the row, knows the last sequence of an unfinished job.
    logged = store.events_after(job.job_id, job.last_sequence)
    return logged[-1].sequence if logged else job.last_sequence


def _finish(
    store: Store, job: JobRecord, state: JobState, payload: EventPayload, last_sequence: int
) -> None:
    event = JobEvent(job.job_id, last_sequence + 1, datetime.now(UTC), payload)
    error = payload.reason if isinstance(payload, JobFailed | JobCancelled) else job.error
    finished = replace(
        job, state=state, error=error, last_sequence=event.sequence, updated_time=event.time
    )
    store.finish_job(finished, event)
