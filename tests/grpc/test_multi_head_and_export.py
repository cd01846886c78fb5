"""Several heads in one Predict, and ExportHead (ONNX), on a real server with two tenants.

Multi-head: one call answers like one call per head (images and texts, heads with an
unfrozen block among them); heads on different backbones, a head named twice and more than
32 heads are INVALID_ARGUMENT; another tenant's head is NOT_FOUND.

Export: the ONNX model of an image head, an image head with an unfrozen block and a text
head with an unfrozen block runs in onnxruntime on inputs preprocessed by the server's own
code, and gives Predict's probabilities within EXPORT_ATOL with the same top-1. The
metadata is checked to describe that preprocessing (an image pipeline written from the
metadata alone gives the same tensor).
"""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from PIL import Image
from transfer_client import (
    AsyncTransferClient,
    InvalidArgumentError,
    NotFoundError,
    Prediction,
    TrainingConfig,
    TransferClient,
)
from transfer_client._cli import main as cli_main
from transfer_client.proto import transfer_service_pb2 as pb
from transfer_client.proto import transfer_service_pb2_grpc as pb_grpc
from transfer_service.domain import ModelInput

from tests.conftest import RunningServer, make_settings, start_server
from tests.datasets import bbc_news, fashion_mnist

ALICE = "alice-5c1e0b7d9a3f42e8"
BOB = "bob-2a7f9c4e1d8b63a0"
# Exported model against Predict (both fp32 on a CPU): measured <= 1e-6 apart.
EXPORT_ATOL = 1e-4
# A row in a multi-head request against the same row alone (the batches differ).
BATCH_ATOL = 1e-4


@pytest.fixture(scope="module")
def tenants_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    root = tmp_path_factory.mktemp("multi-head")
    running = start_server(
        make_settings(
            root / "store",
            auth_tokens=f"{ALICE}=alice,{BOB}=bob",
            preload_backbones=[],
            # One-millisecond slices: a call of more than 8 inputs runs in chunks, so the
            # multi-head tests cover chunked requests (12 images, 10 texts) as well as whole
            # ones (3 images).
            predict_slice_ms=1.0,
        )
    )
    yield running
    running.stop()


def client_of(server: RunningServer, token: str) -> TransferClient:
    return TransferClient(server.address, token=token, timeout=300)


@pytest.fixture(scope="module")
def heads(tenants_server: RunningServer) -> dict[str, str]:
    """alice's heads (image: two linear probes, one with an unfrozen block; text: a linear
    probe and one with an unfrozen block) and one of bob's."""
    images = fashion_mnist(8, classes=4, seed=41)
    texts = bbc_news(6, seed=42)
    plans = {
        "image": ("efficientnet_lite0", images, TrainingConfig(seed=1)),
        "image_other": ("efficientnet_lite0", fashion_mnist(8, classes=3, seed=43), None),
        "image_unfrozen": (
            "efficientnet_lite0",
            images,
            TrainingConfig(epochs=2, trainable_blocks=1, seed=2),
        ),
        "text": ("minilm_l6", texts, None),
        "text_unfrozen": ("minilm_l6", texts, TrainingConfig(epochs=2, trainable_blocks=1)),
    }
    made = {}
    with client_of(tenants_server, ALICE) as alice:
        for key, (backbone, examples, config) in plans.items():
            made[key] = alice.train(backbone, examples, head_name=key, config=config).head_id
    with client_of(tenants_server, BOB) as bob:
        made["bob"] = bob.train("efficientnet_lite0", fashion_mnist(4, classes=2, seed=44)).head_id
    return made


@pytest.fixture(scope="module")
def test_images() -> list[bytes]:
    return [image for image, _ in fashion_mnist(3, split="test", classes=4, seed=45)]


@pytest.fixture(scope="module")
def test_texts() -> list[str]:
    return [text for text, _ in bbc_news(2, seed=46, skip=6)]


def _same(multi: list[Prediction], single: list[Prediction]) -> None:
    assert len(multi) == len(single)
    for one, alone in zip(multi, single, strict=True):
        assert one.label == alone.label
        assert [s.label for s in one.top_k] == [s.label for s in alone.top_k]
        for got, want in zip(one.top_k, alone.top_k, strict=True):
            assert got.score == pytest.approx(want.score, abs=BATCH_ATOL)


