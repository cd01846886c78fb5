"""The dataset store in PostgreSQL: uploaded datasets, their examples, the writer an upload
goes through, and the per-tenant byte count the dataset quota checks, with sqlite_datasets'
semantics. Several replicas share the tables: an upload's quota check and its rows are one
transaction holding the tenant's advisory lock, so two uploads of one tenant, wherever they
run, cannot both fit in the room left for one."""

from __future__ import annotations

import json
import logging
import secrets
from collections import Counter
from collections.abc import Sequence
from datetime import UTC, datetime

from transfer_service.domain import DatasetInfo, LabeledExample, Modality
from transfer_service.errors import (
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
    ServiceError,
)
from transfer_service.store.codec import example_columns, example_from_columns
from transfer_service.store.ids import check_id
from transfer_service.store.pg_pool import Connection, Database

# The advisory-lock class of per-tenant dataset quotas (b"qota"); the tenant's hash is the
# lock's second key.
_QUOTA_LOCK = int.from_bytes(b"qota", "big")

log = logging.getLogger(__name__)


class PostgresDatasets:
    """Datasets (a DatasetStore) in `database`."""

    def __init__(self, database: Database) -> None:
        self._db = database

    def remove_abandoned_uploads(self, older_than_seconds: float) -> int:
        """Deletes uploads never committed and untouched for `older_than_seconds` (their
        replica died mid-upload); an upload still streaming on another replica is kept."""
        with self._db.transaction() as conn:
            cursor = conn.execute(
                "DELETE FROM datasets WHERE NOT complete "
                "AND touched < now() - make_interval(secs => %s)",
                (older_than_seconds,),
            )
            return cursor.rowcount

    def begin_dataset(self, tenant: str, quota_bytes: int | None = None) -> PostgresDatasetWriter:
        """A new upload of `tenant`'s. With `quota_bytes`, adding examples that would take the
        tenant's stored datasets (uploads in progress included) past it raises
        ResourceExhaustedError."""
        return PostgresDatasetWriter(self._db, "ds-" + secrets.token_hex(8), tenant, quota_bytes)

    def dataset_info(self, dataset_id: str) -> DatasetInfo:
        """A complete dataset's description (its tenant included) without its examples."""
        check_id("dataset_id", dataset_id)
        with self._db.transaction() as conn:
            row = conn.execute(
                "SELECT modality, example_count, class_counts, tenant FROM datasets "
                "WHERE dataset_id = %s AND complete",
                (dataset_id,),
            ).fetchone()
        if row is None:
            raise NotFoundError(f"dataset_id: no dataset {dataset_id!r}")
        return DatasetInfo(
            dataset_id,
            int(row[1]),
            tuple((k, v) for k, v in json.loads(row[2])),
            Modality(row[0]),
            tenant=row[3],
        )

    def dataset_bytes(self, tenant: str) -> int:
        """Bytes of `tenant`'s stored datasets, uploads in progress included."""
        with self._db.transaction() as conn:
            return _tenant_dataset_bytes(conn, tenant)

    def delete_dataset(self, dataset_id: str) -> None:
        check_id("dataset_id", dataset_id)
        with self._db.transaction() as conn:
            # The examples go with it (ON DELETE CASCADE).
            deleted = conn.execute(
                "DELETE FROM datasets WHERE dataset_id = %s AND complete", (dataset_id,)
            ).rowcount
        if not deleted:
            raise NotFoundError(f"dataset_id: no dataset {dataset_id!r}")

    def dataset_examples(self, info: DatasetInfo) -> list[LabeledExample]:
        dataset_id = info.dataset_id
        with self._db.transaction() as conn:
            rows = conn.execute(
                "SELECT label, image, text FROM dataset_examples WHERE dataset_id = %s "
                "ORDER BY idx",
                (dataset_id,),
            ).fetchall()
        if not rows and info.example_count:  # deleted since dataset_info read it
            raise NotFoundError(f"dataset_id: no dataset {dataset_id!r}")
        return [example_from_columns(label, image, text) for label, image, text in rows]


