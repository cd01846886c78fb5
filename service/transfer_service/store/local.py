"""The embedded store: a directory for head files plus one SQLite database.

Layout under the root:
  heads/<head_id>/head.json, weights.safetensors   (a head exists iff its directory does)
  heads/<head_id>/tenant                           (its owner again, see UnreadableHeadError)
  heads/.partial-*/                                (saves in progress; removed at start)
  store.sqlite3                                    (jobs, job events, datasets)
Every head, job and dataset records its tenant; the store keeps them all and the operations
layer decides who sees what. Ids are unique across tenants.
A head is written into a partial directory, fsynced, then renamed into place: a crash at any
point leaves either the whole head or nothing under its id.
A write the disk refuses (full, over quota, read-only) is ResourceExhaustedError, saying so,
wherever it happens (`disk_faults`); opening a store that cannot be used is ConfigurationError.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import hashlib
import json
import logging
import os
import secrets
import shutil
import sqlite3
import threading
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime
from pathlib import Path
from typing import ParamSpec, TypeVar

import torch
from safetensors import SafetensorError
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save

from transfer_service.domain import (
    DEFAULT_TENANT,
    ID_PATTERN,
    TENANT_PATTERN,
    DatasetInfo,
    HeadRecord,
    JobEvent,
    JobRecord,
    JobState,
    LabeledExample,
    Modality,
    ModelInput,
)
from transfer_service.errors import (
    ConfigurationError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
)
from transfer_service.store.codec import (
    HeadFormatError,
    decode_head,
    event_kind,
    head_to_json,
    payload_from_json,
    payload_to_json,
    progress_from_json,
)

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS jobs (
  job_id TEXT PRIMARY KEY, state TEXT NOT NULL, backbone TEXT NOT NULL, head_name TEXT NOT NULL,
  head_id TEXT NOT NULL, error TEXT NOT NULL, created TEXT NOT NULL, updated TEXT NOT NULL,
  last_sequence INTEGER NOT NULL, progress TEXT NOT NULL,
  tenant TEXT NOT NULL DEFAULT '{DEFAULT_TENANT}');
CREATE TABLE IF NOT EXISTS job_events (
  job_id TEXT NOT NULL, sequence INTEGER NOT NULL, time TEXT NOT NULL, kind TEXT NOT NULL,
  payload TEXT NOT NULL, PRIMARY KEY (job_id, sequence));
CREATE TABLE IF NOT EXISTS datasets (
  dataset_id TEXT PRIMARY KEY, complete INTEGER NOT NULL, modality TEXT NOT NULL,
  example_count INTEGER NOT NULL, class_counts TEXT NOT NULL, created TEXT NOT NULL,
  tenant TEXT NOT NULL DEFAULT '{DEFAULT_TENANT}', bytes INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS dataset_examples (
  dataset_id TEXT NOT NULL, idx INTEGER NOT NULL, label TEXT NOT NULL, image BLOB, text TEXT,
  PRIMARY KEY (dataset_id, idx));
"""

# On columns the migration may only just have added, so created after it.
_INDEXES = """
CREATE INDEX IF NOT EXISTS jobs_by_tenant ON jobs (tenant, created);
CREATE INDEX IF NOT EXISTS datasets_by_tenant ON datasets (tenant);
"""

# PRAGMA user_version of the database this code writes. 0: before tenants (no tenant columns);
# 1: before dataset sizes (no datasets.bytes).
_SCHEMA_VERSION = 2
_DATABASE = "store.sqlite3"
_FINISHED_STATES = tuple(state.value for state in JobState if state.finished)
# job_events.kind of the events that end a job's log (transfer_service.store.codec.event_kind).
_TERMINAL_KINDS = ("completed", "failed", "cancelled")
# Finished jobs deleted per transaction by the retention sweep: the store's lock is released
# between batches, so a large sweep never holds up a training job's writes for long.
_RETENTION_BATCH = 500
_JOB_COLUMNS = (
    "job_id, state, backbone, head_name, head_id, error, created, updated, last_sequence, "
    "progress, tenant"
)

