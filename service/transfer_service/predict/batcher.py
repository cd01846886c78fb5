"""Predict: a dynamic batcher per backbone that runs the frozen trunk once per batch.

Requests for any heads on one backbone (and input size) that arrive within
`batch_max_wait_ms` are stacked; the batcher waits only while another request is on its way
(admitted and being decoded), so a lone request starts at once. A lone request (no other
queued, on its way or expected back, and no batch in hand) is decoded on the compute thread
right before its forward pass: one thread hop instead of three (pool, loop, compute), ~0.2 ms
of its latency, and no other request to overlap its decoding with (on an accelerator only a
single input or texts: see `_decodes_on_compute_thread`). A batch runs on the compute thread
(mixed_heads: the trunk stage by stage over all rows, each head once over its rows;
with an accelerator every pass padded up to a size warmed at start-up, padding)
and results go back to each caller in its own order.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch

from transfer_service.backbones.cache import BackboneCache, LoadedBackbone
from transfer_service.backbones.preprocess import Preprocessor, declared_pixels
from transfer_service.domain import Modality, ModelInput, PredictionResult
from transfer_service.errors import InvalidArgumentError, ResourceExhaustedError, UnavailableError
from transfer_service.heads import HeadCache, LoadedHead
from transfer_service.predict.mixed_heads import run_heads
from transfer_service.predict.padding import padding_count

log = logging.getLogger(__name__)

# How long a forming batch waits for the next of the callers still coming, as a fraction of
# the last batch's compute time (plus batch_max_wait), counted from the latest arrival: 10% of
# a 100 ms batch is 10 ms, a client round trip plus decoding a few images here. Callers that
# keep arriving keep the batch open, up to HOLD_CAP_FRACTION of the last compute in all (a
# closed loop of 8 callers on one client channel comes back over ~10-13 ms after a 100 ms
# batch); when nobody comes, the cost is one window, once.
HOLD_FRACTION = 0.1
HOLD_CAP_FRACTION = 0.3
OUT_OF_MEMORY = "inputs: out of accelerator memory for this request"
# A request runs whole up to this many compute slices, or WHOLE_REQUEST_INPUTS inputs if
# more (its batch then holds the compute thread for at most that long), in slice-sized
# chunks past it. Chunking a 4-input request at a 2-input slice cost text Predict throughput
# at one caller 0.93 -> 0.79 of the raw loop; under a training job, whose CPU inflates the
# time per input, 1-8-input requests chunked one input at a time cost the soak's Predict
# throughput 16.9 -> 10.4 calls/s (tools/reliability/soak.py).
WHOLE_REQUEST_SLICES = 2
WHOLE_REQUEST_INPUTS = 8
# Chunks of large requests give way to small requests, but never for more than this many
# batches in a row, so a steady stream of small requests cannot starve them.
MAX_CHUNK_SKIPS = 2
# A lone request's images are decoded on the compute thread only while they declare at most
# this many pixels in all (a 12-megapixel photo decodes in the pool).
LONE_DECODE_PIXELS = 4_000_000


@dataclass(frozen=True, slots=True)
class PredictTimings:
    """What one batch cost; for metrics."""

    backbone: str
    batch_inputs: int
    queue_seconds: float
    compute_seconds: float
    padding_inputs: int = 0  # copies added to reach a padded batch size (predict_padding)


@dataclass(slots=True)
class _Pending:
    head: LoadedHead
    examples: list[Any]  # first-stage inputs, CPU
    top_k: int
    return_embedding: bool
    future: asyncio.Future[list[PredictionResult]]
    input_bytes: int
    enqueued: float = field(default_factory=time.perf_counter)
    # A chunk of a large request: the id shared by its chunks (None for a whole request).
    chunk_of: int | None = None

    @property
    def tenant(self) -> str:
        return self.head.record.tenant


class _FairQueue:
    """Requests waiting for a batch, served round-robin by tenant, whole requests before
    chunks of large ones (which give way at most MAX_CHUNK_SKIPS batches in a row). One
    tenant's hundred queued requests therefore wait behind another tenant's one, not in
    front of it."""

    def __init__(self) -> None:
        self._whole: OrderedDict[str, deque[_Pending]] = OrderedDict()
        self._chunks: OrderedDict[str, deque[_Pending]] = OrderedDict()
        self._size = 0
        self._changed = asyncio.Event()

    def put(self, item: _Pending) -> None:
        queues = self._whole if item.chunk_of is None else self._chunks
        queues.setdefault(item.tenant, deque()).append(item)
        self._size += 1
        self._changed.set()

    def empty(self) -> bool:
        return self._size == 0

    def has_chunks(self) -> bool:
        return bool(self._chunks)

    def take(self, chunk_allowed: Callable[[_Pending], bool]) -> _Pending | None:
        """The next whole request by tenant rotation, else the next allowed chunk."""
        item = _rotate(self._whole, lambda item: True) or _rotate(self._chunks, chunk_allowed)
        if item is not None:
            self._size -= 1
        return item

    async def changed(self, timeout: float | None) -> bool:
        """Waits for the next put, up to `timeout` seconds (None: no limit); False on time."""
        self._changed.clear()
        try:
            await asyncio.wait_for(self._changed.wait(), timeout)
        except TimeoutError:
            return False
        return True

    def drain(self) -> list[_Pending]:
        items = [
            item for queues in (self._whole, self._chunks) for q in queues.values() for item in q
        ]
        self._whole.clear()
        self._chunks.clear()
        self._size = 0
        return items


def _rotate(
    queues: OrderedDict[str, deque[_Pending]], allowed: Callable[[_Pending], bool]
) -> _Pending | None:
    """Pops the head of the first tenant's queue that `allowed` accepts, and moves that tenant
    to the back of the rotation."""
    for tenant, queue in queues.items():
        if allowed(queue[0]):
            item = queue.popleft()
            if queue:
                queues.move_to_end(tenant)
            else:
                del queues[tenant]
            return item
    return None


class _BackboneBatcher:
    """One queue and one worker task per (backbone, input size)."""

    def __init__(
        self,
        backbone: LoadedBackbone,
        compute: Executor,
        max_inputs: int,
        max_input_bytes: int,
        max_wait_seconds: float,
        on_batch: Callable[[PredictTimings], None],
        padded_sizes: tuple[int, ...] = (),
        before_batch: Callable[[], None] = lambda: None,
        slice_seconds: float = 0.05,
    ) -> None:
        """`padded_sizes`: the row counts every trunk and head pass is padded up to
        (transfer_service.predict.padding); empty: no padding. `before_batch` runs on the compute
        thread before each batch (transfer_service.torch_threads.CpuShare.fit_compute_thread).
        `slice_seconds`: the compute one chunk of a large request may take, at the last
        batch's time per input (slice_inputs; the Predictor decides which requests are
        chunked); other callers' requests run between two chunks (see _FairQueue)."""
        self._slice_seconds = slice_seconds
        self._before_batch = before_batch
        self._backbone = backbone
        self._padded_sizes = padded_sizes
        self._compute = compute
        self._max_inputs = max_inputs
        self._max_input_bytes = max_input_bytes
        self._max_wait = max_wait_seconds
        self._on_batch = on_batch
        self._queue = _FairQueue()
        self._chunk_skips = 0  # batches in a row formed without a waiting chunk
        self._seconds_per_input = 0.0  # of the last batch; sizes chunks (slice_inputs)
        # Requests admitted for this batcher and still being decoded/preprocessed.
        self._on_the_way = 0
        # Callers of the last batch, whose next requests may be on the wire: under
        # closed-loop load they come back within a round trip, and waiting for them merges
        # two half-size batches into one (8 callers: mean batch 4.0 without, throughput
        # 0.74 of raw batch-8 speed on lite0). Zeroed once a window passes without them.
        self._returning = 0
        self._last_compute = 0.0
        # Batches in hand (forming, waiting for or on the compute thread) and lone requests
        # on the compute thread.
        self._busy = 0
        self._worker = asyncio.get_running_loop().create_task(self._work())

    def expect(self) -> None:
        """A request is being prepared for this batcher: worth holding a batch for, until
        `arrived` (called once, whether or not it is then submitted)."""
        self._on_the_way += 1
        self._returning = max(0, self._returning - 1)

    def arrived(self) -> None:
        self._on_the_way -= 1

    def alone(self) -> bool:
        """True for the one request `expect`ed last when no other is queued, on its way or
        expected back from the last batch, and no batch is in hand (forming, or waiting for
        or on the compute thread): it would be a batch of one."""
        return (
            self._on_the_way == 1
            and self._returning <= 0
            and self._busy == 0
            and self._queue.empty()
        )

    async def run_alone(
        self,
        head: LoadedHead,
        prepare: Callable[[], list[Any]],
        top_k: int,
        return_embedding: bool,
    ) -> list[PredictionResult]:
        """One request, decoded by `prepare` and computed on the compute thread in one hop;
        its caller has seen `alone()` and called `arrived()`."""
        loop = asyncio.get_running_loop()
        pending = _Pending(head, [], top_k, return_embedding, loop.create_future(), 0)

        def prepare_and_run() -> list[PredictionResult]:
            pending.examples = prepare()
            self.checked_input_bytes(pending.examples)  # raises past the per-batch limit
            return self._run_batch([pending])[0][1]

        self._busy += 1
        started = time.perf_counter()
        try:
            results = await loop.run_in_executor(self._compute, prepare_and_run)
        except torch.OutOfMemoryError as exc:
            raise ResourceExhaustedError(OUT_OF_MEMORY) from exc
        finally:
            self._busy -= 1
        compute = time.perf_counter() - started
        self._last_compute = compute
        self._returning = 1
        rows = len(pending.examples)
        self._seconds_per_input = compute / max(rows, 1)
        self._on_batch(
            PredictTimings(
                self._backbone.name, rows, 0.0, compute, padding_count(rows, self._padded_sizes)
            )
        )
        return results

    def checked_input_bytes(self, examples: list[Any]) -> int:
        input_bytes = sum(self._backbone.trunk.example_bytes(example) for example in examples)
        if input_bytes > self._max_input_bytes:
            raise ResourceExhaustedError(
                f"inputs: {input_bytes} bytes of preprocessed input is over the per-batch limit "
                f"of {self._max_input_bytes}; send fewer inputs per call"
            )
        return input_bytes

    def submit(self, pending: _Pending) -> None:
        self._queue.put(pending)

    def slice_inputs(self) -> int:
        """Inputs that fill one compute slice at the last batch's time per input; 1 before
        any batch ran (a large request's first chunk then measures it)."""
        if self._seconds_per_input <= 0:
            return 1
        fitting = int(self._slice_seconds / self._seconds_per_input)
        return max(1, min(self._max_inputs, fitting))

    async def close(self) -> None:
        self._worker.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._worker
        for item in self._queue.drain():
            if not item.future.done():
                item.future.set_exception(UnavailableError("the server is shutting down"))

    async def _work(self) -> None:
        carried: _Pending | None = None
        while True:
            first = carried
            while first is None:
                first = self._queue.take(lambda item: True)
                if first is None:
                    await self._queue.changed(None)
            carried = None
            self._busy += 1
            try:
                carried = await self._form_and_run(first)
            finally:
                self._busy -= 1

    async def _form_and_run(self, first: _Pending) -> _Pending | None:
        """Holds a batch open for the requests on their way, runs it, and returns the request
        that did not fit (it starts the next batch)."""
        loop = asyncio.get_running_loop()
        carried: _Pending | None = None
        batch = [first]
        inputs, input_bytes = len(first.examples), first.input_bytes
        chunked = {first.chunk_of} - {None}
        has_whole = first.chunk_of is None

        def chunk_allowed(item: _Pending) -> bool:
            # One chunk of a large request per batch, even alone: a caller arriving a moment
            # later (on this backbone or another, which shares the compute thread) waits for
            # one slice at most. None beside whole requests unless chunks have given way
            # MAX_CHUNK_SKIPS batches in a row.
            return item.chunk_of not in chunked and (
                not has_whole or self._chunk_skips >= MAX_CHUNK_SKIPS
            )

        # The window grows with the compute it would save: HOLD_FRACTION of a batch's
        # time on top of batch_max_wait, from the latest arrival, within the cap.
        window = self._max_wait + HOLD_FRACTION * self._last_compute
        cap = loop.time() + self._max_wait + HOLD_CAP_FRACTION * self._last_compute
        while inputs < self._max_inputs:
            item = await self._next(min(loop.time() + window, cap), chunk_allowed)
            if item is None:
                break
            if (
                inputs + len(item.examples) > self._max_inputs
                or input_bytes + item.input_bytes > self._max_input_bytes
            ):
                carried = item  # starts the next batch
                break
            batch.append(item)
            inputs += len(item.examples)
            input_bytes += item.input_bytes
            if item.chunk_of is not None:
                chunked.add(item.chunk_of)
            else:
                has_whole = True
        # A carried chunk starts the next batch: the chunks did not give way.
        any_chunk = bool(chunked) or (carried is not None and carried.chunk_of is not None)
        gave_way = not any_chunk and self._queue.has_chunks()
        self._chunk_skips = self._chunk_skips + 1 if gave_way else 0
        # Callers gone (deadline passed, cancelled): their work is dropped, not computed.
        batch = [item for item in batch if not item.future.cancelled()]
        if batch:
            await self._execute(batch)
        return carried

    async def _next(
        self, deadline: float, chunk_allowed: Callable[[_Pending], bool]
    ) -> _Pending | None:
        """The next queued request this batch may take, waiting until `deadline` at most
        while callers are on their way or expected back; None when there is none."""
        loop = asyncio.get_running_loop()
        while True:
            item = self._queue.take(chunk_allowed)
            if item is not None:
                return item
            if self._on_the_way <= 0 and self._returning <= 0:
                # Nobody else is coming: waiting out the window would only add latency
                # (2 ms of the 5.9 ms overhead measured for one caller).
                return None
            remaining = deadline - loop.time()
            if remaining <= 0 or not await self._queue.changed(remaining):
                self._returning = 0  # they did not come back within the window
                return None

    async def _execute(self, batch: list[_Pending]) -> None:
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        try:
            computed = await loop.run_in_executor(self._compute, self._run_batch, batch)
        except torch.OutOfMemoryError:
            if len(batch) > 1:
                # Contain it: rerun each request alone, so only the one that does not fit fails.
                for item in batch:
                    await self._execute([item])
                return
            _fail(batch, ResourceExhaustedError(OUT_OF_MEMORY))
            return
        except Exception as exc:  # delivered to each caller; the worker keeps serving
            _fail(batch, exc)
            return
        compute = time.perf_counter() - started
        self._last_compute = compute
        # Chunks are not callers coming back: the rest of their request is already queued.
        self._returning = sum(1 for item, _ in computed if item.chunk_of is None)
        for item, result in computed:
            if not item.future.done():
                item.future.set_result(result)
        if not computed:
            return  # every caller left while the batch waited for the compute thread
        rows = sum(len(item.examples) for item, _ in computed)
        self._seconds_per_input = compute / rows
        self._on_batch(
            PredictTimings(
                self._backbone.name,
                rows,
                max(started - item.enqueued for item, _ in computed),
                compute,
                padding_count(rows, self._padded_sizes),
            )
        )

    def _run_batch(self, batch: list[_Pending]) -> list[tuple[_Pending, list[PredictionResult]]]:
        """Runs on the compute thread; returns each request it computed with its results."""
        # The batch may have waited in the compute pool's queue behind another backbone's
        # batch; callers that left meanwhile (deadline passed, cancelled) are dropped here, the
        # last moment before the work is spent. Reading a future's state from this thread is
        # a plain attribute read; it is only ever set on the loop.
        batch = [item for item in batch if not item.future.done()]
        if not batch:
            return []
        self._before_batch()
        results = run_heads(self._backbone, batch, self._padded_sizes)
        return list(zip(batch, results, strict=True))


