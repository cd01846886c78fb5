"""The dynamic batcher: one per backbone (and input size), running the frozen trunk once per
batch for any mix of heads.

Requests for any heads on one backbone that arrive within `batch_max_wait_ms` are stacked;
the batcher waits only while another request is on its way (admitted and being decoded), so
a lone request starts at once, and then runs on the compute thread in one hop
(`run_alone`). A batch runs on the compute thread (mixed_heads: the trunk stage by stage
over all rows, each head once over its rows; with an accelerator every pass padded up to a
size warmed at start-up, padding) and results go back to each caller in its own order; a
batch holding a chunk of a large request runs its trunk in segments (segmented_pass).
The Predictor (predictor.py) decides what is queued here and how large requests are cut.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any

import torch

from transfer_service.backbones.cache import LoadedBackbone
from transfer_service.domain import PredictionResult
from transfer_service.errors import ResourceExhaustedError, UnavailableError
from transfer_service.heads import LoadedHead
from transfer_service.predict.fair_queue import FairQueue, PendingRequest
from transfer_service.predict.mixed_heads import run_heads
from transfer_service.predict.padding import padding_count
from transfer_service.predict.segmented_pass import Computed, SegmentedPass, stages_per_segment

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

# Chunks of large requests give way to small requests, but never for more than this many
# batches in a row, so a steady stream of small requests cannot starve them.
MAX_CHUNK_SKIPS = 2


@dataclass(frozen=True, slots=True)
class PredictTimings:
    """What one batch cost; for metrics."""

    backbone: str
    batch_inputs: int
    queue_seconds: float
    compute_seconds: float
    padding_inputs: int = 0  # copies added to reach a padded batch size (predict/padding.py)


class BackboneBatcher:
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
        chunked); other callers' requests run between two chunks (see FairQueue)."""
        self._slice_seconds = slice_seconds
        self._before_batch = before_batch
        self._backbone = backbone
        self._padded_sizes = padded_sizes
        self._compute = compute
        self._segmented = SegmentedPass(backbone, compute, padded_sizes, before_batch)
        self._max_inputs = max_inputs
        self._max_input_bytes = max_input_bytes
        self._max_wait = max_wait_seconds
        self._on_batch = on_batch
        self._queue = FairQueue()
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
        extra_heads: tuple[LoadedHead, ...] = (),
    ) -> list[PredictionResult]:
        """One request, decoded by `prepare` and computed on the compute thread in one hop;
        its caller has seen `alone()` and called `arrived()`."""
        loop = asyncio.get_running_loop()
        pending = PendingRequest(
            head, [], top_k, return_embedding, loop.create_future(), 0, extra_heads=extra_heads
        )

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

    def submit(self, pending: PendingRequest) -> None:
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
        carried: PendingRequest | None = None
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

    async def _form_and_run(self, first: PendingRequest) -> PendingRequest | None:
        """Holds a batch open for the requests on their way, runs it, and returns the request
        that did not fit (it starts the next batch)."""
        loop = asyncio.get_running_loop()
        carried: PendingRequest | None = None
        batch = [first]
        inputs, input_bytes = len(first.examples), first.input_bytes
        chunked = {first.chunk_of} - {None}
        has_whole = first.chunk_of is None

        def chunk_allowed(item: PendingRequest) -> bool:
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
        self, deadline: float, chunk_allowed: Callable[[PendingRequest], bool]
    ) -> PendingRequest | None:
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

    async def _execute(self, batch: list[PendingRequest]) -> None:
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        stages = stages_per_segment(
            batch, self._seconds_per_input, self._slice_seconds, self._backbone.trunk.num_stages
        )
        try:
            if stages:
                computed, spent = await self._run_in_segments(batch, stages)
            else:
                computed = await loop.run_in_executor(self._compute, self._run_batch, batch)
                spent = time.perf_counter() - started
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
        compute = spent  # a segmented batch: its segments' own time, not the waits between
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

    async def _run_in_segments(
        self, batch: list[PendingRequest], stages_per_segment: int
    ) -> tuple[Computed, float]:
        """As _run_batch, the trunk in segments (segmented_pass); also the compute seconds
        spent (the segments' own)."""
        return await self._segmented.run(batch, stages_per_segment, self._run_queued_whole)

    async def _run_queued_whole(self) -> None:
        """Between two segments of a chunk's batch: the whole requests queued meanwhile run
        as one batch of their own, so a small request on this backbone waits for a segment
        of a chunk, not the chunk (bench/noisy_neighbour.py, large_images: the attacker's
        chunks are on the victim's backbone). Queued chunks wait for their turn."""
        batch: list[PendingRequest] = []
        inputs, input_bytes = 0, 0

        def fits(item: PendingRequest) -> bool:
            return (
                inputs + len(item.examples) <= self._max_inputs
                and input_bytes + item.input_bytes <= self._max_input_bytes
            )

        while (item := self._queue.take(lambda item: False, fits)) is not None:
            batch.append(item)
            inputs += len(item.examples)
            input_bytes += item.input_bytes
        batch = [item for item in batch if not item.future.cancelled()]
        if batch:
            await self._execute(batch)

    def _run_batch(self, batch: list[PendingRequest]) -> Computed:
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


def _fail(batch: list[PendingRequest], error: BaseException) -> None:
    for item in batch:
        if not item.future.done():
            item.future.set_exception(error)
