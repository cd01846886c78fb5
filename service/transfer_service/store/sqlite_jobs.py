"""The job store in SQLite: job rows and their event logs (tables in sqlite_schema), with
the fencing of a run's writes by its attempt (interface.JobStore). The queue's methods are
sqlite_job_queue's, on top of these."""

from __future__ import annotations

import dataclasses
import json
import sqlite3
import threading
from datetime import datetime
from pathlib import Path

from transfer_service.domain import JobEvent, JobRecord, JobState
from transfer_service.errors import NotFoundError
from transfer_service.store.codec import (
    event_kind,
    payload_from_json,
    payload_to_json,
    progress_from_json,
)
from transfer_service.store.disk_faults import disk_faults
from transfer_service.store.ids import check_id
from transfer_service.store.paged_query import sqlite_page
from transfer_service.store.queue_rules import check_holder, fencing_tokens
from transfer_service.store.sqlite_schema import transaction

FINISHED_STATES = tuple(state.value for state in JobState if state.finished)
# job_events.kind of the events that end a job's log (transfer_service.store.codec.event_kind).
_TERMINAL_KINDS = ("completed", "failed", "cancelled")
# Finished jobs deleted per transaction by the retention sweep: the store's lock is released
# between batches, so a large sweep never holds up a training job's writes for long.
_RETENTION_BATCH = 500
# What a JobRecord writes; the queue's columns (sqlite_schema) are the queue's own, and
# `attempts` is read back as JobRecord.attempt.
_ROW_COLUMNS = (
    "job_id, state, backbone, head_name, head_id, error, created, updated, last_sequence, "
    "progress, tenant"
)
JOB_COLUMNS = _ROW_COLUMNS + ", attempts"


