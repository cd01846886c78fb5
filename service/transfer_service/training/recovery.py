"""Start-up recovery: brings the job table, the event log and the heads on disk back into
agreement after a process died without running its shutdown (SIGKILL, out-of-memory kill,
power loss). Jobs it left unfinished are not failed: they stay in the queue and run again
from the start (training/jobs.py). Recovery only repairs what a kill can leave half-done:

  * (embedded store) A job left QUEUED or RUNNING whose head is on disk, whole (metadata and
    weights read back), finished training and the save; only its commit was cut off (the
    head directory is renamed into place before the job is finished, and a kill can land
    between). It is adopted: SUCCEEDED with that head and a `completed` event carrying the
    metrics stored with the head, rather than trained again into a second head. A head
    directory of such a job that does not read back whole is removed, so it is never listed.
    (Half-written saves, `.partial-*` directories, are removed when the store opens.) Then
    every lease is dropped (Store.abandon_leases): they were the dead process's.
  * A job in a final state whose log has no terminal event gets the one its state implies.
    The server finishes a job in one store transaction, so only a store written by older
    code, which saved the row and the event separately, has these; without the event a
    WatchJob replay would never end.
On PostgreSQL a head and its job's success commit together, so there is nothing to adopt, and
other replicas' jobs are left alone: only finished logs are repaired. Every repair is itself
one transaction, so a kill during recovery leaves work for the next start.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import replace
from datetime import UTC, datetime

from transfer_service.domain import (
    EventPayload,
    HeadRecord,
    JobCancelled,
    JobCompleted,
    JobEvent,
    JobFailed,
    JobRecord,
    JobState,
    TrainingMetrics,
    TrainingProgress,
)
from transfer_service.errors import ServiceError
from transfer_service.store.interface import Store

log = logging.getLogger(__name__)


def recover_jobs(store: Store, *, sole_process: bool) -> None:
    """Repairs what a previous process left half-done (see the module docstring).
    `sole_process`: the store is the embedded one, and this process is its only user."""
    if not sole_process:
        # Unfinished jobs here are only those whose lease ran out (never the waiting queue,
        # which may be long): the claim loop takes them over, so only finished logs are
        # repaired.
        for job in store.unsettled_jobs(datetime.now(UTC)):
            if job.state.finished:
                _end_event_log(store, job)
        return
    jobs = store.unsettled_jobs(None)
    # Reading every head's metadata is only worth it when some job was cut off.
    unfinished = {job.job_id for job in jobs if not job.state.finished}
    heads = {
        head.job_id: head
        for head in (store.list_heads() if unfinished else [])
        if head.job_id in unfinished
    }
    for job in jobs:
        if job.state.finished:
            _end_event_log(store, job)
            continue
        head = heads.get(job.job_id)
        if head is not None and _reads_back_whole(store, head):
            _adopt(store, job, head)
    store.abandon_leases()


def _reads_back_whole(store: Store, head: HeadRecord) -> bool:
    try:
        store.load_head_weights(head.head_id)
    except ServiceError:
        # Never reported completed (its job did not finish) and not loadable: remove it
        # rather than list a head that cannot serve.
        log.warning(
            "head %s of interrupted job %s is unreadable; removed", head.head_id, head.job_id
        )
        with contextlib.suppress(ServiceError):
            store.delete_head(head.head_id)
        return False
    return True


def _adopt(store: Store, job: JobRecord, head: HeadRecord) -> None:
    adopted = replace(job, head_id=head.head_id, error="")
    payload = JobCompleted(
        head.head_id,
        head.metrics,
        head.evaluation.summary() if head.evaluation is not None else None,
    )
    _finish(store, adopted, JobState.SUCCEEDED, payload, _last_sequence(store, job))
    log.warning(
        "job %s was interrupted by a restart after its head %s was saved; marked succeeded",
        job.job_id,
        head.head_id,
    )


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
            head = store.get_head(job.head_id)
        except ServiceError:  # the head was deleted since (or never readable): what is known
            return JobCompleted(job.head_id, _metrics_from_progress(job.progress))
        evaluation = head.evaluation.summary() if head.evaluation is not None else None
        return JobCompleted(job.head_id, head.metrics, evaluation)
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
