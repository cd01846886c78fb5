"""A job's final state and its terminal event are one store transaction, and start-up
recovery settles what a killed process left: finished jobs whose event log has no terminal
event (stores written by code that saved the two separately), and jobs killed after their
head was renamed into place but before they were finished (the head is adopted, never
trained twice). Any other unfinished job is left unfinished and claimable at once: it runs
again from the start, its log continuing after its last logged event."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import textwrap
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import torch
from transfer_service.domain import (
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
from transfer_service.store.interface import Store
from transfer_service.store.local import LocalStore
from transfer_service.store.postgres import PostgresStore
from transfer_service.store.sqlite_jobs import SqliteJobs
from transfer_service.training.recovery import recover_jobs

from tests.unit.test_store import record

REPO = Path(__file__).resolve().parents[2]
NOW = datetime(2024, 1, 1, tzinfo=UTC)
HEAD_METRICS = TrainingMetrics(0.1, 0.9, 0.2, 0.85, 3, 4, True, 1.5)
WEIGHTS = {"classifier.weight": torch.randn(2, 3), "classifier.bias": torch.zeros(2)}


def head(head_id: str, job_id: str) -> HeadRecord:
    return dataclasses.replace(
        record(head_id), metrics=HEAD_METRICS, created_time=NOW, size_bytes=32, job_id=job_id
    )


def progress(epoch: int, *, epoch_end: bool = False) -> TrainingProgress:
    return TrainingProgress(
        "training", epoch, 3, epoch, 3, 0.5, 0.75, 0.6, 0.7, 1e-3, 10.0, 2.5, 1.0, epoch_end
    )


def running_job(store: Store, job_id: str, *, events: int) -> JobRecord:
    """A RUNNING job with `events` progress events, the row written as the server does (not
    rewritten for per-step progress, so its last_sequence lags the log)."""
    job = JobRecord(job_id, JobState.RUNNING, "efficientnet_lite0", "cats", NOW, NOW)
    store.save_job(job)
    for sequence in range(1, events + 1):
        store.append_event(JobEvent(job_id, sequence, NOW, progress(sequence)))
    return job


def claim_next(store: LocalStore) -> JobRecord | None:
    """What the next claim would take (the job queue), as a process starting now would."""
    claimed = store.claim_job("next-process", datetime.now(UTC) + timedelta(seconds=30))
    return None if claimed is None else claimed.record


def assert_log_ends_once(store: Store, job: JobRecord) -> list[JobEvent]:
    events = store.events_after(job.job_id, 0)
    assert [e.sequence for e in events] == list(range(1, len(events) + 1))
    assert [e.terminal for e in events].count(True) == 1 and events[-1].terminal
    assert job.last_sequence == events[-1].sequence
    return events


def test_finish_job_writes_the_row_and_the_event_together(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    job = running_job(store, "job-1", events=2)
    job.state, job.last_sequence = JobState.SUCCEEDED, 3
    store.finish_job(job, JobEvent("job-1", 3, NOW, JobCancelled("done")))
    assert store.get_job("job-1").state is JobState.SUCCEEDED
    assert store.events_after("job-1", 2)[0].terminal


@pytest.mark.parametrize("failing", ["_write_job", "_write_event"])
def test_a_failure_after_either_write_of_finish_job_undoes_both(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failing: str
) -> None:
    store = LocalStore(tmp_path)
    job = running_job(store, "job-1", events=2)
    real = getattr(SqliteJobs, failing)

    def write_then_fail(self: SqliteJobs, value: object) -> None:
        real(self, value)
        raise OSError("simulated: disk gone after the write")

    monkeypatch.setattr(SqliteJobs, failing, write_then_fail)
    job.state, job.last_sequence = JobState.SUCCEEDED, 3
    with pytest.raises(OSError, match="simulated"):
        store.finish_job(job, JobEvent("job-1", 3, NOW, JobCancelled("done")))
    monkeypatch.undo()
    assert store.get_job("job-1").state is JobState.RUNNING
    assert [e.sequence for e in store.events_after("job-1", 0)] == [1, 2]


def test_a_kill_between_the_event_and_the_row_write_loses_both(tmp_path: Path) -> None:
    """A real process, killed (os._exit: no cleanup runs) after finish_job wrote the terminal
    event and before it wrote the row. The next open sees the job as it was, and recovery
    ends its log exactly once."""
    store = LocalStore(tmp_path)
    running_job(store, "job-1", events=3)
    store.close()
    script = textwrap.dedent(
        f"""
        import os
        from datetime import UTC, datetime, timedelta
        from pathlib import Path
        from transfer_service.domain import JobCompleted, JobEvent, JobState, TrainingMetrics
        from transfer_service.store.local import LocalStore
        from transfer_service.store.sqlite_jobs import SqliteJobs

        store = LocalStore(Path({str(tmp_path)!r}))
        job = store.get_job("job-1")
        job.state, job.head_id, job.last_sequence = JobState.SUCCEEDED, "cats-1", 4
        SqliteJobs._write_job = lambda self, job: os._exit(9)  # the kill, between the writes
        metrics = TrainingMetrics(0.1, 0.9, 0.2, 0.8, 3, 3, False, 1.0)
        event = JobEvent("job-1", 4, datetime.now(UTC), JobCompleted("cats-1", metrics))
        store.finish_job(job, event)
        """
    )
    killed = subprocess.run([sys.executable, "-c", script], cwd=REPO, timeout=120, check=False)
    assert killed.returncode == 9
    store = LocalStore(tmp_path)
    assert store.get_job("job-1").state is JobState.RUNNING
    assert [e.sequence for e in store.events_after("job-1", 0)] == [1, 2, 3]
    recover_jobs(store, sole_process=True)
    assert store.get_job("job-1").state is JobState.RUNNING  # not ended: it runs again
    claimed = claim_next(store)
    assert claimed is not None and claimed.job_id == "job-1" and claimed.last_sequence == 3


def test_recovery_ends_the_log_of_finished_jobs_that_lack_a_terminal_event(
    tmp_path: Path,
) -> None:
    """The state older code left when killed between saving a job's final row and
    appending its terminal event."""
    store = LocalStore(tmp_path)
    for job_id, state, error in (
        ("job-ok", JobState.SUCCEEDED, ""),
        ("job-bad", JobState.FAILED, "labels: fewer than 2 classes"),
        ("job-stop", JobState.CANCELLED, "cancelled by the caller"),
    ):
        job = running_job(store, job_id, events=2)
        job.state, job.error, job.last_sequence = state, error, 1  # the row lags the log
        job.progress = progress(2, epoch_end=True)
        job.head_id = "cats-gone" if state is JobState.SUCCEEDED else ""
        store.save_job(job)
    healthy = running_job(store, "job-healthy", events=1)
    healthy.state, healthy.last_sequence = JobState.CANCELLED, 2
    store.finish_job(healthy, JobEvent("job-healthy", 2, NOW, JobCancelled("cancelled")))

    recover_jobs(store, sole_process=True)
    recover_jobs(store, sole_process=True)  # idempotent: a second start finds nothing to do

    ok = store.get_job("job-ok")
    completed = assert_log_ends_once(store, ok)[-1].payload
    assert ok.state is JobState.SUCCEEDED
    # The head is gone (deleted), so its metrics come from the last progress recorded.
    assert isinstance(completed, JobCompleted) and completed.head_id == "cats-gone"
    assert completed.metrics.train_accuracy == 0.75 and completed.metrics.epochs_run == 2
    bad = store.get_job("job-bad")
    failed = assert_log_ends_once(store, bad)[-1].payload
    assert bad.state is JobState.FAILED
    assert isinstance(failed, JobFailed) and failed.reason == "labels: fewer than 2 classes"
    stop = store.get_job("job-stop")
    cancelled = assert_log_ends_once(store, stop)[-1].payload
    assert isinstance(cancelled, JobCancelled) and cancelled.reason == "cancelled by the caller"
    assert len(store.events_after("job-healthy", 0)) == 2  # untouched


def test_recovery_leaves_an_interrupted_job_claimable_after_its_last_logged_event(
    tmp_path: Path,
) -> None:
    store = LocalStore(tmp_path)
    running_job(store, "job-1", events=5)
    # Held by the process that died: its lease has not run out, yet only recovery's
    # dropping of every lease makes the job claimable at once.
    assert store.claim_job("dead-process", datetime.now(UTC) + timedelta(hours=1)) is not None
    assert claim_next(store) is None
    recover_jobs(store, sole_process=True)
    claimed = claim_next(store)
    assert claimed is not None and claimed.job_id == "job-1"
    assert claimed.state is JobState.RUNNING and claimed.last_sequence == 5
    assert claimed.attempt == 2  # the crash counts as a run cut off
    assert not any(event.terminal for event in store.events_after("job-1", 0))


def test_recovery_beside_live_replicas_ends_finished_logs_and_leaves_the_queue(
    database_url: str,
) -> None:
    """On PostgreSQL a starting replica repairs only finished logs: the queue (jobs nobody
    claimed, and one whose lease ran out) is the claim loop's, and stays as it was."""
    store = PostgresStore(database_url)
    try:
        expired = running_job(store, "job-expired", events=2)
        assert store.claim_job("dead-replica", datetime.now(UTC) - timedelta(seconds=1))
        waiting = [running_job(store, f"job-{index:02d}", events=1) for index in range(30)]
        for job in waiting:
            job.state = JobState.QUEUED  # never claimed: no lease
            store.save_job(job)
        failed = running_job(store, "job-failed", events=2)
        failed.state, failed.error, failed.last_sequence = JobState.FAILED, "boom", 1
        store.save_job(failed)

        recover_jobs(store, sole_process=False)

        assert isinstance(
            assert_log_ends_once(store, store.get_job("job-failed"))[-1].payload, JobFailed
        )
        for job in waiting:
            assert store.get_job(job.job_id) == job
            assert len(store.events_after(job.job_id, 0)) == 1
        assert store.get_job("job-expired").state is JobState.RUNNING
        assert len(store.events_after(expired.job_id, 0)) == 2
        assert store.unsettled_jobs(datetime.now(UTC)) == [store.get_job("job-expired")]
    finally:
        store.close()


