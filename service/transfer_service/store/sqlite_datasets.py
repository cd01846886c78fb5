"""The dataset store in SQLite: uploaded datasets, their examples, the writer an upload goes
through, and the per-tenant byte count a dataset quota checks (tables in sqlite_schema)."""

from __future__ import annotations

import json
import logging
import secrets
import sqlite3
import threading
from collections import Counter
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

from transfer_service.domain import DatasetInfo, LabeledExample, Modality
from transfer_service.errors import InvalidArgumentError, NotFoundError, ResourceExhaustedError
from transfer_service.store.codec import example_columns, example_from_columns
from transfer_service.store.disk_faults import disk_faults
from transfer_service.store.ids import check_id
from transfer_service.store.sqlite_schema import transaction

log = logging.getLogger(__name__)


class SqliteDatasets:
    """Datasets (a DatasetStore) in `db`, used under `lock`, which the store's other users of
    the connection share; `root` is the store's directory (for disk faults)."""

    def __init__(self, db: sqlite3.Connection, lock: threading.Lock, root: Path) -> None:
        self._db = db
        self._lock = lock
        self._root = root

    @disk_faults
    def begin_dataset(self, tenant: str, quota_bytes: int | None = None) -> SqliteDatasetWriter:
        """A new upload of `tenant`'s. With `quota_bytes`, adding examples that would take the
        tenant's stored datasets (uploads in progress included) past it raises
        ResourceExhaustedError."""
        return SqliteDatasetWriter(
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
        with self._lock, transaction(self._db):
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
        return [example_from_columns(label, image, text) for label, image, text in rows]


class SqliteDatasetWriter:
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
        rows: list[tuple[object, ...]] = []
        size = 0
        for example in examples:
            if self._modality is None:
                self._modality = example.input.modality
            columns = example_columns(example, text_as_bytes=False)
            rows.append((self.dataset_id, self._count + len(rows), *columns))
            size += _example_bytes(example)
        with self._lock, transaction(self._db):
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
            with self._lock, transaction(self._db):
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


def _example_bytes(example: LabeledExample) -> int:
    """What an example costs the tenant's dataset quota: its label, image and text bytes
    (sqlite_schema counts stored examples the same way when it migrates)."""
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
