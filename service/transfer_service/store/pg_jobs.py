"""The job store in PostgreSQL: job rows and their event logs (tables in
migrations/0001_initial.sql), with sqlite_jobs' semantics."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
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
from transfer_service.store.pg_pool import Connection, Database

_FINISHED_STATES = [state.value for state in JobState if state.finished]
# job_events.kind of the events that end a job's log (transfer_service.store.codec.event_kind).
_TERMINAL_KINDS = ["completed", "failed", "cancelled"]
# Finished jobs deleted per transaction by the retention sweep (short transactions).
_RETENTION_BATCH = 500
_JOB_COLUMNS = (
    "job_id, state, backbone, head_name, head_id, error, created, updated, last_sequence, "
    "progress, tenant"
)
# bigint is signed 64-bit; a uint64 cursor past that means "nothing".
_MAX_SEQUENCE = 2**63 - 1


class PostgresJobs:
    """Jobs and job events (a JobStore) in `database`."""

    def __init__(self, database: Database) -> None:
        self._db = database

    def save_job(self, job: JobRecord) -> None:
        with self._db.transaction() as conn:
            write_job(conn, job)

    def finish_job(self, job: JobRecord, event: JobEvent) -> None:
        """The job's final row and its terminal event in one transaction: both or neither,
        never a finished job whose event log has no end."""
        with self._db.transaction() as conn:
            write_event(conn, event)
            write_job(conn, job)

    def get_job(self, job_id: str) -> JobRecord:
        check_id("job_id", job_id)
        with self._db.transaction() as conn:
            row = conn.execute(
                f"SELECT {_JOB_COLUMNS} FROM jobs WHERE job_id = %s", (job_id,)
            ).fetchone()
        if row is None:
            raise NotFoundError(f"job_id: no job {job_id!r}")
        return _job_from_row(row)

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
        select = f"SELECT {_JOB_COLUMNS} FROM jobs"
        query, parameters = postgres_page(select, "job_id", filters, after, limit)
        with self._db.transaction() as conn:
            rows = conn.execute(query, parameters).fetchall()
        return [_job_from_row(row) for row in rows]

    holds_leases = True  # replicas share the database

    def hold_jobs(self, owner: str, job_ids: Sequence[str], until: datetime) -> list[str]:
        """Renews `owner`'s lease on those of `job_ids` still unfinished; returns those with a
        cancel requested."""
        if not job_ids:
            return []
        with self._db.transaction() as conn:
            rows = conn.execute(
                "UPDATE jobs SET lease_owner = %s, lease_expires = %s "
                "WHERE job_id = ANY(%s) AND state <> ALL(%s) RETURNING job_id, cancel_requested",
                (owner, _aware(until), list(job_ids), _FINISHED_STATES),
            ).fetchall()
        return [str(row[0]) for row in rows if row[1]]

    def request_cancel(self, job_id: str) -> None:
        with self._db.transaction() as conn:
            conn.execute(
                "UPDATE jobs SET cancel_requested = true WHERE job_id = %s AND state <> ALL(%s)",
                (job_id, _FINISHED_STATES),
            )

    def unsettled_jobs(self, abandoned_before: datetime | None = None) -> list[JobRecord]:
        """Unfinished jobs (with `abandoned_before`, only those whose lease expired before
        it: a live replica renews its jobs' leases), and finished jobs whose newest event is
        not a terminal one at or past the row's last sequence."""
        expired = _aware(abandoned_before) if abandoned_before is not None else None
        with self._db.transaction() as conn:
            rows = conn.execute(
                f"SELECT {_JOB_COLUMNS} FROM jobs AS j WHERE (j.state <> ALL(%s) AND "
                "(%s::timestamptz IS NULL OR j.lease_expires IS NULL "
                "OR j.lease_expires < %s::timestamptz)) "
                "OR (j.state = ANY(%s) AND NOT EXISTS (SELECT 1 FROM job_events AS e "
                "WHERE e.job_id = j.job_id "
                "AND e.sequence = (SELECT MAX(sequence) FROM job_events WHERE job_id = j.job_id) "
                "AND e.sequence >= j.last_sequence AND e.kind = ANY(%s))) "
                "ORDER BY created, job_id",
                (_FINISHED_STATES, expired, expired, _FINISHED_STATES, _TERMINAL_KINDS),
            ).fetchall()
        return [_job_from_row(row) for row in rows]

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
                        (_FINISHED_STATES, _aware(finished_before), _RETENTION_BATCH),
                    )
                ]
                conn.execute("DELETE FROM job_events WHERE job_id = ANY(%s)", (doomed,))
                conn.execute("DELETE FROM jobs WHERE job_id = ANY(%s)", (doomed,))
            deleted += len(doomed)
            if len(doomed) < _RETENTION_BATCH:
                return deleted

    def append_event(self, event: JobEvent) -> None:
        with self._db.transaction() as conn:
            write_event(conn, event)

    def append_progress(self, event: JobEvent, job: JobRecord | None) -> None:
        # Committed without waiting for the WAL flush (synchronous_commit off, this
        # transaction only): a crashed database may lose the newest of them, which costs
        # nothing a restart would not redo; a dead replica loses nothing.
        with self._db.transaction() as conn:
            conn.execute("SET LOCAL synchronous_commit = off")
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


# The lease a job's row is inserted with: longer than any heartbeat period.
INITIAL_LEASE_SECONDS = 120.0


def write_job(conn: Connection, job: JobRecord) -> None:
    """Inserts or replaces the job's row; the lease columns are left as they are."""
    progress = json.dumps(dataclasses.asdict(job.progress)) if job.progress else None
    # A new row starts with a lease (the accepting replica's heartbeat takes it over), so
    # no other replica's recovery reads a job just queued as abandoned.
    conn.execute(
        f"INSERT INTO jobs ({_JOB_COLUMNS}, lease_expires) "
        "VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s, now() + make_interval(secs => %s)) "
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
            _aware(job.created_time),
            _aware(job.updated_time),
            job.last_sequence,
            progress,
            job.tenant,
            INITIAL_LEASE_SECONDS,
        ),
    )


def write_event(conn: Connection, event: JobEvent) -> None:
    conn.execute(
        "INSERT INTO job_events (job_id, sequence, time, kind, payload) "
        "VALUES (%s, %s, %s, %s, %s)",
        (
            event.job_id,
            event.sequence,
            _aware(event.time),
            event_kind(event.payload),
            payload_to_json(event.payload),
        ),
    )


def _job_from_row(row: tuple[Any, ...]) -> JobRecord:
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
    )


def _aware(moment: datetime) -> datetime:
    """timestamptz needs an instant: a naive time is taken to be UTC (as codec does)."""
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def _text(value: str) -> str:
    """PostgreSQL text cannot hold NUL (an error message may quote a label that does)."""
    return value.replace("\x00", "\ufffd")
