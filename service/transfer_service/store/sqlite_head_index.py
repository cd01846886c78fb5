"""The embedded store's index of its heads in SQLite: tenant, name, backbone and creation
time per head id, so ListHeads reads one page of head files, not every head's JSON.

The head files are the truth; the index follows them. A save adds the row after the files
are in place, a delete removes it after the files are gone, and `reconcile` (at start-up)
repairs what a crash between the two left behind."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable
from datetime import datetime

from transfer_service.domain import HeadRecord
from transfer_service.store.disk_faults import disk_faults
from transfer_service.store.paged_query import sqlite_page
from transfer_service.store.sqlite_schema import transaction


class SqliteHeadIndex:
    def __init__(self, db: sqlite3.Connection, lock: threading.Lock) -> None:
        self._db = db
        self._lock = lock

    @disk_faults
    def add(self, record: HeadRecord) -> None:
        with self._lock, transaction(self._db):
            self._db.execute(
                "INSERT OR REPLACE INTO heads (head_id, tenant, name, backbone, created) "
                "VALUES (?, ?, ?, ?, ?)",
                (
                    record.head_id,
                    record.tenant,
                    record.name,
                    record.backbone,
                    record.created_time.isoformat(),
                ),
            )

    @disk_faults
    def remove(self, head_id: str) -> None:
        with self._lock, transaction(self._db):
            self._db.execute("DELETE FROM heads WHERE head_id = ?", (head_id,))

    def page(
        self,
        tenant: str | None,
        *,
        backbone: str | None,
        name: str | None,
        after: tuple[datetime, str] | None,
        limit: int | None,
    ) -> list[tuple[datetime, str]]:
        """(created time, head id) of a page, oldest first (ties by id), filtered and paged as
        HeadStore.list_heads."""
        filters = (("tenant", tenant), ("backbone", backbone), ("name", name))
        select = "SELECT created, head_id FROM heads"
        sql, parameters = sqlite_page(select, "head_id", filters, after, limit)
        with self._lock:
            rows = self._db.execute(sql, parameters).fetchall()
        return [(datetime.fromisoformat(str(row[0])), str(row[1])) for row in rows]

    def reconcile(
        self, stored_ids: list[str], read_record: Callable[[str], HeadRecord | None]
    ) -> tuple[int, int]:
        """Adds the heads on disk the index lacks (a crash after a save's files, or a store
        written before the index existed) and drops rows whose files are gone (a crash
        during a delete). Returns (added, dropped)."""
        with self._lock:
            indexed = {str(row[0]) for row in self._db.execute("SELECT head_id FROM heads")}
        stored = set(stored_ids)
        added = 0
        for head_id in sorted(stored - indexed):
            record = read_record(head_id)
            if record is not None:  # a damaged head stays unlisted, as before the index
                self.add(record)
                added += 1
        gone = sorted(indexed - stored)
        if gone:
            with self._lock, transaction(self._db):
                self._db.executemany(
                    "DELETE FROM heads WHERE head_id = ?", [(head_id,) for head_id in gone]
                )
        return added, len(gone)
