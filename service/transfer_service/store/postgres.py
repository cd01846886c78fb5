"""The PostgreSQL store, for several replicas sharing one durable state (TRANSFER_DATABASE_URL):
heads, jobs and their events, datasets, all in one database.

Composed of:
  pg_pool.py        the connection pool; database failures as domain errors
  pg_migrations.py  the versioned schema (migrations/*.sql), applied at start under a lock
  pg_jobs.py        jobs and job events, and the fencing of a run's writes
  pg_job_queue.py   the job queue: enqueue, claim, release, leases, cancel requests
  pg_job_notices.py NOTIFY on job events, a job queued, a cancel requested; the listener
                    behind watch_jobs
  pg_datasets.py    uploaded datasets and their writer
  pg_head_changes.py  NOTIFY on a deleted or replaced head; the listener (and its backstop)
                    that clears it from every replica's head cache (watch_heads)
and the heads, here: one row per head with its record (codec's JSON), its safetensors bytes
and their SHA-256, checked on every load. A head is one INSERT, so it is complete or absent.
Semantics and errors are LocalStore's; a database that cannot be reached is UnavailableError.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

import torch
from safetensors.torch import save as safetensors_save

from transfer_service.domain import (
    TENANT_PATTERN,
    HeadRecord,
    JobEvent,
    JobRecord,
    JobState,
)
from transfer_service.errors import FailedPreconditionError, NotFoundError, UnreadableHeadError
from transfer_service.store.codec import (
    HeadFormatError,
    decode_head,
    decode_weights,
    head_to_json,
)
from transfer_service.store.delegation import DatasetsByDelegation, JobsByDelegation
from transfer_service.store.ids import check_id
from transfer_service.store.paged_query import filled_page, postgres_page
from transfer_service.store.pg_datasets import PostgresDatasets
from transfer_service.store.pg_head_changes import HeadWatcher, notify_head_changed
from transfer_service.store.pg_job_queue import PostgresJobQueue
from transfer_service.store.pg_jobs import fence, finish
from transfer_service.store.pg_migrations import migrate
from transfer_service.store.pg_pool import Connection, Database

# Uploads not committed and untouched this long are taken for abandoned (their replica died)
# and removed at start-up.
ABANDONED_UPLOAD_SECONDS = 3600.0

log = logging.getLogger(__name__)


class PostgresStore(JobsByDelegation, DatasetsByDelegation):
    """A Store in the PostgreSQL database at `url` (a libpq URL or conninfo string).

    Opening it connects, migrates the schema (once, whichever replica gets there first) and
    removes abandoned uploads. Raises UnavailableError, saying the database is unreachable,
    when it cannot be reached within `timeout` seconds; so does any later call. At most
    `max_connections` connections are open at once."""

    def __init__(
        self,
        url: str,
        *,
        max_connections: int = 8,
        timeout: float = 10.0,
        connect_timeout: float = 5.0,
    ) -> None:
        self._db = Database(
            url, max_connections=max_connections, timeout=timeout, connect_timeout=connect_timeout
        )
        self._db.open()
        try:
            with self._db.transaction() as conn:
                migrate(conn)  # in a transaction of its own, under the migration lock
            self._queue = PostgresJobQueue(self._db)
            self._jobs = self._queue
            self._datasets = PostgresDatasets(self._db)
            self._datasets.remove_abandoned_uploads(ABANDONED_UPLOAD_SECONDS)
        except BaseException:
            self._db.close()
            raise
        self._unlisted_heads: set[str] = set()  # damaged heads already warned about
        self.watcher: HeadWatcher | None = None

    @property
    def where(self) -> str:
        """host:port/database, for logs (never the password)."""
        return self._db.where

    def close(self) -> None:
        if self.watcher is not None:
            self.watcher.close()
        self._queue.close()
        self._db.close()

    def watch_heads(
        self, on_changed: Callable[[str], None], resident: Callable[[], list[str]]
    ) -> None:
        """Calls `on_changed(head_id)` (from a thread of its own) for every head any replica
        deletes or replaces: on its NOTIFY, or, for a lost one, within a second by a check
        of the ids `resident()` names (pg_head_changes). Stopped by close()."""
        if self.watcher is not None:
            self.watcher.close()
        self.watcher = HeadWatcher(self._db, on_changed, resident)
        self.watcher.start()

    # ---- heads ----

    def save_head(self, record: HeadRecord, weights: dict[str, torch.Tensor]) -> None:
        """One row: the record, the weights' safetensors bytes and their SHA-256. Saving an
        id again replaces the head (a retried save)."""
        check_id("head_id", record.head_id)
        # Serialised before the transaction (and in memory, so the checksum is of exactly
        # the bytes that are stored).
        data = safetensors_save(weights)
        with self._db.transaction() as conn:
            _write_head(conn, record, data)

    def get_head(self, head_id: str) -> HeadRecord:
        """Raises UnreadableHeadError (a FailedPreconditionError) for a head whose record is
        damaged in any way, with the owner from its tenant column."""
        check_id("head_id", head_id)
        with self._db.transaction() as conn:
            row = conn.execute(
                "SELECT record, tenant FROM heads WHERE head_id = %s", (head_id,)
            ).fetchone()
        if row is None:
            raise NotFoundError(f"head_id: no head {head_id!r}")
        return _decode(head_id, row[0], row[1])

    def load_head_weights(self, head_id: str) -> dict[str, torch.Tensor]:
        """Checks the weights against their SHA-256: damaged bytes fail loudly here rather
        than predict wrongly."""
        check_id("head_id", head_id)
        with self._db.transaction() as conn:
            row = conn.execute(
                "SELECT record, tenant, weights, weights_sha256 FROM heads WHERE head_id = %s",
                (head_id,),
            ).fetchone()
        if row is None:
            raise NotFoundError(f"head_id: no head {head_id!r}")
        _decode(head_id, row[0], row[1])
        return decode_weights(head_id, bytes(row[2]), row[3])

    def list_heads(
        self,
        tenant: str | None = None,
        *,
        backbone: str | None = None,
        name: str | None = None,
        after: tuple[datetime, str] | None = None,
        limit: int | None = None,
    ) -> list[HeadRecord]:
        """Oldest first, ties by id, filtered, one page with `after`/`limit`. A damaged head
        is left out (with a warning, once per head and process), the page filled from the
        heads past it."""
        filters = (("tenant", tenant), ("backbone", backbone), ("name", name))
        select = "SELECT head_id, record, tenant, created FROM heads"

        def read(
            past: tuple[datetime, str] | None, wanted: int | None
        ) -> tuple[list[HeadRecord], list[tuple[datetime, str]]]:
            query, parameters = postgres_page(select, "head_id", filters, past, wanted)
            with self._db.transaction() as conn:
                rows = conn.execute(query, parameters).fetchall()
            return self._readable(rows), [(row[3], row[0]) for row in rows]

        return filled_page(read, after, limit)

    def _readable(self, rows: Sequence[tuple[Any, ...]]) -> list[HeadRecord]:
        records = []
        for head_id, text, owner, _ in rows:
            try:
                records.append(_decode(head_id, text, owner))
            except FailedPreconditionError as exc:
                if head_id not in self._unlisted_heads:
                    self._unlisted_heads.add(head_id)
                    log.warning("head %r left out of listings: %s", head_id, exc.message)
        return records

    def delete_head(self, head_id: str) -> None:
        """Works whatever state the head's row is in (the caller checks ownership)."""
        check_id("head_id", head_id)
        with self._db.transaction() as conn:
            deleted = conn.execute("DELETE FROM heads WHERE head_id = %s", (head_id,)).rowcount
            if deleted:
                notify_head_changed(conn, head_id)  # delivered on commit
        if not deleted:
            raise NotFoundError(f"head_id: no head {head_id!r}")
        self._unlisted_heads.discard(head_id)

    # ---- jobs and datasets (pg_jobs, pg_datasets; see delegation) ----

    def complete_job(
        self,
        job: JobRecord,
        event: JobEvent,
        head: HeadRecord,
        weights: dict[str, torch.Tensor],
    ) -> None:
        """The head's row, the job's SUCCEEDED row and its `completed` event in one
        transaction: all three or none, the job's stored examples deleted with them. A run
        that no longer holds the job (a later run took it over) is refused by the fence
        (LeaseLostError); an unfenced write (attempt 0) of a job already finished is refused
        as well: either way it never gains a head after it ended."""
        check_id("head_id", head.head_id)
        data = safetensors_save(weights)
        with self._db.transaction() as conn:
            if job.attempt > 0:
                fence(conn, job.job_id, job.attempt)
            else:
                row = conn.execute(
                    "SELECT state FROM jobs WHERE job_id = %s FOR UPDATE", (job.job_id,)
                ).fetchone()
                if row is not None and JobState(row[0]).finished:
                    raise FailedPreconditionError(
                        f"job {job.job_id} was already settled ({row[0]}) by another replica"
                    )
            _write_head(conn, head, data)
            finish(conn, job, event)


