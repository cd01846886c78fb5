"""The Store methods both backends answer by handing the call to one of their parts: the
jobs and their queue (SqliteJobQueue, PostgresJobQueue) and the datasets (SqliteDatasets,
PostgresDatasets).
Written once here; each store keeps what differs (heads, and complete_job, which spans a
head and a job)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime

from transfer_service.domain import (
    ClaimedJob,
    DatasetInfo,
    FineTuneSpec,
    JobEvent,
    JobRecord,
    JobState,
    LabeledExample,
)
from transfer_service.store.interface import DatasetStore, DatasetWriter, JobStore, LeaseRenewal


class JobsByDelegation:
    _jobs: JobStore

    def save_job(self, job: JobRecord) -> None:
        self._jobs.save_job(job)

    def finish_job(self, job: JobRecord, event: JobEvent) -> None:
        self._jobs.finish_job(job, event)

    def get_job(self, job_id: str) -> JobRecord:
        return self._jobs.get_job(job_id)

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
        return self._jobs.list_jobs(
            tenant, state=state, backbone=backbone, name=name, after=after, limit=limit
        )

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
        return self._jobs.enqueue_job(
            job,
            event,
            spec,
            max_unfinished=max_unfinished,
            request_key=request_key,
            request_digest=request_digest,
        )

    def claim_job(self, owner: str, until: datetime) -> ClaimedJob | None:
        return self._jobs.claim_job(owner, until)

    def release_job(self, job: JobRecord, event: JobEvent) -> None:
        self._jobs.release_job(job, event)

    def abandon_leases(self) -> None:
        self._jobs.abandon_leases()

    def watch_jobs(
        self,
        on_events: Callable[[str], None],
        on_queued: Callable[[], None],
        on_cancel: Callable[[str], None],
    ) -> None:
        self._jobs.watch_jobs(on_events, on_queued, on_cancel)

    @property
    def holds_leases(self) -> bool:
        return self._jobs.holds_leases

    def hold_jobs(self, owner: str, job_ids: Sequence[str], until: datetime) -> LeaseRenewal:
        return self._jobs.hold_jobs(owner, job_ids, until)

    def request_cancel(self, job_id: str, event: JobEvent) -> JobRecord | None:
        return self._jobs.request_cancel(job_id, event)

    def unsettled_jobs(self, abandoned_before: datetime | None = None) -> list[JobRecord]:
        return self._jobs.unsettled_jobs(abandoned_before)

    def delete_finished_jobs(self, finished_before: datetime) -> int:
        return self._jobs.delete_finished_jobs(finished_before)

    def append_event(self, event: JobEvent, *, attempt: int = 0) -> None:
        self._jobs.append_event(event, attempt=attempt)

    def append_progress(self, event: JobEvent, job: JobRecord | None, *, attempt: int = 0) -> None:
        self._jobs.append_progress(event, job, attempt=attempt)

    def events_after(self, job_id: str, after_sequence: int) -> list[JobEvent]:
        return self._jobs.events_after(job_id, after_sequence)


class DatasetsByDelegation:
    _datasets: DatasetStore

    def begin_dataset(self, tenant: str, quota_bytes: int | None = None) -> DatasetWriter:
        return self._datasets.begin_dataset(tenant, quota_bytes)

    def dataset_info(self, dataset_id: str) -> DatasetInfo:
        return self._datasets.dataset_info(dataset_id)

    def dataset_bytes(self, tenant: str) -> int:
        return self._datasets.dataset_bytes(tenant)

    def delete_dataset(self, dataset_id: str) -> None:
        self._datasets.delete_dataset(dataset_id)

    def dataset_examples(self, info: DatasetInfo) -> list[LabeledExample]:
        return self._datasets.dataset_examples(info)
