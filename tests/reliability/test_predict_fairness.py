"""Issue 15: one Predict of 512 large inputs held the compute thread for its whole batch and
every other caller waited behind it (167 s). Large requests now run in chunks of one compute
slice, whole requests go first and tenants take turns."""

from __future__ import annotations

import asyncio
import io
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import torch
from PIL import Image
from transfer_client import TransferClient
from transfer_client.proto import transfer_service_pb2 as pb
from transfer_client.proto import transfer_service_pb2_grpc as pb_grpc
from transfer_service.domain import HeadRecord, Modality, ModelInput
from transfer_service.heads import LoadedHead
from transfer_service.predict.batcher import MAX_CHUNK_SKIPS
from transfer_service.predict.fair_queue import FairQueue, PendingRequest
from transfer_service.predict.predictor import _decodes_on_compute_thread

from tests.datasets import bbc_news, fashion_mnist


def pending(tenant: str, chunk_of: int | None = None, name: str = "") -> PendingRequest:
    record = HeadRecord.__new__(HeadRecord)
    object.__setattr__(record, "tenant", tenant)
    object.__setattr__(record, "head_id", name)
    head = LoadedHead(record, None)  # type: ignore[arg-type]
    future: asyncio.Future[list[object]] = asyncio.get_running_loop().create_future()
    return PendingRequest(head, [], 1, False, future, 0, chunk_of=chunk_of)  # type: ignore[arg-type]


def test_tenants_take_turns_and_whole_requests_go_before_chunks() -> None:
    async def run() -> list[str]:
        queue = FairQueue()
        for index in range(3):
            queue.put(pending("alice", name=f"a{index}"))
        queue.put(pending("bob", name="b0"))
        queue.put(pending("carol", chunk_of=7, name="c-chunk"))
        queue.put(pending("bob", name="b1"))
        order = []
        while (item := queue.take(lambda item: True)) is not None:
            order.append(item.head.record.head_id)
        assert queue.empty()
        return order

    assert asyncio.run(run()) == ["a0", "b0", "a1", "b1", "a2", "c-chunk"]


def test_a_chunk_waits_only_when_allowed() -> None:
    async def run() -> tuple[object, object]:
        queue = FairQueue()
        queue.put(pending("alice", chunk_of=1))
        refused = queue.take(lambda item: False)
        taken = queue.take(lambda item: item.chunk_of == 1)
        return refused, taken

    refused, taken = asyncio.run(run())
    assert refused is None and taken is not None
    assert MAX_CHUNK_SKIPS >= 1


def large_and_small(
    head_id: str, distinct: int, seed: int
) -> tuple[pb.PredictRequest, pb.PredictRequest]:
    """A 512-image Predict (`distinct` test images over and over) and a one-image one."""
    images = [image for image, _ in fashion_mnist(distinct, split="test", classes=4, seed=seed)]
    large = pb.PredictRequest(
        head_id=head_id, inputs=[pb.Input(image=images[i % len(images)]) for i in range(512)]
    )
    return large, pb.PredictRequest(head_id=head_id, inputs=[pb.Input(image=images[0])])


def test_a_small_predict_is_not_stuck_behind_a_large_one(
    stub: pb_grpc.TransferServiceStub, image_head: str
) -> None:
    """The small request is answered while the large one is still running, not after it."""
    large, small = large_and_small(image_head, distinct=64, seed=81)
    stub.Predict(small, timeout=60)  # warm: the batcher knows its time per input
    large_done = threading.Event()
    large_started = threading.Event()

    def run_large() -> float:
        started = time.monotonic()
        large_started.set()
        response = stub.Predict(large, timeout=300)
        large_done.set()
        assert len(response.predictions) == 512
        return time.monotonic() - started

    with ThreadPoolExecutor(1) as pool:
        large_call = pool.submit(run_large)
        large_started.wait()
        time.sleep(0.3)  # the large request is decoding and computing its first chunks
        small_latencies = []
        finished_before_large = 0
        for _ in range(3):
            started = time.monotonic()
            stub.Predict(small, timeout=60)
            small_latencies.append(time.monotonic() - started)
            finished_before_large += not large_done.is_set()
        large_seconds = large_call.result()
    assert finished_before_large == 3, (small_latencies, large_seconds)
    assert max(small_latencies) < large_seconds / 3, (small_latencies, large_seconds)


def test_a_large_predict_past_its_deadline_stops(
    stub: pb_grpc.TransferServiceStub, image_head: str
) -> None:
    """A caller that gives up frees the compute thread: its queued chunks are dropped."""
    large, small = large_and_small(image_head, distinct=16, seed=82)
    started = time.monotonic()
    stub.Predict(large, timeout=300)
    whole = time.monotonic() - started
    try:
        stub.Predict(large, timeout=whole / 10)
    except grpc.RpcError as error:
        assert error.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    # Right after, a small request does not wait out the rest of the abandoned one.
    started = time.monotonic()
    stub.Predict(small, timeout=60)
    assert time.monotonic() - started < whole / 2


def test_a_lone_huge_image_is_decoded_off_the_compute_thread() -> None:
    """A lone request is decoded on the compute thread (one hop fewer), but not one whose
    image declares more pixels than a compute slice can decode: a 40-megapixel 1-bit PNG is
    a few KB on the wire and a second of decoding."""

    def png(side: int) -> ModelInput:
        buffer = io.BytesIO()
        Image.new("1", (side, side)).save(buffer, format="PNG")
        return ModelInput(image=buffer.getvalue())

    cpu = torch.device("cpu")
    assert _decodes_on_compute_thread([png(64)], Modality.IMAGE, cpu)
    assert not _decodes_on_compute_thread([png(6000)], Modality.IMAGE, cpu)
    assert not _decodes_on_compute_thread([png(1500)] * 2, Modality.IMAGE, cpu)


def test_a_long_text_costs_what_its_first_tokens_cost(
    client: TransferClient, text_head: str
) -> None:
    """512 texts of 120 KB stalled every tenant for 55 s: each was tokenised whole before it
    was cut to the token limit. Now only a prefix is tokenised, with the same ids."""
    words = " ".join(text for text, _ in bbc_news(4))
    long_text = (words * (120_000 // len(words) + 1))[:120_000]
    short_text = long_text[:4_000]  # far more than 256 tokens, so the same first tokens
    [long_answer] = client.predict(text_head, [long_text], top_k=3)
    [short_answer] = client.predict(text_head, [short_text], top_k=3)
    assert long_answer.label == short_answer.label
    assert [c.score for c in long_answer.top_k] == pytest.approx(
        [c.score for c in short_answer.top_k], abs=1e-5
    )

    def seconds(text: str) -> float:
        best = float("inf")
        for _ in range(3):
            started = time.monotonic()
            client.predict(text_head, [text] * 16)
            best = min(best, time.monotonic() - started)
        return best

    # Whole-text tokenisation of 16 x 120 KB took several times the model's own time.
    assert seconds(long_text) < 1.5 * seconds(short_text)
