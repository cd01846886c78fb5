"""The job store in PostgreSQL: job rows and their event logs (tables in migrations/), with
sqlite_jobs' semantics, the fencing of a run's writes by its attempt (interface.JobStore)
included. The queue's methods are pg_job_queue's, on top of these. Every event written is
announced to the other replicas (pg_job_notices)."""

from __future__ import annotations

import dataclasses
import json
from datetime import UTC, datetime
from typing import Any

from transfer_service.domain import JobEvent, JobRecord, JobState
from transfer_service.errors import NotFoundError
from transfer_service.store.codec import (
    event_kind,
    payload_from_json,
    payload_to_json,
    progress_from_json,
)
from transfer_service.store.ids import check_id
from transfer_service.store.paged_query import postgres_page
from transfer_service.store.pg_job_notices import EVENTS_CHANNEL
from transfer_service.store.pg_pool import Connection, Database
from transfer_service.store.queue_rules import check_holder, fencing_tokens

FINISHED_STATES = [state.value for state in JobState if state.finished]
# job_events.kind of the events that end a job's log (transfer_service.store.codec.event_kind).
_TERMINAL_KINDS = ["completed", "failed", "cancelled"]
# Finished jobs deleted per transaction by the retention sweep (short transactions).
_RETENTION_BATCH = 500
# What a JobRecord writes; the queue's columns are the queue's own, and `attempts` is read
# back as JobRecord.attempt.
_ROW_COLUMNS = (
    "job_id, state, backbone, head_name, head_id, error, created, updated, last_sequence, "
    "progress, tenant"
)
JOB_COLUMNS = _ROW_COLUMNS + ", attempts"
# bigint is signed 64-bit; a uint64 cursor past that means "nothing".
_MAX_SEQUENCE = 2**63 - 1