def _write_head(conn: Connection, record: HeadRecord, data: bytes) -> None:
    """Inserts (or replaces) the head's row: `data` is its weights' safetensors bytes. A
    replaced head is announced to every replica's cache on commit."""
    created = record.created_time
    if created.tzinfo is None:
        created = created.replace(tzinfo=UTC)  # as codec reads a naive time back
    replaced = conn.execute(
        "INSERT INTO heads (head_id, tenant, name, backbone, job_id, created, record, "
        "weights, weights_sha256) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s) "
        "ON CONFLICT (head_id) DO UPDATE SET tenant = excluded.tenant, "
        "name = excluded.name, backbone = excluded.backbone, job_id = excluded.job_id, "
        "created = excluded.created, record = excluded.record, "
        "weights = excluded.weights, weights_sha256 = excluded.weights_sha256 "
        "RETURNING xmax <> 0",  # xmax is 0 on an inserted row, set on an updated one
        (
            record.head_id,
            record.tenant,
            record.name,
            record.backbone,
            record.job_id,
            created,
            head_to_json(record),
            data,
            hashlib.sha256(data).hexdigest(),
        ),
    ).fetchone()
    if replaced is not None and replaced[0]:
        notify_head_changed(conn, record.head_id)


def _decode(head_id: str, text: str, owner: str) -> HeadRecord:
    """The record stored as `text` for `head_id`; UnreadableHeadError, naming `owner`, if it
    is damaged or names another head."""
    known_owner = owner if TENANT_PATTERN.fullmatch(owner) else None
    try:
        record, _ = decode_head(text)
    except HeadFormatError as exc:
        raise UnreadableHeadError(head_id, f"metadata unreadable ({exc})", known_owner) from exc
    if record.head_id != head_id:
        # Caches and tenancy checks key on the id: a record filed under another id is as
        # unusable as a damaged one.
        raise UnreadableHeadError(
            head_id, f"metadata names another head ({record.head_id!r})", known_owner
        )
    return record