def test_several_heads_answer_as_one_call_per_head(
    tenants_server: RunningServer,
    heads: dict[str, str],
    test_images: list[bytes],
    test_texts: list[str],
) -> None:
    cases = (
        (["image", "image_other", "image_unfrozen"], test_images),
        (["image_unfrozen", "image"], test_images[:3]),
        (["text_unfrozen", "text"], test_texts),
    )
    with client_of(tenants_server, ALICE) as alice:
        for keys, inputs in cases:
            ids = [heads[k] for k in keys]
            together = alice.predict_heads(ids, inputs, top_k=3, return_embedding=True)
            assert list(together) == ids  # request order
            for head_id in ids:
                alone = alice.predict(head_id, inputs, top_k=3, return_embedding=True)
                _same(together[head_id], alone)
                for one, single in zip(together[head_id], alone, strict=True):
                    # Each head's own pooled features (its unfrozen block's, if any).
                    assert np.allclose(one.embedding, single.embedding, atol=1e-3)

    async def from_async() -> dict[str, list[Prediction]]:
        async with AsyncTransferClient(tenants_server.address, token=ALICE, timeout=300) as c:
            return await c.predict_heads([heads["image_unfrozen"], heads["image"]], test_images)

    answered = asyncio.run(from_async())
    assert list(answered) == [heads["image_unfrozen"], heads["image"]]


def test_the_wire_keeps_the_single_head_fields(
    tenants_server: RunningServer, heads: dict[str, str], test_images: list[bytes]
) -> None:
    """head_id plus head_ids: `heads` in that order; `head_id` and `predictions` are the
    first head's, where a single-head caller reads them."""
    with grpc.insecure_channel(tenants_server.address) as channel:
        stub = pb_grpc.TransferServiceStub(channel)
        response = stub.Predict(
            pb.PredictRequest(
                head_id=heads["image"],
                head_ids=[heads["image_unfrozen"]],
                inputs=[pb.Input(image=image) for image in test_images],
            ),
            metadata=(("authorization", f"Bearer {ALICE}"),),
            timeout=120,
        )
    assert [h.head_id for h in response.heads] == [heads["image"], heads["image_unfrozen"]]
    assert response.head_id == heads["image"]
    assert list(response.predictions) == list(response.heads[0].predictions)
    assert all(len(h.predictions) == len(test_images) for h in response.heads)


def test_refusals(
    tenants_server: RunningServer,
    heads: dict[str, str],
    test_images: list[bytes],
    test_texts: list[str],
) -> None:
    with client_of(tenants_server, ALICE) as alice:
        with pytest.raises(InvalidArgumentError) as caught:
            alice.predict_heads([heads["image"], heads["text"]], test_images)
        message = caught.value.message
        assert "head_ids[1]" in message and "minilm_l6" in message
        assert "efficientnet_lite0" in message
        with pytest.raises(InvalidArgumentError, match="named twice"):
            alice.predict_heads([heads["image"], heads["image_other"], heads["image"]], test_images)
        with pytest.raises(InvalidArgumentError, match="limit of 32"):
            alice.predict_heads([f"head-{i}" for i in range(33)], test_images)
        # Thirty-two is within the limit (the unknown ids then fail as unknown heads).
        with pytest.raises(NotFoundError):
            alice.predict_heads([f"head-{i}" for i in range(32)], test_images)
        # A text head given images: the inputs are checked against the heads' modality.
        with pytest.raises(InvalidArgumentError, match="inputs"):
            alice.predict_heads([heads["text"], heads["text_unfrozen"]], test_images)
    with client_of(tenants_server, BOB) as bob:
        # Another tenant's head is NOT_FOUND, as a missing one, before its backbone shows.
        for ids in ([heads["bob"], heads["image"]], [heads["bob"], heads["text"]]):
            with pytest.raises(NotFoundError) as missing:
                bob.predict_heads(ids, test_images)
            assert "head_ids[1]" in missing.value.message
            assert "backbone" not in missing.value.message
        assert len(bob.predict_heads([heads["bob"]], test_images)[heads["bob"]]) == len(test_images)
        with pytest.raises(NotFoundError):
            bob.export_head(heads["image"], Path("never-written.onnx"))
    assert not Path("never-written.onnx").exists()


# ---- ExportHead ------------------------------------------------------------------------


def _metadata(model: onnx.ModelProto) -> dict[str, str]:
    return {entry.key: entry.value for entry in model.metadata_props}


