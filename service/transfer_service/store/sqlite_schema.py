"""The embedded store's SQLite database (jobs, job events, datasets, the head index, head
names' versions and aliases): its tables, opening it (with the checks that refuse an unusable
one), migrating older versions, and transactions.

Opening a database that cannot be used is ConfigurationError, saying what to do."""

from __future__ import annotations

import contextlib
import logging
import sqlite3
from collections.abc import Iterator
from pathlib import Path

from transfer_service.domain import DEFAULT_TENANT
from transfer_service.errors import ConfigurationError
from transfer_service.store.disk_faults import disk_fault, volume_state

DATABASE = "store.sqlite3"

# The job queue's columns of `jobs` (version 3): who holds the job and until when (ISO times,
# NULL while nobody does), how many runs it has had (the fencing token), a cancel requested
# for its holder, its spec (codec.spec_to_json; NULL on rows older code wrote) and the
# idempotency key and request digest it was queued with ('' for none).
_QUEUE_COLUMNS = (
    ("lease_owner", "TEXT"),
    ("lease_expires", "TEXT"),
    ("attempts", "INTEGER NOT NULL DEFAULT 0"),
    ("cancel_requested", "INTEGER NOT NULL DEFAULT 0"),
    ("spec", "TEXT"),
    ("request_key", "TEXT NOT NULL DEFAULT ''"),
    ("request_digest", "TEXT NOT NULL DEFAULT ''"),
)
_QUEUE_COLUMNS_SQL = "".join(f",\n  {name} {kind}" for name, kind in _QUEUE_COLUMNS)

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS jobs (
  job_id TEXT PRIMARY KEY, state TEXT NOT NULL, backbone TEXT NOT NULL, head_name TEXT NOT NULL,
  head_id TEXT NOT NULL, error TEXT NOT NULL, created TEXT NOT NULL, updated TEXT NOT NULL,
  last_sequence INTEGER NOT NULL, progress TEXT NOT NULL,
  tenant TEXT NOT NULL DEFAULT '{DEFAULT_TENANT}'{_QUEUE_COLUMNS_SQL});
CREATE TABLE IF NOT EXISTS job_events (
  job_id TEXT NOT NULL, sequence INTEGER NOT NULL, time TEXT NOT NULL, kind TEXT NOT NULL,
  payload TEXT NOT NULL, PRIMARY KEY (job_id, sequence));
