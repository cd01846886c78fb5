"""Each live job's ordered event log: events numbered per job, persisted before they are
published, and fanned out on the event loop to the job's watchers.

Publishing runs on the event loop, so a watcher that replays the log and then subscribes (in
one loop step) never misses or repeats an event. A watcher that goes away only drops its
subscription; the job runs on. A run that stops here without ending its job (released to the
queue at shutdown, or taken over after its lease was lost) detaches: its watchers' follow
ends, and they go on reading the job's log from the store (training/job_watch.py).

Every write of a run carries its attempt (the store's fencing token): once a later run holds
the job, the store refuses them (LeaseLostError) and this run detaches without writing more.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import TypeVar

import torch

from transfer_service.domain import (
    EventPayload,
    FineTuneSpec,
    HeadRecord,
    JobCancelled,
    JobCompleted,
    JobEvent,
    JobFailed,
    JobRecord,
    JobState,
    TrainingProgress,
)
from transfer_service.errors import LeaseLostError, UnavailableError
from transfer_service.store.interface import Store

T = TypeVar("T")

log = logging.getLogger(__name__)

# Backoff of a job write retried through a database outage (JobEventLog.retrying).
_FIRST_RETRY_PAUSE = 0.2
_MAX_RETRY_PAUSE = 2.0


@dataclass(slots=True)
class LiveJob:
    """A job of this process (queued, running, or finished and still kept for its watchers):
    its record, its events so far and the queues of those watching it."""

    record: JobRecord
    spec: FineTuneSpec
    cancel: threading.Event = field(default_factory=threading.Event)
    # This run's events as published (those before `first_sequence` are in the store only).
    events: list[JobEvent] = field(default_factory=list)
    subscribers: set[asyncio.Queue[JobEvent | None]] = field(default_factory=set)
    sequence_lock: threading.Lock = field(default_factory=threading.Lock)
    last_step_event: float = -float("inf")  # time.monotonic() of the last mid-epoch event
    first_sequence: int = 1
    # Set with `cancel` when the server stops: the run puts the job back in the queue
    # instead of cancelling it.
    releasing: bool = False
    # The run stopped without ending the job (released, or its lease lost): set on the loop.
    detached: bool = False

    @property
    def active(self) -> bool:
        """Whether this run still owns the job: not ended, not detached."""
        return not self.detached and not self.record.state.finished


class JobEventLog:
    """Appends live jobs' events (from training threads) and streams them (on the loop)."""

    def __init__(
        self, store: Store, progress_min_interval_seconds: float, outage_seconds: float = 0.0
    ) -> None:
        """Mid-epoch progress events closer together than `progress_min_interval_seconds`
        are coalesced: the job's record still shows the newest, the stream gets at most one
        per interval (epoch ends, warnings and terminal events always go out). A write the
        store refuses as unavailable (the database restarting) is retried for up to
        `outage_seconds` (a lease: after that another process may hold the job)."""
        self._store = store
        self._outage_seconds = outage_seconds
        self._progress_min_interval = progress_min_interval_seconds
        self._loop: asyncio.AbstractEventLoop | None = None
        # Called on the loop after each publish (wakes the job's store-following watchers).
        self.on_published: Callable[[str], None] = lambda job_id: None

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """Publishes on `loop` from now on."""
        self._loop = loop

    def emit(self, live: LiveJob, payload: EventPayload) -> None:
        """Numbers, stores and publishes a non-terminal event (any thread)."""
        mid_epoch = isinstance(payload, TrainingProgress) and not payload.epoch_end
        coalescable = isinstance(payload, TrainingProgress) and payload.supersedes_previous
        with live.sequence_lock:
            if isinstance(payload, TrainingProgress):
                live.record.progress = payload
            if coalescable:
                # A person reads a few updates a second; a 1 ms step streamed every step
                # spent 58% of training on events (bench/RESULTS.md, benchmark 5).
                now = time.monotonic()
                if now - live.last_step_event < self._progress_min_interval:
                    return
                live.last_step_event = now
            sequence = live.record.last_sequence + 1
            event = JobEvent(live.record.job_id, sequence, utc_now(), payload)
            live.record.last_sequence = sequence
            live.record.updated_time = event.time
            attempt = live.record.attempt
            if isinstance(payload, TrainingProgress):
                # Mid-epoch events skip the job row (it is rewritten at the epoch's end).
                row = None if mid_epoch else replace(live.record)
                self.retrying(self._store.append_progress, event, row, attempt=attempt)
            else:
                self.retrying(self._store.append_event, event, attempt=attempt)
                self.retrying(self._store.save_job, replace(live.record))
        self.publish_soon(live, event)

    def store_end(self, live: LiveJob, state: JobState, payload: EventPayload) -> JobEvent | None:
        """Ends the job in `state` with the terminal event `payload`: the final state and the
        event are stored in one transaction (a kill between two writes would leave a finished
        job whose event log never ends); returns the event, to publish, or None when a later
        run holds the job (LeaseLostError: this run detaches, ending nothing).

        Otherwise never raises: when the store cannot take them (a full disk), the job still
        ends here in memory, so its stream closes and CancelJob answers; the stored row stays
        unfinished, and the job runs again once its lease runs out."""
        error = payload.reason if isinstance(payload, JobFailed | JobCancelled) else ""
        with live.sequence_lock:
            event = JobEvent(live.record.job_id, live.record.last_sequence + 1, utc_now(), payload)
            finished = replace(
                live.record,
                state=state,
                error=error,
                last_sequence=event.sequence,
                updated_time=event.time,
            )
            try:
                self.retrying(self._store.finish_job, finished, event)
            except LeaseLostError:
                log.warning(
                    "job %s: run %d no longer holds the job (its lease ran out and another "
                    "run took it over); it stops without ending it",
                    live.record.job_id,
                    live.record.attempt,
                )
                self.detach_soon(live)
                return None
            except Exception:
                log.exception(
                    "job %s: its end (%s) could not be stored; it ends in memory only",
                    live.record.job_id,
                    state.value,
                )
            live.record = finished
        return event

    def store_completion(
        self,
        live: LiveJob,
        payload: JobCompleted,
        head: HeadRecord,
        weights: dict[str, torch.Tensor],
    ) -> JobEvent:
        """Ends the job SUCCEEDED: its head, final row and `completed` event in one store
        commit (Store.complete_job); returns the event, to publish. Raises when the store
        refuses it, leaving the job as it was (the caller then fails it with store_end)."""
        with live.sequence_lock:
            event = JobEvent(live.record.job_id, live.record.last_sequence + 1, utc_now(), payload)
            finished = replace(
                live.record,
                state=JobState.SUCCEEDED,
                error="",
                head_id=head.head_id,
                last_sequence=event.sequence,
                updated_time=event.time,
            )
            self.retrying(self._store.complete_job, finished, event, head, weights)
            live.record = finished
        return event

    def retrying(self, write: Callable[..., T], *args: object, **kwargs: object) -> T:
        """`write(*args, **kwargs)`, tried again while the store answers UnavailableError (a
        database restart), with backoff, for up to `outage_seconds`; then that error."""
        deadline = time.monotonic() + self._outage_seconds
        pause = _FIRST_RETRY_PAUSE
        while True:
            try:
                return write(*args, **kwargs)
            except UnavailableError:
                if time.monotonic() + pause > deadline:
                    raise
                log.warning("the store is unavailable; retrying a job write in %.1f s", pause)
                time.sleep(pause)
                pause = min(pause * 2, _MAX_RETRY_PAUSE)

    def detach_soon(self, live: LiveJob) -> None:
        """The run stopped without ending the job: its watchers' follow ends (on the loop)."""
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._detach, live)

    def publish_soon(self, live: LiveJob, event: JobEvent) -> None:
        """Hands a stored event to the loop, which appends it to the live log and fans it out."""
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._publish, live, event)

    async def follow(self, live: LiveJob, after_sequence: int) -> AsyncGenerator[JobEvent, None]:
        """`live`'s events after `after_sequence`, then new ones, until its terminal event or
        until the run detaches (then the rest of the job's log is in the store)."""
        queue: asyncio.Queue[JobEvent | None] = asyncio.Queue()
        # Replay and subscribe in one loop step: publishing also runs on the loop.
        backlog = [event for event in live.events if event.sequence > after_sequence]
        live.subscribers.add(queue)
        try:
            for event in backlog:
                yield event
                if event.terminal:
                    return
            if (live.events and live.events[-1].terminal) or live.detached:
                return
            while True:
                published = await queue.get()
                if published is None:  # detached
                    return
                event = published
                if event.sequence <= after_sequence:
                    continue
                yield event
                if event.terminal:
                    return
        finally:
            live.subscribers.discard(queue)

    def _publish(self, live: LiveJob, event: JobEvent) -> None:
        live.events.append(event)
        for queue in live.subscribers:
            queue.put_nowait(event)
        self.on_published(live.record.job_id)

    def _detach(self, live: LiveJob) -> None:
        live.detached = True
        for queue in live.subscribers:
            queue.put_nowait(None)
        self.on_published(live.record.job_id)


def utc_now() -> datetime:
    return datetime.now(UTC)
