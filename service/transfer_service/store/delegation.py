"""The Store methods both backends answer by handing the call to one of their parts: the
job rows (SqliteJobs, PostgresJobs) and the datasets (SqliteDatasets, PostgresDatasets).
Written once here; each store keeps what differs (heads, and complete_job, which spans a
head and a job)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from transfer_service.domain import DatasetInfo, JobEvent, JobRecord, JobState, LabeledExample
from transfer_service.store.interface import DatasetStore, DatasetWriter, JobStore


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

    @property
    def holds_leases(self) -> bool:
        return self._jobs.holds_leases

    def hold_jobs(self, owner: str, job_ids: Sequence[str], until: datetime) -> list[str]:
        return self._jobs.hold_jobs(owner, job_ids, until)

    def request_cancel(self, job_id: str) -> None:
        self._jobs.request_cancel(job_id)

    def unsettled_jobs(self, abandoned_before: datetime | None = None) -> list[JobRecord]:
        return self._jobs.unsettled_jobs(abandoned_before)

    def delete_finished_jobs(self, finished_before: datetime) -> int:
        return self._jobs.delete_finished_jobs(finished_before)

    def append_event(self, event: JobEvent) -> None:
        self._jobs.append_event(event)

    def append_progress(self, event: JobEvent, job: JobRecord | None) -> None:
        self._jobs.append_progress(event, job)

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