def _fail(batch: list[_Pending], error: BaseException) -> None:
    for item in batch:
        if not item.future.done():
            item.future.set_exception(error)


class Predictor:
    def __init__(
        self,
        backbones: BackboneCache,
        heads: HeadCache,
        *,
        preprocess_pool: Executor,
        compute_pool: Executor,
        max_inputs: int,
        batch_max_size: int,
        batch_max_wait_ms: float,
        max_batch_input_bytes: int,
        on_batch: Callable[[PredictTimings], None] | None = None,
        padded_sizes: tuple[int, ...] = (),
        before_batch: Callable[[], None] = lambda: None,
        bulk_decodes: int = 1,
        while_decoding: Callable[[], AbstractContextManager[None]] = nullcontext,
        slice_seconds: float = 0.05,
    ) -> None:
        """`padded_sizes`, `before_batch`: see `_BackboneBatcher`. Large requests decode at
        most `bulk_decodes` inputs at a time in all (see _predict_in_chunks), each inside
        `while_decoding()` (transfer_service.torch_threads.CpuShare.decoding: on a CPU the compute
        thread then leaves that core to the decoding thread)."""
        self._before_batch = before_batch
        self._bulk_decode_gate = asyncio.Semaphore(bulk_decodes)
        # Keys the chunks of one large request apart from another's (a counter: the id of a
        # freed object is soon another object's).
        self._request_keys = itertools.count()
        self._slice_seconds = slice_seconds
        self._while_decoding = while_decoding
        self._max_batch_input_bytes = max_batch_input_bytes
        self._padded_sizes = padded_sizes
        self._backbones = backbones
        self._heads = heads
        self._preprocess_pool = preprocess_pool
        self._compute_pool = compute_pool
        self._max_inputs = max_inputs
        self._batch_max_size = batch_max_size
        self._batch_max_wait = batch_max_wait_ms / 1000.0
        self._on_batch = on_batch or (lambda timings: None)
        self._batchers: dict[tuple[str, int, int], _BackboneBatcher] = {}
        self._closing: set[asyncio.Task[None]] = set()
        self._closed = False

    async def predict(
        self,
        head_id: str,
        inputs: Sequence[ModelInput],
        *,
        top_k: int = 1,
        return_embedding: bool = False,
    ) -> list[PredictionResult]:
        if self._closed:
            raise UnavailableError("the server is shutting down")
        if not inputs:
            raise InvalidArgumentError("inputs: no inputs")
        if len(inputs) > self._max_inputs:
            raise ResourceExhaustedError(
                f"inputs: {len(inputs)} inputs is over the limit of {self._max_inputs} per call"
            )
        if top_k < 0:
            raise InvalidArgumentError(f"top_k: {top_k} is negative")
        loop = asyncio.get_running_loop()
        head = self._heads.peek(head_id)
        if head is None:
            head = await loop.run_in_executor(self._preprocess_pool, self._heads.get, head_id)
        # Resident backbones (the normal case) without a thread hop; loads off the loop.
        backbone = self._backbones.peek(head.record.backbone)
        if backbone is None:
            backbone = await loop.run_in_executor(
                self._preprocess_pool, self._backbones.get, head.record.backbone
            )
        modality = head.record.modality
        for position, model_input in enumerate(inputs):
            if model_input.modality is not modality:
                raise InvalidArgumentError(
                    f"inputs[{position}]: {model_input.modality.value} input for head "
                    f"{head_id!r}, which takes {modality.value}"
                )
        preprocessor = backbone.preprocessor
        if preprocessor.input_size != head.record.input_size:
            preprocessor = preprocessor.resized(head.record.input_size)
        expecting = self._batcher(backbone, head.record.input_size)
        whole = max(WHOLE_REQUEST_INPUTS, WHOLE_REQUEST_SLICES * expecting.slice_inputs())
        if len(inputs) > whole:
            return await self._predict_in_chunks(
                backbone, head, preprocessor, inputs, top_k, return_embedding
            )
        expecting.expect()
        if expecting.alone() and _decodes_on_compute_thread(inputs, modality, backbone.device):
            expecting.arrived()
            return await expecting.run_alone(
                head, functools.partial(_prepare, preprocessor, inputs, 0), top_k, return_embedding
            )
        try:
            examples = await self._prepare(preprocessor, inputs, modality)
        finally:
            expecting.arrived()
        future: asyncio.Future[list[PredictionResult]] = loop.create_future()
        # Looked up again: the backbone may have been reloaded (a new batcher) meanwhile.
        batcher = self._batcher(backbone, head.record.input_size)
        input_bytes = batcher.checked_input_bytes(examples)
        batcher.submit(_Pending(head, examples, top_k, return_embedding, future, input_bytes))
        return await future

    async def _predict_in_chunks(
        self,
        backbone: LoadedBackbone,
        head: LoadedHead,
        preprocessor: Preprocessor,
        inputs: Sequence[ModelInput],
        top_k: int,
        return_embedding: bool,
    ) -> list[PredictionResult]:
        """A request too large to run whole (see WHOLE_REQUEST_SLICES): decoded chunk by
        chunk in the pool (at most `bulk_decodes` inputs at a time, across all large
        requests), each chunk queued for the batcher as soon as it is ready, so decoding
        overlaps compute and other callers' work runs between chunks. Each chunk is one
        slice at the batcher's latest time per input. A caller that goes away (deadline,
        cancel) stops the decoding and drops its queued chunks."""
        loop = asyncio.get_running_loop()
        request_key = next(self._request_keys)
        futures: list[asyncio.Future[list[PredictionResult]]] = []
        try:
            start = 0
            while start < len(inputs):
                batcher = self._batcher(backbone, head.record.input_size)
                chunk_size = batcher.slice_inputs()
                examples = await self._prepare_bounded(preprocessor, inputs, start, chunk_size)
                start += chunk_size
                batcher = self._batcher(backbone, head.record.input_size)
                input_bytes = batcher.checked_input_bytes(examples)
                future: asyncio.Future[list[PredictionResult]] = loop.create_future()
                futures.append(future)
                batcher.submit(
                    _Pending(
                        head,
                        examples,
                        top_k,
                        return_embedding,
                        future,
                        input_bytes,
                        chunk_of=request_key,
                    )
                )
            results: list[PredictionResult] = []
            for future in futures:
                results += await future
            return results
        finally:
            for future in futures:
                future.cancel()  # a no-op for those done; the batcher drops the rest

    async def _prepare_bounded(
        self, preprocessor: Preprocessor, inputs: Sequence[ModelInput], start: int, count: int
    ) -> list[Any]:
        """inputs[start : start + count] decoded and preprocessed in the pool, behind the
        bulk-decode gate; the first failing input by position is reported."""
        loop = asyncio.get_running_loop()

        def decode(position: int) -> list[Any]:
            with self._while_decoding():
                return _prepare(preprocessor, [inputs[position]], position)

        async def one(position: int) -> list[Any]:
            async with self._bulk_decode_gate:
                return await loop.run_in_executor(self._preprocess_pool, decode, position)

        tasks = [
            asyncio.ensure_future(one(position))
            for position in range(start, min(start + count, len(inputs)))
        ]
        try:
            parts = await asyncio.gather(*tasks)
        except BaseException:
            for task in tasks:
                task.cancel()
            # Reported by position, not by which decode failed first.
            done = await asyncio.gather(*tasks, return_exceptions=True)
            for part in done:
                if isinstance(part, BaseException) and not isinstance(part, asyncio.CancelledError):
                    raise part from None
            raise
        return [example for part in parts for example in part]

    async def _prepare(
        self, preprocessor: Preprocessor, inputs: Sequence[ModelInput], modality: Modality
    ) -> list[Any]:
        """Decoded and preprocessed inputs, in order. Images are decoded one per pool task, so
        a multi-image request uses every core (Pillow releases the GIL while it decodes and
        resizes); texts tokenise in microseconds, so they stay in one task. The first failing
        input by position is the one reported."""
        loop = asyncio.get_running_loop()
        if modality is not Modality.IMAGE or len(inputs) == 1:
            return await loop.run_in_executor(
                self._preprocess_pool, _prepare, preprocessor, inputs, 0
            )
        parts = await asyncio.gather(
            *(
                loop.run_in_executor(
                    self._preprocess_pool, _prepare, preprocessor, [item], position
                )
                for position, item in enumerate(inputs)
            ),
            return_exceptions=True,
        )
        examples: list[Any] = []
        for part in parts:
            if isinstance(part, BaseException):
                raise part
            examples += part
        return examples

    def _batcher(self, backbone: LoadedBackbone, input_size: int) -> _BackboneBatcher:
        # id(trunk) keys a reloaded backbone apart from an evicted one still draining.
        key = (backbone.name, input_size, id(backbone.trunk))
        batcher = self._batchers.get(key)
        if batcher is None:
            stale = [k for k in self._batchers if k[:2] == key[:2]]
            for old in stale:
                closing = asyncio.get_running_loop().create_task(self._batchers.pop(old).close())
                self._closing.add(closing)
                closing.add_done_callback(self._closing.discard)
            batcher = _BackboneBatcher(
                backbone,
                self._compute_pool,
                self._batch_max_size,
                self._max_batch_input_bytes,
                self._batch_max_wait,
                self._on_batch,
                self._padded_sizes,
                self._before_batch,
                self._slice_seconds,
            )
            self._batchers[key] = batcher
        return batcher

    @property
    def pads_batches(self) -> bool:
        """Whether batches are padded up to warmed sizes (transfer_service.predict.padding)."""
        return bool(self._padded_sizes)

    async def warm_up(self, backbone: LoadedBackbone) -> None:
        """Runs the whole trunk once at every batch size Predict will run it at (1 without
        padding) on the compute thread, before any caller: its torch threads start, and on an
        accelerator each size's cuDNN plans are built (transfer_service.predict.padding)."""
        sizes = self._padded_sizes or (1,)
        await asyncio.get_running_loop().run_in_executor(
            self._compute_pool, backbone.warm_up, sizes
        )

    def discard_head(self, head_id: str) -> None:
        self._heads.discard(head_id)

    async def close(self) -> None:
        self._closed = True
        for batcher in self._batchers.values():
            await batcher.close()
        self._batchers.clear()