_HEAD_META = "head.json"
_HEAD_WEIGHTS = "weights.safetensors"
_HEAD_OWNER = "tenant"

log = logging.getLogger(__name__)

_P = ParamSpec("_P")
_R = TypeVar("_R")

# Errnos of a write the filesystem refuses for space (ENOSPC, EDQUOT) or for good (EROFS).
_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
# SQLite reports some writes on a full disk (growing its shared-memory index, say) only as a
# generic I/O error: with less than this left on the volume, that error means "full".
_NEARLY_FULL_BYTES = 1024**2


def disk_fault(error: BaseException, root: Path) -> str | None:
    """'full' or 'read-only' when `error` is the store's disk refusing a write, else None."""
    if isinstance(error, OSError) and not isinstance(error, sqlite3.Error):
        if error.errno in _FULL_ERRNOS:
            return "full"
        return "read-only" if error.errno == errno.EROFS else None
    if not isinstance(error, sqlite3.OperationalError):
        return None
    name = getattr(error, "sqlite_errorname", "")
    if name == "SQLITE_FULL" or "database or disk is full" in str(error):
        return "full"
    if name.startswith("SQLITE_READONLY") or "readonly database" in str(error):
        return "read-only"
    if name.startswith(("SQLITE_IOERR", "SQLITE_CANTOPEN")) or "disk I/O error" in str(error):
        return _volume_state(root)
    return None


def _volume_state(root: Path) -> str | None:
    try:
        volume = os.statvfs(root)
    except OSError:
        return None
    if volume.f_flag & os.ST_RDONLY:
        return "read-only"
    return "full" if volume.f_bavail * volume.f_frsize < _NEARLY_FULL_BYTES else None


def _free_bytes(root: Path) -> int:
    volume = os.statvfs(root)
    return volume.f_bavail * volume.f_frsize


def disk_faults(method: Callable[_P, _R]) -> Callable[_P, _R]:
    """Store methods (of an object with a `_root`) raise ResourceExhaustedError when the disk
    refuses a write: a caller then reads RESOURCE_EXHAUSTED with the reason, not INTERNAL."""

    @functools.wraps(method)
    def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        try:
            return method(*args, **kwargs)
        except (sqlite3.OperationalError, OSError) as exc:
            root: Path = getattr(args[0], "_root", Path("."))
            fault = disk_fault(exc, root)
            if fault is None:
                raise
            log.error("store write refused: the disk under %s is %s: %s", root, fault, exc)
            raise ResourceExhaustedError(
                f"the store's disk is {fault}: {exc}; nothing was written (the operator must "
                "free space on the store's volume or make it writable)"
            ) from exc

    return wrapper


def check_id(kind: str, value: str) -> str:
    if not ID_PATTERN.fullmatch(value):
        raise InvalidArgumentError(
            f"{kind}: {value!r} is not a valid id (pattern [a-z0-9][a-z0-9_.-]{{0,63}})"
        )
    return value


class UnreadableHeadError(FailedPreconditionError):
    """A head whose metadata cannot be read. Get and Predict answer FAILED_PRECONDITION; the
    head can still be deleted, by its owner: `owner` is the tenant from the head's `tenant`
    file, or None when that is missing too (heads saved before the file existed) or damaged.
    The operations layer takes an unknown owner to be DEFAULT_TENANT, as it does for head
    files written before tenancy, so with authentication on no other tenant can delete it
    (the operator can, by removing its directory)."""

    def __init__(self, head_id: str, problem: str, owner: str | None) -> None:
        super().__init__(
            f"head {head_id!r}: {problem}; the head is corrupt: delete it and train again"
        )
        self.owner = owner


