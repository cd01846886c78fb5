"""What both clients' public surface shares word for word: the constructor and `fine_tune`.
Their signatures are the API, so they are written once; each client supplies the transport
(`_connect`, `_fine_tune`)."""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from typing import Generic, TypeVar

import grpc

from transfer_client import _core as core
from transfer_client._channel import (
    DEFAULT_MAX_ATTEMPTS,
    DEFAULT_TARGET,
    ChannelOptions,
    call_metadata,
    channel_options,
)
from transfer_client.proto import transfer_service_pb2 as pb
from transfer_client.types import LabelledExample, TrainingConfig

EventsT = TypeVar("EventsT")  # Iterator[FineTuneEvent], or AsyncIterator for the async client


class ClientBase(Generic[EventsT]):
    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        credentials: grpc.ChannelCredentials | None = None,
        token: str | None = None,
        timeout: float | None = 30.0,
        max_message_bytes: int = 64 * 1024 * 1024,
        load_balancing: str = "round_robin",
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        reattach_seconds: float = core.DEFAULT_REATTACH_SECONDS,
        wait_for_ready: bool = False,
        keepalive: bool = True,
        stream_idle_seconds: float | None = None,
    ) -> None:
        """`reattach_seconds`: how long `fine_tune`, `train` and `watch_job` keep trying to
        re-attach to a job whose stream broke (UNAVAILABLE: a server restart, a dropped
        connection) before raising the last error; 0 never re-attaches. `wait_for_ready`:
        calls wait for the server to be reachable (within their deadline) instead of failing
        UNAVAILABLE at once. `keepalive`: ping the server every 30 s while calls are open,
        so a silently dropped connection is noticed within about 40 s. `stream_idle_seconds`:
        a job's event stream with no event for this long is taken as broken and re-attached
        (None: wait as long as it takes; set it above the longest quiet spell of a job)."""
        if reattach_seconds < 0:
            raise ValueError(f"reattach_seconds: {reattach_seconds} is negative")
        if stream_idle_seconds is not None and stream_idle_seconds <= 0:
            raise ValueError(f"stream_idle_seconds: {stream_idle_seconds} is not positive")
        options = channel_options(
            max_message_bytes,
            load_balancing=load_balancing,
            max_attempts=max_attempts,
            keepalive=keepalive,
        )
        self._metadata = call_metadata(token)
        self._max_message_bytes = max_message_bytes
        self._timeout = timeout
        self._reattach_seconds = reattach_seconds
        self._stream_idle_seconds = stream_idle_seconds
        # None rather than False: gRPC's own default, so a call is sent exactly as before.
        self._wait_for_ready: bool | None = True if wait_for_ready else None
        self._connect(target, credentials, options)

    def _connect(
        self,
        target: str,
        credentials: grpc.ChannelCredentials | None,
        options: ChannelOptions,
    ) -> None:
        """Opens the channel (plain when `credentials` is None) and its stub."""
        raise NotImplementedError

    def fine_tune(
        self,
        backbone: str,
        examples: Iterable[LabelledExample] | None = None,
        *,
        dataset_id: str | None = None,
        head_name: str = "",
        config: TrainingConfig | None = None,
        validation_examples: Iterable[LabelledExample] | None = None,
        validation_dataset_id: str | None = None,
        candidate_backbones: Iterable[str] = (),
        request_id: str | None = None,
    ) -> EventsT:
        """Starts a training job and returns its events until it ends: an iterator
        (`for`) on `TransferClient`, an async iterator (`async for`) on `AsyncTransferClient`.

        Stopping the iteration early detaches from the job; it keeps running on the server
        (`watch_job` re-attaches, `cancel_job` stops it).

        `request_id` is the call's idempotency key (default: a new UUID per call): the server
        answers a FineTune sent again with the same key with the job the first one queued,
        so the client can resend one whose connection broke without training twice.

        A stream that breaks UNAVAILABLE (a server restart, a dropped connection) is picked
        up again for up to `reattach_seconds` (a client option): before the first event by
        sending the FineTune again with the same `request_id`, after it through
        `watch_job(job_id, after_sequence=last seen)`; no event is yielded twice.
        """
        request = core.fine_tune_request(
            backbone,
            examples,
            dataset_id=dataset_id,
            head_name=head_name,
            config=config,
            validation_examples=validation_examples,
            validation_dataset_id=validation_dataset_id,
            candidate_backbones=candidate_backbones,
            request_id=request_id if request_id is not None else str(uuid.uuid4()),
        )
        return self._fine_tune(request)

    def _fine_tune(self, request: pb.FineTuneRequest) -> EventsT:
        raise NotImplementedError
