"""Each live job's ordered event log: events numbered per job, persisted before they are
published, and fanned out on the event loop to the job's watchers.

Publishing runs on the event loop, so a watcher that replays the log and then subscribes (in
one loop step) never misses or repeats an event. A watcher that goes away only drops its
subscription; the job runs on.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime

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
from transfer_service.store.interface import Store

log = logging.getLogger(__name__)


@dataclass(slots=True)
class LiveJob:
    """A job of this process (queued, running, or finished and still kept for its watchers):
    its record, its events so far and the queues of those watching it."""

    record: JobRecord
    spec: FineTuneSpec
    cancel: threading.Event = field(default_factory=threading.Event)
    events: list[JobEvent] = field(default_factory=list)
    subscribers: set[asyncio.Queue[JobEvent]] = field(default_factory=set)
    sequence_lock: threading.Lock = field(default_factory=threading.Lock)
    last_step_event: float = -float("inf")  # time.monotonic() of the last mid-epoch event


class JobEventLog:
    """Appends live jobs' events (from training threads) and streams them (on the loop)."""

    def __init__(self, store: Store, progress_min_interval_seconds: float) -> None:
        """Mid-epoch progress events closer together than `progress_min_interval_seconds`
        are coalesced: the job's record still shows the newest, the stream gets at most one
        per interval (epoch ends, warnings and terminal events always go out)."""
        self._store = store
        self._progress_min_interval = progress_min_interval_seconds
        self._loop: asyncio.AbstractEventLoop | None = None

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
            if isinstance(payload, TrainingProgress):
                # Mid-epoch events skip the job row (it is rewritten at the epoch's end).
                self._store.append_progress(event, None if mid_epoch else live.record)
            else:
                self._store.append_event(event)
                self._store.save_job(live.record)
        self.publish_soon(live, event)

    def store_end(self, live: LiveJob, state: JobState, payload: EventPayload) -> JobEvent:
        """Ends the job in `state` with the terminal event `payload`: the final state and the
        event are stored in one transaction (a kill between two writes would leave a finished
        job whose event log never ends); returns the event, to publish.

        Never raises: when the store cannot take them (a full disk), the job still ends here
        in memory, so its stream closes, CancelJob answers, and its tenant's quota slot is
        free; the stored row stays unfinished and the next start settles it (recovery.py)."""
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
                self._store.finish_job(finished, event)
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
            self._store.complete_job(finished, event, head, weights)
            live.record = finished
        return event

    def publish_soon(self, live: LiveJob, event: JobEvent) -> None:
        """Hands a stored event to the loop, which appends it to the live log and fans it out."""
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._publish, live, event)

    async def follow(self, live: LiveJob, after_sequence: int) -> AsyncGenerator[JobEvent, None]:
        """`live`'s events after `after_sequence`, then new ones, until its terminal event."""
        queue: asyncio.Queue[JobEvent] = asyncio.Queue()
        # Replay and subscribe in one loop step: publishing also runs on the loop.
        backlog = [event for event in live.events if event.sequence > after_sequence]
        live.subscribers.add(queue)
        try:
            for event in backlog:
                yield event
                if event.terminal:
                    return
            if live.events and live.events[-1].terminal:
                return
            while True:
                event = await queue.get()
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


def utc_now() -> datetime:
    return datetime.now(UTC)