class LocalStore:
    def __init__(self, root: Path, *, recreate_database: bool = False) -> None:
        """Opens the store under `root`, creating it when the directory is new.

        Raises ConfigurationError, saying what is wrong, when the store cannot be used: its
        disk is full or read-only, its database is not a readable SQLite file, or the database
        is missing or empty while heads are stored (their jobs and datasets would vanish
        without a word): that one opens with `recreate_database` (an empty database)."""
        self._root = root.resolve()
        self._heads_dir = self._root / "heads"
        self._lock = threading.Lock()
        database = self._root / _DATABASE
        db: sqlite3.Connection | None = None
        self._unlisted_heads: set[str] = set()  # damaged heads already warned about
        try:
            self._heads_dir.mkdir(parents=True, exist_ok=True)
            for partial in self._heads_dir.glob(".partial-*"):
                shutil.rmtree(partial, ignore_errors=True)
            for deleted in self._heads_dir.glob(".deleted-*"):
                shutil.rmtree(deleted, ignore_errors=True)
            # Refused up front, by name: on a full volume SQLite fails later and vaguely
            # ("disk I/O error" while growing its shared-memory index), or not at all until
            # the first job's write.
            volume = _volume_state(self._root)
            if volume is not None:
                raise ConfigurationError(
                    f"the store's disk is {volume} (TRANSFER_STORE_DIR={self._root}, "
                    f"{_free_bytes(self._root)} bytes free): free space on that volume or make "
                    "it writable, then start again"
                )
            heads = [path for path in self._heads_dir.iterdir() if not path.name.startswith(".")]
            if heads and not recreate_database and not database.exists():
                raise ConfigurationError(_lost_database_message(database, len(heads), "missing"))
            db = sqlite3.connect(database, check_same_thread=False, isolation_level=None)
            has_schema = db.execute(
                "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = 'jobs'"
            ).fetchone()[0]
            if heads and not has_schema:
                if not recreate_database:
                    raise ConfigurationError(_lost_database_message(database, len(heads), "empty"))
                log.warning(
                    "%s was missing or empty beside %d stored heads; started with an empty one "
                    "(TRANSFER_RECREATE_DATABASE): earlier jobs and datasets are gone",
                    database,
                    len(heads),
                )
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.executescript(_SCHEMA)
            _migrate(db)
            db.executescript(_INDEXES)
            with _transaction(db):
                # Uploads cut off by a crash never became datasets: drop them.
                db.execute(
                    "DELETE FROM dataset_examples WHERE dataset_id IN "
                    "(SELECT dataset_id FROM datasets WHERE complete = 0)"
                )
                db.execute("DELETE FROM datasets WHERE complete = 0")
        except (sqlite3.Error, OSError) as exc:
            if db is not None:
                db.close()
            raise ConfigurationError(_open_failure(self._root, database, exc)) from exc
        except BaseException:
            if db is not None:
                db.close()
            raise
        self._db = db

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # ---- heads ----

    def _head_dir(self, head_id: str) -> Path:
        path = (self._heads_dir / check_id("head_id", head_id)).resolve()
        if path.parent != self._heads_dir:
            raise InvalidArgumentError(f"head_id: {head_id!r} escapes the store")
        return path

    @disk_faults
    def save_head(self, record: HeadRecord, weights: dict[str, torch.Tensor]) -> None:
        """Writes the weights, head.json (with the weights' SHA-256) and the `tenant` file
        (the owner alone, so ownership stays readable if head.json is ever damaged) into a
        partial directory, then renames it into place."""
        final = self._head_dir(record.head_id)
        partial = self._heads_dir / f".partial-{record.head_id}-{secrets.token_hex(4)}"
        partial.mkdir()
        try:
            # Serialised in memory so the checksum is of exactly the bytes that are written.
            data = safetensors_save(weights)
            (partial / _HEAD_WEIGHTS).write_bytes(data)
            (partial / _HEAD_META).write_text(
                head_to_json(record, hashlib.sha256(data).hexdigest()), encoding="utf-8"
            )
            (partial / _HEAD_OWNER).write_text(record.tenant, encoding="utf-8")
            for name in (_HEAD_WEIGHTS, _HEAD_META, _HEAD_OWNER):
                _fsync_file(partial / name)
            _fsync_dir(partial)
            os.rename(partial, final)
            _fsync_dir(self._heads_dir)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise

    def get_head(self, head_id: str) -> HeadRecord:
        """Raises UnreadableHeadError (a FailedPreconditionError) for a head whose metadata
        is damaged in any way, never anything else."""
        return self._read_head(head_id)[0]

    def _read_head(self, head_id: str) -> tuple[HeadRecord, str | None]:
        """The record and its weights' SHA-256 (None for heads saved before checksums)."""
        head_dir = self._head_dir(head_id)
        try:
            data = (head_dir / _HEAD_META).read_bytes()
        except FileNotFoundError:
            raise NotFoundError(f"head_id: no head {head_id!r}") from None
        except OSError as exc:  # a directory in its place, no permission, an I/O error
            raise UnreadableHeadError(
                head_id, f"metadata unreadable ({exc.strerror})", _read_owner(head_dir)
            ) from exc
        try:
            record, checksum = decode_head(data)
        except HeadFormatError as exc:
            raise UnreadableHeadError(
                head_id, f"metadata unreadable ({exc})", _read_owner(head_dir)
            ) from exc
        if record.head_id != head_id:
            # Caches and tenancy checks key on the id: a record filed under another id is
            # as unusable as a damaged one.
            raise UnreadableHeadError(
                head_id, f"metadata names another head ({record.head_id!r})", _read_owner(head_dir)
            )
        return record, checksum

    def load_head_weights(self, head_id: str) -> dict[str, torch.Tensor]:
        """Checks the weights against the SHA-256 that head.json holds: a damaged file must
        fail loudly here rather than predict wrongly. Heads saved before checksums existed
        have none and load unchecked, as they always did."""
        path = self._head_dir(head_id) / _HEAD_WEIGHTS
        try:
            data = path.read_bytes()
        except (FileNotFoundError, IsADirectoryError):
            raise NotFoundError(f"head_id: no head {head_id!r}") from None
        except OSError as exc:
            raise FailedPreconditionError(
                f"head {head_id!r}: stored weights unreadable ({exc.strerror})"
            ) from exc
        _, checksum = self._read_head(head_id)
        try:
            # safetensors parses a header and raw buffers; it never unpickles.
            weights = safetensors_load(data)
        except (SafetensorError, ValueError) as exc:
            raise FailedPreconditionError(
                f"head {head_id!r}: stored weights are not a valid safetensors file; the head "
                "is corrupt: delete it and train again"
            ) from exc
        if checksum is not None and hashlib.sha256(data).hexdigest() != checksum:
            raise FailedPreconditionError(
                f"head {head_id!r}: stored weights fail their checksum; the head is corrupt: "
                "delete it and train again"
            )
        return weights

    def list_heads(self) -> list[HeadRecord]:
        """Every readable head. A damaged one is left out (with a warning, once per head and
        process) rather than failing the listing: one caller's broken head must not take
        ListHeads away from every other caller."""
        records = []
        for path in sorted(self._heads_dir.iterdir()):
            # Both files or it is not a head: the rename makes that so for a save; this keeps
            # a directory damaged since out of listings too.
            if path.name.startswith(".") or not (
                (path / _HEAD_META).is_file() and (path / _HEAD_WEIGHTS).is_file()
            ):
                continue
            try:
                records.append(self.get_head(path.name))
            except (InvalidArgumentError, NotFoundError):
                continue  # not a head id, or deleted since the directory was listed
            except FailedPreconditionError as exc:
                if path.name not in self._unlisted_heads:
                    self._unlisted_heads.add(path.name)
                    log.warning("head %r left out of listings: %s", path.name, exc.message)
        records.sort(key=lambda record: record.created_time)
        return records

    @disk_faults
    def delete_head(self, head_id: str) -> None:
        """Works whatever state the head's files are in (the caller checks ownership)."""
        path = self._head_dir(head_id)
        if not path.is_dir():
            raise NotFoundError(f"head_id: no head {head_id!r}")
        # Rename first so the head vanishes atomically, then remove the files.
        doomed = self._heads_dir / f".deleted-{head_id}-{secrets.token_hex(4)}"
        os.rename(path, doomed)
        _fsync_dir(self._heads_dir)
        shutil.rmtree(doomed, ignore_errors=True)
        self._unlisted_heads.discard(head_id)

    # ---- jobs ----

    @disk_faults
    def save_job(self, job: JobRecord) -> None:
        with self._lock:
            self._write_job(job)

    @disk_faults
    def finish_job(self, job: JobRecord, event: JobEvent) -> None:
        """The job's final row and its terminal event in one transaction: a crash leaves
        both or neither, never a finished job whose event log has no end."""
        with self._lock, _transaction(self._db):
            self._write_event(event)
            self._write_job(job)

    def _write_job(self, job: JobRecord) -> None:
        progress = json.dumps(dataclasses.asdict(job.progress)) if job.progress else ""
        self._db.execute(
            f"INSERT OR REPLACE INTO jobs ({_JOB_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
            (
                job.job_id,
                job.state.value,
                job.backbone,
                job.head_name,
                job.head_id,
                job.error,
                job.created_time.isoformat(),
                job.updated_time.isoformat(),
                job.last_sequence,
                progress,
                job.tenant,
            ),
        )

    def get_job(self, job_id: str) -> JobRecord:
        check_id("job_id", job_id)
        with self._lock:
            row = self._db.execute(
                f"SELECT {_JOB_COLUMNS} FROM jobs WHERE job_id = ?", (job_id,)
            ).fetchone()
        if row is None:
            raise NotFoundError(f"job_id: no job {job_id!r}")
        return _job_from_row(row)

    def list_jobs(
        self,
        tenant: str | None = None,
        *,
        after: tuple[datetime, str] | None = None,
        limit: int | None = None,
    ) -> list[JobRecord]:
        """Every job, oldest first (ties by id); only `tenant`'s when given, read through an
        index so one tenant's listing does not scan everyone's jobs. `after` (a job's created
        time and id) and `limit` read one page."""
        where: list[str] = []
        parameters: list[object] = []
        if tenant is not None:
            where.append("tenant = ?")
            parameters.append(tenant)
        if after is not None:
            created = after[0].isoformat()  # as _write_job stored it
            where.append("(created > ? OR (created = ? AND job_id > ?))")
            parameters += [created, created, after[1]]
        sql = f"SELECT {_JOB_COLUMNS} FROM jobs"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY created, job_id"
        if limit is not None:
            sql += " LIMIT ?"
            parameters.append(limit)
        with self._lock:
            rows = self._db.execute(sql, parameters).fetchall()
        return [_job_from_row(row) for row in rows]

    def unsettled_jobs(self) -> list[JobRecord]:
        """What start-up recovery must look at, found by SQLite rather than by reading every
        job's log (200,000 jobs took 3.4 s that way): jobs not finished, and finished jobs
        whose newest event is not a terminal one at or past the row's last sequence."""
        finished = ",".join("?" * len(_FINISHED_STATES))
        terminal = ",".join("?" * len(_TERMINAL_KINDS))
        with self._lock:
            rows = self._db.execute(
                f"SELECT {_JOB_COLUMNS} FROM jobs AS j WHERE j.state NOT IN ({finished}) "
                "OR NOT EXISTS (SELECT 1 FROM job_events AS e WHERE e.job_id = j.job_id "
                "AND e.sequence = (SELECT MAX(sequence) FROM job_events WHERE job_id = j.job_id) "
                f"AND e.sequence >= j.last_sequence AND e.kind IN ({terminal})) "
                "ORDER BY created, job_id",
                (*_FINISHED_STATES, *_TERMINAL_KINDS),
            ).fetchall()
        return [_job_from_row(row) for row in rows]

    @disk_faults
    def delete_finished_jobs(self, finished_before: datetime) -> int:
        """Deletes jobs that finished (last updated) before `finished_before`, with their
        events; queued and running jobs, and heads, are never touched. Returns how many."""
        cutoff = finished_before.isoformat()
        states = ",".join("?" * len(_FINISHED_STATES))
        deleted = 0
        while True:
            with self._lock, _transaction(self._db):
                # julianday() compares the stored ISO times across UTC offsets.
                doomed = [
                    str(row[0])
                    for row in self._db.execute(
                        f"SELECT job_id FROM jobs WHERE state IN ({states}) "
                        "AND julianday(updated) < julianday(?) LIMIT ?",
                        (*_FINISHED_STATES, cutoff, _RETENTION_BATCH),
                    )
                ]
                for job_id in doomed:
                    self._db.execute("DELETE FROM job_events WHERE job_id = ?", (job_id,))
                    self._db.execute("DELETE FROM jobs WHERE job_id = ?", (job_id,))
            deleted += len(doomed)
            if len(doomed) < _RETENTION_BATCH:
                return deleted

    @disk_faults
    def append_event(self, event: JobEvent) -> None:
        with self._lock:
            self._write_event(event)

    @disk_faults
    def append_progress(self, event: JobEvent, job: JobRecord | None) -> None:
        # WAL with synchronous=NORMAL: the commit reaches the OS (so a killed process keeps
        # it) but is not fsynced; the next FULL commit syncs it with its own. 2 ms -> 0.07 ms
        # per event here, which is what progress streamed every step costs training.
        with self._lock:
            self._db.execute("PRAGMA synchronous=NORMAL")
            try:
                with _transaction(self._db):
                    self._write_event(event)
                    if job is not None:
                        self._write_job(job)
            finally:
                self._db.execute("PRAGMA synchronous=FULL")

    def _write_event(self, event: JobEvent) -> None:
        self._db.execute(
            "INSERT INTO job_events VALUES (?,?,?,?,?)",
            (
                event.job_id,
                event.sequence,
                event.time.isoformat(),
                event_kind(event.payload),
                payload_to_json(event.payload),
            ),
        )

    def events_after(self, job_id: str, after_sequence: int) -> list[JobEvent]:
        # SQLite integers are signed 64-bit; a uint64 sequence past that means "nothing".
        after_sequence = min(after_sequence, 2**63 - 1)
        with self._lock:
            rows = self._db.execute(
                "SELECT job_id, sequence, time, kind, payload FROM job_events "
                "WHERE job_id = ? AND sequence > ? ORDER BY sequence",
                (job_id, after_sequence),
            ).fetchall()
        return [
            JobEvent(
                row[0], row[1], datetime.fromisoformat(row[2]), payload_from_json(row[3], row[4])
            )
            for row in rows
        ]

    # ---- datasets ----

    @disk_faults
    def begin_dataset(self, tenant: str, quota_bytes: int | None = None) -> LocalDatasetWriter:
        """A new upload of `tenant`'s. With `quota_bytes`, adding examples that would take the
        tenant's stored datasets (uploads in progress included) past it raises
        ResourceExhaustedError."""
        return LocalDatasetWriter(
            self._db, self._lock, self._root, "ds-" + secrets.token_hex(8), tenant, quota_bytes
        )

    def dataset_info(self, dataset_id: str) -> DatasetInfo:
        """A complete dataset's description (its tenant included) without its examples."""
        check_id("dataset_id", dataset_id)
        with self._lock:
            row = self._db.execute(
                "SELECT modality, example_count, class_counts, tenant FROM datasets "
                "WHERE dataset_id = ? AND complete = 1",
                (dataset_id,),
            ).fetchone()
        if row is None:
            raise NotFoundError(f"dataset_id: no dataset {dataset_id!r}")
        return DatasetInfo(
            dataset_id,
            row[1],
            tuple((k, v) for k, v in json.loads(row[2])),
            Modality(row[0]),
            tenant=row[3],
        )

    def dataset_bytes(self, tenant: str) -> int:
        """Bytes of `tenant`'s stored datasets, uploads in progress included."""
        with self._lock:
            return _tenant_dataset_bytes(self._db, tenant)

    @disk_faults
    def delete_dataset(self, dataset_id: str) -> None:
        check_id("dataset_id", dataset_id)
        with self._lock, _transaction(self._db):
            deleted = self._db.execute(
                "DELETE FROM datasets WHERE dataset_id = ? AND complete = 1", (dataset_id,)
            ).rowcount
            if not deleted:
                raise NotFoundError(f"dataset_id: no dataset {dataset_id!r}")
            self._db.execute("DELETE FROM dataset_examples WHERE dataset_id = ?", (dataset_id,))

    def dataset_examples(self, info: DatasetInfo) -> list[LabeledExample]:
        dataset_id = info.dataset_id
        with self._lock:
            rows = self._db.execute(
                "SELECT label, image, text FROM dataset_examples WHERE dataset_id = ? ORDER BY idx",
                (dataset_id,),
            ).fetchall()
        if not rows and info.example_count:  # deleted since dataset_info read it
            raise NotFoundError(f"dataset_id: no dataset {dataset_id!r}")
        examples = [
            LabeledExample(
                ModelInput(image=bytes(image) if image is not None else None, text=text), label
            )
            for label, image, text in rows
        ]
        return examples


