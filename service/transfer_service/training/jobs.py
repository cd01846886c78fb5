"""Training jobs: queued on a worker pool, observed through an ordered event log
(job_events.py: numbered per job, persisted, then fanned out to watchers). A job's final
state and its terminal event are stored in one transaction. On start, recovery (recovery.py)
settles what a previous process left unfinished.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, aclosing, nullcontext
from dataclasses import dataclass, replace
from functools import partial

import torch

from transfer_service.backbones.cache import BackboneCache
from transfer_service.domain import (
    EventPayload,
    FineTuneSpec,
    HeadRecord,
    JobCancelled,
    JobCompleted,
    JobEvent,
    JobFailed,
    JobQueued,
    JobRecord,
    JobState,
)
from transfer_service.errors import (
    FailedPreconditionError,
    JobCancelledError,
    ResourceExhaustedError,
    ServiceError,
    UnavailableError,
)
from transfer_service.heads import HeadCache, LoadedHead, head_weights
from transfer_service.store.interface import Store
from transfer_service.torch_threads import run_in_fresh_thread, use_intra_op_threads
from transfer_service.training.job_events import JobEventLog, LiveJob, utc_now
from transfer_service.training.job_leases import JobLeases
from transfer_service.training.recovery import recover_jobs
from transfer_service.training.selection import select_backbone
from transfer_service.training.trainer import Trainer, TrainingResult

log = logging.getLogger(__name__)

_FINISHED_JOBS_KEPT_LIVE = 256


@dataclass(frozen=True, slots=True)
class JobHooks:
    """Observers for metrics; all optional."""

    on_state: Callable[[JobState, JobState | None], None] = lambda new, old: None
    on_step: Callable[[float], None] = lambda seconds: None
    on_epoch: Callable[[float, float], None] = lambda seconds, examples_per_second: None
    on_finished: Callable[[str, HeadRecord | None], None] = lambda outcome, head: None


class JobManager:
    def __init__(
        self,
        store: Store,
        backbones: BackboneCache,
        heads: HeadCache,
        *,
        max_concurrent_jobs: int,
        max_jobs_per_tenant: int,
        feature_cache_bytes: int,
        intra_op_threads: int,
        fresh_thread_per_job: bool,
        hooks: JobHooks | None = None,
        progress_min_interval_seconds: float = 0.0,
        while_training: Callable[[], AbstractContextManager[None]] = nullcontext,
        lease_seconds: float = 30.0,
    ) -> None:
        """Mid-epoch progress events closer together than `progress_min_interval_seconds`
        are coalesced: GetJob still shows the newest, the stream gets at most one per
        interval (epoch ends, warnings and terminal events always go out). A job's fresh
        thread runs inside `while_training()` (transfer_service.torch_threads.CpuShare.training)."""
        self._events = JobEventLog(store, progress_min_interval_seconds)
        self._store = store
        self._backbones = backbones
        self._heads = heads
        self._feature_cache_bytes = feature_cache_bytes
        self._max_jobs_per_tenant = max_jobs_per_tenant
        self._hooks = hooks or JobHooks()
        self._intra_op_threads = intra_op_threads
        # fresh_thread_per_job (transfer_service.torch_threads.jobs_train_on_fresh_threads): these
        # threads only queue jobs and wait, and each job trains on a fresh thread of its own,
        # whose OpenMP team ends with the job. Otherwise jobs train on these long-lived
        # threads themselves, with the same torch CPU thread count, and keep what torch caches
        # per thread (cuDNN's execution plans) from one job to the next.
        self._fresh_thread_per_job = fresh_thread_per_job
        self._while_training = while_training
        keep_count = partial(use_intra_op_threads, intra_op_threads)
        self._executor = ThreadPoolExecutor(
            max_concurrent_jobs,
            thread_name_prefix="train",
            initializer=None if fresh_thread_per_job else keep_count,
        )
        self._live: dict[str, LiveJob] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._leases = JobLeases(store, self._live, lease_seconds)
        self._renewing: asyncio.Task[None] | None = None
        self._accepting = True

    # ---- lifecycle ----

    def start(self) -> None:
        """Binds to the running loop and settles jobs a previous process left unfinished
        (in a store replicas share, only those whose lease expired; then keeps this
        replica's leases, job_leases.py)."""
        self._loop = asyncio.get_running_loop()
        self._events.bind(self._loop)
        if not self._store.holds_leases:
            recover_jobs(self._store)
            return
        self._renewing = self._loop.create_task(self._leases.run())

    def holds(self, job_id: str) -> bool:
        return job_id in self._live  # live in this process

    def begin_shutdown(self) -> None:
        """Stops accepting jobs and asks queued and running ones to stop at their next step
        (they end CANCELLED, their events saved), so their streams can close."""
        self._accepting = False
        for live in self._live.values():
            if not live.record.state.finished:
                live.cancel.set()

    async def shutdown(self, grace_seconds: float) -> None:
        """begin_shutdown, then waits up to `grace_seconds` for the training threads."""
        self.begin_shutdown()
        loop = asyncio.get_running_loop()
        try:
            await asyncio.wait_for(
                loop.run_in_executor(None, lambda: self._executor.shutdown(wait=True)),
                timeout=max(grace_seconds, 0.1),
            )
        finally:
            if self._renewing is not None:  # renewed while the jobs were ending
                self._renewing.cancel()

    # ---- commands ----

    async def submit(self, spec: FineTuneSpec) -> JobRecord:
        """Queues a job for `spec.tenant`, who may have at most `max_jobs_per_tenant` queued or
        running at once (RESOURCE_EXHAUSTED beyond). The slot is counted and taken on the
        event loop, so two submits cannot both take the last one; the job's row and its
        queued event are written off the loop (fsynced commits, which may wait behind a
        dataset upload), and a failed write gives the slot back."""
        if not self._accepting:
            raise UnavailableError("the server is shutting down; no new jobs")
        if self.unfinished_count(spec.tenant) >= self._max_jobs_per_tenant:
            raise ResourceExhaustedError(
                f"jobs: {self._max_jobs_per_tenant} jobs already queued or running for this "
                "tenant; wait for one to finish or cancel one"
            )
        now = utc_now()
        record = JobRecord(
            job_id="job-" + secrets.token_hex(8),
            state=JobState.QUEUED,
            backbone=spec.backbone,
            head_name=spec.head_name,
            created_time=now,
            updated_time=now,
            tenant=spec.tenant,
            last_sequence=1,
        )
        # The first event names the job at once, before it waits for a slot: a caller whose
        # stream breaks meanwhile can still watch or cancel it.
        queued = JobEvent(record.job_id, 1, now, JobQueued(spec.backbone, spec.head_name))
        live = LiveJob(record, spec, events=[queued])
        self._live[record.job_id] = live
        try:
            await asyncio.to_thread(self._store_queued, record, queued)
        except BaseException:
            del self._live[record.job_id]
            raise
        self._prune_finished()
        self._hooks.on_state(JobState.QUEUED, None)
        assert self._loop is not None, "JobManager.start() was not called"
        self._loop.run_in_executor(self._executor, self._run_on_job_thread, live)
        return replace(record)

    def _store_queued(self, record: JobRecord, queued: JobEvent) -> None:
        self._store.save_job(record)
        try:
            self._store.append_event(queued)
            # This replica's lease from the start: a kill before the next renewal then
            # leaves the job to others after one lease, not the row's initial one.
            self._leases.hold_now([record.job_id])
        except BaseException:
            with contextlib.suppress(Exception):  # the store is failing; recovery settles it
                self._store.save_job(replace(record, state=JobState.FAILED, error="not stored"))
            raise

    def unfinished_count(self, tenant: str) -> int:
        """Jobs of `tenant` queued or running in this process."""
        return sum(
            1
            for live in self._live.values()
            if live.record.tenant == tenant and not live.record.state.finished
        )

    def get(self, job_id: str) -> JobRecord:
        live = self._live.get(job_id)
        if live is not None:
            return replace(live.record)
        return self._store.get_job(job_id)

    def list(self) -> list[JobRecord]:
        return self._store.list_jobs()

    def cancel(self, job_id: str) -> JobRecord:
        live = self._live.get(job_id)
        if live is None:
            record = self._store.get_job(job_id)  # NOT_FOUND for unknown ids
            raise FailedPreconditionError(
                f"job_id: job {job_id} is {record.state.value}; not cancellable"
            )
        if live.record.state.finished:
            raise FailedPreconditionError(
                f"job_id: job {job_id} is {live.record.state.value}; not cancellable"
            )
        live.cancel.set()
        return replace(live.record)

    async def watch(self, job_id: str, after_sequence: int = 0) -> AsyncIterator[JobEvent]:
        """Events after `after_sequence`, then live ones, until the job's terminal event."""
        live = self._live.get(job_id)
        if live is None:
            self._store.get_job(job_id)  # NOT_FOUND for unknown ids
            for event in self._store.events_after(job_id, after_sequence):
                yield event
            return
        # aclosing: a watcher that goes away unsubscribes at once, not when collected.
        async with aclosing(self._events.follow(live, after_sequence)) as events:
            async for event in events:
                yield event

    # ---- the worker side (runs in a training thread) ----

    def _run_on_job_thread(self, live: LiveJob) -> None:
        """Runs the job here, or on a fresh thread of its own (fresh_thread_per_job)."""
        if not self._fresh_thread_per_job:
            self._run(live)
            return
        with self._while_training():
            run_in_fresh_thread(
                lambda: self._run(live), f"job-{live.record.job_id}", self._intra_op_threads
            )

    def _run(self, live: LiveJob) -> None:
        """Runs the job to a terminal state, whatever fails on the way (a store that cannot
        take its RUNNING row, a bug): a job never stays queued or running in memory."""
        try:
            self._run_job(live)
        except Exception as exc:
            if live.record.state.finished:
                raise
            log.exception("job %s failed outside training", live.record.job_id)
            if isinstance(exc, ServiceError):
                payload = JobFailed(exc.message, exc.status_name)
            else:
                reason = f"internal error (job {live.record.job_id}); the server log has details"
                payload = JobFailed(reason, "INTERNAL")
            self._finish(live, JobState.FAILED, payload)

    def _run_job(self, live: LiveJob) -> None:
        # The job's examples go to the trainer, which releases them once their features
        # exist; the live job (kept for a while after it ends) keeps none.
        spec = live.spec
        live.spec = spec.without_examples()
        if live.cancel.is_set():
            self._finish(live, JobState.CANCELLED, JobCancelled("cancelled before it started"))
            return
        self._set_state(live, JobState.RUNNING)
        try:
            if spec.candidate_backbones:
                chosen = select_backbone(
                    spec.candidate_backbones,
                    self._backbones.get,
                    spec,
                    lambda payload: self._events.emit(live, payload),
                    live.cancel,
                    self._feature_cache_bytes,
                )
                spec = replace(spec, backbone=chosen, candidate_backbones=())
                live.spec = spec.without_examples()
                live.record.backbone = chosen
                self._store.save_job(live.record)
            backbone = self._backbones.get(spec.backbone)
            trainer = Trainer(
                backbone,
                spec,
                feature_cache_bytes=self._feature_cache_bytes,
                emit=lambda payload: self._events.emit(live, payload),
                cancelled=live.cancel,
                on_step=self._hooks.on_step,
                on_epoch=self._hooks.on_epoch,
            )
            spec = live.spec  # from here on only the trainer holds the examples
            result = trainer.run()
            del trainer
            head_id = f"{spec.head_name}-{secrets.token_hex(4)}"
            weights = head_weights(result.head)
            record = HeadRecord(
                head_id=head_id,
                name=spec.head_name,
                backbone=spec.backbone,
                modality=backbone.spec.modality,
                class_names=result.class_names,
                trainable_blocks=spec.config.trainable_blocks,
                input_size=backbone.preprocessor.input_size,
                hidden_dim=spec.config.hidden_dim,
                head_type=spec.config.head_type,
                metrics=result.metrics,
                config=spec.config,
                created_time=utc_now(),
                size_bytes=sum(t.numel() * t.element_size() for t in weights.values()),
                job_id=live.record.job_id,
                tenant=spec.tenant,
            )
            self._complete(live, record, weights, result)
        except JobCancelledError as exc:
            self._hooks.on_finished("cancelled", None)
            reason = exc.message if self._accepting else "the server shut down during training"
            self._finish(live, JobState.CANCELLED, JobCancelled(reason))
        except ServiceError as exc:
            self._hooks.on_finished("failed", None)
            self._finish(live, JobState.FAILED, JobFailed(exc.message, exc.status_name))
        except torch.OutOfMemoryError:
            self._hooks.on_finished("failed", None)
            reason = "out of accelerator memory; try a smaller batch_size or fewer trainable_blocks"
            self._finish(live, JobState.FAILED, JobFailed(reason, "RESOURCE_EXHAUSTED"))
        except Exception:
            log.exception("job %s failed", live.record.job_id)
            self._hooks.on_finished("failed", None)
            reason = f"internal error (job {live.record.job_id}); the server log has details"
            self._finish(live, JobState.FAILED, JobFailed(reason, "INTERNAL"))
        finally:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    def _complete(
        self,
        live: LiveJob,
        record: HeadRecord,
        weights: dict[str, torch.Tensor],
        result: TrainingResult,
    ) -> None:
        """Durable first: the head, SUCCEEDED and the completed event commit together, and
        only then is the event sent and the head served. A store that refuses the commit
        fails the job instead (no head exists then)."""
        old = live.record.state
        try:
            event = self._events.store_completion(
                live, JobCompleted(record.head_id, result.metrics), record, weights
            )
        except ServiceError as exc:
            self._hooks.on_finished("failed", None)
            reason = f"the trained head could not be stored: {exc.message}"
            self._finish(live, JobState.FAILED, JobFailed(reason, exc.status_name))
            return
        self._heads.put(LoadedHead(record, result.head))
        self._hooks.on_finished("succeeded", record)
        self._hooks.on_state(JobState.SUCCEEDED, old)
        self._events.publish_soon(live, event)

    def _set_state(self, live: LiveJob, state: JobState, error: str = "") -> None:
        old = live.record.state
        live.record.state = state
        live.record.error = error
        live.record.updated_time = utc_now()
        self._store.save_job(live.record)
        self._hooks.on_state(state, old)

    def _finish(self, live: LiveJob, state: JobState, payload: EventPayload) -> None:
        """Stores the final state and the terminal event together, then publishes; never
        raises (JobEventLog.store_end)."""
        old = live.record.state
        event = self._events.store_end(live, state, payload)
        self._hooks.on_state(state, old)
        self._events.publish_soon(live, event)

    def _prune_finished(self) -> None:
        finished = [job_id for job_id, live in self._live.items() if live.record.state.finished]
        for job_id in finished[: max(0, len(finished) - _FINISHED_JOBS_KEPT_LIVE)]:
            del self._live[job_id]
