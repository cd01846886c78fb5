"""Training jobs as a queue in the store. FineTune enqueues a job (its spec and examples
stored with it); every server process claims jobs while it has a free slot
(Store.claim_job), holds a lease on each while it runs it (job_leases.py), and runs it on a
training thread (job_runner.py). A process that dies stops renewing, and any other claims the
job once the lease runs out and runs it again from the start with the same seed; one that
stops gracefully puts its jobs back at once. The embedded store works the same way with one
process: a job interrupted by a stop or a crash runs again when the server comes back.

Streams: a job this process runs is followed in memory (job_events.py); any other job is
followed from its log in the store, woken by this process's own events and by the store's
notices from other processes (PostgreSQL NOTIFY), with a poll as the backstop.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import secrets
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, aclosing, nullcontext
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from functools import partial

from transfer_service.backbones.cache import BackboneCache
from transfer_service.domain import (
    ClaimedJob,
    FineTuneSpec,
    JobCancelled,
    JobEvent,
    JobQueued,
    JobRecord,
    JobState,
    TrainingConfig,
)
from transfer_service.errors import UnavailableError
from transfer_service.heads import HeadCache
from transfer_service.store.interface import Store
from transfer_service.torch_threads import use_intra_op_threads
from transfer_service.training.job_events import JobEventLog, LiveJob, utc_now
from transfer_service.training.job_leases import JobLeases, replica_name
from transfer_service.training.job_runner import JobHooks, JobRunner
from transfer_service.training.recovery import recover_jobs

__all__ = ["JobHooks", "JobManager"]

log = logging.getLogger(__name__)

_FINISHED_JOBS_KEPT_LIVE = 256
# How often an idle process looks for claimable jobs and a watcher re-reads a log it follows
# from the store, when no notice woke it (a lost NOTIFY, an expired lease nobody announces).
POLL_SECONDS = 1.0


class JobManager:
    def __init__(
        self,
        store: Store,
        backbones: BackboneCache,
        heads: HeadCache,
        *,
        max_running_jobs: int,
        max_jobs_per_tenant: int,
        feature_cache_bytes: int,
        intra_op_threads: int,
        fresh_thread_per_job: bool,
        hooks: JobHooks | None = None,
        progress_min_interval_seconds: float = 0.0,
        while_training: Callable[[], AbstractContextManager[None]] = nullcontext,
        lease_seconds: float = 30.0,
        max_attempts: int = 3,
    ) -> None:
        """`max_running_jobs`: the slots of this process (jobs it runs at once; the rest
        wait in the queue for any process's free slot). Mid-epoch progress events closer
        together than `progress_min_interval_seconds` are coalesced. A job's fresh thread runs
        inside `while_training()` (transfer_service.torch_threads.CpuShare.training). A job
        whose runs were cut off `max_attempts` times is failed, not run again."""
        self._events = JobEventLog(store, progress_min_interval_seconds, lease_seconds)
        self._events.on_published = self._wake
        self._store = store
        self._max_jobs_per_tenant = max_jobs_per_tenant
        self._hooks = hooks or JobHooks()
        self._slots = max_running_jobs
        # fresh_thread_per_job (transfer_service.torch_threads.jobs_train_on_fresh_threads):
        # these threads only start jobs and wait, and each job trains on a fresh thread of
        # its own. Otherwise jobs train on these long-lived threads, with the same torch CPU
        # thread count, and keep what torch caches per thread (cuDNN's execution plans).
        keep_count = partial(use_intra_op_threads, intra_op_threads)
        self._executor = ThreadPoolExecutor(
            max_running_jobs,
            thread_name_prefix="train",
            initializer=None if fresh_thread_per_job else keep_count,
        )
        self._live: dict[str, LiveJob] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lease = timedelta(seconds=lease_seconds)
        self._leases = JobLeases(store, self._live, lease_seconds, replica_name())
        self._runner = JobRunner(
            store,
            backbones,
            heads,
            self._events,
            self._hooks,
            feature_cache_bytes=feature_cache_bytes,
            max_attempts=max_attempts,
            intra_op_threads=intra_op_threads,
            fresh_thread_per_job=fresh_thread_per_job,
            while_training=while_training,
            replica=self._leases.owner,
        )
        self._tasks: list[asyncio.Task[None]] = []
        self._running = 0  # runs of this process in progress (its slots taken)
        self._claim_wanted = asyncio.Event()
        self._watchers: dict[str, set[asyncio.Event]] = {}
        self._accepting = True

    # ---- lifecycle ----

    def start(self) -> None:
        """Binds to the running loop, settles what a previous process left inconsistent
        (recovery.py), then claims and runs jobs, keeps this process's leases and listens
        for other processes' notices."""
        self._loop = asyncio.get_running_loop()
        self._events.bind(self._loop)
        sole_process = not self._store.holds_leases
        recover_jobs(self._store, sole_process=sole_process)
        loop = self._loop

        def on_events(job_id: str) -> None:
            loop.call_soon_threadsafe(self._wake, job_id)

        def on_queued() -> None:
            loop.call_soon_threadsafe(self._claim_wanted.set)

        def on_cancel(job_id: str) -> None:
            loop.call_soon_threadsafe(self._cancel_here, job_id)

        # Other processes' notices (PostgreSQL NOTIFY), on a thread of the store's.
        self._store.watch_jobs(on_events, on_queued, on_cancel)
        self._tasks = [
            self._loop.create_task(self._leases.run()),
            self._loop.create_task(self._claim_forever()),
        ]

    def begin_shutdown(self) -> None:
        """Stops claiming and accepting jobs, and asks this process's runs to stop at their
        next step and put their jobs back in the queue (they run again from the start on
        the next process to claim them); their watchers here are told to watch again."""
        self._accepting = False
        for live in self._live.values():
            if live.active:
                live.releasing = True
                live.cancel.set()
        self._claim_wanted.set()
        for job_id in list(self._watchers):  # store-following streams end UNAVAILABLE now
            self._wake(job_id)

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
            for task in self._tasks:  # the leases were renewed while the jobs were ending
                task.cancel()

    # ---- commands ----

    async def submit(self, spec: FineTuneSpec, request_id: str = "") -> JobRecord:
        """Queues a job for `spec.tenant`, who may have at most `max_jobs_per_tenant` queued
        or running at once across every process (RESOURCE_EXHAUSTED beyond; counted by the
        store). With a `request_id` the tenant already used for the same request, returns
        that job instead of queueing another (a FineTune retried after a lost connection)."""
        if not self._accepting:
            raise UnavailableError("the server is shutting down; no new jobs")
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
        stored: JobRecord = await asyncio.to_thread(
            self._store.enqueue_job,
            record,
            queued,
            spec,
            max_unfinished=self._max_jobs_per_tenant,
            request_key=request_id,
            request_digest=request_digest(spec) if request_id else "",
        )
        if stored.job_id == record.job_id:
            self._hooks.on_state(JobState.QUEUED, None)
            self._claim_wanted.set()
        return stored

    def get(self, job_id: str) -> JobRecord:
        live = self._live.get(job_id)
        if live is not None and not live.detached:
            return replace(live.record)
        return self._store.get_job(job_id)

    async def cancel(self, job_id: str) -> JobRecord:
        """Stops the job at its next step when this process runs it; else the store ends a
        queued job at once, or tells the process holding it (which stops it at its next step
        once notified, or at its next lease renewal)."""
        if self._cancel_here(job_id):
            return replace(self._live[job_id].record)
        event = JobEvent(job_id, 0, utc_now(), JobCancelled("cancelled before it started"))
        ended = await asyncio.to_thread(self._store.request_cancel, job_id, event)
        if ended is not None:
            self._hooks.on_state(JobState.CANCELLED, JobState.QUEUED)
            self._wake(job_id)
            return ended
        # Held: by another process, or by this one since the check above (a claim landed).
        self._cancel_here(job_id)
        return self.get(job_id)

    async def watch(self, job_id: str, after_sequence: int = 0) -> AsyncIterator[JobEvent]:
        """Events after `after_sequence`, then new ones, until the job's terminal event: in
        memory while this process runs the job, otherwise from the store's log."""
        last = after_sequence
        woken = asyncio.Event()
        self._watchers.setdefault(job_id, set()).add(woken)
        try:
            while True:
                live = self._live.get(job_id)
                if live is not None and not live.detached and last + 1 >= live.first_sequence:
                    # aclosing: a watcher that goes away unsubscribes at once.
                    async with aclosing(self._events.follow(live, last)) as events:
                        async for event in events:
                            yield event
                            last = event.sequence
                            if event.terminal:
                                return
                    continue  # the run detached: the rest of the log is in the store
                woken.clear()
                logged: list[JobEvent] = await asyncio.to_thread(
                    self._store.events_after, job_id, last
                )
                for event in logged:
                    yield event
                    last = event.sequence
                    if event.terminal:
                        return
                if logged:
                    continue
                if not self._accepting:
                    raise UnavailableError(
                        f"the server is shutting down; job {job_id} goes on: watch it again "
                        f"on another server with after_sequence {last}"
                    )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(woken.wait(), POLL_SECONDS)
        finally:
            watchers = self._watchers.get(job_id)
            if watchers is not None:
                watchers.discard(woken)
                if not watchers:
                    del self._watchers[job_id]

    # ---- on the loop ----

    def _wake(self, job_id: str) -> None:
        """New events in `job_id`'s log (or its run detached): its watchers read on."""
        for woken in self._watchers.get(job_id, ()):
            woken.set()

    def _cancel_here(self, job_id: str) -> bool:
        live = self._live.get(job_id)
        if live is None or not live.active:
            return False
        live.cancel.set()
        return True

    async def _claim_forever(self) -> None:
        """Claims jobs while a slot is free: at once when a job is queued here or a run ends,
        on another process's notice, and every POLL_SECONDS (expired leases are announced by
        nobody). A failing store (the database down) is logged and tried again."""
        while True:
            self._claim_wanted.clear()
            try:
                while self._accepting and self._running < self._slots:
                    until = datetime.now(UTC) + self._lease
                    claimed = await asyncio.to_thread(
                        self._store.claim_job, self._leases.owner, until
                    )
                    if claimed is None:
                        break
                    self._start_run(claimed)
            except UnavailableError as exc:  # the database down: one line, not a trace a second
                log.warning("claiming jobs: %s; trying again in %.0f s", exc.message, POLL_SECONDS)
            except Exception:
                log.exception("claiming jobs failed; trying again in %.0f s", POLL_SECONDS)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._claim_wanted.wait(), POLL_SECONDS)

    def _start_run(self, claimed: ClaimedJob) -> None:
        record = claimed.record
        # No spec: stored by a version that kept no examples with its jobs (it cannot run).
        spec = claimed.spec or FineTuneSpec(
            record.backbone, record.head_name, (), TrainingConfig(), tenant=record.tenant
        )
        live = LiveJob(record, spec, first_sequence=record.last_sequence + 1)
        self._live[record.job_id] = live
        self._prune_finished()
        self._running += 1
        assert self._loop is not None
        run = self._runner.run_on_job_thread if claimed.spec else self._runner.fail_unrunnable
        future = self._loop.run_in_executor(self._executor, run, live)
        future.add_done_callback(lambda _: self._run_ended())
        log.info("job %s claimed (run %d)", record.job_id, record.attempt)

    def _run_ended(self) -> None:
        self._running -= 1
        self._claim_wanted.set()

    def _prune_finished(self) -> None:
        ended = [job_id for job_id, live in self._live.items() if not live.active]
        for job_id in ended[: max(0, len(ended) - _FINISHED_JOBS_KEPT_LIVE)]:
            del self._live[job_id]


def request_digest(spec: FineTuneSpec) -> str:
    """What identifies a FineTune request for its idempotency key: everything the job
    trains on, examples included (a key reused for other examples is refused)."""
    digest = hashlib.sha256()
    digest.update(repr((spec.backbone, spec.head_name, spec.config, spec.tenant)).encode())
    digest.update(repr(spec.candidate_backbones).encode())
    for split in (spec.examples, spec.validation_examples):
        digest.update(b"\x00split")
        for example in split:
            for part in (example.label, example.input.text or "", example.input.image or b""):
                data = part.encode() if isinstance(part, str) else part
                digest.update(len(data).to_bytes(8, "big"))
                digest.update(data)
    return digest.hexdigest()