class LocalDatasetWriter:
    """Rows go in as chunks arrive; the dataset becomes visible only on commit."""

    def __init__(
        self,
        db: sqlite3.Connection,
        lock: threading.Lock,
        root: Path,
        dataset_id: str,
        tenant: str,
        quota_bytes: int | None = None,
    ) -> None:
        self._db = db
        self._lock = lock
        self._root = root
        self.dataset_id = dataset_id
        self.tenant = tenant
        self._quota_bytes = quota_bytes
        self._count = 0
        self._labels: Counter[str] = Counter()
        self._modality: Modality | None = None
        with self._lock:
            self._db.execute(
                "INSERT INTO datasets "
                "(dataset_id, complete, modality, example_count, class_counts, created, tenant) "
                "VALUES (?, 0, '', 0, '[]', ?, ?)",
                (dataset_id, datetime.now().astimezone().isoformat(), tenant),
            )

    @disk_faults
    def add(self, examples: Sequence[LabeledExample]) -> None:
        rows: list[tuple[str, int, str, bytes | None, str | None]] = []
        size = 0
        for example in examples:
            if self._modality is None:
                self._modality = example.input.modality
            rows.append(
                (
                    self.dataset_id,
                    self._count + len(rows),
                    example.label,
                    example.input.image,
                    example.input.text,
                )
            )
            size += _example_bytes(example)
        with self._lock, _transaction(self._db):
            if self._quota_bytes is not None:
                # Counted and recorded under the store's lock, so two uploads of one tenant
                # cannot both fit in the room left for one.
                used = _tenant_dataset_bytes(self._db, self.tenant)
                if used + size > self._quota_bytes:
                    raise ResourceExhaustedError(
                        f"examples: this upload would take the tenant's stored datasets past "
                        f"their quota of {self._quota_bytes} bytes ({used} in use, this chunk "
                        f"{size}); free space with DeleteDataset, or upload fewer or smaller "
                        "examples"
                    )
            self._db.executemany("INSERT INTO dataset_examples VALUES (?,?,?,?,?)", rows)
            self._db.execute(
                "UPDATE datasets SET bytes = bytes + ? WHERE dataset_id = ?",
                (size, self.dataset_id),
            )
        # Only once stored: a refused chunk leaves the writer as it was.
        for example in examples:
            self._labels[example.label] += 1
        self._count += len(rows)

    @disk_faults
    def commit(self) -> DatasetInfo:
        if self._modality is None:
            raise InvalidArgumentError("examples: the uploaded dataset is empty")
        counts = tuple(sorted(self._labels.items()))
        with self._lock:
            self._db.execute(
                "UPDATE datasets SET complete = 1, modality = ?, example_count = ?, "
                "class_counts = ? WHERE dataset_id = ?",
                (self._modality.value, self._count, json.dumps(counts), self.dataset_id),
            )
        return DatasetInfo(self.dataset_id, self._count, counts, self._modality, self.tenant)

    def abort(self) -> None:
        """Removes the upload's rows. When the disk refuses even that (a delete must write,
        too) the rows stay marked incomplete, invisible, and the next start removes them."""
        try:
            with self._lock, _transaction(self._db):
                self._db.execute(
                    "DELETE FROM dataset_examples WHERE dataset_id = ?", (self.dataset_id,)
                )
                self._db.execute("DELETE FROM datasets WHERE dataset_id = ?", (self.dataset_id,))
        except (sqlite3.Error, OSError) as exc:
            log.warning(
                "could not remove the partial upload %s now (%s); the next start removes it",
                self.dataset_id,
                exc,
            )


