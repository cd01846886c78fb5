"""What the two clients share: every call's request, its result, and its errors.

`TransferClient` and `AsyncTransferClient` keep only the transport (which stub method to call,
blocking or awaited, and the streaming loops); the rest is written once, here:

- `Unary` plans of the unary calls: the request message, and what its response means;
- `Pages`, the paging of `list_jobs` and `list_heads`;
- `train_outcome` and `stream_ended`, how `train` reads a job's events;
- `translated_errors`, the one place a failed call's `grpc.RpcError` becomes a `TransferError`.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import BinaryIO, Generic, TypeVar

import grpc

from transfer_client import _convert as convert
from transfer_client import _requests as request_messages

# Re-exported for the clients' streaming calls, so that they read the protocol from one module.
from transfer_client._convert import dataset_info_from_pb as dataset_info_from_pb
from transfer_client._convert import event_from_pb as event_from_pb
from transfer_client._requests import fine_tune_request as fine_tune_request
from transfer_client._requests import upload_requests as upload_requests
from transfer_client.errors import (
    TransferError,
    UnavailableError,
    from_job_outcome,
    from_rpc_error,
)
from transfer_client.proto import transfer_service_pb2 as pb
from transfer_client.types import (
    Backbone,
    EvaluationReport,
    FineTuneEvent,
    Head,
    InputData,
    Job,
    JobCancelled,
    JobCompleted,
    JobFailed,
    JobState,
    LabelledExample,
    Prediction,
)

RequestT = TypeVar("RequestT")
ResponseT = TypeVar("ResponseT")
ResultT = TypeVar("ResultT")
ItemT = TypeVar("ItemT")


class translated_errors:  # lower case, like `contextlib.suppress`: used as a function
    """`with translated_errors(): ...` re-raises a failed call's `grpc.RpcError` as the matching
    `TransferError`, chained to it; anything else passes through untouched.

    It is a plain (synchronous) context manager, so it serves awaited calls as well:
    `with translated_errors(): await stub.GetJob(...)`.
    """

    def __enter__(self) -> None:
        return None

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if isinstance(exc, grpc.RpcError):
            raise from_rpc_error(exc) from exc


@dataclass(frozen=True, slots=True)
class Unary(Generic[RequestT, ResponseT, ResultT]):
    """A unary call but for its transport: the request to send, and what the response means."""

    request: RequestT
    result: Callable[[ResponseT], ResultT]


def _nothing(response: object) -> None:
    return None


def list_backbones() -> Unary[pb.ListBackbonesRequest, pb.ListBackbonesResponse, list[Backbone]]:
    return Unary(
        pb.ListBackbonesRequest(),
        lambda response: [convert.backbone_from_pb(backbone) for backbone in response.backbones],
    )


def get_job(job_id: str) -> Unary[pb.GetJobRequest, pb.Job, Job]:
    return Unary(pb.GetJobRequest(job_id=job_id), convert.job_from_pb)


def cancel_job(job_id: str) -> Unary[pb.CancelJobRequest, pb.Job, Job]:
    return Unary(pb.CancelJobRequest(job_id=job_id), convert.job_from_pb)


def get_head(head_id: str) -> Unary[pb.GetHeadRequest, pb.Head, Head]:
    return Unary(pb.GetHeadRequest(head_id=head_id), convert.head_from_pb)


def evaluate_head(
    head_id: str, examples: Iterable[LabelledExample] | None, dataset_id: str | None
) -> Unary[pb.EvaluateHeadRequest, pb.EvaluationReport, EvaluationReport]:
    return Unary(
        request_messages.evaluate_head_request(head_id, examples, dataset_id),
        convert.evaluation_from_pb,
    )


def delete_head(
    head_id: str, force: bool
) -> Unary[pb.DeleteHeadRequest, pb.DeleteHeadResponse, None]:
    return Unary(pb.DeleteHeadRequest(head_id=head_id, force=force), _nothing)


def set_head_alias(
    name: str, alias: str, version: int
) -> Unary[pb.SetHeadAliasRequest, pb.Head, Head]:
    if version < 1:
        raise ValueError(f"version: {version} is not a head version (1, 2, 3, ...)")
    return Unary(
        pb.SetHeadAliasRequest(name=name, alias=alias, version=version), convert.head_from_pb
    )


def delete_head_alias(
    name: str, alias: str
) -> Unary[pb.DeleteHeadAliasRequest, pb.DeleteHeadAliasResponse, None]:
    return Unary(pb.DeleteHeadAliasRequest(name=name, alias=alias), _nothing)


def delete_dataset(
    dataset_id: str,
) -> Unary[pb.DeleteDatasetRequest, pb.DeleteDatasetResponse, None]:
    return Unary(pb.DeleteDatasetRequest(dataset_id=dataset_id), _nothing)


def predict(
    head_id: str, inputs: InputData | Iterable[InputData], *, top_k: int, return_embedding: bool
) -> Unary[pb.PredictRequest, pb.PredictResponse, list[Prediction]]:
    return Unary(
        request_messages.predict_request(
            head_id, inputs, top_k=top_k, return_embedding=return_embedding
        ),
        convert.predictions_from_pb,
    )


def predict_heads(
    head_ids: Iterable[str],
    inputs: InputData | Iterable[InputData],
    *,
    top_k: int,
    return_embedding: bool,
) -> Unary[pb.PredictRequest, pb.PredictResponse, dict[str, list[Prediction]]]:
    request = request_messages.predict_request(
        "", inputs, top_k=top_k, return_embedding=return_embedding
    )
    references = list(head_ids)
    request.head_ids.extend(references)
    # Keyed by the caller's references (a name or `name@alias` resolves to an id the caller
    # may not know): the response has one entry per reference, in request order. Each
    # prediction says which head id and version answered.
    return Unary(
        request,
        lambda response: {
            reference: convert.predictions_from_pb(head)
            for reference, head in zip(references, response.heads, strict=True)
        },
    )


def export_head_request(head_id: str) -> pb.ExportHeadRequest:
    return pb.ExportHeadRequest(head_id=head_id)


class ExportedFile:
    """ExportHead's chunks written to `path`, through `<path>.part` beside it, moved into
    place once the stream is whole: a broken stream leaves no truncated model behind.
    `with ExportedFile(path) as out: for chunk in stream: out.add(chunk)`; `out.size` is
    then the file's size."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._part = self.path.with_name(self.path.name + ".part")
        self._file: BinaryIO | None = None
        self._expected: int | None = None
        self.size = 0

    def __enter__(self) -> ExportedFile:
        self._file = self._part.open("wb")
        return self

    def add(self, chunk: pb.ExportHeadChunk) -> None:
        assert self._file is not None
        if self._expected is None:
            self._expected = chunk.total_bytes
        self._file.write(chunk.data)
        self.size += len(chunk.data)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        assert self._file is not None
        self._file.close()
        if exc is not None or self._expected != self.size:
            self._part.unlink(missing_ok=True)
        if exc is None and self._expected != self.size:
            raise UnavailableError(
                f"ExportHead: the stream ended after {self.size} of {self._expected} bytes"
            )
        if exc is None:
            os.replace(self._part, self.path)