class PostgresDatasetWriter:
    """Rows go in as chunks arrive, marked incomplete (invisible); commit makes the dataset
    visible, abort removes it."""

    def __init__(
        self, database: Database, dataset_id: str, tenant: str, quota_bytes: int | None = None
    ) -> None:
        self._db = database
        self.dataset_id = dataset_id
        self.tenant = tenant
        self._quota_bytes = quota_bytes
        self._count = 0
        self._labels: Counter[str] = Counter()
        self._modality: Modality | None = None
        now = datetime.now(UTC)
        with self._db.transaction() as conn:
            conn.execute(
                "INSERT INTO datasets (dataset_id, tenant, complete, modality, example_count, "
                "class_counts, created, touched) VALUES (%s, %s, false, '', 0, '[]', %s, %s)",
                (dataset_id, tenant, now, now),
            )

    def add(self, examples: Sequence[LabeledExample]) -> None:
        modality = self._modality
        rows: list[tuple[object, ...]] = []
        size = 0
        for example in examples:
            if modality is None:
                modality = example.input.modality
            columns = example_columns(example, text_as_bytes=True)
            rows.append((self.dataset_id, self._count + len(rows), *columns))
            size += _example_bytes(example)
        with self._db.transaction() as conn:
            if self._quota_bytes is not None:
                conn.execute(
                    "SELECT pg_advisory_xact_lock(%s, hashtext(%s))", (_QUOTA_LOCK, self.tenant)
                )
                used = _tenant_dataset_bytes(conn, self.tenant)
                if used + size > self._quota_bytes:
                    raise ResourceExhaustedError(
                        f"examples: this upload would take the tenant's stored datasets past "
                        f"their quota of {self._quota_bytes} bytes ({used} in use, this chunk "
                        f"{size}); free space with DeleteDataset, or upload fewer or smaller "
                        "examples"
                    )
            updated = conn.execute(
                "UPDATE datasets SET bytes = bytes + %s, touched = now() "
                "WHERE dataset_id = %s AND NOT complete",
                (size, self.dataset_id),
            ).rowcount
            if not updated:
                raise _abandoned(self.dataset_id)
            with conn.cursor() as cursor:
                cursor.executemany(
                    "INSERT INTO dataset_examples (dataset_id, idx, label, image, text) "
                    "VALUES (%s, %s, %s, %s, %s)",
                    rows,
                )
        # Only once stored: a refused chunk leaves the writer as it was.
        self._modality = modality
        for example in examples:
            self._labels[example.label] += 1
        self._count += len(rows)

    def commit(self) -> DatasetInfo:
        if self._modality is None:
            raise InvalidArgumentError("examples: the uploaded dataset is empty")
        counts = tuple(sorted(self._labels.items()))
        with self._db.transaction() as conn:
            updated = conn.execute(
                "UPDATE datasets SET complete = true, modality = %s, example_count = %s, "
                "class_counts = %s, touched = now() WHERE dataset_id = %s AND NOT complete",
                (self._modality.value, self._count, json.dumps(counts), self.dataset_id),
            ).rowcount
        if not updated:
            raise _abandoned(self.dataset_id)
        return DatasetInfo(self.dataset_id, self._count, counts, self._modality, self.tenant)

    def abort(self) -> None:
        """Removes the upload's rows. When the database refuses even that, the rows stay
        marked incomplete, invisible, and a later start removes them once they are stale."""
        try:
            with self._db.transaction() as conn:
                conn.execute(
                    "DELETE FROM datasets WHERE dataset_id = %s AND NOT complete",
                    (self.dataset_id,),
                )
        except ServiceError as exc:
            log.warning(
                "could not remove the partial upload %s now (%s); a later start removes it",
                self.dataset_id,
                exc.message,
            )


def _abandoned(dataset_id: str) -> FailedPreconditionError:
    return FailedPreconditionError(
        f"dataset {dataset_id!r}: the upload was idle so long it was removed; upload again"
    )


def _example_bytes(example: LabeledExample) -> int:
    """What an example costs the tenant's dataset quota: its label, image and text bytes
    (as sqlite_datasets counts them)."""
    size = len(example.label.encode())
    if example.input.image is not None:
        size += len(example.input.image)
    if example.input.text is not None:
        size += len(example.input.text.encode())
    return size


def _tenant_dataset_bytes(conn: Connection, tenant: str) -> int:
    row = conn.execute(
        "SELECT COALESCE(SUM(bytes), 0) FROM datasets WHERE tenant = %s", (tenant,)
    ).fetchone()
    return int(row[0]) if row is not None else 0