def _job_from_row(row: tuple[object, ...]) -> JobRecord:
    return JobRecord(
        job_id=str(row[0]),
        state=JobState(row[1]),
        backbone=str(row[2]),
        head_name=str(row[3]),
        head_id=str(row[4]),
        error=str(row[5]),
        created_time=datetime.fromisoformat(str(row[6])),
        updated_time=datetime.fromisoformat(str(row[7])),
        last_sequence=int(str(row[8])),
        progress=progress_from_json(str(row[9])),
        tenant=str(row[10]),
    )


def _migrate(db: sqlite3.Connection) -> None:
    """Brings a database written by older code up to _SCHEMA_VERSION, explicitly and once.

    0 -> 1: jobs and datasets gain a tenant column; existing rows belong to DEFAULT_TENANT.
    1 -> 2: datasets gain `bytes` (what the per-tenant quota counts), computed from the rows.
    (The CREATE statements above already carry the columns, so a new database only gets its
    version.) One transaction: a crash mid-migration leaves the old version to migrate again.
    """
    version = int(db.execute("PRAGMA user_version").fetchone()[0])
    if version >= _SCHEMA_VERSION:
        return
    with _transaction(db):
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
        if version < 2:
            db.execute(
                "UPDATE datasets SET bytes = (SELECT COALESCE(SUM("
                f"{_SQL_EXAMPLE_BYTES}), 0) FROM dataset_examples AS e "
                "WHERE e.dataset_id = datasets.dataset_id)"
            )
        db.execute(f"PRAGMA user_version = {_SCHEMA_VERSION}")


