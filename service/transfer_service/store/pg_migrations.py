"""The PostgreSQL store's schema migrations: versioned SQL files in store/migrations/
(`NNNN_name.sql`, shipped as package data), applied in order at start-up, each once.

All of one start's migrations run in one transaction that first takes a transaction-level
advisory lock (pg_advisory_xact_lock(MIGRATION_LOCK)): replicas starting together on an empty
database queue on it, and each then sees in `schema_migrations` what the one before it
applied. PostgreSQL's DDL is transactional, so a start that dies mid-migration leaves the
schema as it was, for the next start to migrate again."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from importlib import resources

from transfer_service.store.pg_pool import Connection

# The advisory-lock key every replica migrates under (b"transfer" as a big-endian int64).
MIGRATION_LOCK = int.from_bytes(b"transfer", "big")
_FILE_NAME = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str


def available_migrations() -> list[Migration]:
    """The migrations shipped with this code, by version (1, 2, ... without gaps)."""
    folder = resources.files("transfer_service.store").joinpath("migrations")
    migrations = []
    for entry in folder.iterdir():
        match = _FILE_NAME.fullmatch(entry.name)
        if match:
            text = entry.read_text(encoding="utf-8")
            migrations.append(Migration(int(match[1]), entry.name, text))
    migrations.sort(key=lambda migration: migration.version)
    versions = [migration.version for migration in migrations]
    if versions != list(range(1, len(versions) + 1)):
        raise RuntimeError(f"store migrations are not numbered 1..n without gaps: {versions}")
    return migrations


def migrate(conn: Connection) -> list[int]:
    """Applies the migrations `conn`'s database lacks, under the migration lock, in one
    transaction; returns the versions applied (none when another replica got there first).
    `conn` is not in a transaction; it is committed on return."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
        conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            "version integer PRIMARY KEY, name text NOT NULL, "
            "applied_at timestamptz NOT NULL DEFAULT now())"
        )
        applied = {int(row[0]) for row in conn.execute("SELECT version FROM schema_migrations")}
        done = []
        for migration in available_migrations():
            if migration.version in applied:
                continue
            # No parameters: several statements in one simple query.
            conn.execute(migration.sql.encode())
            conn.execute(
                "INSERT INTO schema_migrations (version, name) VALUES (%s, %s)",
                (migration.version, migration.name),
            )
            done.append(migration.version)
    newer = sorted(applied - {m.version for m in available_migrations()})
    if newer:
        # A newer replica migrated further (a rolling upgrade): its migrations keep what
        # older code reads and writes working, or they would not have been written.
        log.info("the store's database has newer schema versions than this code: %s", newer)
    if done:
        log.info("store database migrated: applied versions %s", done)
    return done
