"""One batch, many requests: each head runs once over the rows of all of its requests, at its
own split point, and every request gets exactly the rows it sent, in its order."""

from __future__ import annotations

import asyncio
import dataclasses
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import torch
from transfer_service.backbones.cache import LoadedBackbone
from transfer_service.domain import ModelInput, PredictionResult
from transfer_service.heads import LoadedHead, build_head
from transfer_service.predict.batcher import BackboneBatcher
from transfer_service.predict.fair_queue import PendingRequest
from transfer_service.predict.padding import padded_batch_sizes

from tests.datasets import fashion_mnist
from tests.unit.test_store import record


def counting_head(
    backbone: LoadedBackbone, trainable_blocks: int, seed: int, calls: list[int]
) -> LoadedHead:
    """A real head whose feature passes append their row count to `calls`."""
    torch.manual_seed(seed)
    head = build_head(backbone.trunk, trainable_blocks, num_classes=3).eval()
    features = head.features

    def counted(state: Any) -> torch.Tensor:
        calls.append(len(state))
        return features(state)

    setattr(head, "features", counted)  # noqa: B010  # an instance attribute, not the class's
    return LoadedHead(
        dataclasses.replace(
            record(f"head-{seed}"),
            class_names=("a", "b", "c"),
            trainable_blocks=trainable_blocks,
            input_size=backbone.preprocessor.input_size,
        ),
        head,
    )


def examples(backbone: LoadedBackbone, count: int, seed: int) -> list[Any]:
    pre = backbone.preprocessor
    images = [x for x, _ in fashion_mnist(count, split="test", classes=1, seed=seed)][:count]
    return pre.finish([pre.load(ModelInput(image=x), "x") for x in images], None)


def run_batch(
    backbone: LoadedBackbone,
    requests: list[tuple[LoadedHead, list[Any], bool]],
    padded_sizes: tuple[int, ...] = (),
) -> list[list[PredictionResult]]:
    async def run() -> list[list[PredictionResult]]:
        loop = asyncio.get_running_loop()
        with ThreadPoolExecutor(1) as compute:
            batcher = BackboneBatcher(
                backbone, compute, 64, 10**9, 0.0, lambda t: None, padded_sizes
            )
            pending = [
                PendingRequest(head, rows, 3, embed, loop.create_future(), 0)
                for head, rows, embed in requests
            ]
            computed = batcher._run_batch(pending)
            await batcher.close()
        assert [item for item, _ in computed] == pending
        return [results for _, results in computed]

    return asyncio.run(run())


def assert_same_results(
    backbone: LoadedBackbone,
    results: list[PredictionResult],
    expected: list[PredictionResult],
    embed: bool,
) -> None:
    """Row by row: the same labels, and scores and embeddings (of the trunk's width when
    asked for, else none) within the tolerance of a row computed in another batch. On a CPU
    a row's numbers barely depend on its batch. On CUDA, fp32 convolutions run in TF32
    (PyTorch's cuDNN default) with kernels chosen per batch shape: on an H200 scores came out
    7e-5 apart and embedding values (~4) 0.9% (docs/design.md, "Backbones as stages")."""
    on_cpu = backbone.device.type == "cpu"
    score_tolerance = 1e-5 if on_cpu else 1e-3
    embedding_tolerance = {"abs": 1e-4} if on_cpu else {"abs": 1e-2, "rel": 2e-2}
    for one, other in zip(results, expected, strict=True):
        assert [c.label for c in one.top_k] == [c.label for c in other.top_k]
        assert [c.score for c in one.top_k] == pytest.approx(
            [c.score for c in other.top_k], abs=score_tolerance
        )
        assert len(one.embedding) == (backbone.trunk.feature_dim if embed else 0)
        assert one.embedding == pytest.approx(other.embedding, **embedding_tolerance)


def test_each_head_runs_once_per_batch_and_callers_get_their_own_rows(
    lite0: LoadedBackbone,
) -> None:
    calls: dict[str, list[int]] = {"a": [], "b": [], "tuned": []}
    probe_a = counting_head(lite0, 0, 1, calls["a"])
    probe_b = counting_head(lite0, 0, 2, calls["b"])
    tuned = counting_head(lite0, 1, 3, calls["tuned"])
    rows = [examples(lite0, n, seed=70 + n) for n in (1, 3, 2, 1, 2)]
    requests = [
        (probe_a, rows[0], False),
        (tuned, rows[1], True),
        (probe_a, rows[2], True),
        (probe_b, rows[3], False),
        (tuned, rows[4], False),
    ]
    together = run_batch(lite0, requests)
    # One feature pass per distinct head, over all of that head's rows.
    assert calls == {"a": [1 + 2], "b": [1], "tuned": [3 + 2]}

    for (head, request_rows, embed), batched in zip(requests, together, strict=True):
        [alone] = run_batch(lite0, [(head, request_rows, embed)])
        assert len(batched) == len(request_rows)
        assert_same_results(lite0, batched, alone, embed)


def test_padded_batches_run_at_padded_sizes_and_give_each_caller_its_own_rows(
    lite0: LoadedBackbone,
) -> None:
    """TRANSFER_PREDICT_BATCH_PADDING: the trunk and every head pass see only padded sizes
    (the copies' results are dropped), and each caller gets what an unpadded batch gives it."""
    sizes = padded_batch_sizes(64)
    calls: dict[str, list[int]] = {"a": [], "b": [], "tuned": [], "deep": []}
    probe_a = counting_head(lite0, 0, 1, calls["a"])
    probe_b = counting_head(lite0, 0, 2, calls["b"])
    tuned = counting_head(lite0, 1, 3, calls["tuned"])
    deep = counting_head(lite0, 2, 4, calls["deep"])
    trunk_rows: list[int] = []
    first_stage = lite0.trunk.stages[0]
    hook = first_stage.register_forward_pre_hook(lambda _, args: trunk_rows.append(len(args[0])))
    rows = [examples(lite0, n, seed=90 + n) for n in (2, 3, 1, 1, 2)]
    requests = [
        (probe_a, rows[0], True),
        (tuned, rows[1], False),
        (probe_b, rows[2], False),
        (deep, rows[3], True),
        (tuned, rows[4], False),
    ]
    try:
        padded = run_batch(lite0, requests, sizes)
    finally:
        hook.remove()
    # 9 rows -> 16 through the first stage; probe_a 2 rows -> 2, probe_b 1 -> 1, tuned
    # 3 + 2 -> 8 and deep 1 -> 1 (their own, unfrozen blocks included).
    assert trunk_rows == [16]
    assert calls == {"a": [2], "b": [1], "tuned": [8], "deep": [1]}
    for name in calls:
        calls[name].clear()
    unpadded = run_batch(lite0, requests)
    assert calls == {"a": [2], "b": [1], "tuned": [5], "deep": [1]}
    for (_, request_rows, embed), with_padding, without in zip(
        requests, padded, unpadded, strict=True
    ):
        assert len(with_padding) == len(without) == len(request_rows)
        assert_same_results(lite0, with_padding, without, embed)
