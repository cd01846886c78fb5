"""A lone request is decoded on the compute thread and computed in one hop: the same results
as the batch path, the same errors, and only when nothing else is queued, coming or running."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar, cast

import pytest
import torch
from transfer_service.backbones.cache import BackboneCache, LoadedBackbone
from transfer_service.domain import Modality, ModelInput, PredictionResult
from transfer_service.errors import InvalidArgumentError, ResourceExhaustedError
from transfer_service.predict.batcher import OUT_OF_MEMORY, BackboneBatcher, PredictTimings
from transfer_service.predict.fair_queue import PendingRequest
from transfer_service.predict.predictor import Predictor, _decodes_on_compute_thread, _prepare

from tests.datasets import fashion_mnist
from tests.unit.test_batched_heads import counting_head

Outcome = TypeVar("Outcome")


def with_batcher(
    backbone: LoadedBackbone,
    work: Callable[[BackboneBatcher], Awaitable[Outcome]],
    *,
    max_input_bytes: int = 10**9,
    timings: list[PredictTimings] | None = None,
) -> Outcome:
    async def run() -> Outcome:
        with ThreadPoolExecutor(1) as compute:
            batcher = BackboneBatcher(
                backbone,
                compute,
                64,
                max_input_bytes,
                0.0,
                (timings if timings is not None else []).append,
            )
            try:
                return await work(batcher)
            finally:
                await batcher.close()

    return asyncio.run(run())


def image_inputs(count: int) -> list[ModelInput]:
    return [ModelInput(image=x) for x, _ in fashion_mnist(count, split="test", classes=1, seed=5)]


def test_a_lone_request_gets_what_the_batch_path_computes(lite0: LoadedBackbone) -> None:
    head = counting_head(lite0, 1, seed=11, calls=[])
    [image] = image_inputs(1)
    timings: list[PredictTimings] = []

    async def both(batcher: BackboneBatcher) -> tuple[PredictionResult, PredictionResult]:
        batcher.expect()
        assert batcher.alone()
        batcher.arrived()
        prepare = functools.partial(_prepare, lite0.preprocessor, [image], 0)
        [lone] = await batcher.run_alone(head, prepare, 3, True)
        loop = asyncio.get_running_loop()
        examples = _prepare(lite0.preprocessor, [image], 0)
        pending = PendingRequest(head, examples, 3, True, loop.create_future(), 0)
        batcher.submit(pending)
        [batched] = await pending.future
        return lone, batched

    lone, batched = with_batcher(lite0, both, timings=timings)
    assert [c.label for c in lone.top_k] == [c.label for c in batched.top_k]
    assert [c.score for c in lone.top_k] == pytest.approx([c.score for c in batched.top_k])
    assert lone.embedding == pytest.approx(batched.embedding, abs=1e-5)
    assert [t.batch_inputs for t in timings] == [1, 1]  # both computed, both in the metrics


def test_a_lone_request_reports_bad_input_like_the_batch_path(lite0: LoadedBackbone) -> None:
    head = counting_head(lite0, 0, seed=12, calls=[])
    [image] = image_inputs(1)

    async def undecodable(batcher: BackboneBatcher) -> None:
        prepare = functools.partial(_prepare, lite0.preprocessor, [ModelInput(image=b"junk")], 0)
        await batcher.run_alone(head, prepare, 1, False)

    with pytest.raises(InvalidArgumentError, match=r"inputs\[0\]"):
        with_batcher(lite0, undecodable)

    async def too_big(batcher: BackboneBatcher) -> None:
        prepare = functools.partial(_prepare, lite0.preprocessor, [image], 0)
        await batcher.run_alone(head, prepare, 1, False)

    with pytest.raises(ResourceExhaustedError, match="per-batch limit"):
        with_batcher(lite0, too_big, max_input_bytes=100)


def test_a_lone_request_out_of_memory_is_resource_exhausted(
    lite0: LoadedBackbone, monkeypatch: pytest.MonkeyPatch
) -> None:
    head = counting_head(lite0, 0, seed=14, calls=[])
    [image] = image_inputs(1)

    def out_of_memory(self: BackboneBatcher, batch: list[PendingRequest]) -> None:
        raise torch.OutOfMemoryError("simulated: CUDA out of memory")

    monkeypatch.setattr(BackboneBatcher, "_run_batch", out_of_memory)

    async def lone(batcher: BackboneBatcher) -> None:
        prepare = functools.partial(_prepare, lite0.preprocessor, [image], 0)
        await batcher.run_alone(head, prepare, 1, False)

    with pytest.raises(ResourceExhaustedError, match=OUT_OF_MEMORY):
        with_batcher(lite0, lone)


def test_alone_only_while_nothing_else_is_queued_coming_or_running(
    lite0: LoadedBackbone,
) -> None:
    head = counting_head(lite0, 0, seed=13, calls=[])
    [image] = image_inputs(1)

    async def states(batcher: BackboneBatcher) -> list[bool]:
        seen = []
        batcher.expect()
        seen.append(batcher.alone())  # the only one: alone
        batcher.expect()
        seen.append(batcher.alone())  # a second is on its way
        batcher.arrived()
        batcher.arrived()
        # Two requests in one batch: both callers may come straight back.
        loop = asyncio.get_running_loop()
        examples = _prepare(lite0.preprocessor, [image], 0)
        futures = [loop.create_future() for _ in range(2)]
        for future in futures:
            batcher.submit(PendingRequest(head, examples, 1, False, future, 0))
        await asyncio.gather(*futures)
        batcher.expect()
        seen.append(batcher.alone())  # the other caller of that batch is expected back
        batcher.arrived()
        batcher.expect()
        seen.append(batcher.alone())  # both came back (or the window passed): alone again
        batcher.arrived()
        # A batch in hand: the worker holds it open for the caller still expected back.
        held = loop.create_future()
        batcher.submit(PendingRequest(head, examples, 1, False, held, 0))
        await asyncio.sleep(0)  # the worker takes it and waits for the returning caller
        batcher.expect()
        seen.append(batcher.alone())  # joins that batch rather than running beside it
        batcher.arrived()
        await held
        return seen

    assert with_batcher(lite0, states) == [True, False, False, True, False]


def test_the_pool_path_decodes_the_same_and_names_the_first_bad_input(
    lite0: LoadedBackbone,
) -> None:
    """A multi-image request that is not alone (or on an accelerator) decodes one image per
    pool task: the same tensors in the same order as decoding them one after another, and
    the first failing input by position is the one reported."""
    images = image_inputs(4)
    bad = [images[0], ModelInput(image=b"junk"), images[2], ModelInput(image=b"also junk")]

    async def prepare(inputs: list[ModelInput]) -> list[Any]:
        with ThreadPoolExecutor(4) as pool:
            predictor = Predictor(
                cast(BackboneCache, None),
                preprocess_pool=pool,
                compute_pool=pool,
                max_inputs=16,
                batch_max_size=16,
                batch_max_wait_ms=0.0,
                max_batch_input_bytes=10**9,
            )
            return await predictor._prepare(lite0.preprocessor, inputs, Modality.IMAGE)

    parallel = asyncio.run(prepare(images))
    serial = _prepare(lite0.preprocessor, images, 0)
    assert len(parallel) == len(serial) == 4
    for one, other in zip(parallel, serial, strict=True):
        assert torch.equal(one, other)
    with pytest.raises(InvalidArgumentError, match=r"inputs\[1\]"):
        asyncio.run(prepare(bad))


def test_where_a_lone_request_decodes() -> None:
    images = image_inputs(2)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert _decodes_on_compute_thread(images, Modality.IMAGE, cpu)
    assert _decodes_on_compute_thread(images[:1], Modality.IMAGE, cuda)
    texts = [ModelInput(text="a"), ModelInput(text="b")]
    assert _decodes_on_compute_thread(texts, Modality.TEXT, cuda)
    assert not _decodes_on_compute_thread(images, Modality.IMAGE, cuda)
