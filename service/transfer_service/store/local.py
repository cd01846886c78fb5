"""The embedded store: a directory for head files plus one SQLite database.

Layout under the root:
  heads/          the head files (head_files.HeadFiles)
  store.sqlite3   jobs, job events, the job queue, datasets, an index of the heads
                  (sqlite_schema, sqlite_jobs, sqlite_job_queue, sqlite_datasets,
                  sqlite_head_index)
Every head, job and dataset records its tenant; the store keeps them all and the operations
layer decides who sees what. Ids are unique across tenants.
A write the disk refuses (full, over quota, read-only) is ResourceExhaustedError, saying so,
wherever it happens (disk_faults); opening a store that cannot be used is ConfigurationError.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import sqlite3
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import torch

from transfer_service.domain import (
    HeadName,
    HeadRecord,
    JobEvent,
    JobRecord,
)
from transfer_service.errors import ConfigurationError
from transfer_service.store.delegation import DatasetsByDelegation, JobsByDelegation
from transfer_service.store.disk_faults import disk_faults, refuse_unusable_volume
from transfer_service.store.head_files import HeadFiles
from transfer_service.store.head_name_errors import aliased_version, version_taken
from transfer_service.store.paged_query import filled_page
from transfer_service.store.sqlite_datasets import SqliteDatasets
from transfer_service.store.sqlite_head_index import SqliteHeadIndex
from transfer_service.store.sqlite_job_queue import SqliteJobQueue
from transfer_service.store.sqlite_schema import (
    DATABASE,
    open_database,
    open_failure,
    transaction,
)

log = logging.getLogger(__name__)


class LocalStore(JobsByDelegation, DatasetsByDelegation):
    """A Store: HeadFiles under the root, SqliteJobQueue and SqliteDatasets on one connection
    to the database beside them, sharing one lock."""

    def __init__(self, root: Path, *, recreate_database: bool = False) -> None:
        """Opens the store under `root`, creating it when the directory is new.

        Raises ConfigurationError, saying what is wrong, when the store cannot be used: its
        disk is full or read-only, its database is not a readable SQLite file, or the database
        is missing or empty while heads are stored (their jobs and datasets would vanish
        without a word): that one opens with `recreate_database` (an empty database)."""
        self._root = root.resolve()
        self._lock = threading.Lock()
        # Held across a delete's files and rows and by alias writes, so an alias is never
        # set on a version while it is being deleted (one process owns the directory).
        self._names_lock = threading.Lock()
        database = self._root / DATABASE
        try:
            self._heads = HeadFiles(self._root)
            refuse_unusable_volume(self._root)
            self._db = open_database(
                database, self._heads.stored_count(), recreate_database=recreate_database
            )
        except (sqlite3.Error, OSError) as exc:
            raise ConfigurationError(open_failure(self._root, database, exc)) from exc
        self._jobs = SqliteJobQueue(self._db, self._lock, self._root)
        self._datasets = SqliteDatasets(self._db, self._lock, self._root)
        self._head_index = SqliteHeadIndex(self._db, self._lock)
        added, dropped = self._head_index.reconcile(
            self._heads.stored_ids(), self._heads.listed_head
        )
        if added or dropped:
            log.info("head index: %d heads added, %d stale rows dropped", added, dropped)
        assigned = self._assign_versions()
        if assigned:
            log.info("head versions: %d heads stored before versions got theirs", assigned)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def watch_heads(
        self,
        on_changed: Callable[[str], None],
        resident: Callable[[], list[str]],
        on_name_changed: Callable[[str, str], None] = lambda tenant, name: None,
    ) -> None:
        """Nothing to watch: one process owns the directory, and its deletes and alias moves
        drop their cached heads and names themselves (HeadCatalog)."""

    # ---- heads (head_files) ----

    def _assign_versions(self) -> int:
        """Versions for the indexed heads without one (see sqlite_head_index): first the
        versions their head.json already carries (a start cut off mid-assignment), then new
        ones in created order. Returns how many heads got a version."""
        pending: list[HeadRecord] = []
        assigned = 0
        for head_id in self._head_index.unversioned():
            record = self._heads.listed_head(head_id)
            if record is None:
                continue  # damaged: unlisted, and without a version until repaired
            if record.version > 0:
                try:
                    self._head_index.set_version(head_id, record.version)
                    assigned += 1
                    continue
                except sqlite3.IntegrityError:
                    pass  # another head holds its version: it gets a fresh one below
            pending.append(record)
        for record in pending:
            version = self._head_index.reserve(record.tenant, record.name)
            self._heads.set_version(record.head_id, version)
            self._head_index.set_version(record.head_id, version)
            assigned += 1
        return assigned

    def save_head(self, record: HeadRecord, weights: dict[str, torch.Tensor]) -> None:
        """A record without a version (0) gets the name's next one, in its head.json too.
        FailedPreconditionError, nothing saved, when another head of the name holds its
        version."""
        if record.version == 0:
            version = self._head_index.reserve(record.tenant, record.name)
            record = dataclasses.replace(record, version=version)
        self._heads.save_head(record, weights)
        try:
            self._head_index.add(record)
        except BaseException as exc:
            # Not listed means not saved: the caller sees the failure and no head is left.
            with contextlib.suppress(Exception):
                self._heads.delete_head(record.head_id)
            if isinstance(exc, sqlite3.IntegrityError):
                raise version_taken(record.name, record.version) from exc
            raise

    def get_head(self, head_id: str) -> HeadRecord:
        return self._heads.get_head(head_id)

    def load_head_weights(self, head_id: str) -> dict[str, torch.Tensor]:
        return self._heads.load_head_weights(head_id)

    def list_heads(
        self,
        tenant: str | None = None,
        *,
        backbone: str | None = None,
        name: str | None = None,
        after: tuple[datetime, str] | None = None,
        limit: int | None = None,
    ) -> list[HeadRecord]:
        """Pages through the index and reads only the head files it names; a damaged head is
        left out and the page filled from the heads after it, so a page short of `limit`
        always means the listing's end."""

        def read(
            past: tuple[datetime, str] | None, wanted: int | None
        ) -> tuple[list[HeadRecord], list[tuple[datetime, str]]]:
            positions = self._head_index.page(
                tenant, backbone=backbone, name=name, after=past, limit=wanted
            )
            listed = (self._heads.listed_head(head_id) for _, head_id in positions)
            return [record for record in listed if record is not None], positions

        return filled_page(read, after, limit)

    def delete_head(self, head_id: str, *, force: bool = False) -> None:
        """The files first, then the row with the aliases at its version (one transaction);
        a crash between leaves a row that start-up reconcile drops, aliases with it."""
        with self._names_lock:
            place = self._head_index.place(head_id)
            if place is not None and place[2] > 0 and not force:
                aliases = self._head_index.aliases_at(*place)
                if aliases:
                    raise aliased_version(head_id, place[1], place[2], aliases)
            self._heads.delete_head(head_id)
            self._head_index.remove(head_id)

    # ---- names: versions and aliases (sqlite_head_index) ----

    def reserve_head_version(self, tenant: str, name: str) -> int:
        return self._head_index.reserve(tenant, name)

    def head_name(self, tenant: str, name: str) -> HeadName:
        return self._head_index.head_name(tenant, name)

    def set_head_alias(self, tenant: str, name: str, alias: str, version: int) -> HeadName:
        with self._names_lock:
            return self._head_index.set_alias(tenant, name, alias, version)

    def delete_head_alias(self, tenant: str, name: str, alias: str) -> HeadName:
        with self._names_lock:
            return self._head_index.delete_alias(tenant, name, alias)

    # ---- measurements (issue 20: the chosen precision per backbone and machine) ----

    @disk_faults
    def read_measurement(self, key: str) -> str | None:
        with self._lock:
            row = self._db.execute("SELECT value FROM measurements WHERE key = ?", (key,))
            found = row.fetchone()
        return None if found is None else str(found[0])

    @disk_faults
    def write_measurement(self, key: str, value: str) -> None:
        with self._lock, transaction(self._db):
            self._db.execute(
                "INSERT INTO measurements (key, value, updated) VALUES (?, ?, ?) "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value, "
                "updated = excluded.updated",
                (key, value, datetime.now(UTC).isoformat()),
            )

    # ---- jobs and datasets (sqlite_jobs, sqlite_datasets; see delegation) ----

    def complete_job(
        self,
        job: JobRecord,
        event: JobEvent,
        head: HeadRecord,
        weights: dict[str, torch.Tensor],
    ) -> None:
        """The head files first (renamed into place whole), then the job's row and event in
        one SQLite transaction. Files and database cannot share a transaction: when the
        second step fails the head is removed again; a kill between the two leaves a whole
        head whose job is unfinished, which start-up recovery adopts (training/recovery.py),
        so the outcome is the same as one commit. A run that no longer holds the job
        (LeaseLostError from the fenced row write) leaves no head either."""
        self.save_head(head, weights)
        try:
            self._jobs.finish_job(job, event)
        except BaseException:
            with contextlib.suppress(Exception):
                self.delete_head(head.head_id, force=True)
            raise
