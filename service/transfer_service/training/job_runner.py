"""One run of a claimed job, on a training thread: from the claim to its end. The run ends the
job (SUCCEEDED with its head, FAILED, CANCELLED), or stops without ending it: released back
to the queue when the server stops (it runs again from the start, here or on another
replica), or detached when a later run took the job over (its lease was lost). Every write is
fenced by the run's attempt (job_events.py), so a run that lost its job writes nothing more.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, replace

import torch

from transfer_service.backbones.cache import BackboneCache
from transfer_service.domain import (
    EventPayload,
    HeadRecord,
    JobCancelled,
    JobCompleted,
    JobEvent,
    JobFailed,
    JobState,
    JobWarning,
)
from transfer_service.errors import JobCancelledError, LeaseLostError, ServiceError
from transfer_service.heads import HeadCache, LoadedHead, head_weights
from transfer_service.store.interface import Store
from transfer_service.torch_threads import run_in_fresh_thread
from transfer_service.training.job_events import JobEventLog, LiveJob, utc_now
from transfer_service.training.selection import select_backbone
from transfer_service.training.trainer import Trainer, TrainingResult

log = logging.getLogger(__name__)

RESTARTED_WARNING = "restarted"
REQUEUED_WARNING = "requeued"


@dataclass(frozen=True, slots=True)
class JobHooks:
    """Observers for metrics; all optional."""

    on_state: Callable[[JobState, JobState | None], None] = lambda new, old: None
    on_step: Callable[[float], None] = lambda seconds: None
    on_epoch: Callable[[float, int], None] = lambda seconds, examples: None
    on_finished: Callable[[str, HeadRecord | None], None] = lambda outcome, head: None


class JobRunner:
    def __init__(
        self,
        store: Store,
        backbones: BackboneCache,
        heads: HeadCache,
        events: JobEventLog,
        hooks: JobHooks,
        *,
        feature_cache_bytes: int,
        max_attempts: int,
        intra_op_threads: int,
        fresh_thread_per_job: bool,
        while_training: Callable[[], AbstractContextManager[None]],
        replica: str,
    ) -> None:
        self._store = store
        self._backbones = backbones
        self._heads = heads
        self._events = events
        self._hooks = hooks
        self._feature_cache_bytes = feature_cache_bytes
        self._max_attempts = max_attempts
        self._intra_op_threads = intra_op_threads
        self._fresh_thread_per_job = fresh_thread_per_job
        self._while_training = while_training
        self._replica = replica

    def run_on_job_thread(self, live: LiveJob) -> None:
        """Runs the job here, or on a fresh thread of its own (fresh_thread_per_job: its
        OpenMP team ends with the job; transfer_service.torch_threads)."""
        if not self._fresh_thread_per_job:
            self.run(live)
            return
        with self._while_training():
            run_in_fresh_thread(
                lambda: self.run(live), f"job-{live.record.job_id}", self._intra_op_threads
            )

    def run(self, live: LiveJob) -> None:
        """Runs the claimed job to an end or a release, whatever fails on the way (a store
        that cannot take its RUNNING row, a bug): a run never leaves its job hanging."""
        try:
            self._run_job(live)
        except LeaseLostError:
            self._lost(live)
        except Exception as exc:
            if not live.active:
                raise
            log.exception("job %s failed outside training", live.record.job_id)
            if isinstance(exc, ServiceError):
                payload = JobFailed(exc.message, exc.status_name)
            else:
                reason = f"internal error (job {live.record.job_id}); the server log has details"
                payload = JobFailed(reason, "INTERNAL")
            self._finish(live, JobState.FAILED, payload)

    def fail_unrunnable(self, live: LiveJob) -> None:
        """A job stored without its examples (by an older server version) cannot run again."""
        reason = (
            "the server stopped while this job was queued or running, and it was stored "
            "without its examples (by an older server version), so it cannot run again; "
            "submit it again"
        )
        self._finish(live, JobState.FAILED, JobFailed(reason, "ABORTED"))

    def _run_job(self, live: LiveJob) -> None:
        # The job's examples go to the trainer, which releases them once their features
        # exist; the live job (kept for a while after it ends) keeps none.
        spec = live.spec
        live.spec = spec.without_examples()
        if live.record.attempt > self._max_attempts:
            reason = (
                f"the server running this job stopped {live.record.attempt - 1} times before "
                "it finished (TRANSFER_JOB_MAX_ATTEMPTS); it is not run again, since it may be "
                "what stops the server. Check the job's examples and configuration"
            )
            self._finish(live, JobState.FAILED, JobFailed(reason, "ABORTED"))
            return
        if live.cancel.is_set() and not live.releasing:
            self._finish(live, JobState.CANCELLED, JobCancelled("cancelled before it started"))
            return
        self._set_state(live, JobState.RUNNING)
        if live.record.attempt > 1:
            self._events.emit(
                live,
                JobWarning(
                    RESTARTED_WARNING,
                    f"run {live.record.attempt}: the server running this job stopped before "
                    "it finished; it runs again from the start with the same seed",
                ),
            )
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
                self._events.retrying(self._store.save_job, replace(live.record))
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
            # Reserved now, not in the commit: the completed event stored with the head
            # names it. A commit that then fails leaves a gap in the versions, never a
            # version twice.
            version = self._events.retrying(
                self._store.reserve_head_version, spec.tenant, spec.head_name
            )
            record = HeadRecord(
                head_id=head_id,
                version=version,
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
                temperature=result.evaluation.temperature,
                evaluation=result.evaluation,
            )
            self._complete(live, record, weights, result)
        except LeaseLostError:
            raise
        except JobCancelledError as exc:
            if live.releasing:
                self._release(live)
                return
            self._hooks.on_finished("cancelled", None)
            self._finish(live, JobState.CANCELLED, JobCancelled(exc.message))
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
        fails the job instead (no head exists then); a later run holding the job
        (LeaseLostError) leaves it to that run."""
        old = live.record.state
        try:
            event = self._events.store_completion(
                live,
                JobCompleted(
                    record.head_id,
                    result.metrics,
                    result.evaluation.summary(),
                    head_version=record.version,
                ),
                record,
                weights,
            )
        except LeaseLostError:
            raise
        except ServiceError as exc:
            self._hooks.on_finished("failed", None)
            reason = f"the trained head could not be stored: {exc.message}"
            self._finish(live, JobState.FAILED, JobFailed(reason, exc.status_name))
            return
        self._heads.put(LoadedHead(record, result.head))
        self._hooks.on_finished("succeeded", record)
        self._hooks.on_state(JobState.SUCCEEDED, old)
        self._events.publish_soon(live, event)

    def _release(self, live: LiveJob) -> None:
        """The server is stopping: the job goes back to the queue, to run again from the
        start (its stream says so); its watchers here are told to watch it again."""
        with live.sequence_lock:
            event = JobEvent(
                live.record.job_id,
                live.record.last_sequence + 1,
                utc_now(),
                JobWarning(
                    REQUEUED_WARNING,
                    f"the server running this job ({self._replica}) is stopping; the job is "
                    "queued again and runs from the start on the next server to take it",
                ),
            )
            released = replace(
                live.record,
                state=JobState.QUEUED,
                last_sequence=event.sequence,
                updated_time=event.time,
            )
            # LeaseLostError: run() detaches.
            self._events.retrying(self._store.release_job, released, event)
            live.record = released
        old = JobState.RUNNING
        self._hooks.on_state(JobState.QUEUED, old)
        self._events.publish_soon(live, event)
        self._events.detach_soon(live)
        log.info("job %s released to the queue (server stopping)", live.record.job_id)

    def _lost(self, live: LiveJob) -> None:
        log.warning(
            "job %s: run %d lost the job to a later run (its lease ran out); it stops here",
            live.record.job_id,
            live.record.attempt,
        )
        self._events.detach_soon(live)

    def _set_state(self, live: LiveJob, state: JobState, error: str = "") -> None:
        old = live.record.state
        updated = replace(live.record, state=state, error=error, updated_time=utc_now())
        self._events.retrying(self._store.save_job, updated)  # fenced: LeaseLostError
        live.record = updated
        self._hooks.on_state(state, old)

    def _finish(self, live: LiveJob, state: JobState, payload: EventPayload) -> None:
        """Stores the final state and the terminal event together, then publishes; never
        raises (JobEventLog.store_end)."""
        old = live.record.state
        event = self._events.store_end(live, state, payload)
        if event is None:  # a later run holds the job
            return
        self._hooks.on_state(state, old)
        self._events.publish_soon(live, event)