class SqliteJobs:
    """Jobs and job events (a JobStore) in `db`, used under `lock`, which the store's other
    users of the connection share; `root` is the store's directory (for disk faults)."""

    def __init__(self, db: sqlite3.Connection, lock: threading.Lock, root: Path) -> None:
        self._db = db
        self._lock = lock
        self._root = root

    @disk_faults
    def save_job(self, job: JobRecord) -> None:
        with self._lock, transaction(self._db):
            self._check_holder(job.job_id, job.attempt)
            self._write_job(job)

    @disk_faults
    def finish_job(self, job: JobRecord, event: JobEvent) -> None:
        """The job's final row and its terminal event in one transaction: a crash leaves
        both or neither, never a finished job whose event log has no end. Its stored
        examples go with it: no run needs them any more."""
        with self._lock, transaction(self._db):
            self._check_holder(job.job_id, job.attempt)
            self._write_event(event)
            self._write_job(job)
            self._db.execute("DELETE FROM job_examples WHERE job_id = ?", (job.job_id,))

    def _check_holder(self, job_id: str, attempt: int) -> None:
        """The fence (store/queue_rules.py), read under the store's lock, which the caller holds
        with its transaction open: nothing changes the row between check and write."""
        if attempt <= 0:
            return  # unfenced: no read
        row = self._db.execute(
            "SELECT state, attempts FROM jobs WHERE job_id = ?", (job_id,)
        ).fetchone()
        check_holder(job_id, attempt, (str(row[0]), int(row[1])) if row is not None else None)

    def _write_job(self, job: JobRecord) -> None:
        """Inserts or updates the job's row; the queue's columns (the lease, the attempt
        count, the spec) are left as they are: an upsert, not INSERT OR REPLACE, which would
        reset them."""
        progress = json.dumps(dataclasses.asdict(job.progress)) if job.progress else ""
        self._db.execute(
            f"INSERT INTO jobs ({_ROW_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?) "
            "ON CONFLICT (job_id) DO UPDATE SET state = excluded.state, "
            "backbone = excluded.backbone, head_name = excluded.head_name, "
            "head_id = excluded.head_id, error = excluded.error, created = excluded.created, "
            "updated = excluded.updated, last_sequence = excluded.last_sequence, "
            "progress = excluded.progress, tenant = excluded.tenant",
            (
                job.job_id,
                job.state.value,
                job.backbone,
                job.head_name,
                job.head_id,
                job.error,
                job.created_time.isoformat(),
                job.updated_time.isoformat(),
                job.last_sequence,
                progress,
                job.tenant,
            ),
        )

    def get_job(self, job_id: str) -> JobRecord:
        check_id("job_id", job_id)
        with self._lock:
            row = self._db.execute(
                f"SELECT {JOB_COLUMNS} FROM jobs WHERE job_id = ?", (job_id,)
            ).fetchone()
        if row is None:
            raise NotFoundError(f"job_id: no job {job_id!r}")
        return job_from_row(row)

    def list_jobs(
        self,
        tenant: str | None = None,
        *,
        state: JobState | None = None,
        backbone: str | None = None,
        name: str | None = None,
        after: tuple[datetime, str] | None = None,
        limit: int | None = None,
    ) -> list[JobRecord]:
        """Every job, oldest first (ties by id); only `tenant`'s, in `state`, on `backbone`
        and for head name `name` when given, read through the tenant index so one tenant's
        listing does not scan everyone's jobs. `after` (a job's created time and id) and
        `limit` read one page."""
        filters = (
            ("tenant", tenant),
            ("state", state.value if state is not None else None),
            ("backbone", backbone),
            ("head_name", name),
        )
        select = f"SELECT {JOB_COLUMNS} FROM jobs"
        sql, parameters = sqlite_page(select, "job_id", filters, after, limit)
        with self._lock:
            rows = self._db.execute(sql, parameters).fetchall()
        return [job_from_row(row) for row in rows]

    holds_leases = False  # one process owns the embedded store

    def unsettled_jobs(self, abandoned_before: datetime | None = None) -> list[JobRecord]:
        """What recovery must look at, found by SQLite rather than by reading every job's
        log (200,000 jobs took 3.4 s that way): jobs not finished (only at start-up,
        `abandoned_before` None: while this process runs, it runs them all), and finished
        jobs whose newest event is not a terminal one at or past the row's last sequence."""
        finished = ",".join("?" * len(FINISHED_STATES))
        terminal = ",".join("?" * len(_TERMINAL_KINDS))
        unfinished = f"j.state NOT IN ({finished})" if abandoned_before is None else "0"
        with self._lock:
            rows = self._db.execute(
                f"SELECT {JOB_COLUMNS} FROM jobs AS j WHERE {unfinished} "
                f"OR (j.state IN ({finished}) AND NOT EXISTS (SELECT 1 FROM job_events AS e "
                "WHERE e.job_id = j.job_id "
                "AND e.sequence = (SELECT MAX(sequence) FROM job_events WHERE job_id = j.job_id) "
                f"AND e.sequence >= j.last_sequence AND e.kind IN ({terminal}))) "
                "ORDER BY created, job_id",
                (
                    *(FINISHED_STATES if abandoned_before is None else ()),
                    *FINISHED_STATES,
                    *_TERMINAL_KINDS,
                ),
            ).fetchall()
        return [job_from_row(row) for row in rows]

    @disk_faults
    def delete_finished_jobs(self, finished_before: datetime) -> int:
        """Deletes jobs that finished (last updated) before `finished_before`, with their
        events; queued and running jobs, and heads, are never touched. Returns how many."""
        cutoff = finished_before.isoformat()
        states = ",".join("?" * len(FINISHED_STATES))
        deleted = 0
        while True:
            with self._lock, transaction(self._db):
                # julianday() compares the stored ISO times across UTC offsets.
                doomed = [
                    str(row[0])
                    for row in self._db.execute(
                        f"SELECT job_id FROM jobs WHERE state IN ({states}) "
                        "AND julianday(updated) < julianday(?) LIMIT ?",
                        (*FINISHED_STATES, cutoff, _RETENTION_BATCH),
                    )
                ]
                for job_id in doomed:
                    self._db.execute("DELETE FROM job_events WHERE job_id = ?", (job_id,))
                    self._db.execute("DELETE FROM job_examples WHERE job_id = ?", (job_id,))
                    self._db.execute("DELETE FROM jobs WHERE job_id = ?", (job_id,))
            deleted += len(doomed)
            if len(doomed) < _RETENTION_BATCH:
                return deleted

    @disk_faults
    def append_event(self, event: JobEvent, *, attempt: int = 0) -> None:
        with self._lock, transaction(self._db):
            self._check_holder(event.job_id, attempt)
            self._write_event(event)

    @disk_faults
    def append_progress(self, event: JobEvent, job: JobRecord | None, *, attempt: int = 0) -> None:
        # WAL with synchronous=NORMAL: the commit reaches the OS (so a killed process keeps
        # it) but is not fsynced; the next FULL commit syncs it with its own. 2 ms -> 0.07 ms
        # per event here, which is what progress streamed every step costs training.
        with self._lock:
            self._db.execute("PRAGMA synchronous=NORMAL")
            try:
                with transaction(self._db):
                    for token in fencing_tokens(attempt, job):
                        self._check_holder(event.job_id, token)
                    self._write_event(event)
                    if job is not None:
                        self._write_job(job)
            finally:
                self._db.execute("PRAGMA synchronous=FULL")

    def _write_event(self, event: JobEvent) -> None:
        self._db.execute(
            "INSERT INTO job_events VALUES (?,?,?,?,?)",
            (
                event.job_id,
                event.sequence,
                event.time.isoformat(),
                event_kind(event.payload),
                payload_to_json(event.payload),
            ),
        )

    def events_after(self, job_id: str, after_sequence: int) -> list[JobEvent]:
        # SQLite integers are signed 64-bit; a uint64 sequence past that means "nothing".
        after_sequence = min(after_sequence, 2**63 - 1)
        with self._lock:
            rows = self._db.execute(
                "SELECT job_id, sequence, time, kind, payload FROM job_events "
                "WHERE job_id = ? AND sequence > ? ORDER BY sequence",
                (job_id, after_sequence),
            ).fetchall()
        return [
            JobEvent(
                row[0], row[1], datetime.fromisoformat(row[2]), payload_from_json(row[3], row[4])
            )
            for row in rows
        ]


def job_from_row(row: tuple[object, ...]) -> JobRecord:
    return JobRecord(
        job_id=str(row[0]),
        state=JobState(row[1]),
        backbone=str(row[2]),
        head_name=str(row[3]),
        head_id=str(row[4]),
        error=str(row[5]),
        created_time=datetime.fromisoformat(str(row[6])),
        updated_time=datetime.fromisoformat(str(row[7])),
        last_sequence=int(str(row[8])),
        progress=progress_from_json(str(row[9])),
        tenant=str(row[10]),
        attempt=int(str(row[11])),
    )