def _image_from_metadata(image: bytes, preprocessing: dict[str, object]) -> np.ndarray:
    """The image tensor made from the metadata alone, the way an offline user would."""
    size = int(preprocessing["image_size"])  # type: ignore[call-overload]
    resample = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}
    picture = Image.open(io.BytesIO(image)).convert("RGB")
    side = min(picture.size)
    left, top = (picture.width - side) // 2, (picture.height - side) // 2
    square = picture.resize(
        (size, size),
        resample[str(preprocessing["interpolation"])],
        box=(left, top, left + side, top + side),
    )
    pixels = np.asarray(square, dtype=np.float32).transpose(2, 0, 1) / 255.0
    mean = np.array(preprocessing["mean"], dtype=np.float32).reshape(3, 1, 1)
    std = np.array(preprocessing["std"], dtype=np.float32).reshape(3, 1, 1)
    return (pixels - mean) / std  # type: ignore[no-any-return]


def _server_inputs(
    server: RunningServer, backbone: str, input_size: int, inputs: list[bytes] | list[str]
) -> dict[str, np.ndarray]:
    """The model's inputs made by the server's own preprocessing code."""
    loaded = server.app.backbones.get(backbone)
    preprocessor = loaded.preprocessor.resized(input_size)
    models = [ModelInput(image=x) if isinstance(x, bytes) else ModelInput(text=x) for x in inputs]
    examples = preprocessor.finish([preprocessor.load(m, "test") for m in models], None)
    state = loaded.trunk.collate(examples)
    if isinstance(state, torch.Tensor):
        return {"pixel_values": state.contiguous().numpy()}
    return {"input_ids": state.values.numpy(), "attention_mask": state.mask.numpy()}


@pytest.mark.parametrize("key", ["image", "image_unfrozen", "text_unfrozen"])
def test_an_exported_head_gives_predicts_probabilities(
    tenants_server: RunningServer,
    heads: dict[str, str],
    test_images: list[bytes],
    test_texts: list[str],
    key: str,
    tmp_path: Path,
) -> None:
    head_id = heads[key]
    path = tmp_path / f"{key}.onnx"
    with client_of(tenants_server, ALICE) as alice:
        size = alice.export_head(head_id, path)
        head = alice.get_head(head_id)
        inputs: list[bytes] | list[str] = test_texts if key.startswith("text") else test_images
        predictions = alice.predict(head_id, inputs, top_k=len(head.class_names))
    assert path.stat().st_size == size
    assert not path.with_name(path.name + ".part").exists()
    model = onnx.load(str(path))
    metadata = _metadata(model)
    assert metadata["head_id"] == head_id
    assert metadata["backbone"] == head.backbone
    classes = json.loads(metadata["class_names"])
    assert classes == list(head.class_names)
    if head.evaluation is not None:
        assert float(metadata["temperature"]) == pytest.approx(head.evaluation.temperature)
    preprocessing = json.loads(metadata["preprocessing"])
    feeds = _server_inputs(tenants_server, head.backbone, head.input_size, inputs)
    preprocessor = tenants_server.app.backbones.get(head.backbone).preprocessor
    if key.startswith("text"):
        assert preprocessing["tokenizer"] == "sentence-transformers/all-MiniLM-L6-v2"
        assert preprocessing["max_tokens"] == head.input_size
    else:
        assert preprocessing["image_size"] == head.input_size
        assert tuple(preprocessing["mean"]) == preprocessor.mean  # type: ignore[attr-defined]
        assert tuple(preprocessing["std"]) == preprocessor.std  # type: ignore[attr-defined]
        own = np.stack([_image_from_metadata(image, preprocessing) for image in test_images])
        assert np.allclose(own, feeds["pixel_values"], atol=1e-5)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == json.loads(metadata["input_names"])
    (probabilities,) = session.run(["probabilities"], feeds)
    assert probabilities.shape == (len(inputs), len(classes))
    for row, prediction in zip(probabilities, predictions, strict=True):
        served = np.zeros(len(classes), dtype=np.float32)
        for score in prediction.top_k:
            served[classes.index(score.label)] = score.score
        assert classes[int(row.argmax())] == prediction.label
        assert np.allclose(row, served, atol=EXPORT_ATOL), np.abs(row - served).max()


def test_the_cli_writes_the_export(
    tenants_server: RunningServer, heads: dict[str, str], tmp_path: Path
) -> None:
    out = tmp_path / "cli.onnx"
    code = cli_main(
        ["--target", tenants_server.address, "--token", ALICE, "export", heads["image"], str(out)]
    )
    assert code == 0
    assert _metadata(onnx.load(str(out)))["head_id"] == heads["image"]
