"""A large Predict's chunks run their trunk in segments of stages, each its own compute-thread
task (predict/batcher.py, SEGMENTS_PER_SLICE), so another backbone's batch runs between them;
the answers are those of the same inputs predicted one by one. Their inputs decode on the
bulk-decode thread, at lowered CPU priority (app.py, BULK_DECODE_NICENESS)."""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from transfer_client.proto import transfer_service_pb2 as pb
from transfer_client.proto import transfer_service_pb2_grpc as pb_grpc
from transfer_service.app import BULK_DECODE_NICENESS
from transfer_service.predict import predictor as predictor_module
from transfer_service.predict.batcher import BackboneBatcher

from tests.conftest import RunningServer, make_settings, start_server
from tests.datasets import fashion_mnist
from tools.reliability.common import BIG_MESSAGES


@pytest.fixture(scope="module")
def sliced_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    # A 2 ms slice: every chunk is one input or a few, each expected over a segment.
    running = start_server(
        make_settings(
            Path(tmp_path_factory.mktemp("segments")),
            preload_backbones=["efficientnet_lite0"],
            predict_slice_ms=2.0,
        )
    )
    yield running
    running.stop()


def fine_tuned(stub: pb_grpc.TransferServiceStub, name: str, examples: list[pb.Example]) -> str:
    """The head id a FineTune of `examples` on lite0 completes with."""
    request = pb.FineTuneRequest(backbone="efficientnet_lite0", head_name=name, examples=examples)
    head_id = ""
    for event in stub.FineTune(request, timeout=300):
        if event.WhichOneof("event") == "completed":
            head_id = event.completed.head_id
    assert head_id
    return head_id


def test_segmented_chunks_answer_as_whole_requests(
    sliced_server: RunningServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    segmented: list[int] = []
    real = BackboneBatcher._run_in_segments

    async def counting(self: BackboneBatcher, batch: Any, stages: int) -> Any:
        segmented.append(stages)
        return await real(self, batch, stages)

    monkeypatch.setattr(BackboneBatcher, "_run_in_segments", counting)
    examples = [pb.Example(image=x, label=y) for x, y in fashion_mnist(6, classes=2, seed=3)]
    images = [image for image, _ in fashion_mnist(10, split="test", classes=2, seed=4)]
    with grpc.insecure_channel(sliced_server.address, options=BIG_MESSAGES) as channel:
        stub = pb_grpc.TransferServiceStub(channel)
        head_id = fine_tuned(stub, "s", examples)
        one_by_one = [
            stub.Predict(
                pb.PredictRequest(head_id=head_id, inputs=[pb.Input(image=image)], top_k=2),
                timeout=60,
            ).predictions[0]
            for image in images
        ]
        inputs = [pb.Input(image=images[i % len(images)]) for i in range(40)]
        large = stub.Predict(
            pb.PredictRequest(head_id=head_id, inputs=inputs, top_k=2), timeout=300
        )
    assert segmented, "no chunk ran in segments"
    assert len(large.predictions) == 40
    for position, prediction in enumerate(large.predictions):
        alone = one_by_one[position % len(images)]
        assert prediction.label == alone.label
        for mine, theirs in zip(prediction.top_k, alone.top_k, strict=True):
            assert mine.label == theirs.label
            assert mine.score == pytest.approx(theirs.score, abs=1e-4)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice is Linux's")
def test_large_requests_decode_at_lowered_priority(
    sliced_server: RunningServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # One caller's large request decodes on what the compute thread leaves: measured on 2
    # CPUs, a victim's p99 beside 512 long texts went from 1.67-2.38x idle to 1.16-1.36x.
    decoders: list[tuple[str, int]] = []
    real = predictor_module._prepare

    def recording(*args: Any) -> Any:
        thread = threading.current_thread().name
        decoders.append((thread, os.getpriority(os.PRIO_PROCESS, threading.get_native_id())))
        return real(*args)

    monkeypatch.setattr(predictor_module, "_prepare", recording)
    examples = [pb.Example(image=x, label=y) for x, y in fashion_mnist(6, classes=2, seed=5)]
    images = [image for image, _ in fashion_mnist(10, split="test", classes=2, seed=6)]
    with grpc.insecure_channel(sliced_server.address, options=BIG_MESSAGES) as channel:
        stub = pb_grpc.TransferServiceStub(channel)
        head_id = fine_tuned(stub, "nice", examples)
        decoders.clear()
        inputs = [pb.Input(image=images[i % len(images)]) for i in range(40)]
        large = stub.Predict(
            pb.PredictRequest(head_id=head_id, inputs=inputs, top_k=1), timeout=300
        )
    assert len(large.predictions) == 40
    assert len(decoders) == 40  # chunked: one decode per input
    for thread, niceness in decoders:
        assert thread.startswith("bulk-decode"), thread
        assert niceness >= BULK_DECODE_NICENESS
