"""The job queue in PostgreSQL (interface.JobStore's queue methods) on PostgresJobs' rows,
with sqlite_job_queue's semantics, for replicas sharing the database:

* enqueue_job holds the tenant's advisory lock for its transaction, so two replicas queueing
  for one tenant at once count each other's jobs (quota) and see each other's keys;
* claim_job takes its job FOR UPDATE SKIP LOCKED: claimers never take the same job, and
  never wait on each other;
* request_cancel and every fenced write lock the job's row, so a claim cannot slip between
  their check and their write.
Times are the database's (now()), so replicas' clocks need not agree on what expired."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from datetime import datetime
from typing import Any

from transfer_service.domain import ClaimedJob, FineTuneSpec, JobEvent, JobRecord, JobState
from transfer_service.errors import NotFoundError
from transfer_service.store.codec import spec_example_rows, spec_from_json, spec_to_json
from transfer_service.store.ids import check_id
from transfer_service.store.interface import LeaseRenewal
from transfer_service.store.pg_job_notices import JobWatcher, notify_cancel, notify_queued
from transfer_service.store.pg_jobs import (
    FINISHED_STATES,
    JOB_COLUMNS,
    PostgresJobs,
    aware,
    fence,
    finish,
    job_from_row,
    write_event,
    write_job,
)
from transfer_service.store.pg_pool import Connection, Database
from transfer_service.store.queue_rules import (
    cancelled_in_queue,
    check_cancellable,
    check_quota,
    known_request,
    renewal,
)

# The advisory-lock key of a tenant's queue: its name hashed with this prefix (to keep it
# apart from other users of single-key advisory locks).
_TENANT_LOCK_PREFIX = "transfer-tenant:"
_UNHELD = "(lease_owner IS NULL OR lease_expires < now())"
# The claimable job to take: the tenant holding the fewest running jobs first (fair between
# tenants), then the oldest; locked, skipping jobs another claimer has locked.
_NEXT_CLAIMABLE = (
    "WITH held AS (SELECT tenant, count(*) AS running FROM jobs "
    f"WHERE state <> ALL(%(finished)s) AND NOT {_UNHELD} GROUP BY tenant) "
    "SELECT jobs.job_id FROM jobs LEFT JOIN held ON held.tenant = jobs.tenant "
    f"WHERE jobs.state <> ALL(%(finished)s) AND {_UNHELD} "
    "ORDER BY COALESCE(held.running, 0), jobs.created, jobs.job_id "
    "LIMIT 1 FOR UPDATE OF jobs SKIP LOCKED"
)


class PostgresJobQueue(PostgresJobs):
    """PostgresJobs with the queue: the PostgreSQL store's whole JobStore. close() stops what
    watch_jobs started."""

    def __init__(self, database: Database) -> None:
        super().__init__(database)
        self.watcher: JobWatcher | None = None

    def close(self) -> None:
        if self.watcher is not None:
            self.watcher.close()

    def enqueue_job(
        self,
        job: JobRecord,
        event: JobEvent,
        spec: FineTuneSpec,
        *,
        max_unfinished: int,
        request_key: str = "",
        request_digest: str = "",
    ) -> JobRecord:
        """Under the tenant's lock: the idempotency key, the quota, then the job's row (held
        by nobody, attempt 0), spec, examples and first event; claimers are notified."""
        with self._db.transaction() as conn:
            conn.execute(
                "SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))",
                (_TENANT_LOCK_PREFIX + job.tenant,),
            )
            if request_key:
                row = conn.execute(
                    f"SELECT {JOB_COLUMNS}, request_digest FROM jobs "
                    "WHERE tenant = %s AND request_key = %s",
                    (job.tenant, request_key),
                ).fetchone()
                if row is not None:
                    return known_request(
                        job_from_row(row[:-1]), str(row[-1]), request_key, request_digest
                    )
            counted = conn.execute(
                "SELECT count(*) FROM jobs WHERE tenant = %s AND state <> ALL(%s)",
                (job.tenant, FINISHED_STATES),
            ).fetchone()
            check_quota(int(counted[0]) if counted is not None else 0, max_unfinished)
            write_job(conn, job)
            conn.execute(
                "UPDATE jobs SET lease_owner = NULL, lease_expires = NULL, attempts = 0, "
                "cancel_requested = false, spec = %s, request_key = %s, request_digest = %s "
                "WHERE job_id = %s",
                (spec_to_json(spec), request_key, request_digest, job.job_id),
            )
            with conn.cursor() as cursor:
                cursor.executemany(
                    "INSERT INTO job_examples (job_id, split, idx, label, image, text) "
                    "VALUES (%s, %s, %s, %s, %s, %s)",
                    spec_example_rows(job.job_id, spec, text_as_bytes=True),
                )
            write_event(conn, event)
            notify_queued(conn)
        return job

    def claim_job(self, owner: str, until: datetime) -> ClaimedJob | None:
        with self._db.transaction() as conn:
            row = conn.execute(_NEXT_CLAIMABLE, {"finished": FINISHED_STATES}).fetchone()
            if row is None:
                return None
            claimed = conn.execute(
                "UPDATE jobs SET lease_owner = %s, lease_expires = %s, "
                f"attempts = attempts + 1 WHERE job_id = %s RETURNING {JOB_COLUMNS}, spec",
                (owner, aware(until), row[0]),
            ).fetchone()
            return _claimed(conn, claimed) if claimed is not None else None

    def release_job(self, job: JobRecord, event: JobEvent) -> None:
        with self._db.transaction() as conn:
            fence(conn, job.job_id, job.attempt)
            write_job(conn, replace(job, state=JobState.QUEUED))
            # The attempt count as it was before this run's claim: a stop is not the job's.
            conn.execute(
                "UPDATE jobs SET lease_owner = NULL, lease_expires = NULL, "
                "attempts = GREATEST(attempts - 1, 0) WHERE job_id = %s",
                (job.job_id,),
            )
            write_event(conn, event)
            notify_queued(conn)

    def abandon_leases(self) -> None:
        """A no-op here: replicas share this store, so a starting replica cannot tell a dead
        predecessor's lease from a live replica's; expired leases make jobs claimable."""

    def hold_jobs(self, owner: str, job_ids: Sequence[str], until: datetime) -> LeaseRenewal:
        wanted = list(dict.fromkeys(job_ids))
        if not wanted:
            return renewal([], {})
        with self._db.transaction() as conn:
            rows = conn.execute(
                "UPDATE jobs SET lease_expires = %s WHERE job_id = ANY(%s) "
                "AND state <> ALL(%s) AND lease_owner = %s RETURNING job_id, cancel_requested",
                (aware(until), wanted, FINISHED_STATES, owner),
            ).fetchall()
        return renewal(wanted, {str(job_id): bool(flag) for job_id, flag in rows})

    def request_cancel(self, job_id: str, event: JobEvent) -> JobRecord | None:
        check_id("job_id", job_id)
        with self._db.transaction() as conn:
            # Locked: a claim waits for (or skips) it, so "nobody holds it" stays true.
            row = conn.execute(
                f"SELECT {JOB_COLUMNS}, {_UNHELD} FROM jobs WHERE job_id = %s FOR UPDATE",
                (job_id,),
            ).fetchone()
            if row is None:
                raise NotFoundError(f"job_id: no job {job_id!r}")
            record = job_from_row(row[:-1])
            check_cancellable(record)
            if not row[-1]:  # a replica holds it: the request is its to act on
                conn.execute("UPDATE jobs SET cancel_requested = true WHERE job_id = %s", (job_id,))
                notify_cancel(conn, job_id)
                return None
            final, terminal = cancelled_in_queue(record, event, _newest_sequence(conn, job_id))
            finish(conn, final, terminal)
        return final

    def watch_jobs(
        self,
        on_events: Callable[[str], None],
        on_queued: Callable[[], None],
        on_cancel: Callable[[str], None],
    ) -> None:
        """Calls the callbacks (from a thread of its own) for every notice any replica sends
        (pg_job_notices). Stopped by close()."""
        if self.watcher is not None:
            self.watcher.close()
        self.watcher = JobWatcher(self._db, on_events, on_queued, on_cancel)
        self.watcher.start()


def _claimed(conn: Connection, row: tuple[Any, ...]) -> ClaimedJob:
    """The job just claimed (`row`: its columns and spec) as its run sees it: the stored row
    at the new attempt, its newest logged event's sequence (progress events do not always
    move the row's) and the spec with its examples (None on a row older code wrote)."""
    record = job_from_row(row[:-1])
    record.last_sequence = max(record.last_sequence, _newest_sequence(conn, record.job_id))
    spec = None
    if row[-1] is not None:
        examples = conn.execute(
            "SELECT split, label, image, text FROM job_examples WHERE job_id = %s "
            "ORDER BY split, idx",
            (record.job_id,),
        ).fetchall()
        spec = spec_from_json(row[-1], examples)
    return ClaimedJob(record, spec)


def _newest_sequence(conn: Connection, job_id: str) -> int:
    row = conn.execute(
        "SELECT COALESCE(MAX(sequence), 0) FROM job_events WHERE job_id = %s", (job_id,)
    ).fetchone()
    return int(row[0]) if row is not None else 0
