"""The store seen by the rest of the server. The embedded backend is LocalStore (a directory
plus SQLite); the PostgreSQL backend for multi-replica deployments implements the same
protocols. A write the disk refuses (full, read-only) raises ResourceExhaustedError."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol

import torch

from transfer_service.domain import (
    ClaimedJob,
    DatasetInfo,
    FineTuneSpec,
    HeadName,
    HeadRecord,
    JobEvent,
    JobRecord,
    JobState,
    LabeledExample,
)


@dataclass(frozen=True, slots=True)
class LeaseRenewal:
    """What a heartbeat (JobStore.hold_jobs) found: jobs another process asked to cancel, and
    jobs the owner no longer holds (finished, or taken over after its lease expired)."""

    cancel_requested: list[str] = field(default_factory=list)
    lost: list[str] = field(default_factory=list)


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

    def delete_head(self, head_id: str, *, force: bool = False) -> None:
        """NotFoundError for an unknown head. When aliases of its name point at it:
        FailedPreconditionError naming them, unless `force`, which removes those aliases in
        the same transaction as the head (a concurrent set_head_alias to this version either
        commits first, and is then refused or removed with it, or fails NOT_FOUND after)."""

    # ---- names, versions and aliases (per tenant) ----

    def reserve_head_version(self, tenant: str, name: str) -> int:
        """The next version of (tenant, name): 1 for a new name, then one more than any
        version ever reserved for it, atomically across every process sharing the store.
        Never reused, even when a reserved version is never saved (its job failed) or is
        deleted; versions may therefore have gaps. The head saved with it (save_head,
        complete_job) carries it in HeadRecord.version."""

    def head_name(self, tenant: str, name: str) -> HeadName:
        """One consistent read of the name's existing versions and its aliases.
        NotFoundError when the tenant has no head of that name (every version deleted, or
        never trained)."""

    def set_head_alias(self, tenant: str, name: str, alias: str, version: int) -> HeadName:
        """Creates or moves `alias` to `version`, atomically, and returns the name as it is
        after. NotFoundError when that version does not exist (never trained, or deleted).
        `alias` is valid (ALIAS_PATTERN, not LATEST_ALIAS): the caller checked."""

    def delete_head_alias(self, tenant: str, name: str, alias: str) -> HeadName:
        """Removes the alias; NotFoundError when the name has no such alias. Returns the name
        as it is after (its versions are untouched)."""


class JobStore(Protocol):
    """Jobs, their event logs, and the job queue.

    Fencing: a JobRecord with `attempt` > 0 is written by that run of the job. Every such
    write (save_job, finish_job, complete_job, append_progress's row, append_event and
    append_progress with `attempt`) applies only while the stored row is unfinished and its
    attempt count equals it; otherwise it raises LeaseLostError and writes nothing (a later
    run took the job over). Writes with attempt 0 are not fenced."""

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

    # ---- the queue ----

    def enqueue_job(
        self,
        job: JobRecord,
        event: JobEvent,
        spec: FineTuneSpec,
        *,
        max_unfinished: int,
        request_key: str = "",
        request_digest: str = "",
    ) -> JobRecord:
        """One transaction, serialised per tenant across every process sharing the store:
        * with a non-empty `request_key` the tenant already used: stores nothing and returns
          that job's current record, or raises FailedPreconditionError when its stored
          `request_digest` differs (the key reused for a different request);
        * else, when `job.tenant` has `max_unfinished` jobs queued or running (counted in
          the store): ResourceExhaustedError;
        * else stores `job` (QUEUED, nobody holding it, attempt 0), `spec` with its
          examples and validation examples (the run reads them back from the store), and
          its first event `event`; returns `job`."""

    def claim_job(self, owner: str, until: datetime) -> ClaimedJob | None:
        """Takes one claimable job for `owner`, leased until `until`, or None. Claimable: not
        finished, and nobody holds it (never claimed, released, or its holder's lease expired
        before now). Fair between tenants: among claimable jobs the tenant holding the fewest
        running jobs goes first, then the oldest job. The job's attempt count goes up by one
        (the returned record's `attempt`). Processes claiming at once never take the same
        job (PostgreSQL: FOR UPDATE SKIP LOCKED)."""

    def release_job(self, job: JobRecord, event: JobEvent) -> None:
        """A run (job.attempt) that stops without ending its job (the server is stopping)
        puts it back: QUEUED, nobody holding it, its attempt count back to what it was before
        this run's claim (a stop is not the job's fault), `job`'s row fields and `event` (a
        warning saying why) written; one transaction. LeaseLostError if the run no longer
        holds it."""

    def abandon_leases(self) -> None:
        """The start of a store's only process (the embedded store): every lease is its dead
        predecessor's, so every unfinished job becomes claimable at once. Attempt counts
        stay: a crash may be the job's own doing. Not for a store replicas share."""

    def hold_jobs(self, owner: str, job_ids: Sequence[str], until: datetime) -> LeaseRenewal:
        """The heartbeat: extends `owner`'s lease to `until` on those of `job_ids` it still
        holds (unfinished, lease_owner `owner`); reports which of them another process asked
        to cancel, and which `owner` no longer holds (finished, or taken over)."""

    def request_cancel(self, job_id: str, event: JobEvent) -> JobRecord | None:
        """CancelJob for a job this process does not run. Nobody holding it (queued): ends
        it CANCELLED here, with `event` (its `cancelled` event; its sequence is replaced by
        the log's next one) in one transaction, and returns the final record. Held by a
        process: records the request for the holder (read back with its next hold_jobs, and
        on PostgreSQL notified to it at once) and returns None. FailedPreconditionError for
        a finished job, NotFoundError for an unknown one."""

    def watch_jobs(
        self,
        on_events: Callable[[str], None],
        on_queued: Callable[[], None],
        on_cancel: Callable[[str], None],
    ) -> None:
        """Until close(), on a thread of the store's: `on_events(job_id)` after another
        process appends events to a job's log, `on_queued()` after a job becomes claimable,
        `on_cancel(job_id)` after a cancel is requested for a held job. Best effort (a
        notice may be lost while the connection is down: callers also poll). A store no
        other process shares does nothing."""

    # ---- recovery and retention ----

    @property
    def holds_leases(self) -> bool:
        """Whether several processes share the store (PostgreSQL); False for a store one
        process owns (the embedded one)."""

    def unsettled_jobs(self, abandoned_before: datetime | None = None) -> list[JobRecord]:
        """Jobs recovery must look at: finished ones whose event log does not end in a
        terminal event, and unfinished ones nobody runs any more. With `abandoned_before`
        None (the start of a store's only process) every unfinished job is abandoned; with
        a time, only those held by a lease that expired before it (none, in a store without
        leases), so jobs other live processes run are left alone, and so is the queue: a
        job no process has claimed, or one released back to it, holds no lease."""

    def delete_finished_jobs(self, finished_before: datetime) -> int:
        """Retention: deletes jobs that finished before `finished_before` and their events
        (never queued or running ones, never heads); returns how many."""

    # ---- the event log ----

    def append_event(self, event: JobEvent, *, attempt: int = 0) -> None: ...

    def append_progress(self, event: JobEvent, job: JobRecord | None, *, attempt: int = 0) -> None:
        """A progress event (and the job row carrying it), in one transaction that may skip
        the disk flush: it survives the process dying, and losing the newest of them to a
        power cut costs nothing a restart would not redo (the job fails over anyway)."""

    def finish_job(self, job: JobRecord, event: JobEvent) -> None:
        """Atomically: saves the job's final row and appends its terminal event, or neither;
        the job's stored examples are deleted with it (no run needs them any more)."""

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


