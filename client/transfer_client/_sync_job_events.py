"""The blocking client's job event streams (`fine_tune`, `train`, `watch_job`,
`job_history`), followed across broken connections: the FineTune is sent again until its
first event names the job, then WatchJob picks up after the last event seen."""

from __future__ import annotations

import time
from collections.abc import Generator
from dataclasses import dataclass

import grpc

from transfer_client import _core as core
from transfer_client._core import translated_errors
from transfer_client._sync_streams import EventStream, IdleWatchdog, await_channel_ready
from transfer_client.errors import TransferError
from transfer_client.proto import transfer_service_pb2 as pb
from transfer_client.proto import transfer_service_pb2_grpc as pb_grpc
from transfer_client.types import FineTuneEvent


@dataclass(frozen=True, slots=True)
class JobEventStreams:
    """Opens and follows a job's event streams with the client's channel and call options."""

    channel: grpc.Channel
    stub: pb_grpc.TransferServiceStub
    metadata: tuple[tuple[str, str], ...]
    wait_for_ready: bool | None
    timeout: float | None
    reattach_seconds: float
    stream_idle_seconds: float | None

    def followed(
        self, reattach: core.Reattach, fine_tune: pb.FineTuneRequest | None
    ) -> Generator[FineTuneEvent]:
        """A job's events across broken streams: the FineTune (sent again, same request,
        until its first event names the job) or WatchJob from the last event seen."""
        while True:
            call = self._open(reattach, fine_tune)
            watchdog = IdleWatchdog(call, self.stream_idle_seconds)
            try:
                with translated_errors():
                    for message in call:
                        watchdog.touch()
                        event = core.event_from_pb(message)
                        if event is not None and reattach.is_new(event):
                            watchdog.pause()  # the caller's time with the event is not idle
                            yield event
                            watchdog.touch()
                return
            except TransferError as caught:
                error = caught
                if watchdog.fired:  # our own cancel: the stream went silent
                    assert self.stream_idle_seconds is not None
                    error = core.stream_idle(self.stream_idle_seconds)
                delay = reattach.delay(error)
                if delay is None:
                    if error is caught:
                        raise
                    raise error from caught
                time.sleep(delay)
            finally:
                watchdog.stop()
                # Ends the stream when the caller stops early; the job itself keeps running.
                call.cancel()

    def _open(self, reattach: core.Reattach, fine_tune: pb.FineTuneRequest | None) -> EventStream:
        if reattach.job_id:
            return self.stub.WatchJob(
                reattach.watch_request(),
                metadata=self.metadata,
                wait_for_ready=None if reattach.broken else self.wait_for_ready,
            )
        assert fine_tune is not None
        if self.wait_for_ready and not reattach.broken:
            await_channel_ready(
                self.channel, core.ready_wait_seconds(self.timeout, self.reattach_seconds)
            )
        return self.stub.FineTune(
            fine_tune,
            metadata=self.metadata,
            # After a break the loop does the waiting, within reattach_seconds: a stream has
            # no deadline, so one waiting for the server to be ready would never end.
            wait_for_ready=None if reattach.broken else self.wait_for_ready,
        )
