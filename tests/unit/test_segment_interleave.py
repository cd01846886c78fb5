"""Issue 15, large_images on the victim's own backbone: a batch holding a chunk of a large
request runs its trunk in segments (predict/segmented_pass.py), and a small request queued on
the same backbone meanwhile runs between two of them, not after the whole chunk; the chunk's
answers are those of the same rows run in one pass."""

from __future__ import annotations

import asyncio
import dataclasses
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import torch
from transfer_service.backbones.cache import LoadedBackbone
from transfer_service.domain import PredictionResult
from transfer_service.heads import LoadedHead
from transfer_service.predict.batcher import BackboneBatcher
from transfer_service.predict.fair_queue import PendingRequest

from tests.unit.test_batched_heads import counting_head, examples


def _of(head: LoadedHead, tenant: str) -> LoadedHead:
    return LoadedHead(dataclasses.replace(head.record, tenant=tenant), head.module)


def test_a_small_request_runs_between_the_segments_of_a_chunk(
    lite0: LoadedBackbone, monkeypatch: pytest.MonkeyPatch
) -> None:
    passes: list[tuple[int, int]] = []  # (rows, first stage) of each trunk segment or pass
    answered: list[str] = []
    real_run_prefix = LoadedBackbone.run_prefix
    torch.manual_seed(0)
    attacker_head = _of(counting_head(lite0, 0, 1, []), "attacker")
    victim_head = _of(counting_head(lite0, 0, 2, []), "victim")
    chunk_rows = examples(lite0, 4, 1)
    small_rows = examples(lite0, 1, 2)

    async def scenario() -> tuple[list[PredictionResult], list[PredictionResult], Any]:
        loop = asyncio.get_running_loop()
        with ThreadPoolExecutor(1) as compute:
            batcher = BackboneBatcher(
                lite0, compute, 64, 10**9, 0.0, lambda timings: None, slice_seconds=0.004
            )
            # A 4-row chunk expected to take 4 s, far over a 1 ms segment: one stage each.
            batcher._seconds_per_input = 1.0
            chunk = PendingRequest(
                attacker_head, chunk_rows, 2, False, loop.create_future(), 0, chunk_of=7
            )
            small = PendingRequest(victim_head, small_rows, 2, False, loop.create_future(), 0)

            def run_prefix(
                self: LoadedBackbone, state: Any, start: int, stop: int, **kw: Any
            ) -> Any:
                passes.append((len(state), start))
                if len(passes) == 1:  # the victim's request arrives during the first segment
                    loop.call_soon_threadsafe(batcher.submit, small)
                return real_run_prefix(self, state, start, stop, **kw)

            monkeypatch.setattr(LoadedBackbone, "run_prefix", run_prefix)
            small.future.add_done_callback(lambda future: answered.append("small"))
            chunk.future.add_done_callback(lambda future: answered.append("chunk"))
            batcher.submit(chunk)
            chunk_results = await asyncio.wait_for(chunk.future, 120)
            small_results = await asyncio.wait_for(small.future, 120)
            monkeypatch.setattr(LoadedBackbone, "run_prefix", real_run_prefix)
            one_pass = batcher._run_batch(
                [PendingRequest(attacker_head, chunk_rows, 2, False, loop.create_future(), 0)]
            )
            await batcher.close()
        return chunk_results, small_results, one_pass[0][1]

    chunk_results, small_results, one_pass = asyncio.run(scenario())
    assert answered == ["small", "chunk"]
    chunk_segments = [start for rows, start in passes if rows == 4]
    small_pass = passes.index(next(p for p in passes if p[0] == 1))
    assert len(chunk_segments) > 2, passes
    # The victim's pass ran after the chunk's first segment and before its last.
    assert 0 < small_pass < len(passes) - 1, passes
    assert len(small_results) == 1
    for mine, whole in zip(chunk_results, one_pass, strict=True):
        assert mine.label == whole.label
        for a, b in zip(mine.top_k, whole.top_k, strict=True):
            assert a.label == b.label and a.score == pytest.approx(b.score, abs=1e-5)
