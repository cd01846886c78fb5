"""Heads with different split points, trained with unfrozen blocks and augmentation, served
together: concurrent requests for different heads share trunk passes and each caller gets
exactly what it would get alone."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from transfer_client import AsyncTransferClient, JobStarted, TrainingConfig, TransferClient

from tests.conftest import RunningServer, make_settings, start_server
from tests.datasets import bbc_news, fashion_mnist


@pytest.fixture(scope="module")
def batching_server(tmp_path_factory: pytest.TempPathFactory) -> RunningServer:
    # A long batching window makes concurrent requests reliably land in one batch.
    settings = make_settings(tmp_path_factory.mktemp("batching"), batch_max_wait_ms=50.0)
    running = start_server(settings)
    yield running  # type: ignore[misc]
    running.stop()


def _batch_stats(server: RunningServer, backbone: str) -> tuple[float, float]:
    registry = server.app.metrics.registry
    count = registry.get_sample_value("transfer_predict_batch_size_count", {"backbone": backbone})
    total = registry.get_sample_value("transfer_predict_batch_size_sum", {"backbone": backbone})
    return count or 0.0, total or 0.0


def test_image_heads_at_three_split_points_batch_together(batching_server: RunningServer) -> None:
    train = fashion_mnist(8, classes=3, seed=31)
    test_images = [x for x, _ in fashion_mnist(4, split="test", classes=3, seed=32)]
    with TransferClient(batching_server.address, timeout=120) as client:
        heads = {}
        for blocks, augment in ((0, False), (2, False), (1, True)):
            events = list(
                client.fine_tune(
                    "efficientnet_lite0",
                    train,
                    head_name=f"split-{blocks}",
                    config=TrainingConfig(epochs=3, trainable_blocks=blocks, augment=augment),
                )
            )
            started = events[1]  # after the queued event
            assert isinstance(started, JobStarted)
            assert started.plan.trainable_blocks == blocks
            assert started.plan.cached_features is (not augment)
            heads[blocks] = events[-1].head_id  # type: ignore[union-attr]
        sizes = {b: client.get_head(h).size_bytes for b, h in heads.items()}
        assert sizes[0] < sizes[1] < sizes[2]  # unfrozen blocks are part of the head
        alone = {b: client.predict(h, test_images, top_k=2) for b, h in heads.items()}

    async def together() -> dict[int, list[object]]:
        async with AsyncTransferClient(batching_server.address, timeout=120) as aclient:
            calls = [
                aclient.predict(heads[b], [image], top_k=2) for image in test_images for b in heads
            ]
            results = await asyncio.gather(*calls)
        merged: dict[int, list[object]] = {b: [] for b in heads}
        for position, result in enumerate(results):
            merged[list(heads)[position % len(heads)]] += result
        return merged

    count_before, total_before = _batch_stats(batching_server, "efficientnet_lite0")
    concurrent = asyncio.run(together())
    count_after, total_after = _batch_stats(batching_server, "efficientnet_lite0")
    inputs = len(test_images) * len(heads)
    assert total_after - total_before == inputs
    # Fewer trunk passes than requests: requests for different heads shared batches.
    assert count_after - count_before < inputs / 2
    for blocks in heads:
        for single, batched in zip(alone[blocks], concurrent[blocks], strict=True):
            assert batched.label == single.label  # type: ignore[attr-defined]
            assert batched.score == pytest.approx(single.score, abs=1e-4)  # type: ignore[attr-defined]


def test_text_head_with_an_unfrozen_layer(batching_server: RunningServer, tmp_path: Path) -> None:
    train = bbc_news(6, seed=41)
    test = bbc_news(4, seed=41, skip=6)
    with TransferClient(batching_server.address, timeout=120) as client:
        probe = client.train("minilm_l6", train, head_name="t0")
        tuned = client.train(
            "minilm_l6", train, head_name="t1", config=TrainingConfig(epochs=5, trainable_blocks=1)
        )
        texts = [x for x, _ in test]
        # Different lengths in one batch: padding must not change any answer.
        alone = [client.predict(tuned.head_id, [t])[0] for t in texts]
        batched = client.predict(tuned.head_id, texts)
        for single, together in zip(alone, batched, strict=True):
            assert together.label == single.label
            assert together.score == pytest.approx(single.score, abs=1e-4)
        probe_answers = client.predict(probe.head_id, texts)
        accuracy = sum(p.label == y for p, (_, y) in zip(probe_answers, test, strict=True))
        assert accuracy / len(test) >= 0.5  # chance is 0.2; quality proper: test_transfer_quality


def test_a_lone_request_does_not_wait_out_the_window(tmp_path: Path) -> None:
    """The window only holds a batch for requests already on their way: sequential calls
    (nothing else in flight) start at once, even with a 3-second window."""
    window_seconds = 3.0
    running = start_server(make_settings(tmp_path, batch_max_wait_ms=window_seconds * 1000))
    try:
        with TransferClient(running.address, timeout=120) as client:
            head = client.train(
                "efficientnet_lite0", fashion_mnist(4, classes=2, seed=41), head_name="lone"
            ).head_id
            image = fashion_mnist(1, split="test", classes=2, seed=42)[0][0]
            client.predict(head, [image])  # loads the head
            registry = running.app.metrics.registry
            labels = {"backbone": "efficientnet_lite0"}
            before = registry.get_sample_value("transfer_predict_queue_seconds_sum", labels)
            for _ in range(3):
                client.predict(head, [image])
            after = registry.get_sample_value("transfer_predict_queue_seconds_sum", labels)
        assert before is not None and after is not None
        assert after - before < window_seconds / 2  # three waits of the window would be 9 s
    finally:
        running.stop()


def test_padded_batches_answer_as_unpadded_and_count_their_copies(tmp_path: Path) -> None:
    """TRANSFER_PREDICT_BATCH_PADDING=on (the default with an accelerator; forced here on the
    CPU): a 3-image call runs as a batch of 4, the copy is counted in
    transfer_predict_padding_inputs_total, and each image's answer is what it gets alone."""
    running = start_server(
        make_settings(
            tmp_path,
            predict_batch_padding="on",
            batch_max_size=8,
            predict_slice_ms=60_000,  # the 3-image call runs whole, as one batch
            preload_backbones=["efficientnet_lite0"],
        )
    )
    try:
        with TransferClient(running.address, timeout=120) as client:
            head = client.train(
                "efficientnet_lite0", fashion_mnist(4, classes=2, seed=43), head_name="padded"
            ).head_id
            images = [x for x, _ in fashion_mnist(3, split="test", classes=2, seed=44)][:3]
            registry = running.app.metrics.registry
            labels = {"backbone": "efficientnet_lite0"}

            def padding_inputs() -> float:
                value = registry.get_sample_value("transfer_predict_padding_inputs_total", labels)
                return value or 0.0

            alone = [client.predict(head, [image], top_k=2)[0] for image in images]
            before = padding_inputs()
            together = client.predict(head, images, top_k=2)
            assert padding_inputs() - before == 1  # 3 rows padded to 4
        # On a GPU the trunk runs in bf16 (precision auto), with kernels picked per batch
        # shape: scores move further there (docs/design.md, "Backbones as stages").
        on_cpu = running.app.backbones.device.type == "cpu"
        for one, other in zip(together, alone, strict=True):
            assert one.label == other.label
            assert [c.score for c in one.top_k] == pytest.approx(
                [c.score for c in other.top_k], abs=1e-4 if on_cpu else 2e-2
            )
    finally:
        running.stop()