def _decodes_on_compute_thread(
    inputs: Sequence[ModelInput], modality: Modality, device: torch.device
) -> bool:
    """Whether a lone request is decoded on the compute thread rather than in the pool. On a
    CPU yes: right after a batch the trunk's OpenMP workers spin on every core for a few
    milliseconds, so pool threads decoding in parallel share what is left (4 images: 6.5 ms
    in the pool against 3.6 ms one after another on the compute thread, 2-CPU VM). With an
    accelerator the cores are free and a multi-image request decodes faster in parallel.
    Never for images declaring more than LONE_DECODE_PIXELS in all: decoding them could hold
    the compute thread far longer than a compute slice (a 40-megapixel PNG takes a second)."""
    if modality is Modality.IMAGE:
        pixels = sum(declared_pixels(item.image or b"") for item in inputs)
        if pixels > LONE_DECODE_PIXELS:
            return False
    return device.type == "cpu" or len(inputs) == 1 or modality is Modality.TEXT


def _prepare(preprocessor: Preprocessor, inputs: Sequence[ModelInput], first: int) -> list[Any]:
    """`inputs` are the request's inputs from position `first` on (for error messages)."""
    loaded = [preprocessor.load(item, f"inputs[{first + i}]") for i, item in enumerate(inputs)]
    return preprocessor.finish(loaded, None)
