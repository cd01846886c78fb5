"""The store seen by the rest of the server. The embedded backend is LocalStore (a directory
plus SQLite); the PostgreSQL backend for multi-replica deployments implements the same
protocols. A write the disk refuses (full, read-only) raises ResourceExhaustedError."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Protocol

import torch

from transfer_service.domain import (
    DatasetInfo,
    HeadRecord,
    JobEvent,
    JobRecord,
    JobState,
    LabeledExample,
)


class HeadStore(Protocol):
    def save_head(self, record: HeadRecord, weights: dict[str, torch.Tensor]) -> None:
        """Atomically: afterwards the head is complete and listed, or absent."""

    def get_head(self, head_id: str) -> HeadRecord: ...

    def load_head_weights(self, head_id: str) -> dict[str, torch.Tensor]: ...

    def list_heads(
        self,
        tenant: str | None = None,
        *,
        backbone: str | None = None,
        name: str | None = None,
        after: tuple[datetime, str] | None = None,
        limit: int | None = None,
    ) -> list[HeadRecord]:
        """Oldest first, ties by id; only `tenant`'s, `backbone`'s and those named `name` when
        given; with `after` (created time, head id) only the heads past that one, at most
        `limit`. A damaged head is left out, never failing the listing."""

    def delete_head(self, head_id: str) -> None: ...


class JobStore(Protocol):
    def save_job(self, job: JobRecord) -> None: ...

    def get_job(self, job_id: str) -> JobRecord: ...

    def list_jobs(
        self,
        tenant: str | None = None,
        *,
        state: JobState | None = None,
        backbone: str | None = None,
        name: str | None = None,
        after: tuple[datetime, str] | None = None,
        limit: int | None = None,
    ) -> list[JobRecord]:
        """Oldest first, ties by id; only `tenant`'s, those in `state`, on `backbone` and for
        head name `name` when given; with `after` (created time, job id) only the jobs past
        that one, at most `limit`."""

    @property
    def holds_leases(self) -> bool:
        """Whether several processes share the store, each holding leases on the jobs it
        runs (PostgreSQL); False for a store one process owns (the embedded one)."""

    def hold_jobs(self, owner: str, job_ids: Sequence[str], until: datetime) -> list[str]:
        """Renews `owner`'s lease on these unfinished jobs until `until` (a heartbeat) and
        returns those of them another replica asked to cancel; a no-op for a store without
        leases."""

    def request_cancel(self, job_id: str) -> None:
        """Asks the replica holding the unfinished job to stop it: it reads the request at
        its next lease renewal. Only for a store with leases (one process cancels in
        memory)."""

    def unsettled_jobs(self, abandoned_before: datetime | None = None) -> list[JobRecord]:
        """Jobs recovery must settle: finished ones whose event log does not end in a
        terminal event, and unfinished ones nobody runs any more. With `abandoned_before`
        None (the start of a store's only process) every unfinished job is abandoned; with
        a time, only those whose lease expired before it (none, in a store without
        leases), so jobs other live processes run are left alone."""

    def delete_finished_jobs(self, finished_before: datetime) -> int:
        """Retention: deletes jobs that finished before `finished_before` and their events
        (never queued or running ones, never heads); returns how many."""

    def append_event(self, event: JobEvent) -> None: ...

    def append_progress(self, event: JobEvent, job: JobRecord | None) -> None:
        """A progress event (and the job row carrying it), in one transaction that may skip
        the disk flush: it survives the process dying, and losing the newest of them to a
        power cut costs nothing a restart would not redo (the job fails over anyway)."""

    def finish_job(self, job: JobRecord, event: JobEvent) -> None:
        """Atomically: saves the job's final row and appends its terminal event, or neither."""

    def events_after(self, job_id: str, after_sequence: int) -> list[JobEvent]: ...


class DatasetWriter(Protocol):
    def add(self, examples: Sequence[LabeledExample]) -> None: ...

    def commit(self) -> DatasetInfo: ...

    def abort(self) -> None: ...


class DatasetStore(Protocol):
    def begin_dataset(self, tenant: str, quota_bytes: int | None = None) -> DatasetWriter:
        """With `quota_bytes`, `add` refuses (ResourceExhaustedError) examples that would take
        the tenant's stored datasets, uploads in progress included, past it."""

    def dataset_info(self, dataset_id: str) -> DatasetInfo:
        """A complete dataset's description and tenant, without reading its examples."""

    def dataset_examples(self, info: DatasetInfo) -> list[LabeledExample]:
        """The examples of the dataset `info` describes (read first, so its owner is checked
        before any example is); NOT_FOUND if it was deleted since."""

    def dataset_bytes(self, tenant: str) -> int: ...

    def delete_dataset(self, dataset_id: str) -> None: ...


class Store(HeadStore, JobStore, DatasetStore, Protocol):
    def complete_job(
        self,
        job: JobRecord,
        event: JobEvent,
        head: HeadRecord,
        weights: dict[str, torch.Tensor],
    ) -> None:
        """A job's success: its head, its SUCCEEDED row and its `completed` event commit
        together, or none of them (raises then). A re-run of the job can therefore never
        leave two heads, and no head exists without its job's success."""

    def watch_heads(
        self, on_changed: Callable[[str], None], resident: Callable[[], list[str]]
    ) -> None:
        """From now until close(), calls `on_changed(head_id)` (on a thread of the store's)
        for each head deleted or replaced by another process sharing the store, within about
        a second; `resident()` names the heads the caller holds, for the check that covers
        a lost notice. A store no other process shares does nothing: its own deletes are
        the only ones."""

    def close(self) -> None:
        """Also stops what watch_heads started."""