def test_a_job_killed_after_its_head_was_renamed_into_place_adopts_the_head(
    tmp_path: Path,
) -> None:
    """The rename-to-commit window: the head is whole on disk, the job still reads RUNNING."""
    store = LocalStore(tmp_path)
    running_job(store, "job-1", events=4)
    store.save_head(head("cats-1", "job-1"), WEIGHTS)
    running_job(store, "job-2", events=1)  # no head: still failed
    store.save_head(head("dogs-1", "job-old"), WEIGHTS)  # another job's head: left alone
    recover_jobs(store, sole_process=True)

    job = store.get_job("job-1")
    assert job.state is JobState.SUCCEEDED and job.head_id == "cats-1" and not job.error
    events = assert_log_ends_once(store, job)
    assert events[-1].sequence == 5
    assert events[-1].payload == JobCompleted("cats-1", HEAD_METRICS)
    assert store.get_job("job-2").state is JobState.RUNNING  # runs again
    next_job = claim_next(store)
    assert next_job is not None and next_job.job_id == "job-2"
    assert {h.head_id for h in store.list_heads()} == {"cats-1", "dogs-1"}
    store.close()
    store = LocalStore(tmp_path)  # what recovery wrote is durable, and it is not redone
    recover_jobs(store, sole_process=True)
    assert len(store.events_after("job-1", 0)) == 5
    assert store.get_job("job-1").state is JobState.SUCCEEDED


def test_an_unreadable_head_of_an_interrupted_job_is_removed_not_adopted(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    running_job(store, "job-1", events=2)
    store.save_head(head("cats-1", "job-1"), WEIGHTS)
    (tmp_path / "heads" / "cats-1" / "weights.safetensors").write_bytes(b"not safetensors")
    recover_jobs(store, sole_process=True)
    job = store.get_job("job-1")
    assert job.state is JobState.RUNNING and not job.head_id  # runs again
    assert store.list_heads() == []
    assert not (tmp_path / "heads" / "cats-1").exists()


def test_a_head_directory_without_its_weights_is_never_listed(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    store.save_head(head("cats-1", "job-1"), WEIGHTS)
    (tmp_path / "heads" / "cats-1" / "weights.safetensors").unlink()
    assert store.list_heads() == []
