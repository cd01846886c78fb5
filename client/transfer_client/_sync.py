"""The blocking client."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Generator, Iterable, Iterator
from types import TracebackType
from typing import Protocol, Self

import grpc

from transfer_client import _convert as convert
from transfer_client._channel import DEFAULT_TARGET, call_metadata, channel_options
from transfer_client.errors import UnavailableError, from_job_outcome, from_rpc_error
from transfer_client.proto import transfer_service_pb2 as pb
from transfer_client.proto import transfer_service_pb2_grpc as pb_grpc
from transfer_client.types import (
    Backbone,
    DatasetInfo,
    FineTuneEvent,
    Head,
    InputData,
    Job,
    JobCancelled,
    JobCompleted,
    JobFailed,
    LabelledExample,
    Prediction,
    TrainingConfig,
)


class TransferClient:
    """A connection to the transfer service.

    `timeout` is the deadline of each unary call in seconds (None: no deadline). Streams
    (`fine_tune`, `watch_job`, `upload_dataset`) run as long as they need to.
    """

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        credentials: grpc.ChannelCredentials | None = None,
        token: str | None = None,
        timeout: float | None = 30.0,
        max_message_bytes: int = 64 * 1024 * 1024,
    ) -> None:
        options = channel_options(max_message_bytes)
        if credentials is None:
            self._channel = grpc.insecure_channel(target, options=options)
        else:
            self._channel = grpc.secure_channel(target, credentials, options=options)
        self._stub = pb_grpc.TransferServiceStub(self._channel)
        self._metadata = call_metadata(token)
        self._timeout = timeout

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    # --- backbones -----------------------------------------------------------------------

    def list_backbones(self) -> list[Backbone]:
        try:
            response = self._stub.ListBackbones(
                pb.ListBackbonesRequest(), timeout=self._timeout, metadata=self._metadata
            )
        except grpc.RpcError as err:
            raise from_rpc_error(err) from err
        return [convert.backbone_from_pb(backbone) for backbone in response.backbones]

    # --- training ------------------------------------------------------------------------

    def upload_dataset(
        self, examples: Iterable[LabelledExample], *, chunk_size: int = 64
    ) -> DatasetInfo:
        """Streams a labelled dataset in chunks; pass the returned id to `fine_tune`."""
        requests = _GuardedRequests(convert.upload_requests(examples, chunk_size))
        call: grpc.Future[pb.UploadDatasetResponse] = self._stub.UploadDataset.future(
            requests, metadata=self._metadata
        )
        requests.attach(call)
        try:
            response = call.result()
        except (grpc.RpcError, grpc.FutureCancelledError) as err:
            if requests.error is not None:
                raise requests.error from None
            if isinstance(err, grpc.RpcError):
                raise from_rpc_error(err) from err
            raise
        except BaseException:
            call.cancel()  # e.g. Ctrl-C: stop sending rather than finish in the background
            raise
        return convert.dataset_info_from_pb(response)

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
    ) -> Iterator[FineTuneEvent]:
        """Starts a training job and yields its events until it ends.

        Stopping the iteration early detaches from the job; it keeps running on the server
        (`watch_job` re-attaches, `cancel_job` stops it).
        """
        request = convert.fine_tune_request(
            backbone,
            examples,
            dataset_id=dataset_id,
            head_name=head_name,
            config=config,
            validation_examples=validation_examples,
            validation_dataset_id=validation_dataset_id,
            candidate_backbones=candidate_backbones,
        )
        return self._events(self._stub.FineTune(request, metadata=self._metadata))

    def train(
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
        on_event: Callable[[FineTuneEvent], object] | None = None,
    ) -> JobCompleted:
        """Runs `fine_tune` to the end; a failed or cancelled job raises its `TransferError`."""
        request = convert.fine_tune_request(
            backbone,
            examples,
            dataset_id=dataset_id,
            head_name=head_name,
            config=config,
            validation_examples=validation_examples,
            validation_dataset_id=validation_dataset_id,
            candidate_backbones=candidate_backbones,
        )
        job_id = ""
        with contextlib.closing(
            self._events(self._stub.FineTune(request, metadata=self._metadata))
        ) as events:
            for event in events:
                job_id = event.job_id
                if on_event is not None:
                    on_event(event)
                if isinstance(event, JobCompleted):
                    return event
                if isinstance(event, JobFailed | JobCancelled):
                    raise from_job_outcome(event)
        raise UnavailableError(
            f"the event stream of job {job_id or '?'} ended before the job did; "
            "re-attach with watch_job"
        )

    # --- jobs ----------------------------------------------------------------------------

    def get_job(self, job_id: str) -> Job:
        try:
            response = self._stub.GetJob(
                pb.GetJobRequest(job_id=job_id), timeout=self._timeout, metadata=self._metadata
            )
        except grpc.RpcError as err:
            raise from_rpc_error(err) from err
        return convert.job_from_pb(response)

    def list_jobs(self) -> list[Job]:
        """Every job of the caller, oldest first (read a page of up to 1000 at a time)."""
        jobs: list[Job] = []
        page_token = ""
        while True:
            try:
                response = self._stub.ListJobs(
                    pb.ListJobsRequest(page_token=page_token),
                    timeout=self._timeout,
                    metadata=self._metadata,
                )
            except grpc.RpcError as err:
                raise from_rpc_error(err) from err
            jobs.extend(convert.job_from_pb(job) for job in response.jobs)
            if not response.next_page_token:
                return jobs
            page_token = response.next_page_token

    def cancel_job(self, job_id: str) -> Job:
        try:
            response = self._stub.CancelJob(
                pb.CancelJobRequest(job_id=job_id), timeout=self._timeout, metadata=self._metadata
            )
        except grpc.RpcError as err:
            raise from_rpc_error(err) from err
        return convert.job_from_pb(response)

    def watch_job(self, job_id: str, *, after_sequence: int = 0) -> Iterator[FineTuneEvent]:
        """Replays the job's events after `after_sequence`, then follows it until it ends."""
        request = pb.WatchJobRequest(job_id=job_id, after_sequence=after_sequence)
        return self._events(self._stub.WatchJob(request, metadata=self._metadata))

    # --- heads ---------------------------------------------------------------------------

    def list_heads(self, *, backbone: str = "") -> list[Head]:
        try:
            response = self._stub.ListHeads(
                pb.ListHeadsRequest(backbone=backbone),
                timeout=self._timeout,
                metadata=self._metadata,
            )
        except grpc.RpcError as err:
            raise from_rpc_error(err) from err
        return [convert.head_from_pb(head) for head in response.heads]

    def get_head(self, head_id: str) -> Head:
        try:
            response = self._stub.GetHead(
                pb.GetHeadRequest(head_id=head_id), timeout=self._timeout, metadata=self._metadata
            )
        except grpc.RpcError as err:
            raise from_rpc_error(err) from err
        return convert.head_from_pb(response)

    def delete_head(self, head_id: str) -> None:
        try:
            self._stub.DeleteHead(
                pb.DeleteHeadRequest(head_id=head_id),
                timeout=self._timeout,
                metadata=self._metadata,
            )
        except grpc.RpcError as err:
            raise from_rpc_error(err) from err

    def delete_dataset(self, dataset_id: str) -> None:
        """Deletes an uploaded dataset, freeing its bytes from the tenant's dataset quota."""
        try:
            self._stub.DeleteDataset(
                pb.DeleteDatasetRequest(dataset_id=dataset_id),
                timeout=self._timeout,
                metadata=self._metadata,
            )
        except grpc.RpcError as err:
            raise from_rpc_error(err) from err

    # --- inference -----------------------------------------------------------------------

    def predict(
        self,
        head_id: str,
        inputs: InputData | Iterable[InputData],
        *,
        top_k: int = 1,
        return_embedding: bool = False,
    ) -> list[Prediction]:
        """Classifies `inputs` (one, or several in one request); results in input order."""
        request = convert.predict_request(
            head_id, inputs, top_k=top_k, return_embedding=return_embedding
        )
        try:
            response = self._stub.Predict(request, timeout=self._timeout, metadata=self._metadata)
        except grpc.RpcError as err:
            raise from_rpc_error(err) from err
        return [convert.prediction_from_pb(prediction) for prediction in response.predictions]

    # --- internals -----------------------------------------------------------------------

    @staticmethod
    def _events(call: _EventStream) -> Generator[FineTuneEvent]:
        try:
            for message in call:
                event = convert.event_from_pb(message)
                if event is not None:
                    yield event
        except grpc.RpcError as err:
            raise from_rpc_error(err) from err
        finally:
            # Ends the stream when the caller stops early; the job itself keeps running.
            call.cancel()


class _EventStream(Protocol):
    """A server-streaming call as far as `_events` uses it (the stubs leave `cancel` untyped)."""

    def __iter__(self) -> Iterator[pb.FineTuneEvent]: ...
    def cancel(self) -> bool: ...


class _GuardedRequests(Iterator[pb.UploadDatasetRequest]):
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
