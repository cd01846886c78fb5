"""Predict batch padding (TRANSFER_PREDICT_BATCH_PADDING): which sizes, when, and the warm-up
that runs each of them on the compute thread before the server reports SERVING. That padded
batches give every caller its own results is tested in test_batched_heads."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import cast

import pytest
import torch
from transfer_service.backbones.cache import BackboneCache, LoadedBackbone
from transfer_service.predict.padding import (
    padded_batch_sizes,
    padded_index,
    padded_row_count,
    padding_count,
    pads_predict_batches,
)
from transfer_service.predict.predictor import Predictor


def test_padded_sizes_are_powers_of_two_up_to_the_batch_limit() -> None:
    assert padded_batch_sizes(64) == (1, 2, 4, 8, 16, 32, 64)
    assert padded_batch_sizes(48) == (1, 2, 4, 8, 16, 32, 48)
    assert padded_batch_sizes(1) == (1,)


@pytest.mark.parametrize(
    ("rows", "limit", "padded"),
    [
        (1, 64, 1),
        (3, 64, 4),
        (33, 64, 64),
        (64, 64, 64),
        (40, 48, 48),
        (65, 64, 128),
        (97, 48, 144),
    ],
)
def test_rows_pad_to_the_smallest_size_that_holds_them(rows: int, limit: int, padded: int) -> None:
    # Past the limit (one call may carry more inputs than batch_max_size): its multiples.
    assert padded_row_count(rows, padded_batch_sizes(limit)) == padded
    assert padding_count(rows, padded_batch_sizes(limit)) == padded - rows
    assert padding_count(rows, ()) == 0  # no sizes: no padding
    index = torch.arange(rows) * 3
    assert padded_index(index, padded_batch_sizes(limit)).tolist() == (
        index.tolist() + [index[-1].item()] * (padded - rows)
    )
    assert padded_index(index, ()) is index


def test_padding_is_on_with_an_accelerator_unless_set() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert not pads_predict_batches("auto", cpu)
    assert pads_predict_batches("auto", cuda)
    assert pads_predict_batches("on", cpu)
    assert not pads_predict_batches("off", cuda)


@pytest.mark.parametrize("padded_sizes", [(), (1, 2, 4)])
def test_warm_up_runs_every_padded_size_on_the_compute_thread(
    lite0: LoadedBackbone, padded_sizes: tuple[int, ...]
) -> None:
    seen: list[tuple[int, str]] = []
    hook = lite0.trunk.stages[0].register_forward_pre_hook(
        lambda _, args: seen.append((len(args[0]), threading.current_thread().name))
    )

    async def warm_up() -> None:
        with (
            ThreadPoolExecutor(1, thread_name_prefix="compute") as compute,
            ThreadPoolExecutor(1, thread_name_prefix="blocking") as blocking,
        ):
            predictor = Predictor(
                cast(BackboneCache, None),
                preprocess_pool=blocking,
                compute_pool=compute,
                max_inputs=16,
                batch_max_size=4,
                batch_max_wait_ms=0.0,
                max_batch_input_bytes=10**9,
                padded_sizes=padded_sizes,
            )
            await predictor.warm_up(lite0)

    try:
        asyncio.run(warm_up())
    finally:
        hook.remove()
    assert [rows for rows, _ in seen] == list(padded_sizes or (1,))
    assert {thread for _, thread in seen} == {"compute_0"}
