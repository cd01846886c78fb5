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
import logging
import sqlite3
import threading
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import torch

from transfer_service.domain import (
    HeadRecord,
    JobEvent,
    JobRecord,
)
from transfer_service.errors import ConfigurationError
from transfer_service.store.delegation import DatasetsByDelegation, JobsByDelegation
from transfer_service.store.disk_faults import refuse_unusable_volume
from transfer_service.store.head_files import HeadFiles
from transfer_service.store.paged_query import filled_page
from transfer_service.store.sqlite_datasets import SqliteDatasets
from transfer_service.store.sqlite_head_index import SqliteHeadIndex
from transfer_service.store.sqlite_job_queue import SqliteJobQueue
from transfer_service.store.sqlite_schema import DATABASE, open_database, open_failure

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

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def watch_heads(
        self, on_changed: Callable[[str], None], resident: Callable[[], list[str]]
    ) -> None:
        """Nothing to watch: one process owns the directory, and its deletes discard their
        heads themselves (operations.delete_head)."""

    # ---- heads (head_files) ----

    def save_head(self, record: HeadRecord, weights: dict[str, torch.Tensor]) -> None:
        self._heads.save_head(record, weights)
        try:
            self._head_index.add(record)
        except BaseException:
            # Not listed means not saved: the caller sees the failure and no head is left.
            with contextlib.suppress(Exception):
                self._heads.delete_head(record.head_id)
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

    def delete_head(self, head_id: str) -> None:
        self._heads.delete_head(head_id)
        self._head_index.remove(head_id)

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
                self.delete_head(head.head_id)
            raise