# A stored example's bytes, as _example_bytes counts them (CAST: length() of TEXT counts
# characters, of a BLOB bytes).
_SQL_EXAMPLE_BYTES = (
    "length(CAST(e.label AS BLOB)) + COALESCE(length(e.image), 0) "
    "+ COALESCE(length(CAST(e.text AS BLOB)), 0)"
)


def _example_bytes(example: LabeledExample) -> int:
    """What an example costs the tenant's dataset quota: its label, image and text bytes."""
    size = len(example.label.encode())
    if example.input.image is not None:
        size += len(example.input.image)
    if example.input.text is not None:
        size += len(example.input.text.encode())
    return size


def _tenant_dataset_bytes(db: sqlite3.Connection, tenant: str) -> int:
    row = db.execute(
        "SELECT COALESCE(SUM(bytes), 0) FROM datasets WHERE tenant = ?", (tenant,)
    ).fetchone()
    return int(row[0])


def _lost_database_message(database: Path, heads: int, how: str) -> str:
    return (
        f"the store database {database} is {how}, but {heads} heads are stored beside it: "
        "the jobs and datasets they refer to would be gone without a word. Restore the "
        "database from a backup, or set TRANSFER_RECREATE_DATABASE=true to start with an "
        "empty one (the heads stay usable)"
    )


def _open_failure(root: Path, database: Path, error: BaseException) -> str:
    """Why the store under `root` cannot be opened, for the operator (start-up refusal)."""
    fault = disk_fault(error, root)
    if fault is None and isinstance(error, sqlite3.OperationalError):
        fault = _volume_state(root)  # a full or read-only volume fails opens in many ways
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


def _read_owner(head_dir: Path) -> str | None:
    """The tenant in a head's `tenant` file, or None if it is missing or not a tenant."""
    try:
        owner = (head_dir / _HEAD_OWNER).read_text(encoding="utf-8")
    except (OSError, ValueError):
        return None
    return owner if TENANT_PATTERN.fullmatch(owner) else None


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def _transaction(db: sqlite3.Connection) -> Iterator[None]:
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