class PostgresJobs:
    """Jobs and job events (a JobStore) in `database`."""

    def __init__(self, database: Database) -> None:
        self._db = database

    def save_job(self, job: JobRecord) -> None:
        with self._db.transaction() as conn:
            fence(conn, job.job_id, job.attempt)
            write_job(conn, job)

    def finish_job(self, job: JobRecord, event: JobEvent) -> None:
        """The job's final row and its terminal event in one transaction: both or neither,
        never a finished job whose event log has no end."""
        with self._db.transaction() as conn:
            fence(conn, job.job_id, job.attempt)
            finish(conn, job, event)

    def get_job(self, job_id: str) -> JobRecord:
        check_id("job_id", job_id)
        with self._db.transaction() as conn:
            row = conn.execute(
                f"SELECT {JOB_COLUMNS} FROM jobs WHERE job_id = %s", (job_id,)
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
        """Oldest first (ties by id), filtered; `after` (a job's created time and id) and
        `limit` read one page, through the (created, job_id) indexes."""
        filters = (
            ("tenant", tenant),
            ("state", state.value if state is not None else None),
            ("backbone", backbone),
            ("head_name", name),
        )
        select = f"SELECT {JOB_COLUMNS} FROM jobs"
        query, parameters = postgres_page(select, "job_id", filters, after, limit)
        with self._db.transaction() as conn:
            rows = conn.execute(query, parameters).fetchall()
        return [job_from_row(row) for row in rows]

    holds_leases = True  # replicas share the database

    def unsettled_jobs(self, abandoned_before: datetime | None = None) -> list[JobRecord]:
        """Unfinished jobs (with `abandoned_before`, only those held by a lease that expired
        before it: a live replica renews its jobs' leases, and a queued job nobody claimed,
        or one released, holds none, so the waiting queue is not read), and finished jobs
        whose newest event is not a terminal one at or past the row's last sequence."""
        expired = aware(abandoned_before) if abandoned_before is not None else None
        with self._db.transaction() as conn:
            # `lease_expires < t` is NULL, so false, for a job that holds no lease.
            rows = conn.execute(
                f"SELECT {JOB_COLUMNS} FROM jobs AS j WHERE (j.state <> ALL(%s) AND "
                "(%s::timestamptz IS NULL OR j.lease_expires < %s::timestamptz)) "
                "OR (j.state = ANY(%s) AND NOT EXISTS (SELECT 1 FROM job_events AS e "
                "WHERE e.job_id = j.job_id "
                "AND e.sequence = (SELECT MAX(sequence) FROM job_events WHERE job_id = j.job_id) "
                "AND e.sequence >= j.last_sequence AND e.kind = ANY(%s))) "
                "ORDER BY created, job_id",
                (FINISHED_STATES, expired, expired, FINISHED_STATES, _TERMINAL_KINDS),
            ).fetchall()
        return [job_from_row(row) for row in rows]

    def delete_finished_jobs(self, finished_before: datetime) -> int:
        """Deletes jobs that finished (last updated) before `finished_before`, with their
        events, in batches; queued and running jobs, and heads, are never touched."""
        deleted = 0
        while True:
            with self._db.transaction() as conn:
                doomed = [
                    str(row[0])
                    for row in conn.execute(
                        "SELECT job_id FROM jobs WHERE state = ANY(%s) AND updated < %s "
                        "LIMIT %s FOR UPDATE SKIP LOCKED",
                        (FINISHED_STATES, aware(finished_before), _RETENTION_BATCH),
                    )
                ]
                conn.execute("DELETE FROM job_events WHERE job_id = ANY(%s)", (doomed,))
                conn.execute("DELETE FROM job_examples WHERE job_id = ANY(%s)", (doomed,))
                conn.execute("DELETE FROM jobs WHERE job_id = ANY(%s)", (doomed,))
            deleted += len(doomed)
            if len(doomed) < _RETENTION_BATCH:
                return deleted

    def append_event(self, event: JobEvent, *, attempt: int = 0) -> None:
        with self._db.transaction() as conn:
            fence(conn, event.job_id, attempt)
            write_event(conn, event)

    def append_progress(self, event: JobEvent, job: JobRecord | None, *, attempt: int = 0) -> None:
        # Committed without waiting for the WAL flush (synchronous_commit off, this
        # transaction only): a crashed database may lose the newest of them, which costs
        # nothing a restart would not redo; a dead replica loses nothing.
        with self._db.transaction() as conn:
            conn.execute("SET LOCAL synchronous_commit = off")
            for token in fencing_tokens(attempt, job):
                fence(conn, event.job_id, token)
            write_event(conn, event)
            if job is not None:
                write_job(conn, job)

    def events_after(self, job_id: str, after_sequence: int) -> list[JobEvent]:
        with self._db.transaction() as conn:
            rows = conn.execute(
                "SELECT job_id, sequence, time, kind, payload FROM job_events "
                "WHERE job_id = %s AND sequence > %s ORDER BY sequence",
                (job_id, min(after_sequence, _MAX_SEQUENCE)),
            ).fetchall()
        return [
            JobEvent(row[0], int(row[1]), row[2], payload_from_json(row[3], row[4])) for row in rows
        ]


def fence(conn: Connection, job_id: str, attempt: int) -> None:
    """The fence (store/queue_rules.py) in `conn`'s transaction: the row is locked (FOR
    UPDATE) until it ends, so no claim can move the job to another run between the check and
    the write it guards."""
    if attempt <= 0:
        return  # unfenced: no read, no lock
    row = conn.execute(
        "SELECT state, attempts FROM jobs WHERE job_id = %s FOR UPDATE", (job_id,)
    ).fetchone()
    check_holder(job_id, attempt, (str(row[0]), int(row[1])) if row is not None else None)


def finish(conn: Connection, job: JobRecord, event: JobEvent) -> None:
    """A job's end in `conn`'s transaction (its fence already checked): the terminal event,
    the final row, and its stored examples deleted (no run needs them any more)."""
    write_event(conn, event)
    write_job(conn, job)
    conn.execute("DELETE FROM job_examples WHERE job_id = %s", (job.job_id,))


def write_job(conn: Connection, job: JobRecord) -> None:
    """Inserts or updates the job's row; the queue's columns (the lease, the attempt count,
    the spec) are left as they are. A row inserted here is held by nobody."""
    progress = json.dumps(dataclasses.asdict(job.progress)) if job.progress else None
    conn.execute(
        f"INSERT INTO jobs ({_ROW_COLUMNS}) "
        "VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s) "
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
            _text(job.error),
            aware(job.created_time),
            aware(job.updated_time),
            job.last_sequence,
            progress,
            job.tenant,
        ),
    )


def write_event(conn: Connection, event: JobEvent) -> None:
    """Appends the event and announces it to every replica's watch_jobs (delivered on
    commit): one statement, as this runs for every progress event."""
    conn.execute(
        "WITH added AS (INSERT INTO job_events (job_id, sequence, time, kind, payload) "
        "VALUES (%s, %s, %s, %s, %s) RETURNING job_id) "
        "SELECT pg_notify(%s, job_id) FROM added",
        (
            event.job_id,
            event.sequence,
            aware(event.time),
            event_kind(event.payload),
            payload_to_json(event.payload),
            EVENTS_CHANNEL,
        ),
    )


def job_from_row(row: tuple[Any, ...]) -> JobRecord:
    return JobRecord(
        job_id=row[0],
        state=JobState(row[1]),
        backbone=row[2],
        head_name=row[3],
        head_id=row[4],
        error=row[5],
        created_time=row[6],
        updated_time=row[7],
        last_sequence=int(row[8]),
        progress=progress_from_json(row[9] or ""),
        tenant=row[10],
        attempt=int(row[11]),
    )


def aware(moment: datetime) -> datetime:
    """timestamptz needs an instant: a naive time is taken to be UTC (as codec does)."""
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def _text(value: str) -> str:
    """PostgreSQL text cannot hold NUL (an error message may quote a label that does)."""
    return value.replace("\x00", "\ufffd")
