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
    ) -> None:
        options = channel_options(
            max_message_bytes, load_balancing=load_balancing, max_attempts=max_attempts
        )
        self._metadata = call_metadata(token)
        self._timeout = timeout
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