class MeasurementStore(Protocol):
    """Small facts the server measured about the machine it runs on (issue 20: the chosen
    precision per backbone and device), kept so that a restart does not measure again. Keys
    carry the machine's fingerprint; values are JSON text. Last write wins."""

    def read_measurement(self, key: str) -> str | None: ...

    def write_measurement(self, key: str, value: str) -> None: ...


class Store(HeadStore, JobStore, DatasetStore, MeasurementStore, Protocol):
    def complete_job(
        self,
        job: JobRecord,
        event: JobEvent,
        head: HeadRecord,
        weights: dict[str, torch.Tensor],
    ) -> None:
        """A job's success: its head, its SUCCEEDED row and its `completed` event commit
        together, or none of them (raises then; LeaseLostError when `job.attempt` no longer
        holds the job). Its stored examples are deleted with it. A re-run of the job can
        therefore never leave two heads, and no head exists without its job's success.
        `head.version` was reserved with reserve_head_version (a re-run reserves anew)."""

    def watch_heads(
        self,
        on_changed: Callable[[str], None],
        resident: Callable[[], list[str]],
        on_name_changed: Callable[[str, str], None] = lambda tenant, name: None,
    ) -> None:
        """From now until close(), calls `on_changed(head_id)` (on a thread of the store's)
        for each head deleted or replaced by another process sharing the store, within about
        a second; `resident()` names the heads the caller holds, for the check that covers
        a lost notice; and `on_name_changed(tenant, name)` soon after another process
        changed that name's versions or aliases (a best-effort hint: the name cache's age
        bound is what guarantees it). A store no other process shares does nothing: its own
        changes are the only ones."""

    def close(self) -> None:
        """Also stops what watch_heads started."""
