"""The embedded store's index of its heads in SQLite: tenant, name, version, backbone and
creation time per head id, so ListHeads reads one page of head files, not every head's JSON;
and each name's versions and aliases (tables head_names, head_aliases).

The head files are the truth; the index follows them. A save adds the row after the files
are in place, a delete removes it after the files are gone, and `reconcile` (at start-up)
repairs what a crash between the two left behind.

Versions: a head's version lives in its head.json, written with the head. It is reserved
before (`reserve`: head_names.next_version, committed at once), so a version in a file is
always below next_version and a later reservation never hands it out again; a crash between
the reservation and the save leaves only a gap. The unique index on (tenant, name, version)
refuses a second head with a version already indexed; a head found on disk at start-up
whose version another indexed head holds (only a crash inside such a refused save leaves
one) is given a fresh version, as a legacy head is. Heads stored before versions existed
(version 0 in head.json, and in the index after the schema upgrade) get theirs at start-up
(`unversioned`, then LocalStore._assign_versions): in created order (ties by head id), each
reserved, written into its head.json (atomic rename) and then into the index; a crash in
between leaves the file ahead of the index, and the next start adopts the file's version.
An alias points at a version of its name; it goes with the version's row (`remove`), and
`reconcile` drops any whose version is gone (a crash between a delete's files and its row).
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable
from datetime import datetime

from transfer_service.domain import HeadName, HeadRecord
from transfer_service.store.disk_faults import disk_faults
from transfer_service.store.head_name_errors import no_such_alias, no_such_name, no_such_version
from transfer_service.store.paged_query import sqlite_page
from transfer_service.store.sqlite_schema import transaction

# (tenant, name, version) of an indexed head.
HeadPlace = tuple[str, str, int]


class SqliteHeadIndex:
    def __init__(self, db: sqlite3.Connection, lock: threading.Lock) -> None:
        self._db = db
        self._lock = lock

    @disk_faults
    def add(self, record: HeadRecord) -> None:
        """Indexes the head (again, for an id already indexed). sqlite3.IntegrityError when
        another head of its name holds its version (nothing changed then)."""
        with self._lock, transaction(self._db):
            self._insert(record, record.version)

    def _insert(self, record: HeadRecord, version: int) -> None:
        self._db.execute(
            "INSERT INTO heads (head_id, tenant, name, backbone, created, version) "
            "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (head_id) DO UPDATE SET "
            "tenant = excluded.tenant, name = excluded.name, backbone = excluded.backbone, "
            "created = excluded.created, version = excluded.version",
            (
                record.head_id,
                record.tenant,
                record.name,
                record.backbone,
                record.created_time.isoformat(),
                version,
            ),
        )
        if version > 0:
            self._reserved_up_to(record.tenant, record.name, version)

    def _reserved_up_to(self, tenant: str, name: str, version: int) -> None:
        """next_version past `version` (a head saved with it, or a database recreated
        beside heads that carry versions)."""
        self._db.execute(
            "INSERT INTO head_names (tenant, name, next_version) VALUES (?, ?, ?) "
            "ON CONFLICT (tenant, name) DO UPDATE SET "
            "next_version = max(next_version, excluded.next_version)",
            (tenant, name, version + 1),
        )

    @disk_faults
    def set_version(self, head_id: str, version: int) -> None:
        """The version of a head that had none (start-up assignment). sqlite3.IntegrityError
        when another head of its name holds it."""
        with self._lock, transaction(self._db):
            row = self._db.execute(
                "SELECT tenant, name FROM heads WHERE head_id = ?", (head_id,)
            ).fetchone()
            if row is None:
                return
            self._db.execute("UPDATE heads SET version = ? WHERE head_id = ?", (version, head_id))
            self._reserved_up_to(str(row[0]), str(row[1]), version)

    @disk_faults
    def remove(self, head_id: str) -> None:
        """Drops the head's row and the aliases that point at its version, in one
        transaction."""
        with self._lock, transaction(self._db):
            place = self._place(head_id)
            if place is not None and place[2] > 0:
                self._db.execute(
                    "DELETE FROM head_aliases WHERE tenant = ? AND name = ? AND version = ?",
                    place,
                )
            self._db.execute("DELETE FROM heads WHERE head_id = ?", (head_id,))

    def place(self, head_id: str) -> HeadPlace | None:
        """(tenant, name, version) of an indexed head; None when it is not indexed."""
        with self._lock:
            return self._place(head_id)

    def _place(self, head_id: str) -> HeadPlace | None:
        row = self._db.execute(
            "SELECT tenant, name, version FROM heads WHERE head_id = ?", (head_id,)
        ).fetchone()
        return None if row is None else (str(row[0]), str(row[1]), int(row[2]))

    def aliases_at(self, tenant: str, name: str, version: int) -> list[str]:
        with self._lock:
            rows = self._db.execute(
                "SELECT alias FROM head_aliases WHERE tenant = ? AND name = ? AND version = ? "
                "ORDER BY alias",
                (tenant, name, version),
            ).fetchall()
        return [str(row[0]) for row in rows]

    # ---- names: versions and aliases ----

    @disk_faults
    def reserve(self, tenant: str, name: str) -> int:
        """The name's next version, committed before it is returned (BEGIN IMMEDIATE: atomic
        across processes as well)."""
        with self._lock, transaction(self._db):
            row = self._db.execute(
                "SELECT next_version FROM head_names WHERE tenant = ? AND name = ?",
                (tenant, name),
            ).fetchone()
            version = 1 if row is None else int(row[0])
            self._reserved_up_to(tenant, name, version)
        return version

    def head_name(self, tenant: str, name: str) -> HeadName:
        with self._lock:
            return self._head_name(tenant, name)

    def _head_name(self, tenant: str, name: str) -> HeadName:
        """NotFoundError when the name has no version; the caller holds the lock (one
        connection, so the two reads see one state)."""
        versions = {
            int(row[0]): str(row[1])
            for row in self._db.execute(
                "SELECT version, head_id FROM heads WHERE tenant = ? AND name = ? AND version > 0",
                (tenant, name),
            )
        }
        if not versions:
            raise no_such_name(name)
        aliases = {
            str(row[0]): int(row[1])
            for row in self._db.execute(
                "SELECT alias, version FROM head_aliases WHERE tenant = ? AND name = ?",
                (tenant, name),
            )
        }
        return HeadName(tenant=tenant, name=name, versions=versions, aliases=aliases)

    @disk_faults
    def set_alias(self, tenant: str, name: str, alias: str, version: int) -> HeadName:
        with self._lock:
            with transaction(self._db):
                exists = self._db.execute(
                    "SELECT 1 FROM heads WHERE tenant = ? AND name = ? AND version = ?",
                    (tenant, name, version),
                ).fetchone()
                if exists is None:
                    self._head_name(tenant, name)  # NotFoundError for a name with no version
                    raise no_such_version(name, version)
                self._db.execute(
                    "INSERT INTO head_aliases (tenant, name, alias, version) VALUES (?, ?, ?, ?) "
                    "ON CONFLICT (tenant, name, alias) DO UPDATE SET version = excluded.version",
                    (tenant, name, alias, version),
                )
            return self._head_name(tenant, name)

    @disk_faults
    def delete_alias(self, tenant: str, name: str, alias: str) -> HeadName:
        with self._lock:
            with transaction(self._db):
                deleted = self._db.execute(
                    "DELETE FROM head_aliases WHERE tenant = ? AND name = ? AND alias = ?",
                    (tenant, name, alias),
                ).rowcount
                if not deleted:
                    raise no_such_alias(name, alias)
            return self._head_name(tenant, name)

    # ---- listing and start-up ----

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
        written before the index existed), drops rows whose files are gone (a crash during
        a delete) and the aliases whose version is gone with them. A head added whose
        version another indexed head holds is indexed without one (version 0), for
        `unversioned` to give it a fresh one. Returns (added, dropped)."""
        with self._lock:
            indexed = {str(row[0]) for row in self._db.execute("SELECT head_id FROM heads")}
        stored = set(stored_ids)
        added = 0
        for head_id in sorted(stored - indexed):
            record = read_record(head_id)
            if record is None:  # a damaged head stays unlisted, as before the index
                continue
            try:
                self.add(record)
            except sqlite3.IntegrityError:
                with self._lock, transaction(self._db):
                    self._insert(record, 0)
            added += 1
        gone = sorted(indexed - stored)
        with self._lock, transaction(self._db):
            if gone:
                self._db.executemany(
                    "DELETE FROM heads WHERE head_id = ?", [(head_id,) for head_id in gone]
                )
            self._db.execute(
                "DELETE FROM head_aliases WHERE NOT EXISTS (SELECT 1 FROM heads AS h "
                "WHERE h.tenant = head_aliases.tenant AND h.name = head_aliases.name "
                "AND h.version = head_aliases.version)"
            )
        return added, len(gone)

    def unversioned(self) -> list[str]:
        """The indexed heads without a version (stored before versions existed), oldest
        first, ties by id: the order they get their versions in."""
        with self._lock:
            rows = self._db.execute(
                "SELECT head_id FROM heads WHERE version = 0 ORDER BY created, head_id"
            ).fetchall()
        return [str(row[0]) for row in rows]
