"""The blocking client."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Callable, Generator, Iterable, Iterator
from types import TracebackType
from typing import Self

import grpc

from transfer_client import _core as core
from transfer_client import _predict_files as files
from transfer_client._channel import ChannelOptions
from transfer_client._client_base import ClientBase
from transfer_client._core import RequestT, ResponseT, ResultT, translated_errors
from transfer_client._history import HistoryBuilder, TrainingHistory
from transfer_client._sync_job_events import JobEventStreams
from transfer_client._sync_streams import GuardedRequests
from transfer_client.errors import TransferError
from transfer_client.proto import transfer_service_pb2 as pb
from transfer_client.proto import transfer_service_pb2_grpc as pb_grpc
from transfer_client.types import (
    Backbone,
    DatasetInfo,
    EvaluationReport,
    FineTuneEvent,
    Head,
    InputData,
    Job,
    JobCompleted,
    JobState,
    LabelledExample,
    Prediction,
    TrainingConfig,
)


class TransferClient(ClientBase[Iterator[FineTuneEvent]]):
    """A connection to the transfer service.

    `timeout` is the deadline of each unary call in seconds (None: no deadline). Streams
    (`fine_tune`, `watch_job`, `upload_dataset`) run as long as they need to; `fine_tune`,
    `train` and `watch_job` re-attach to the job when their stream breaks UNAVAILABLE (a
    server restart, a dropped connection), for up to `reattach_seconds` (default 300; 0:
    never), without showing an event twice, and with `stream_idle_seconds` set, when no
    event came for that long.

    `target` is `host:port`, or `dns:///host:port` for every address the name resolves to
    (a headless Kubernetes Service: one per replica), which `load_balancing="round_robin"`
    (the default; or "pick_first") spreads calls over. Reads, `predict`, `set_head_alias` and
    `watch_job` (until its first event) are retried on UNAVAILABLE, within `timeout`, up to
    `max_attempts` tries in all (1: no retries; at most 5), as is `fine_tune` (its
    `request_id` makes a resent one return the first one's job); `upload_dataset`,
    `cancel_job` and the deletes are never retried. `wait_for_ready=True` makes calls wait
    for an unreachable server (within their deadline) rather than fail at once. Errors carry
    the server's `request_id` for its logs, and the fields at fault in `field_violations`.
    """

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
        return self._unary(self._stub.ListBackbones, core.list_backbones())

    # --- training ------------------------------------------------------------------------

    def upload_dataset(
        self, examples: Iterable[LabelledExample], *, chunk_size: int = 64
    ) -> DatasetInfo:
        """Streams a labelled dataset in chunks; pass the returned id to `fine_tune`."""
        requests = GuardedRequests(core.upload_requests(examples, chunk_size))
        call: grpc.Future[pb.UploadDatasetResponse] = self._stub.UploadDataset.future(
            requests, metadata=self._metadata, wait_for_ready=self._wait_for_ready
        )
        requests.attach(call)
        with translated_errors():
            try:
                response = call.result()
            except (grpc.RpcError, grpc.FutureCancelledError):
                if requests.error is not None:
                    raise requests.error from None
                raise
            except BaseException:
                call.cancel()  # e.g. Ctrl-C: stop sending rather than finish in the background
                raise
        return core.dataset_info_from_pb(response)

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
        request_id: str | None = None,
    ) -> JobCompleted:
        """Runs `fine_tune` to the end; a failed or cancelled job raises its `TransferError`."""
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
        job_id = ""
        with contextlib.closing(self._fine_tune(request)) as events:
            for event in events:
                job_id = event.job_id
                if on_event is not None:
                    on_event(event)
                if (completed := core.train_outcome(event)) is not None:
                    return completed
        raise core.stream_ended(job_id)

    # --- jobs ----------------------------------------------------------------------------

    def get_job(self, job_id: str) -> Job:
        return self._unary(self._stub.GetJob, core.get_job(job_id))

    def list_jobs(
        self, *, state: JobState | None = None, backbone: str = "", head_name: str = ""
    ) -> list[Job]:
        """Every job of the caller, oldest first (read a page of up to 1000 at a time); only
        those in `state`, on `backbone`, training `head_name`, when given."""
        pages = core.job_pages(state, backbone, head_name)
        while (page := pages.next_page()) is not None:
            self._unary(self._stub.ListJobs, page)
        return pages.items

    def cancel_job(self, job_id: str) -> Job:
        return self._unary(self._stub.CancelJob, core.cancel_job(job_id))

    def watch_job(self, job_id: str, *, after_sequence: int = 0) -> Iterator[FineTuneEvent]:
        """Replays the job's events after `after_sequence`, then follows it until it ends;
        a broken stream is re-attached for up to `reattach_seconds`, as in `fine_tune`."""
        reattach = core.Reattach(
            self._reattach_seconds, job_id=job_id, after_sequence=after_sequence
        )
        return self._events.followed(reattach, None)

    def job_history(self, job_id: str, *, follow: bool = False) -> TrainingHistory:
        """The job's per-epoch (or, for the cross-validated solver, per-C) table, from its
        events replayed through `watch_job`. For a finished job, the whole table; for a
        running one, the rows up to its newest event when this is called (`follow=True`
        waits for the job to end and returns the whole table)."""
        until = None if follow else self.get_job(job_id).last_sequence
        builder = HistoryBuilder(job_id, until)
        if not builder.done:
            reattach = core.Reattach(self._reattach_seconds, job_id=job_id)
            with contextlib.closing(self._events.followed(reattach, None)) as events:
                for event in events:
                    if builder.add(event):
                        break
        return builder.history()

    # --- heads ---------------------------------------------------------------------------

    def list_heads(self, *, backbone: str = "", name: str = "") -> list[Head]:
        """Every head of the caller, oldest first (read a page of up to 1000 at a time); only
        those on `backbone` and named `name`, when given."""
        pages = core.head_pages(backbone, name)
        while (page := pages.next_page()) is not None:
            self._unary(self._stub.ListHeads, page)
        return pages.items

    def get_head(self, head_id: str) -> Head:
        return self._unary(self._stub.GetHead, core.get_head(head_id))

    def evaluate_head(
        self,
        head_id: str,
        examples: Iterable[LabelledExample] | None = None,
        *,
        dataset_id: str | None = None,
    ) -> EvaluationReport:
        """Scores the head on a labelled test set (inline examples, or an uploaded dataset's
        id): the same report `get_head` carries from training. The head is not changed."""
        return self._unary(
            self._stub.EvaluateHead, core.evaluate_head(head_id, examples, dataset_id)
        )

    def delete_head(self, head_id: str, *, force: bool = False) -> None:
        """Deletes one head version: its id or `name@N` (a bare name or alias is refused, so a
        delete always names exactly what it removes). A version an alias points at is
        FailedPreconditionError unless `force`, which removes those aliases too."""
        self._unary(self._stub.DeleteHead, core.delete_head(head_id, force))

    def set_head_alias(self, name: str, alias: str, version: int) -> Head:
        """Points `alias` of head name `name` at its `version`, creating or moving it in one
        step (promotion, rollback): callers of `name@alias` (and of `name`, for
        "production") are answered wholly by the old version or wholly by the new one.
        Returns the head the alias now points at."""
        return self._unary(self._stub.SetHeadAlias, core.set_head_alias(name, alias, version))

    def delete_head_alias(self, name: str, alias: str) -> None:
        """Removes an alias of `name`; the version it pointed at stays."""
        self._unary(self._stub.DeleteHeadAlias, core.delete_head_alias(name, alias))

    def delete_dataset(self, dataset_id: str) -> None:
        """Deletes an uploaded dataset, freeing its bytes from the tenant's dataset quota."""
        self._unary(self._stub.DeleteDataset, core.delete_dataset(dataset_id))

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
        call = core.predict(head_id, inputs, top_k=top_k, return_embedding=return_embedding)
        return self._unary(self._stub.Predict, call)

    def predict_heads(
        self,
        head_ids: Iterable[str],
        inputs: InputData | Iterable[InputData],
        *,
        top_k: int = 1,
        return_embedding: bool = False,
    ) -> dict[str, list[Prediction]]:
        """Several heads on the same backbone (at most 32) in one request: the inputs are
        decoded once and the backbone runs once. Each head's results in input order, keyed
        by head id in `head_ids` order. Heads on different backbones, or a head named twice,
        are InvalidArgumentError."""
        call = core.predict_heads(head_ids, inputs, top_k=top_k, return_embedding=return_embedding)
        return self._unary(self._stub.Predict, call)

    def predict_files(
        self,
        head: str,
        paths_or_dir: files.Source,
        *,
        top_k: int = 1,
        chunk_size: int = files.DEFAULT_CHUNK_SIZE,
        on_progress: Callable[[int, int], object] | None = None,
    ) -> Iterator[tuple[str, Prediction]]:
        """Predicts every input `paths_or_dir` names, yielding `(key, prediction)` in input
        order: a directory's image files (.jpg .jpeg .png .webp .gif .bmp .tif .tiff, sorted
        by path, recursively; the key is the file's path), a CSV's `text` column (one per
        row; the key is the text), or a list of such paths. Inputs go in Predict calls of
        at most `chunk_size` (at most 512, the server's limit) and 16 MiB; the first call's
        resolved head id answers the rest, so one version answers them all even if an alias
        moves. `on_progress(done, total)` is called with 0 first and after each call. A
        refused input raises the call's error naming its key (field_violations: its
        position among all the inputs); files are found now, read as their call is built."""
        inputs = files.collect_inputs(paths_or_dir)
        limits = files.chunk_limits(chunk_size, self._max_message_bytes)
        return self._predicted_files(head, inputs, limits, top_k, on_progress)

    # --- export --------------------------------------------------------------------------

    def export_head(self, head_id: str, path: str | os.PathLike[str]) -> int:
        """Writes the head with its backbone as an ONNX model to `path` and returns its size
        in bytes. Its input is the preprocessed tensor, its output the probabilities Predict
        gives; the preprocessing it expects is in the model's metadata_props. A broken
        stream leaves no file (it is written to `<path>.part` first)."""
        request = core.export_head_request(head_id)
        with translated_errors(), core.ExportedFile(path) as out:
            for chunk in self._stub.ExportHead(
                request,
                timeout=self._timeout,
                metadata=self._metadata,
                wait_for_ready=self._wait_for_ready,
            ):
                out.add(chunk)
        return out.size

    # --- internals -----------------------------------------------------------------------

    def _unary(
        self,
        method: grpc.UnaryUnaryMultiCallable[RequestT, ResponseT],
        call: core.Unary[RequestT, ResponseT, ResultT],
    ) -> ResultT:
        with translated_errors():
            response = method(
                call.request,
                timeout=self._timeout,
                metadata=self._metadata,
                wait_for_ready=self._wait_for_ready,
            )
        return call.result(response)

    def _predicted_files(
        self,
        head: str,
        inputs: list[files.FileInput],
        limits: tuple[int, int],
        top_k: int,
        on_progress: Callable[[int, int], object] | None,
    ) -> Iterator[tuple[str, Prediction]]:
        if on_progress is not None:
            on_progress(0, len(inputs))
        for first, chunk in files.chunks(inputs, *limits):
            try:
                predictions = self.predict(head, [item.value for item in chunk], top_k=top_k)
            except TransferError as error:
                raise files.located(error, chunk, first) from error
            head = files.pinned_head(head, predictions)
            if on_progress is not None:
                on_progress(first + len(chunk), len(inputs))
            yield from files.answered(chunk, predictions)

    def _connect(
        self,
        target: str,
        credentials: grpc.ChannelCredentials | None,
        options: ChannelOptions,
    ) -> None:
        if credentials is None:
            self._channel = grpc.insecure_channel(target, options=options)
        else:
            self._channel = grpc.secure_channel(target, credentials, options=options)
        self._stub = pb_grpc.TransferServiceStub(self._channel)
        self._events = JobEventStreams(
            self._channel,
            self._stub,
            self._metadata,
            self._wait_for_ready,
            self._timeout,
            self._reattach_seconds,
            self._stream_idle_seconds,
        )

    def _fine_tune(self, request: pb.FineTuneRequest) -> Generator[FineTuneEvent]:
        return self._events.followed(core.Reattach(self._reattach_seconds), request)
