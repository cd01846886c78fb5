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
  pg_head_names.py  head names' versions and aliases; deleting a head (under its name's lock)
and the heads, here: one row per head with its record (codec's JSON), its safetensors bytes
and their SHA-256, checked on every load. A head is one INSERT, so it is complete or absent.
Its version is the row's `version` column (unique per tenant and name; a record saved with
version 0 gets its name's next one from a trigger, migrations/0004_head_versions.sql).
Semantics and errors are LocalStore's; a database that cannot be reached is UnavailableError.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from typing import Any

import psycopg
import torch
from safetensors.torch import save as safetensors_save

from transfer_service.domain import (
    TENANT_PATTERN,
    HeadName,
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
from transfer_service.store.head_name_errors import version_taken
from transfer_service.store.ids import check_id
from transfer_service.store.paged_query import filled_page, postgres_page
from transfer_service.store.pg_datasets import PostgresDatasets
from transfer_service.store.pg_head_changes import (
    HeadWatcher,
    notify_head_changed,
    notify_name_changed,
)
from transfer_service.store.pg_head_names import PostgresHeadNames
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
            self._names = PostgresHeadNames(self._db)
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
        self,
        on_changed: Callable[[str], None],
        resident: Callable[[], list[str]],
        on_name_changed: Callable[[str, str], None] = lambda tenant, name: None,
    ) -> None:
        """Calls `on_changed(head_id)` (from a thread of its own) for every head any replica
        deletes or replaces: on its NOTIFY, or, for a lost one, within a second by a check
        of the ids `resident()` names (pg_head_changes); and `on_name_changed(tenant, name)`
        on the NOTIFY of a name whose versions or aliases changed. Stopped by close()."""
        if self.watcher is not None:
            self.watcher.close()
        self.watcher = HeadWatcher(self._db, on_changed, resident, on_name_changed=on_name_changed)
        self.watcher.start()

    # ---- heads ----

    def save_head(self, record: HeadRecord, weights: dict[str, torch.Tensor]) -> None:
        """One row: the record, the weights' safetensors bytes and their SHA-256. Saving an
        id again replaces the head (a retried save; version 0 keeps the version it had). A
        new head with version 0 gets its name's next version. FailedPreconditionError,
        nothing saved, when another head of the name holds the record's version."""
        check_id("head_id", record.head_id)
        # Serialised before the transaction (and in memory, so the checksum is of exactly
        # the bytes that are stored).
        data = safetensors_save(weights)
        with _version_unique(record), self._db.transaction() as conn:
            _write_head(conn, record, data)

    def get_head(self, head_id: str) -> HeadRecord:
        """Raises UnreadableHeadError (a FailedPreconditionError) for a head whose record is
        damaged in any way, with the owner from its tenant column."""
        check_id("head_id", head_id)
        with self._db.transaction() as conn:
            row = conn.execute(
                "SELECT record, tenant, version FROM heads WHERE head_id = %s", (head_id,)
            ).fetchone()
        if row is None:
            raise NotFoundError(f"head_id: no head {head_id!r}")
        return _decode(head_id, row[0], row[1], row[2])

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
        _decode(head_id, row[0], row[1], 0)
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
        select = "SELECT head_id, record, tenant, created, version FROM heads"

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
        for head_id, text, owner, _, version in rows:
            try:
                records.append(_decode(head_id, text, owner, version))
            except FailedPreconditionError as exc:
                if head_id not in self._unlisted_heads:
                    self._unlisted_heads.add(head_id)
                    log.warning("head %r left out of listings: %s", head_id, exc.message)
        return records

    def delete_head(self, head_id: str, *, force: bool = False) -> None:
        """Works whatever state the head's row is in (the caller checks ownership); refused
        while aliases point at its version, unless `force` (pg_head_names)."""
        check_id("head_id", head_id)
        self._names.delete_head(head_id, force=force)
        self._unlisted_heads.discard(head_id)

    # ---- names: versions and aliases (pg_head_names) ----

    def reserve_head_version(self, tenant: str, name: str) -> int:
        return self._names.reserve(tenant, name)

    def head_name(self, tenant: str, name: str) -> HeadName:
        return self._names.head_name(tenant, name)

    def set_head_alias(self, tenant: str, name: str, alias: str, version: int) -> HeadName:
        return self._names.set_alias(tenant, name, alias, version)

    def delete_head_alias(self, tenant: str, name: str, alias: str) -> HeadName:
        return self._names.delete_alias(tenant, name, alias)

    # ---- jobs and datasets (pg_jobs, pg_datasets; see delegation) ----

    # ---- measurements (issue 20: the chosen precision per backbone and machine) ----

    def read_measurement(self, key: str) -> str | None:
        with self._db.transaction() as conn:
            row = conn.execute("SELECT value FROM measurements WHERE key = %s", (key,)).fetchone()
        return None if row is None else str(row[0])

    def write_measurement(self, key: str, value: str) -> None:
        with self._db.transaction() as conn:
            conn.execute(
                "INSERT INTO measurements (key, value) VALUES (%s, %s) ON CONFLICT (key) "
                "DO UPDATE SET value = excluded.value, updated = now()",
                (key, value),
            )

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
        with _version_unique(head), self._db.transaction() as conn:
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
        "weights, weights_sha256, version) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s) "
        "ON CONFLICT (head_id) DO UPDATE SET tenant = excluded.tenant, "
        "name = excluded.name, backbone = excluded.backbone, job_id = excluded.job_id, "
        "created = excluded.created, record = excluded.record, "
        "weights = excluded.weights, weights_sha256 = excluded.weights_sha256, "
        # A replacing save without a version keeps the head's (the trigger's is for new rows).
        "version = CASE WHEN %s > 0 THEN excluded.version ELSE heads.version END "
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
            record.version,
            record.version,
        ),
    ).fetchone()
    if replaced is not None and replaced[0]:
        notify_head_changed(conn, record.head_id)
    # A new version: every replica's `name` and `name@latest` answer with it at once.
    notify_name_changed(conn, record.tenant, record.name)


@contextlib.contextmanager
def _version_unique(record: HeadRecord) -> Iterator[None]:
    """The unique index on (tenant, name, version) refusing a save (its transaction rolled
    back) as FailedPreconditionError."""
    try:
        yield
    except psycopg.errors.UniqueViolation as exc:
        if exc.diag.constraint_name != "heads_by_version":
            raise
        raise version_taken(record.name, record.version) from exc


def _decode(head_id: str, text: str, owner: str, version: int) -> HeadRecord:
    """The record stored as `text` for `head_id`, with the row's `version`; UnreadableHeadError,
    naming `owner`, if it is damaged or names another head."""
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
    return dataclasses.replace(record, version=version) if version else record
