"""The job queue in SQLite (interface.JobStore's queue methods) on SqliteJobs' rows: enqueue
with its quota and idempotency key, claim, release, leases, cancel requests.

One process owns the embedded store, and every transaction here runs under the store's lock
with BEGIN IMMEDIATE, so each is serialised against every other write: a tenant's quota
check and its insert cannot interleave with another's. Times are ISO text, compared through
julianday() (which reads their UTC offsets)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from datetime import UTC, datetime

from transfer_service.domain import ClaimedJob, FineTuneSpec, JobEvent, JobRecord, JobState
from transfer_service.errors import NotFoundError
from transfer_service.store.codec import spec_example_rows, spec_from_json, spec_to_json
from transfer_service.store.disk_faults import disk_faults
from transfer_service.store.ids import check_id
from transfer_service.store.interface import LeaseRenewal
from transfer_service.store.queue_rules import (
    UNFINISHED_STATES,
    cancelled_in_queue,
    check_cancellable,
    check_quota,
    known_request,
    renewal,
)
from transfer_service.store.sqlite_jobs import JOB_COLUMNS, SqliteJobs, job_from_row
from transfer_service.store.sqlite_schema import transaction

_UNFINISHED = f"state IN ({','.join(repr(state) for state in UNFINISHED_STATES)})"
# Nobody holds the job: never claimed, released, or its holder's lease ran out (the `now`
# parameter). Of an unfinished job this is "claimable".
_UNHELD = "(lease_owner IS NULL OR julianday(lease_expires) < julianday(:now))"
# The claimable job to take: the tenant holding the fewest running jobs first (fair between
# tenants), then the oldest.
_NEXT_CLAIMABLE = (
    "WITH held AS (SELECT tenant, count(*) AS running FROM jobs "
    f"WHERE {_UNFINISHED} AND NOT {_UNHELD} GROUP BY tenant) "
    "SELECT job_id FROM jobs LEFT JOIN held USING (tenant) "
    f"WHERE {_UNFINISHED} AND {_UNHELD} "
    "ORDER BY COALESCE(held.running, 0), julianday(created), job_id LIMIT 1"
)


class SqliteJobQueue(SqliteJobs):
    """SqliteJobs with the queue: the embedded store's whole JobStore."""

    @disk_faults
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
        """The job's row (nobody holding it, attempt 0), its spec, examples and first
        event in one transaction, after the idempotency key and the tenant's quota."""
        with self._lock, transaction(self._db):
            if request_key:
                row = self._db.execute(
                    f"SELECT {JOB_COLUMNS}, request_digest FROM jobs "
                    "WHERE tenant = ? AND request_key = ?",
                    (job.tenant, request_key),
                ).fetchone()
                if row is not None:
                    return known_request(
                        job_from_row(row[:-1]), str(row[-1]), request_key, request_digest
                    )
            (unfinished,) = self._db.execute(
                f"SELECT count(*) FROM jobs WHERE tenant = ? AND {_UNFINISHED}", (job.tenant,)
            ).fetchone()
            check_quota(int(unfinished), max_unfinished)
            self._write_job(job)
            self._db.execute(
                "UPDATE jobs SET lease_owner = NULL, lease_expires = NULL, attempts = 0, "
                "cancel_requested = 0, spec = ?, request_key = ?, request_digest = ? "
                "WHERE job_id = ?",
                (spec_to_json(spec), request_key, request_digest, job.job_id),
            )
            self._db.executemany(
                "INSERT INTO job_examples (job_id, split, idx, label, image, text) "
                "VALUES (?,?,?,?,?,?)",
                spec_example_rows(job.job_id, spec, text_as_bytes=False),
            )
            self._write_event(event)
        return job

    @disk_faults
    def claim_job(self, owner: str, until: datetime) -> ClaimedJob | None:
        with self._lock, transaction(self._db):
            row = self._db.execute(_NEXT_CLAIMABLE, {"now": _now()}).fetchone()
            if row is None:
                return None
            job_id = str(row[0])
            self._db.execute(
                "UPDATE jobs SET lease_owner = ?, lease_expires = ?, attempts = attempts + 1 "
                "WHERE job_id = ?",
                (owner, until.isoformat(), job_id),
            )
            return self._claimed(job_id)

    def _claimed(self, job_id: str) -> ClaimedJob:
        """The job just claimed as its run sees it: the stored row at the new attempt, its
        newest logged event's sequence (progress events do not always move the row's) and
        the spec with its examples (None on a row older code wrote)."""
        row = self._db.execute(
            f"SELECT {JOB_COLUMNS}, spec, (SELECT MAX(sequence) FROM job_events AS e "
            "WHERE e.job_id = jobs.job_id) FROM jobs WHERE job_id = ?",
            (job_id,),
        ).fetchone()
        record = job_from_row(row[:-2])
        record.last_sequence = max(record.last_sequence, int(row[-1] or 0))
        spec = None
        if row[-2] is not None:
            examples = self._db.execute(
                "SELECT split, label, image, text FROM job_examples WHERE job_id = ? "
                "ORDER BY split, idx",
                (job_id,),
            ).fetchall()
            spec = spec_from_json(str(row[-2]), examples)
        return ClaimedJob(record, spec)

    @disk_faults
    def release_job(self, job: JobRecord, event: JobEvent) -> None:
        with self._lock, transaction(self._db):
            self._check_holder(job.job_id, job.attempt)
            self._write_job(replace(job, state=JobState.QUEUED))
            # The attempt count as it was before this run's claim: a stop is not the job's.
            self._db.execute(
                "UPDATE jobs SET lease_owner = NULL, lease_expires = NULL, "
                "attempts = MAX(attempts - 1, 0) WHERE job_id = ?",
                (job.job_id,),
            )
            self._write_event(event)

    @disk_faults
    def abandon_leases(self) -> None:
        with self._lock, transaction(self._db):
            self._db.execute(
                f"UPDATE jobs SET lease_owner = NULL, lease_expires = NULL WHERE {_UNFINISHED}"
            )

    @disk_faults
    def hold_jobs(self, owner: str, job_ids: Sequence[str], until: datetime) -> LeaseRenewal:
        wanted = list(dict.fromkeys(job_ids))
        if not wanted:
            return renewal([], {})
        marks = ",".join("?" * len(wanted))
        with self._lock, transaction(self._db):
            rows = self._db.execute(
                f"UPDATE jobs SET lease_expires = ? WHERE job_id IN ({marks}) "
                f"AND {_UNFINISHED} AND lease_owner = ? RETURNING job_id, cancel_requested",
                (until.isoformat(), *wanted, owner),
            ).fetchall()
        return renewal(wanted, {str(job_id): bool(flag) for job_id, flag in rows})

    @disk_faults
    def request_cancel(self, job_id: str, event: JobEvent) -> JobRecord | None:
        check_id("job_id", job_id)
        with self._lock, transaction(self._db):
            row = self._db.execute(
                f"SELECT {JOB_COLUMNS}, {_UNHELD}, (SELECT COALESCE(MAX(sequence), 0) "
                "FROM job_events AS e WHERE e.job_id = jobs.job_id) FROM jobs "
                "WHERE job_id = :job_id",
                {"now": _now(), "job_id": job_id},
            ).fetchone()
            if row is None:
                raise NotFoundError(f"job_id: no job {job_id!r}")
            record = job_from_row(row[:-2])
            check_cancellable(record)
            if not row[-2]:  # a process holds it: the request is its to act on
                self._db.execute("UPDATE jobs SET cancel_requested = 1 WHERE job_id = ?", (job_id,))
                return None
            final, terminal = cancelled_in_queue(record, event, int(row[-1]))
            self._write_event(terminal)
            self._write_job(final)
            self._db.execute("DELETE FROM job_examples WHERE job_id = ?", (job_id,))
        return final

    def watch_jobs(
        self,
        on_events: Callable[[str], None],
        on_queued: Callable[[], None],
        on_cancel: Callable[[str], None],
    ) -> None:
        """Nothing to watch: no other process writes this store's jobs."""


def _now() -> str:
    return datetime.now(UTC).isoformat()
