"""The blocking client's stream helpers: a watchdog for silent event streams, upload chunks
built on gRPC's sender thread, and a bounded wait for a server to be ready."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterator
from typing import Protocol

import grpc

from transfer_client._core import not_ready_message
from transfer_client.errors import UnavailableError
from transfer_client.proto import transfer_service_pb2 as pb


class EventStream(Protocol):
    """A server-streaming call as far as `JobEventStreams` uses it (the stubs leave `cancel`
    untyped)."""

    def __iter__(self) -> Iterator[pb.FineTuneEvent]: ...
    def cancel(self) -> bool: ...


class IdleWatchdog:
    """Cancels a stream that has received nothing for `seconds` (None: never): a blocking
    gRPC stream cannot be read with a timeout, so a thread watches the time of its last
    message instead. `fired` tells that cancel from any other."""

    def __init__(self, call: EventStream, seconds: float | None) -> None:
        self.fired = False
        self._call = call
        self._seconds = seconds
        self._last = time.monotonic()
        self._stopped = threading.Event()
        if seconds is not None:
            threading.Thread(target=self._watch, name="stream-idle", daemon=True).start()

    def touch(self) -> None:
        self._last = time.monotonic()

    def pause(self) -> None:
        self._last = math.inf  # until the next touch

    def stop(self) -> None:
        self._stopped.set()

    def _watch(self) -> None:
        assert self._seconds is not None
        while not self._stopped.wait(min(1.0, self._seconds / 4)):
            if time.monotonic() - self._last >= self._seconds:
                self.fired = True
                self._call.cancel()
                return


class GuardedRequests(Iterator[pb.UploadDatasetRequest]):
    """Upload chunks as gRPC's sender thread pulls them.

    If building a chunk fails (an unreadable file, say), ending the stream would make the
    server store a truncated dataset, and raising would leave gRPC to swap the error for an
    anonymous UNKNOWN status. So the call is cancelled instead, and the error kept for the
    caller's thread to raise.
    """

    def __init__(self, chunks: Iterator[pb.UploadDatasetRequest]) -> None:
        self._chunks = chunks
        self._call: grpc.Future[pb.UploadDatasetResponse] | None = None
        self._call_attached = threading.Event()
        self.error: Exception | None = None

    def attach(self, call: grpc.Future[pb.UploadDatasetResponse]) -> None:
        self._call = call
        self._call_attached.set()

    def __next__(self) -> pb.UploadDatasetRequest:
        try:
            return next(self._chunks)
        except StopIteration:
            raise
        except Exception as err:
            self.error = err
            # The sender thread can run before `future()` has returned the call to attach.
            self._call_attached.wait()
            if self._call is not None:
                self._call.cancel()
            raise StopIteration from None


def await_channel_ready(channel: grpc.Channel, seconds: float) -> None:
    """wait_for_ready for a stream, which has no deadline to end the wait: the channel must
    be ready within `seconds` (the client's call timeout, as a unary call's wait would end),
    else UnavailableError."""
    try:
        grpc.channel_ready_future(channel).result(timeout=seconds)
    except grpc.FutureTimeoutError:
        raise UnavailableError(not_ready_message(seconds)) from None