CREATE TABLE IF NOT EXISTS datasets (
  dataset_id TEXT PRIMARY KEY, complete INTEGER NOT NULL, modality TEXT NOT NULL,
  example_count INTEGER NOT NULL, class_counts TEXT NOT NULL, created TEXT NOT NULL,
  tenant TEXT NOT NULL DEFAULT '{DEFAULT_TENANT}', bytes INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS heads (
  head_id TEXT PRIMARY KEY, tenant TEXT NOT NULL, name TEXT NOT NULL, backbone TEXT NOT NULL,
  created TEXT NOT NULL, version INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS head_names (
  tenant TEXT NOT NULL, name TEXT NOT NULL, next_version INTEGER NOT NULL,
  PRIMARY KEY (tenant, name));
CREATE TABLE IF NOT EXISTS head_aliases (
  tenant TEXT NOT NULL, name TEXT NOT NULL, alias TEXT NOT NULL, version INTEGER NOT NULL,
  PRIMARY KEY (tenant, name, alias));
CREATE TABLE IF NOT EXISTS dataset_examples (
  dataset_id TEXT NOT NULL, idx INTEGER NOT NULL, label TEXT NOT NULL, image BLOB, text TEXT,
  PRIMARY KEY (dataset_id, idx));
CREATE TABLE IF NOT EXISTS measurements (
  key TEXT PRIMARY KEY, value TEXT NOT NULL, updated TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS job_examples (
  job_id TEXT NOT NULL, split TEXT NOT NULL CHECK (split IN ('train', 'validation')),
  idx INTEGER NOT NULL, label TEXT NOT NULL, image BLOB, text TEXT,
  PRIMARY KEY (job_id, split, idx));
"""

# On columns the migration may only just have added, so created after it.
_INDEXES = """
CREATE INDEX IF NOT EXISTS jobs_by_tenant ON jobs (tenant, created);
CREATE INDEX IF NOT EXISTS datasets_by_tenant ON datasets (tenant);
CREATE INDEX IF NOT EXISTS heads_by_tenant ON heads (tenant, created, head_id);
CREATE UNIQUE INDEX IF NOT EXISTS heads_by_version ON heads (tenant, name, version)
  WHERE version > 0;
CREATE UNIQUE INDEX IF NOT EXISTS jobs_by_request_key ON jobs (tenant, request_key)
  WHERE request_key <> '';
CREATE INDEX IF NOT EXISTS jobs_unfinished ON jobs (created, job_id)
  WHERE state IN ('queued', 'running');
"""

# PRAGMA user_version of the database this code writes. 0: before tenants (no tenant columns);
# 1: before dataset sizes (no datasets.bytes); 2: before the job queue (no lease columns);
# 3: before head versions (no heads.version, head_names, head_aliases).
_SCHEMA_VERSION = 4

# A stored example's bytes, as sqlite_datasets._example_bytes counts them (CAST: length() of
# TEXT counts characters, of a BLOB bytes).
_SQL_EXAMPLE_BYTES = (
    "length(CAST(e.label AS BLOB)) + COALESCE(length(e.image), 0) "
    "+ COALESCE(length(CAST(e.text AS BLOB)), 0)"
)

log = logging.getLogger(__name__)


def open_database(database: Path, heads: int, *, recreate_database: bool) -> sqlite3.Connection:
    """The database at `database`, created, migrated and with unfinished uploads removed.

    `heads` is how many heads are stored beside it: a database missing or empty beside
    stored heads is refused (ConfigurationError) unless `recreate_database`. sqlite3.Error
    and OSError pass through (the caller says why the store cannot open: `open_failure`)."""
    if heads and not recreate_database and not database.exists():
        raise ConfigurationError(_lost_database_message(database, heads, "missing"))
    db = sqlite3.connect(database, check_same_thread=False, isolation_level=None)
    try:
        has_schema = db.execute(
            "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = 'jobs'"
        ).fetchone()[0]
        if heads and not has_schema:
            if not recreate_database:
                raise ConfigurationError(_lost_database_message(database, heads, "empty"))
            log.warning(
                "%s was missing or empty beside %d stored heads; started with an empty one "
                "(TRANSFER_RECREATE_DATABASE): earlier jobs and datasets are gone",
                database,
                heads,
            )
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.executescript(_SCHEMA)
        _migrate(db)
        db.executescript(_INDEXES)
        with transaction(db):
            # Uploads cut off by a crash never became datasets: drop them.
            db.execute(
                "DELETE FROM dataset_examples WHERE dataset_id IN "
                "(SELECT dataset_id FROM datasets WHERE complete = 0)"
            )
            db.execute("DELETE FROM datasets WHERE complete = 0")
    except BaseException:
        db.close()
        raise
    return db


@contextlib.contextmanager
def transaction(db: sqlite3.Connection) -> Iterator[None]:
    """One explicit transaction on an autocommit connection: all of the block's writes or
    none of them (rolled back on any exception). Callers hold the store's lock."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
        db.execute("COMMIT")
    except BaseException:
        # SQLite may already have rolled back (a full disk or an I/O error can do that, even
        # at COMMIT): a second ROLLBACK would raise and hide the error that matters.
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise


def _migrate(db: sqlite3.Connection) -> None:
    """Brings a database written by older code up to _SCHEMA_VERSION, explicitly and once.

    0 -> 1: jobs and datasets gain a tenant column; existing rows belong to DEFAULT_TENANT.
    1 -> 2: datasets gain `bytes` (what the per-tenant quota counts), computed from the rows.
    2 -> 3: jobs gain the queue's columns (_QUEUE_COLUMNS): existing rows are held by nobody,
    at attempt 0, without a stored spec (job_examples, a new table, is created above).
    3 -> 4: the head index gains `version`, 0 on existing rows: sqlite_head_index assigns
    those heads their versions at start-up (it rewrites their head.json; head_names and
    head_aliases, new tables, are created above).
    (The CREATE statements above already carry the columns, so a new database only gets its
    version.) One transaction: a crash mid-migration leaves the old version to migrate again.
    """
    version = int(db.execute("PRAGMA user_version").fetchone()[0])
    if version >= _SCHEMA_VERSION:
        return
    with transaction(db):
        for table in ("jobs", "datasets"):
            columns = {str(row[1]) for row in db.execute(f"PRAGMA table_info({table})")}
            if "tenant" not in columns:
                db.execute(
                    f"ALTER TABLE {table} ADD COLUMN tenant TEXT NOT NULL "
                    f"DEFAULT '{DEFAULT_TENANT}'"
                )
        columns = {str(row[1]) for row in db.execute("PRAGMA table_info(datasets)")}
        if "bytes" not in columns:
            db.execute("ALTER TABLE datasets ADD COLUMN bytes INTEGER NOT NULL DEFAULT 0")
        columns = {str(row[1]) for row in db.execute("PRAGMA table_info(jobs)")}
        for name, kind in _QUEUE_COLUMNS:
            if name not in columns:
                db.execute(f"ALTER TABLE jobs ADD COLUMN {name} {kind}")
        columns = {str(row[1]) for row in db.execute("PRAGMA table_info(heads)")}
        if "version" not in columns:
            db.execute("ALTER TABLE heads ADD COLUMN version INTEGER NOT NULL DEFAULT 0")
        if version < 2:
            db.execute(
                "UPDATE datasets SET bytes = (SELECT COALESCE(SUM("
                f"{_SQL_EXAMPLE_BYTES}), 0) FROM dataset_examples AS e "
                "WHERE e.dataset_id = datasets.dataset_id)"
            )
        db.execute(f"PRAGMA user_version = {_SCHEMA_VERSION}")


def _lost_database_message(database: Path, heads: int, how: str) -> str:
    return (
        f"the store database {database} is {how}, but {heads} heads are stored beside it: "
        "the jobs and datasets they refer to would be gone without a word. Restore the "
        "database from a backup, or set TRANSFER_RECREATE_DATABASE=true to start with an "
        "empty one (the heads stay usable)"
    )


def open_failure(root: Path, database: Path, error: BaseException) -> str:
    """Why the store under `root` cannot be opened, for the operator (start-up refusal)."""
    fault = disk_fault(error, root)
    if fault is None and isinstance(error, sqlite3.OperationalError):
        fault = volume_state(root)  # a full or read-only volume fails opens in many ways
    if fault is not None:
        return (
            f"the store's disk is {fault} (TRANSFER_STORE_DIR={root}): {error}; free space on "
            "that volume or make it writable, then start again"
        )
    if isinstance(error, sqlite3.DatabaseError) and not isinstance(error, sqlite3.OperationalError):
        return (
            f"the store database {database} is damaged ({error}): restore it from a backup, "
            "or move it aside (keep it for recovery) and start with "
            "TRANSFER_RECREATE_DATABASE=true to begin with an empty one (the heads stay usable)"
        )
    return f"cannot open the store under {root} (TRANSFER_STORE_DIR): {error}"
