"""A Predict batch holding a chunk of a large request, its trunk run in segments of stages:
each segment is a compute-thread task of its own, so other work runs between two of them.

Another backbone's batch (backbones share the compute thread) then waits for one segment,
not the whole chunk; and between two segments the batcher runs the whole requests queued
on this backbone meanwhile (`between_segments`), so a small request of another tenant waits
for one segment of a chunk on its own backbone too. One input can take a whole slice or more:
a 256-token MiniLM text takes ~50 ms on 2 CPUs, and a victim's lite0 Predict waited behind
each one (bench/noisy_neighbour.py, long_texts).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from typing import Any

import torch

from transfer_service.backbones.cache import LoadedBackbone
from transfer_service.domain import PredictionResult
from transfer_service.predict.fair_queue import PendingRequest
from transfer_service.predict.mixed_heads import collate_rows, first_split, run_heads

# A segment runs about a slice / SEGMENTS_PER_SLICE of compute.
SEGMENTS_PER_SLICE = 4

Computed = list[tuple[PendingRequest, list[PredictionResult]]]


def stages_per_segment(
    batch: list[PendingRequest], seconds_per_input: float, slice_seconds: float, num_stages: int
) -> int:
    """0: the batch runs in one compute-thread task; else how many trunk stages each of its
    segments runs (a batch with a chunk expected to take longer than a segment, at
    `seconds_per_input`)."""
    if all(item.chunk_of is None for item in batch):
        return 0
    expected = sum(len(item.examples) for item in batch) * seconds_per_input
    segment = slice_seconds / SEGMENTS_PER_SLICE
    if expected <= segment or num_stages < 2:
        return 0
    return max(1, int(num_stages * segment / expected))


class SegmentedPass:
    """Runs batches on `compute` as the batcher's one-task pass does (mixed_heads), the trunk
    in segments; `before_batch` runs on the compute thread before each task (the thread
    count may change between them)."""

    def __init__(
        self,
        backbone: LoadedBackbone,
        compute: Executor,
        padded_sizes: tuple[int, ...],
        before_batch: Callable[[], None],
    ) -> None:
        self._backbone = backbone
        self._compute = compute
        self._padded_sizes = padded_sizes
        self._before_batch = before_batch

    async def run(
        self,
        batch: list[PendingRequest],
        stages_per_segment: int,
        between_segments: Callable[[], Awaitable[None]],
    ) -> tuple[Computed, float]:
        """Each live request of `batch` with its results, and the compute seconds spent (the
        segments' own, not `between_segments`'). Requests whose callers left are dropped;
        when all left, the rest is not computed."""
        loop = asyncio.get_running_loop()
        live, state, spent = await loop.run_in_executor(self._compute, self._begin, batch)
        if not live:
            return [], spent
        stop = first_split(self._backbone, live)
        stage = 0
        while stage < stop:
            if all(item.future.done() for item in live):
                return [], spent  # every caller left: the rest is not computed
            end = min(stop, stage + stages_per_segment)
            state, seconds = await loop.run_in_executor(
                self._compute, self._advance, state, stage, end
            )
            spent += seconds
            stage = end
            await between_segments()
        computed, seconds = await loop.run_in_executor(
            self._compute, self._finish, live, state, stage
        )
        return computed, spent + seconds

    def _begin(self, batch: list[PendingRequest]) -> tuple[list[PendingRequest], Any, float]:
        started = time.perf_counter()
        live = [item for item in batch if not item.future.done()]
        if not live:
            return live, None, 0.0
        self._before_batch()
        with torch.inference_mode():
            state = collate_rows(self._backbone, live, self._padded_sizes)
        return live, state, time.perf_counter() - started

    def _advance(self, state: Any, start: int, stop: int) -> tuple[Any, float]:
        started = time.perf_counter()
        self._before_batch()
        with torch.inference_mode():
            state = self._backbone.run_prefix(state, start, stop)
        return state, time.perf_counter() - started

    def _finish(self, live: list[PendingRequest], state: Any, stage: int) -> tuple[Computed, float]:
        started = time.perf_counter()
        self._before_batch()
        results = run_heads(self._backbone, live, self._padded_sizes, start=(state, stage))
        return list(zip(live, results, strict=True)), time.perf_counter() - started
