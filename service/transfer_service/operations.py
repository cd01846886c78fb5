"""What each RPC does, on domain types: the servicer only converts around these calls.

Every call names the caller's tenant. Heads, jobs and datasets of another tenant are reported
exactly like unknown ones (NOT_FOUND, same message), so ids do not leak across tenants.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any, TypeVar

from transfer_service.backbones.cache import BackboneCache, BackboneStatus
from transfer_service.backbones.preprocess import check_image
from transfer_service.dataset_upload import store_upload
from transfer_service.domain import (
    DatasetInfo,
    FineTuneSpec,
    HeadRecord,
    JobEvent,
    JobRecord,
    JobState,
    LabeledExample,
    Modality,
    ModelInput,
    PredictionResult,
)
from transfer_service.errors import (
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
)
from transfer_service.head_catalog import ResolveHead
from transfer_service.list_pages import read_page
from transfer_service.predict.predictor import Predictor
from transfer_service.store.ids import check_id
from transfer_service.store.interface import Store
from transfer_service.training.features import check_pooled_features_fit
from transfer_service.training.jobs import JobManager
from transfer_service.training.selection import candidate_names
from transfer_service.training.validation import (
    TrainingConfigRequest,
    check_examples,
    check_head_name,
    check_request_id,
    check_validation_examples,
    resolve_config,
)

T = TypeVar("T")
AUTO_BACKBONE = "auto"


@dataclass(frozen=True, slots=True)
class FineTuneCall:
    """A FineTune request in domain terms."""

    backbone: str
    head_name: str
    examples: Sequence[LabeledExample]
    dataset_id: str
    config: TrainingConfigRequest
    validation_examples: Sequence[LabeledExample] = ()
    validation_dataset_id: str = ""
    candidate_backbones: Sequence[str] = ()
    # The caller's idempotency key: a retry with the same key returns the same job.
    request_id: str = ""


log = logging.getLogger(__name__)


class TransferOperations:
    def __init__(
        self,
        *,
        store: Store,
        backbones: BackboneCache,
        resolve_head: ResolveHead,
        jobs: JobManager,
        predictor: Predictor,
        blocking_pool: Executor,
        max_dataset_examples: int,
        max_image_pixels: int,
        max_classes: int,
        feature_cache_bytes: int,
        on_predicted: Callable[[str, float], None] = lambda backbone, seconds: None,
        max_dataset_bytes_per_tenant: int | None = None,
    ) -> None:
        """`on_predicted(backbone, seconds)` observes each successful Predict end to end.
        `max_dataset_bytes_per_tenant`: the quota on one tenant's stored dataset bytes."""
        self._store = store
        self._backbones = backbones
        self._resolve_head = resolve_head
        self._jobs = jobs
        self._predictor = predictor
        self._pool = blocking_pool
        self._max_examples = max_dataset_examples
        self._max_pixels = max_image_pixels
        self._max_classes = max_classes
        self._feature_cache_bytes = feature_cache_bytes
        self._on_predicted = on_predicted
        self._max_dataset_bytes = max_dataset_bytes_per_tenant

    async def _blocking(self, function: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, function, *args)

    async def list_backbones(self) -> list[BackboneStatus]:
        statuses: list[BackboneStatus] = await self._blocking(self._backbones.statuses)
        return statuses

    async def start_fine_tune(self, tenant: str, call: FineTuneCall) -> JobRecord:
        """Validates everything that can be checked up front, then queues the job."""
        examples, field = await self._examples(
            tenant, call.examples, call.dataset_id, "examples", "dataset_id"
        )
        validation, validation_field = await self._examples(
            tenant,
            call.validation_examples,
            call.validation_dataset_id,
            "validation_examples",
            "validation_dataset_id",
        )
        if call.backbone == AUTO_BACKBONE:
            if not examples:
                raise InvalidArgumentError(f"{field}: no examples (send examples or a dataset_id)")
            modality = examples[0].input.modality
            statuses = await self.list_backbones()
            candidates = candidate_names(
                call.candidate_backbones, modality, statuses, self._backbones.check_available
            )
        else:
            if call.candidate_backbones:
                raise InvalidArgumentError(
                    f"candidate_backbones: only with backbone {AUTO_BACKBONE!r}"
                )
            modality = self._backbones.check_available(call.backbone).modality
            candidates = [call.backbone]
        name = check_head_name(call.head_name, call.backbone)
        check_request_id(call.request_id)
        check_examples(examples, modality, self._max_examples, field, self._max_classes)
        feature_dim = max(self._backbones.spec(c).feature_dim for c in candidates)
        check_pooled_features_fit(
            len(examples) + len(validation), feature_dim, self._feature_cache_bytes, field
        )
        labels = {example.label for example in examples}
        check_validation_examples(validation, labels, modality, validation_field)
        if modality is Modality.IMAGE:
            # Uploaded datasets were checked at upload; inline images are checked here.
            if not call.dataset_id:
                await self._blocking(self._check_images, examples, field)
            if not call.validation_dataset_id:
                await self._blocking(self._check_images, validation, validation_field)
        # Only the candidates' architectures are built (on the meta device, once each).
        stages = min(
            [await self._blocking(self._backbones.unfreezable_blocks, c) for c in candidates]
        )
        resolved = resolve_config(call.config, modality, stages)
        job = await self._jobs.submit(
            FineTuneSpec(
                call.backbone,
                name,
                tuple(examples),
                resolved,
                tenant=tenant,
                validation_examples=tuple(validation),
                candidate_backbones=tuple(candidates) if call.backbone == AUTO_BACKBONE else (),
            ),
            request_id=call.request_id,
        )
        log.info(
            "job %s queued: backbone %s, head name %s, %d examples",
            job.job_id,
            call.backbone,
            name,
            len(examples),
        )
        return job

    async def _examples(
        self,
        tenant: str,
        inline: Sequence[LabeledExample],
        dataset_id: str,
        inline_field: str,
        dataset_field: str,
    ) -> tuple[Sequence[LabeledExample], str]:
        """Inline examples or a stored dataset's (never both), and the field to blame."""
        if inline and dataset_id:
            raise InvalidArgumentError(
                f"{dataset_field}: send either {inline_field} or a {dataset_field}, not both"
            )
        if not dataset_id:
            return inline, inline_field
        check_id(dataset_field, dataset_id)
        # Ownership from the info row first: another tenant's examples are never read (that
        # was wasted work, and its duration told whether the id existed).
        info: DatasetInfo = await self._blocking(self._store.dataset_info, dataset_id)
        _check_owner(info.tenant, tenant, f"{dataset_field}: no dataset {dataset_id!r}")
        loaded: list[LabeledExample] = await self._blocking(self._store.dataset_examples, info)
        return loaded, f"dataset {dataset_id}"

    def _check_images(self, examples: Sequence[LabeledExample], field: str) -> None:
        for position, example in enumerate(examples):
            assert example.input.image is not None
            check_image(example.input.image, f"{field}[{position}].image", self._max_pixels)

    async def watch_job(
        self, tenant: str, job_id: str, after_sequence: int = 0
    ) -> AsyncIterator[JobEvent]:
        record = await self.get_job(tenant, job_id)
        if record.state.finished:
            # Its whole log is stored (the terminal event is written before it is published):
            # replay it from the blocking pool. A large log read on the loop stalled every
            # other call.
            events: list[JobEvent] = await self._blocking(
                self._store.events_after, job_id, after_sequence
            )
            for event in events:
                yield event
            return
        # Unfinished: followed in memory if it runs here, else from the store's log.
        async for event in self._jobs.watch(job_id, after_sequence):
            yield event

    async def predict(
        self,
        tenant: str,
        head_id: str,
        inputs: Sequence[ModelInput],
        top_k: int,
        return_embedding: bool,
    ) -> tuple[HeadRecord, list[PredictionResult]]:
        """The head `head_id` refers to (HeadCatalog.resolve_head) and its results."""
        started = time.perf_counter()
        head = await self._resolve_head(tenant, head_id, "head_id")
        results = await self._predictor.predict(
            head, inputs, top_k=top_k, return_embedding=return_embedding
        )
        self._on_predicted(head.record.backbone, time.perf_counter() - started)
        return head.record, results

    async def upload_dataset(
        self, tenant: str, chunks: AsyncIterator[list[LabeledExample]]
    ) -> DatasetInfo:
        """Stores a dataset as it streams in (see dataset_upload.store_upload)."""
        writer = await self._blocking(self._store.begin_dataset, tenant, self._max_dataset_bytes)
        return await store_upload(
            writer,
            chunks,
            max_examples=self._max_examples,
            max_pixels=self._max_pixels,
            blocking=self._blocking,
        )

    async def delete_dataset(self, tenant: str, dataset_id: str) -> None:
        check_id("dataset_id", dataset_id)
        info: DatasetInfo = await self._blocking(self._store.dataset_info, dataset_id)
        _check_owner(info.tenant, tenant, f"dataset_id: no dataset {dataset_id!r}")
        # Jobs already queued from it hold their own copy of the examples.
        await self._blocking(self._store.delete_dataset, dataset_id)
        log.info("dataset %s deleted (%d examples)", dataset_id, info.example_count)

    # Job calls read the store (a finished job's row, or every job of the tenant) in the
    # blocking pool: with 200,000 stored jobs a listing on the event loop took 4 s, and every
    # other tenant's Predict waited behind it.

    async def get_job(self, tenant: str, job_id: str) -> JobRecord:
        record: JobRecord = await self._blocking(self._jobs.get, check_id("job_id", job_id))
        _check_owner(record.tenant, tenant, f"job_id: no job {job_id!r}")
        return record

    async def list_jobs(
        self,
        tenant: str,
        page_size: int = 0,
        page_token: str = "",
        *,
        state: JobState | None = None,
        backbone: str = "",
        head_name: str = "",
    ) -> tuple[list[JobRecord], str]:
        """One page of the tenant's jobs, oldest first, filtered, and the token of the next
        page ("" on the last). `page_size` 0 or over MAX_PAGE reads as MAX_PAGE."""
        if backbone:
            self._backbones.spec(backbone)

        return await read_page(
            functools.partial(
                self._store.list_jobs,
                tenant,
                state=state,
                backbone=backbone or None,
                name=head_name or None,
            ),
            self._blocking,
            lambda job: (job.created_time, job.job_id),
            page_size,
            page_token,
            (state.value if state else "", backbone, head_name),
        )

    async def cancel_job(self, tenant: str, job_id: str) -> JobRecord:
        record = await self.get_job(tenant, job_id)
        if record.state.finished:
            # Said here, from the row read in the pool: the job manager would read the store
            # again, on the loop, for a job that is no longer live.
            raise FailedPreconditionError(
                f"job_id: job {job_id} is {record.state.value}; not cancellable"
            )
        return await self._jobs.cancel(job_id)


def _check_owner(owner: str, tenant: str, not_found_message: str) -> None:
    """Another tenant's record is reported exactly as a missing one."""
    if owner != tenant:
        raise NotFoundError(not_found_message)