class Pages(Generic[RequestT, ResponseT, ItemT]):
    """A listing a page at a time: send each plan `next_page()` gives until it gives None;
    `items` then holds every record, oldest first."""

    def __init__(
        self,
        request: Callable[[str], RequestT],
        read: Callable[[ResponseT], tuple[list[ItemT], str]],
    ) -> None:
        self.items: list[ItemT] = []
        self._request = request  # the request for a page token ("" for the first page)
        self._read_page = read  # a response's records and next page token
        self._page_token: str | None = ""  # None once the last page is read

    def next_page(self) -> Unary[RequestT, ResponseT, None] | None:
        if self._page_token is None:
            return None
        return Unary(self._request(self._page_token), self._read)

    def _read(self, response: ResponseT) -> None:
        items, token = self._read_page(response)
        self.items.extend(items)
        self._page_token = token or None


def job_pages(
    state: JobState | None, backbone: str, head_name: str
) -> Pages[pb.ListJobsRequest, pb.ListJobsResponse, Job]:
    """`list_jobs`, filtered by the server (state None: any)."""
    wire_state = convert.job_state_to_pb(state) if state is not None else pb.JOB_STATE_UNSPECIFIED
    return Pages(
        lambda token: pb.ListJobsRequest(
            page_token=token, state=wire_state, backbone=backbone, head_name=head_name
        ),
        lambda response: (
            [convert.job_from_pb(job) for job in response.jobs],
            response.next_page_token,
        ),
    )


