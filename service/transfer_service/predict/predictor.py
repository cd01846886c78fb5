"""Predict for one resolved head: validates the inputs, decodes them, and hands them to the
backbone's batcher whole, alone on the compute thread, or in slice-sized chunks.

A lone request (no other queued, on its way or expected back, and no batch in hand) is
decoded on the compute thread right before its forward pass: one thread hop instead of three
(pool, loop, compute), ~0.2 ms of its latency, and no other request to overlap its decoding
with (on an accelerator only a single input or texts: see `_decodes_on_compute_thread`).
"""

from __future__ import annotations

import asyncio
import functools
import itertools
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch

from transfer_service.backbones.cache import BackboneCache, LoadedBackbone
from transfer_service.backbones.preprocess import (
    Preprocessor,
    check_image_format,
    declared_pixels,
)
from transfer_service.domain import Modality, ModelInput, PredictionResult
from transfer_service.errors import InvalidArgumentError, ResourceExhaustedError, UnavailableError
from transfer_service.heads import LoadedHead
from transfer_service.predict.batcher import BackboneBatcher, PredictTimings
from transfer_service.predict.fair_queue import PendingRequest

# A request runs whole up to this many compute slices, or WHOLE_REQUEST_INPUTS inputs if
# more (its batch then holds the compute thread for at most that long), in slice-sized
# chunks past it. Chunking a 4-input request at a 2-input slice cost text Predict throughput
# at one caller 0.93 -> 0.79 of the raw loop; under a training job, whose CPU inflates the
# time per input, 1-8-input requests chunked one input at a time cost the soak's Predict
# throughput 16.9 -> 10.4 calls/s (tools/reliability/soak.py).
WHOLE_REQUEST_SLICES = 2
WHOLE_REQUEST_INPUTS = 8

# A lone request's images are decoded on the compute thread only while they declare at most
# this many pixels in all (a 12-megapixel photo decodes in the pool).
LONE_DECODE_PIXELS = 4_000_000


