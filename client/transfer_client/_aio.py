"""The asyncio client: `TransferClient`'s API over `grpc.aio`."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterable
from types import TracebackType
from typing import Any, Self

import grpc
import grpc.aio

from transfer_client import _core as core
from transfer_client import _predict_files as files
from transfer_client._channel import ChannelOptions
from transfer_client._client_base import ClientBase
from transfer_client._core import RequestT, ResponseT, ResultT, translated_errors
from transfer_client._history import HistoryBuilder, TrainingHistory
from transfer_client.errors import TransferError, UnavailableError
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


class AsyncTransferClient(ClientBase[AsyncIterator[FineTuneEvent]]):
    """A connection to the transfer service, for asyncio code. Create it inside the loop.

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

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close(grace=None)

    # --- backbones -----------------------------------------------------------------------

    async def list_backbones(self) -> list[Backbone]:
        return await self._unary(self._stub.ListBackbones, core.list_backbones())

    # --- training ------------------------------------------------------------------------

    async def upload_dataset(
        self, examples: Iterable[LabelledExample], *, chunk_size: int = 64
    ) -> DatasetInfo:
        """Streams a labelled dataset in chunks; pass the returned id to `fine_tune`."""
        chunks = core.upload_requests(examples, chunk_size)
        call = self._stub.UploadDataset(
            request_iterator=None, metadata=self._metadata, wait_for_ready=self._wait_for_ready
        )
        with translated_errors():
            try:
                # Chunks are built in a worker thread: building one reads image files.
                while (request := await asyncio.to_thread(next, chunks, None)) is not None:
                    await call.write(request)
                await call.done_writing()
                response = await call
            except grpc.RpcError:
                raise  # the call has ended: nothing to cancel
            except BaseException:
                # Ending the stream would commit a truncated dataset; cancelling discards it.
                call.cancel()
                raise
        return core.dataset_info_from_pb(response)

    async def train(
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
        """Runs `fine_tune` to the end; a failed or cancelled job raises its `TransferError`.

        `on_event` may be a plain function or a coroutine function.
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
        job_id = ""
        async with contextlib.aclosing(self._fine_tune(request)) as events:
            async for event in events:
                job_id = event.job_id
                if on_event is not None:
                    outcome = on_event(event)
                    if inspect.isawaitable(outcome):
                        await outcome
                if (completed := core.train_outcome(event)) is not None:
                    return completed
        raise core.stream_ended(job_id)

    # --- jobs ----------------------------------------------------------------------------

    async def get_job(self, job_id: str) -> Job:
        return await self._unary(self._stub.GetJob, core.get_job(job_id))

    async def list_jobs(
        self, *, state: JobState | None = None, backbone: str = "", head_name: str = ""
    ) -> list[Job]:
        """Every job of the caller, oldest first (read a page of up to 1000 at a time); only
        those in `state`, on `backbone`, training `head_name`, when given."""
        pages = core.job_pages(state, backbone, head_name)
        while (page := pages.next_page()) is not None:
            await self._unary(self._stub.ListJobs, page)
        return pages.items

    async def cancel_job(self, job_id: str) -> Job:
        return await self._unary(self._stub.CancelJob, core.cancel_job(job_id))

    def watch_job(self, job_id: str, *, after_sequence: int = 0) -> AsyncIterator[FineTuneEvent]:
        """Replays the job's events after `after_sequence`, then follows it until it ends;
        a broken stream is re-attached for up to `reattach_seconds`, as in `fine_tune`."""
        reattach = core.Reattach(
            self._reattach_seconds, job_id=job_id, after_sequence=after_sequence
        )
        return self._followed(reattach, None)

    async def job_history(self, job_id: str, *, follow: bool = False) -> TrainingHistory:
        """The job's per-epoch (or per-C) table from its replayed events: as
        `TransferClient.job_history` (a running job's rows so far, unless `follow`)."""
        until = None if follow else (await self.get_job(job_id)).last_sequence
        builder = HistoryBuilder(job_id, until)
        if not builder.done:
            reattach = core.Reattach(self._reattach_seconds, job_id=job_id)
            async with contextlib.aclosing(self._followed(reattach, None)) as events:
                async for event in events:
                    if builder.add(event):
                        break
        return builder.history()

    # --- heads ---------------------------------------------------------------------------

    async def list_heads(self, *, backbone: str = "", name: str = "") -> list[Head]:
        """Every head of the caller, oldest first (read a page of up to 1000 at a time); only
        those on `backbone` and named `name`, when given."""
        pages = core.head_pages(backbone, name)
        while (page := pages.next_page()) is not None:
            await self._unary(self._stub.ListHeads, page)
        return pages.items

    async def get_head(self, head_id: str) -> Head:
        return await self._unary(self._stub.GetHead, core.get_head(head_id))

    async def evaluate_head(
        self,
        head_id: str,
        examples: Iterable[LabelledExample] | None = None,
        *,
        dataset_id: str | None = None,
    ) -> EvaluationReport:
        """Scores the head on a labelled test set (inline examples, or an uploaded dataset's
        id): the same report `get_head` carries from training. The head is not changed."""
        return await self._unary(
            self._stub.EvaluateHead, core.evaluate_head(head_id, examples, dataset_id)
        )

    async def delete_head(self, head_id: str, *, force: bool = False) -> None:
        """Deletes one head version: its id or `name@N` (a bare name or alias is refused, so a
        delete always names exactly what it removes). A version an alias points at is
        FailedPreconditionError unless `force`, which removes those aliases too."""
        await self._unary(self._stub.DeleteHead, core.delete_head(head_id, force))

    async def set_head_alias(self, name: str, alias: str, version: int) -> Head:
        """Points `alias` of head name `name` at its `version`, creating or moving it in one
        step (promotion, rollback): callers of `name@alias` (and of `name`, for
        "production") are answered wholly by the old version or wholly by the new one.
        Returns the head the alias now points at."""
        return await self._unary(self._stub.SetHeadAlias, core.set_head_alias(name, alias, version))

    async def delete_head_alias(self, name: str, alias: str) -> None:
        """Removes an alias of `name`; the version it pointed at stays."""
        await self._unary(self._stub.DeleteHeadAlias, core.delete_head_alias(name, alias))

    async def delete_dataset(self, dataset_id: str) -> None:
        """Deletes an uploaded dataset, freeing its bytes from the tenant's dataset quota."""
        await self._unary(self._stub.DeleteDataset, core.delete_dataset(dataset_id))

    # --- inference -----------------------------------------------------------------------

    async def predict(
        self,
        head_id: str,
        inputs: InputData | Iterable[InputData],
        *,
        top_k: int = 1,
        return_embedding: bool = False,
    ) -> list[Prediction]:
        """Classifies `inputs` (one, or several in one request); results in input order."""
        call = core.predict(head_id, inputs, top_k=top_k, return_embedding=return_embedding)
        return await self._unary(self._stub.Predict, call)

    async def predict_heads(
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
        return await self._unary(self._stub.Predict, call)

    async def predict_files(
        self,
        head: str,
        paths_or_dir: files.Source,
        *,
        top_k: int = 1,
        chunk_size: int = files.DEFAULT_CHUNK_SIZE,
        on_progress: Callable[[int, int], object] | None = None,
    ) -> AsyncIterator[tuple[str, Prediction]]:
        """`TransferClient.predict_files` for `async for`: the folder is walked and each
        call's files read in a worker thread, off the event loop."""
        limits = files.chunk_limits(chunk_size, self._max_message_bytes)
        inputs = await asyncio.to_thread(files.collect_inputs, paths_or_dir)
        if on_progress is not None:
            on_progress(0, len(inputs))
        for first, chunk in files.chunks(inputs, *limits):
            values = [item.value for item in chunk]
            call = await asyncio.to_thread(
                core.predict, head, values, top_k=top_k, return_embedding=False
            )
            try:
                predictions = await self._unary(self._stub.Predict, call)
            except TransferError as error:
                raise files.located(error, chunk, first) from error
            head = files.pinned_head(head, predictions)
            if on_progress is not None:
                on_progress(first + len(chunk), len(inputs))
            for answer in files.answered(chunk, predictions):
                yield answer

    # --- export --------------------------------------------------------------------------

    async def export_head(self, head_id: str, path: str | os.PathLike[str]) -> int:
        """Writes the head with its backbone as an ONNX model to `path` and returns its size
        in bytes. Its input is the preprocessed tensor, its output the probabilities Predict
        gives; the preprocessing it expects is in the model's metadata_props. A broken
        stream leaves no file (it is written to `<path>.part` first)."""
        request = core.export_head_request(head_id)
        with translated_errors(), core.ExportedFile(path) as out:
            async for chunk in self._stub.ExportHead(
                request,
                timeout=self._timeout,
                metadata=self._metadata,
                wait_for_ready=self._wait_for_ready,
            ):
                out.add(chunk)
        return out.size

    # --- internals -----------------------------------------------------------------------

    async def _await_ready(self) -> None:
        """wait_for_ready for a stream, which has no deadline to end the wait: the channel
        must be ready within the client's timeout (as a unary call's wait would end)."""
        limit = core.ready_wait_seconds(self._timeout, self._reattach_seconds)
        try:
            await asyncio.wait_for(self._channel.channel_ready(), limit)
        except TimeoutError:
            raise UnavailableError(core.not_ready_message(limit)) from None

    async def _unary(
        self,
        method: grpc.aio.UnaryUnaryMultiCallable[RequestT, ResponseT],
        call: core.Unary[RequestT, ResponseT, ResultT],
    ) -> ResultT:
        with translated_errors():
            response = await method(
                call.request,
                timeout=self._timeout,
                metadata=self._metadata,
                wait_for_ready=self._wait_for_ready,
            )
        return call.result(response)

    def _connect(
        self,
        target: str,
        credentials: grpc.ChannelCredentials | None,
        options: ChannelOptions,
    ) -> None:
        if credentials is None:
            self._channel = grpc.aio.insecure_channel(target, options=options)
        else:
            self._channel = grpc.aio.secure_channel(target, credentials, options=options)
        self._stub = pb_grpc.TransferServiceStub(self._channel)

    def _fine_tune(self, request: pb.FineTuneRequest) -> AsyncGenerator[FineTuneEvent]:
        return self._followed(core.Reattach(self._reattach_seconds), request)

    async def _followed(
        self, reattach: core.Reattach, fine_tune: pb.FineTuneRequest | None
    ) -> AsyncGenerator[FineTuneEvent]:
        """A job's events across broken streams: the FineTune (sent again, same request,
        until its first event names the job) or WatchJob from the last event seen."""
        while True:
            call: grpc.aio.UnaryStreamCall[Any, pb.FineTuneEvent]
            if reattach.job_id:
                call = self._stub.WatchJob(
                    reattach.watch_request(),
                    metadata=self._metadata,
                    wait_for_ready=None if reattach.broken else self._wait_for_ready,
                )
            else:
                assert fine_tune is not None
                if self._wait_for_ready and not reattach.broken:
                    await self._await_ready()
                call = self._stub.FineTune(
                    fine_tune,
                    metadata=self._metadata,
                    # After a break the loop does the waiting, within reattach_seconds: a
                    # stream has no deadline, so one waiting for the server would never end.
                    wait_for_ready=None if reattach.broken else self._wait_for_ready,
                )
            try:
                with translated_errors():
                    messages = aiter(call)
                    while True:
                        try:
                            # A message, or the idle limit: a silent stream counts as broken.
                            message = await asyncio.wait_for(
                                anext(messages), self._stream_idle_seconds
                            )
                        except StopAsyncIteration:
                            return
                        except TimeoutError:
                            assert self._stream_idle_seconds is not None
                            raise core.stream_idle(self._stream_idle_seconds) from None
                        event = core.event_from_pb(message)
                        if event is not None and reattach.is_new(event):
                            yield event
            except TransferError as err:
                delay = reattach.delay(err)
                if delay is None:
                    raise
                await asyncio.sleep(delay)
            finally:
                # Ends the stream when the caller stops early; the job itself keeps running.
                call.cancel()
