"""The PostgreSQL store's head names: versions and aliases per (tenant, name) (tables
head_names and head_aliases, heads.version; migrations/0004_head_versions.sql).

reserve_head_version is one upsert of the name's row (atomic across replicas). Setting an
alias and deleting a head lock the name's row (SELECT ... FOR UPDATE) in their transaction,
so they serialise per name: an alias set concurrently with a delete of its version either
commits first (the delete then sees it: refused, or removed with the head under force) or
waits and finds the version gone (NotFoundError). The foreign key from head_aliases to
heads (tenant, name, version) backs this up in the database itself."""

from __future__ import annotations

from transfer_service.domain import HeadName
from transfer_service.errors import NotFoundError
from transfer_service.store.head_name_errors import (
    aliased_version,
    no_such_alias,
    no_such_name,
    no_such_version,
)
from transfer_service.store.pg_head_changes import notify_head_changed, notify_name_changed
from transfer_service.store.pg_pool import Connection, Database


class PostgresHeadNames:
    def __init__(self, db: Database) -> None:
        self._db = db

    def reserve(self, tenant: str, name: str) -> int:
        with self._db.transaction() as conn:
            row = conn.execute(
                "INSERT INTO head_names AS n (tenant, name, next_version) VALUES (%s, %s, 2) "
                "ON CONFLICT (tenant, name) DO UPDATE SET next_version = n.next_version + 1 "
                "RETURNING n.next_version - 1",
                (tenant, name),
            ).fetchone()
        assert row is not None  # an upsert with RETURNING always returns its row
        return int(row[0])

    def head_name(self, tenant: str, name: str) -> HeadName:
        with self._db.transaction() as conn:
            return read_head_name(conn, tenant, name)

    def set_alias(self, tenant: str, name: str, alias: str, version: int) -> HeadName:
        with self._db.transaction() as conn:
            _lock_name(conn, tenant, name)
            exists = conn.execute(
                "SELECT 1 FROM heads WHERE tenant = %s AND name = %s AND version = %s",
                (tenant, name, version),
            ).fetchone()
            if exists is None:
                read_head_name(conn, tenant, name)  # NotFoundError for a name with no version
                raise no_such_version(name, version)
            conn.execute(
                "INSERT INTO head_aliases (tenant, name, alias, version) "
                "VALUES (%s, %s, %s, %s) ON CONFLICT (tenant, name, alias) "
                "DO UPDATE SET version = excluded.version",
                (tenant, name, alias, version),
            )
            notify_name_changed(conn, tenant, name)  # delivered on commit
            return read_head_name(conn, tenant, name)

    def delete_alias(self, tenant: str, name: str, alias: str) -> HeadName:
        with self._db.transaction() as conn:
            _lock_name(conn, tenant, name)
            deleted = conn.execute(
                "DELETE FROM head_aliases WHERE tenant = %s AND name = %s AND alias = %s",
                (tenant, name, alias),
            ).rowcount
            if not deleted:
                raise no_such_alias(name, alias)
            notify_name_changed(conn, tenant, name)
            return read_head_name(conn, tenant, name)

    def delete_head(self, head_id: str, *, force: bool) -> None:
        """The head's row and, under `force`, the aliases at its version, in one transaction
        holding its name's lock; NotFoundError for an unknown head, FailedPreconditionError
        naming the aliases without `force`. Announced to every replica's cache on commit."""
        with self._db.transaction() as conn:
            found = conn.execute(
                "SELECT tenant, name FROM heads WHERE head_id = %s", (head_id,)
            ).fetchone()
            if found is None:
                raise NotFoundError(f"head_id: no head {head_id!r}")
            tenant, name = str(found[0]), str(found[1])
            _lock_name(conn, tenant, name)
            # Read again under the lock: a delete that got there first has removed it.
            row = conn.execute(
                "SELECT version FROM heads WHERE head_id = %s FOR UPDATE", (head_id,)
            ).fetchone()
            if row is None:
                raise NotFoundError(f"head_id: no head {head_id!r}")
            version = int(row[0])
            aliases = [
                str(alias)
                for (alias,) in conn.execute(
                    "SELECT alias FROM head_aliases WHERE tenant = %s AND name = %s "
                    "AND version = %s ORDER BY alias",
                    (tenant, name, version),
                )
            ]
            if aliases and not force:
                raise aliased_version(head_id, name, version, aliases)
            if aliases:
                conn.execute(
                    "DELETE FROM head_aliases WHERE tenant = %s AND name = %s AND version = %s",
                    (tenant, name, version),
                )
            conn.execute("DELETE FROM heads WHERE head_id = %s", (head_id,))
            notify_head_changed(conn, head_id)  # delivered on commit
            notify_name_changed(conn, tenant, name)


def read_head_name(conn: Connection, tenant: str, name: str) -> HeadName:
    """The name's versions and aliases in one statement (one snapshot); NotFoundError when it
    has no version."""
    rows = conn.execute(
        "SELECT 'version', version, head_id FROM heads WHERE tenant = %s AND name = %s "
        "UNION ALL SELECT 'alias', version, alias FROM head_aliases "
        "WHERE tenant = %s AND name = %s",
        (tenant, name, tenant, name),
    ).fetchall()
    versions = {int(v): str(text) for kind, v, text in rows if kind == "version"}
    if not versions:
        raise no_such_name(name)
    aliases = {str(text): int(v) for kind, v, text in rows if kind == "alias"}
    return HeadName(tenant=tenant, name=name, versions=versions, aliases=aliases)


def _lock_name(conn: Connection, tenant: str, name: str) -> None:
    """Locks the name's row until the transaction ends; NotFoundError when the name was
    never given a version."""
    row = conn.execute(
        "SELECT 1 FROM head_names WHERE tenant = %s AND name = %s FOR UPDATE", (tenant, name)
    ).fetchone()
    if row is None:
        raise no_such_name(name)