class Predictor:
    def __init__(
        self,
        backbones: BackboneCache,
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
        bulk_decode_pool: Executor | None = None,
    ) -> None:
        """`padded_sizes`, `before_batch`: see `BackboneBatcher`. Large requests decode at
        most `bulk_decodes` inputs at a time in all (see _predict_in_chunks), each inside
        `while_decoding()` (transfer_service.torch_threads.CpuShare.decoding: on a CPU the compute
        thread then leaves that core to the decoding thread), in `bulk_decode_pool` (default:
        the preprocessing pool; the server's runs at lowered CPU priority, so one caller's
        large request takes the CPU the compute thread leaves, not the CPU others' batches
        need)."""
        self._bulk_decode_pool = bulk_decode_pool or preprocess_pool
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
        self._preprocess_pool = preprocess_pool
        self._compute_pool = compute_pool
        self._max_inputs = max_inputs
        self._batch_max_size = batch_max_size
        self._batch_max_wait = batch_max_wait_ms / 1000.0
        self._on_batch = on_batch or (lambda timings: None)
        self._batchers: dict[tuple[str, int, int], BackboneBatcher] = {}
        self._closing: set[asyncio.Task[None]] = set()
        self._closed = False

    async def predict(
        self,
        head: LoadedHead,
        inputs: Sequence[ModelInput],
        *,
        top_k: int = 1,
        return_embedding: bool = False,
    ) -> list[PredictionResult]:
        """`head` is resolved (and its owner checked) by the caller, once per request."""
        return await self._predict((head,), inputs, top_k, return_embedding)

    async def predict_heads(
        self,
        heads: Sequence[LoadedHead],
        inputs: Sequence[ModelInput],
        *,
        top_k: int = 1,
        return_embedding: bool = False,
    ) -> list[list[PredictionResult]]:
        """Each head's results, in `heads` order, from one decoding of `inputs` and one trunk
        pass: the heads ride one request through the batcher (mixed_heads runs each on its
        rows). The caller resolved them and checked that they share a backbone and input
        size (one batcher)."""
        flat = await self._predict(tuple(heads), inputs, top_k, return_embedding)
        count = len(inputs)
        return [flat[i * count : (i + 1) * count] for i in range(len(heads))]

    async def _predict(
        self,
        heads: tuple[LoadedHead, ...],
        inputs: Sequence[ModelInput],
        top_k: int,
        return_embedding: bool,
    ) -> list[PredictionResult]:
        """The results of every head, head by head (`len(inputs)` each)."""
        head, extra_heads = heads[0], heads[1:]
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
        modality = head.record.modality
        for position, model_input in enumerate(inputs):
            if model_input.modality is not modality:
                raise InvalidArgumentError(
                    f"inputs[{position}]: {model_input.modality.value} input for head "
                    f"{head.record.head_id!r}, which takes {modality.value}"
                )
            if model_input.image is not None:
                # Bytes of a refused format end here, before any thread hop, decoding or
                # queueing: a caller looping on them costs the others as little as it can.
                check_image_format(model_input.image, f"inputs[{position}]")
        loop = asyncio.get_running_loop()
        # Resident backbones (the normal case) without a thread hop; loads off the loop.
        backbone = self._backbones.peek(head.record.backbone)
        if backbone is None:
            backbone = await loop.run_in_executor(
                self._preprocess_pool, self._backbones.get, head.record.backbone
            )
        preprocessor = backbone.preprocessor
        if preprocessor.input_size != head.record.input_size:
            preprocessor = preprocessor.resized(head.record.input_size)
        expecting = self._batcher(backbone, head.record.input_size)
        whole = max(WHOLE_REQUEST_INPUTS, WHOLE_REQUEST_SLICES * expecting.slice_inputs())
        if len(inputs) > whole:
            return await self._predict_in_chunks(
                backbone, heads, preprocessor, inputs, top_k, return_embedding
            )
        expecting.expect()
        if expecting.alone() and _decodes_on_compute_thread(inputs, modality, backbone.device):
            expecting.arrived()
            return await expecting.run_alone(
                head,
                functools.partial(_prepare, preprocessor, inputs, 0),
                top_k,
                return_embedding,
                extra_heads,
            )
        try:
            examples = await self._prepare(preprocessor, inputs, modality)
        finally:
            expecting.arrived()
        future: asyncio.Future[list[PredictionResult]] = loop.create_future()
        # Looked up again: the backbone may have been reloaded (a new batcher) meanwhile.
        batcher = self._batcher(backbone, head.record.input_size)
        input_bytes = batcher.checked_input_bytes(examples)
        batcher.submit(
            PendingRequest(
                head,
                examples,
                top_k,
                return_embedding,
                future,
                input_bytes,
                extra_heads=extra_heads,
            )
        )
        return await future

    async def _predict_in_chunks(
        self,
        backbone: LoadedBackbone,
        heads: tuple[LoadedHead, ...],
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
        cancel) stops the decoding and drops its queued chunks. Results head by head, as
        `_predict`'s."""
        head = heads[0]
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
                    PendingRequest(
                        head,
                        examples,
                        top_k,
                        return_embedding,
                        future,
                        input_bytes,
                        chunk_of=request_key,
                        extra_heads=heads[1:],
                    )
                )
            # Each chunk answers head by head for its own rows: regrouped by head.
            per_head: list[list[PredictionResult]] = [[] for _ in heads]
            for future in futures:
                part = await future
                rows = len(part) // len(heads)
                for i, results in enumerate(per_head):
                    results += part[i * rows : (i + 1) * rows]
            return [result for results in per_head for result in results]
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
                return await loop.run_in_executor(self._bulk_decode_pool, decode, position)

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

    def _batcher(self, backbone: LoadedBackbone, input_size: int) -> BackboneBatcher:
        # id(trunk) keys a reloaded backbone apart from an evicted one still draining.
        key = (backbone.name, input_size, id(backbone.trunk))
        batcher = self._batchers.get(key)
        if batcher is None:
            stale = [k for k in self._batchers if k[:2] == key[:2]]
            for old in stale:
                closing = asyncio.get_running_loop().create_task(self._batchers.pop(old).close())
                self._closing.add(closing)
                closing.add_done_callback(self._closing.discard)
            batcher = BackboneBatcher(
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