def head_pages(backbone: str, name: str) -> Pages[pb.ListHeadsRequest, pb.ListHeadsResponse, Head]:
    """`list_heads`, filtered by the server."""
    return Pages(
        lambda token: pb.ListHeadsRequest(page_token=token, backbone=backbone, name=name),
        lambda response: (
            [convert.head_from_pb(head) for head in response.heads],
            response.next_page_token,
        ),
    )


def watch_job_request(job_id: str, after_sequence: int) -> pb.WatchJobRequest:
    return pb.WatchJobRequest(job_id=job_id, after_sequence=after_sequence)


def train_outcome(event: FineTuneEvent) -> JobCompleted | None:
    """How `train` reads one event: the completed job's event ends it, a failed or cancelled
    job raises its `TransferError`, and anything else (None) means read on."""
    if isinstance(event, JobCompleted):
        return event
    if isinstance(event, JobFailed | JobCancelled):
        raise from_job_outcome(event)
    return None


def stream_ended(job_id: str) -> UnavailableError:
    """What `train` raises when the event stream ends before the job did."""
    return UnavailableError(
        f"the event stream of job {job_id or '?'} ended before the job did; "
        "re-attach with watch_job"
    )


DEFAULT_REATTACH_SECONDS = 300.0
_FIRST_BACKOFF = 0.2
_MAX_BACKOFF = 5.0


class Reattach:
    """How a job's event stream goes on after its connection breaks (`fine_tune`, `train`,
    `watch_job`): what to call next, which events are new, and how long to keep trying.

    Before the first event the job id is unknown, so the FineTune itself is sent again, with
    the same request (and `request_id`: the server answers with the job the first try
    queued, never a second job). After it, `WatchJob(job_id, after_sequence=last seen)`
    continues the job's one log: a server that stops puts its running jobs back in the queue,
    and the restarted server (or another replica) runs them again under the same id.

    Only UNAVAILABLE (which is also what gRPC reports for a refused or dropped connection)
    is retried: any other status is the server's answer. Tries back off exponentially with
    jitter, from 0.2 s up to 5 s; the clock restarts with every new event, and `seconds`
    after a break with no event since, the last error is raised (0: never re-attach).
    """

    def __init__(self, seconds: float, *, job_id: str = "", after_sequence: int = 0) -> None:
        self.seconds = seconds
        self.job_id = job_id
        self.last_sequence = after_sequence
        self._give_up_at: float | None = None
        self._tries = 0
        self.broken = False  # a stream has broken: the next call is a re-attach

    def is_new(self, event: FineTuneEvent) -> bool:
        """Records the event; False for one already yielded (a replay never shows twice)."""
        if event.sequence and event.sequence <= self.last_sequence:
            return False
        self.job_id = event.job_id or self.job_id
        self.last_sequence = max(self.last_sequence, event.sequence)
        self._give_up_at = None  # progress: a later break gets the whole time again
        self._tries = 0
        return True

    def delay(self, error: TransferError) -> float | None:
        """Seconds to wait before the next try after `error`, or None to raise it."""
        if not isinstance(error, UnavailableError) or self.seconds <= 0:
            return None
        self.broken = True
        now = time.monotonic()
        if self._give_up_at is None:
            self._give_up_at = now + self.seconds
        left = self._give_up_at - now
        if left <= 0:
            return None
        backoff = min(_MAX_BACKOFF, _FIRST_BACKOFF * 2.0**self._tries)
        self._tries += 1
        # Jitter keeps the clients of a restarted server from all arriving at the same moment.
        return min(left, backoff * random.uniform(0.5, 1.0))

    def watch_request(self) -> pb.WatchJobRequest:
        return watch_job_request(self.job_id, self.last_sequence)


def stream_idle(seconds: float) -> UnavailableError:
    """What a stream silent for `stream_idle_seconds` counts as: broken, so re-attached."""
    return UnavailableError(f"no event for {seconds:g} s: the stream is taken as broken")


def ready_wait_seconds(timeout: float | None, reattach_seconds: float) -> float:
    """How long a stream opened with wait_for_ready waits for the server: the client's call
    timeout, or reattach_seconds for a client without one."""
    return timeout if timeout is not None else reattach_seconds


def not_ready_message(seconds: float) -> str:
    return f"no server became ready within {seconds:g} s (wait_for_ready)"
