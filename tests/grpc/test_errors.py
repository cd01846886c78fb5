"""Every error row of the status table, through the real server: the right code, a message
naming the field, and never a stack trace."""

from __future__ import annotations

import io
import math
from collections.abc import Callable

import grpc
import numpy as np
import pytest
from PIL import Image
from transfer_client.proto import transfer_service_pb2 as pb
from transfer_client.proto import transfer_service_pb2_grpc as pb_grpc

from tests.conftest import RunningServer
from tests.datasets import png_bytes

OK_IMAGE = png_bytes(np.random.default_rng(0).integers(0, 255, (32, 32), dtype=np.uint8))


def _image_examples(labels: list[str]) -> list[pb.Example]:
    return [pb.Example(image=OK_IMAGE, label=label) for label in labels]


def _bomb_png(width: int, height: int) -> bytes:
    """A tiny PNG whose header declares width x height pixels."""
    buffer = io.BytesIO()
    Image.new("1", (width, height)).save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def stub(server: RunningServer) -> pb_grpc.TransferServiceStub:
    channel = grpc.insecure_channel(
        server.address, options=[("grpc.max_send_message_length", 256 * 1024 * 1024)]
    )
    return pb_grpc.TransferServiceStub(channel)


def _fine_tune(stub: pb_grpc.TransferServiceStub, request: pb.FineTuneRequest) -> None:
    for _ in stub.FineTune(request, timeout=60):
        pass


def _cases(
    image_head: str, text_head: str
) -> list[tuple[str, Callable[[pb_grpc.TransferServiceStub], object], grpc.StatusCode, str]]:
    two_classes = _image_examples(["a", "b"])
    return [
        ("unknown backbone", lambda s: _fine_tune(s, pb.FineTuneRequest(backbone="nope", examples=two_classes)), grpc.StatusCode.NOT_FOUND, "backbone"),
        ("backbone as a path", lambda s: _fine_tune(s, pb.FineTuneRequest(backbone="../../etc/passwd", examples=two_classes)), grpc.StatusCode.NOT_FOUND, "backbone"),
        ("unknown head", lambda s: s.Predict(pb.PredictRequest(head_id="no-such-head", inputs=[pb.Input(image=OK_IMAGE)])), grpc.StatusCode.NOT_FOUND, "head_id"),
        ("head id with ../", lambda s: s.Predict(pb.PredictRequest(head_id="../x", inputs=[pb.Input(image=OK_IMAGE)])), grpc.StatusCode.INVALID_ARGUMENT, "head_id"),
        ("unknown job", lambda s: s.GetJob(pb.GetJobRequest(job_id="job-0000")), grpc.StatusCode.NOT_FOUND, "job_id"),
        ("unknown job cancel", lambda s: s.CancelJob(pb.CancelJobRequest(job_id="job-0000")), grpc.StatusCode.NOT_FOUND, "job_id"),
        ("unknown job watch", lambda s: list(s.WatchJob(pb.WatchJobRequest(job_id="job-0000"))), grpc.StatusCode.NOT_FOUND, "job_id"),
        ("unknown dataset", lambda s: _fine_tune(s, pb.FineTuneRequest(backbone="efficientnet_lite0", dataset_id="ds-0000")), grpc.StatusCode.NOT_FOUND, "dataset_id"),
        ("unknown head get", lambda s: s.GetHead(pb.GetHeadRequest(head_id="nope")), grpc.StatusCode.NOT_FOUND, "head_id"),
        ("unknown head delete", lambda s: s.DeleteHead(pb.DeleteHeadRequest(head_id="nope")), grpc.StatusCode.NOT_FOUND, "head_id"),
        ("undecodable image (FineTune)", lambda s: _fine_tune(s, pb.FineTuneRequest(backbone="efficientnet_lite0", examples=[*two_classes, pb.Example(image=b"\x89PNG not really", label="a")])), grpc.StatusCode.INVALID_ARGUMENT, "examples[2].image"),
        ("truncated image (FineTune)", lambda s: _fine_tune(s, pb.FineTuneRequest(backbone="efficientnet_lite0", examples=[*two_classes, pb.Example(image=OK_IMAGE[: len(OK_IMAGE) // 2], label="a")])), grpc.StatusCode.INVALID_ARGUMENT, "examples[2].image"),
        ("undecodable image (Predict)", lambda s: s.Predict(pb.PredictRequest(head_id=image_head, inputs=[pb.Input(image=OK_IMAGE), pb.Input(image=b"garbage")])), grpc.StatusCode.INVALID_ARGUMENT, "inputs[1]"),
        ("two undecodable images (Predict): the first is named", lambda s: s.Predict(pb.PredictRequest(head_id=image_head, inputs=[pb.Input(image=OK_IMAGE), pb.Input(image=b"garbage"), pb.Input(image=OK_IMAGE), pb.Input(image=b"also garbage")])), grpc.StatusCode.INVALID_ARGUMENT, "inputs[1]"),
        ("image bomb", lambda s: s.Predict(pb.PredictRequest(head_id=image_head, inputs=[pb.Input(image=_bomb_png(30000, 30000))])), grpc.StatusCode.RESOURCE_EXHAUSTED, "inputs[0]"),
        ("empty text (Predict)", lambda s: s.Predict(pb.PredictRequest(head_id=text_head, inputs=[pb.Input(text="  ")])), grpc.StatusCode.INVALID_ARGUMENT, "inputs[0]"),
        ("empty text (FineTune)", lambda s: _fine_tune(s, pb.FineTuneRequest(backbone="minilm_l6", examples=[pb.Example(text="x", label="a"), pb.Example(text="", label="b")])), grpc.StatusCode.INVALID_ARGUMENT, "examples[1].text"),
        ("one class", lambda s: _fine_tune(s, pb.FineTuneRequest(backbone="efficientnet_lite0", examples=_image_examples(["a", "a"]))), grpc.StatusCode.INVALID_ARGUMENT, "at least 2"),
        ("empty label", lambda s: _fine_tune(s, pb.FineTuneRequest(backbone="efficientnet_lite0", examples=_image_examples(["a", "b", ""]))), grpc.StatusCode.INVALID_ARGUMENT, "examples[2].label"),
        ("example with no input", lambda s: _fine_tune(s, pb.FineTuneRequest(backbone="efficientnet_lite0", examples=[*two_classes, pb.Example(label="a")])), grpc.StatusCode.INVALID_ARGUMENT, "examples[2]"),
        ("no examples", lambda s: _fine_tune(s, pb.FineTuneRequest(backbone="efficientnet_lite0")), grpc.StatusCode.INVALID_ARGUMENT, "examples"),
        ("text to image backbone", lambda s: _fine_tune(s, pb.FineTuneRequest(backbone="efficientnet_lite0", examples=[pb.Example(text="hi", label="a"), pb.Example(text="yo", label="b")])), grpc.StatusCode.INVALID_ARGUMENT, "examples[0]"),
        ("text to image head", lambda s: s.Predict(pb.PredictRequest(head_id=image_head, inputs=[pb.Input(text="a cat")])), grpc.StatusCode.INVALID_ARGUMENT, "inputs[0]"),
        ("image to text head", lambda s: s.Predict(pb.PredictRequest(head_id=text_head, inputs=[pb.Input(image=OK_IMAGE)])), grpc.StatusCode.INVALID_ARGUMENT, "inputs[0]"),
        ("no inputs", lambda s: s.Predict(pb.PredictRequest(head_id=image_head)), grpc.StatusCode.INVALID_ARGUMENT, "inputs"),
        ("negative top_k", lambda s: s.Predict(pb.PredictRequest(head_id=image_head, inputs=[pb.Input(image=OK_IMAGE)], top_k=-1)), grpc.StatusCode.INVALID_ARGUMENT, "top_k"),
        ("too many inputs", lambda s: s.Predict(pb.PredictRequest(head_id=image_head, inputs=[pb.Input(image=OK_IMAGE)] * 513)), grpc.StatusCode.RESOURCE_EXHAUSTED, "inputs"),
        ("message too large", lambda s: s.Predict(pb.PredictRequest(head_id=image_head, inputs=[pb.Input(image=b"x" * (65 * 1024 * 1024))])), grpc.StatusCode.RESOURCE_EXHAUSTED, ""),
        ("trainable_blocks beyond the backbone", lambda s: _fine_tune(s, pb.FineTuneRequest(backbone="efficientnet_lite0", examples=two_classes, config=pb.TrainingConfig(trainable_blocks=99))), grpc.StatusCode.INVALID_ARGUMENT, "config.trainable_blocks"),
        ("trainable_blocks below -1", lambda s: _fine_tune(s, pb.FineTuneRequest(backbone="efficientnet_lite0", examples=two_classes, config=pb.TrainingConfig(trainable_blocks=-2))), grpc.StatusCode.INVALID_ARGUMENT, "config.trainable_blocks"),
        ("NaN learning rate", lambda s: _fine_tune(s, pb.FineTuneRequest(backbone="efficientnet_lite0", examples=two_classes, config=pb.TrainingConfig(learning_rate=math.nan))), grpc.StatusCode.INVALID_ARGUMENT, "config.learning_rate"),
        ("validation fraction 1", lambda s: _fine_tune(s, pb.FineTuneRequest(backbone="efficientnet_lite0", examples=two_classes, config=pb.TrainingConfig(validation_fraction=1.0))), grpc.StatusCode.INVALID_ARGUMENT, "config.validation_fraction"),
        ("augment on text", lambda s: _fine_tune(s, pb.FineTuneRequest(backbone="minilm_l6", examples=[pb.Example(text="x", label="a"), pb.Example(text="y", label="b")], config=pb.TrainingConfig(augment=True))), grpc.StatusCode.INVALID_ARGUMENT, "config.augment"),
        ("bad head name", lambda s: _fine_tune(s, pb.FineTuneRequest(backbone="efficientnet_lite0", head_name="../Evil", examples=two_classes)), grpc.StatusCode.INVALID_ARGUMENT, "head_name"),
        ("examples and dataset", lambda s: _fine_tune(s, pb.FineTuneRequest(backbone="efficientnet_lite0", examples=two_classes, dataset_id="ds-1")), grpc.StatusCode.INVALID_ARGUMENT, "dataset_id"),
        ("unavailable backbone", lambda s: _fine_tune(s, pb.FineTuneRequest(backbone="resnet18", examples=two_classes)), grpc.StatusCode.FAILED_PRECONDITION, "resnet18"),
        ("mixed-modality upload", lambda s: s.UploadDataset(iter([pb.UploadDatasetRequest(examples=[pb.Example(text="x", label="a"), pb.Example(image=OK_IMAGE, label="b")])])), grpc.StatusCode.INVALID_ARGUMENT, "examples[1]"),
        ("empty upload", lambda s: s.UploadDataset(iter([])), grpc.StatusCode.INVALID_ARGUMENT, "empty"),
        ("list heads of unknown backbone", lambda s: s.ListHeads(pb.ListHeadsRequest(backbone="nope")), grpc.StatusCode.NOT_FOUND, "backbone"),
    ]  # fmt: skip


def test_every_error_row(
    server: RunningServer, stub: pb_grpc.TransferServiceStub, image_head: str, text_head: str
) -> None:
    failures = []
    for name, call, code, field in _cases(image_head, text_head):
        try:
            call(stub)
        except grpc.RpcError as error:
            got_code, details = error.code(), error.details() or ""  # type: ignore[attr-defined]
        else:
            failures.append(f"{name}: expected {code.name}, but the call succeeded")
            continue
        # No server internals in a message: tracebacks, or Python object reprs ("<_io.BytesIO
        # object at 0x...>" is what Pillow says about undecodable bytes).
        internals = "Traceback" in details or " object at 0x" in details
        if got_code != code or field not in details or internals:
            failures.append(
                f"{name}: expected {code.name} naming {field!r}, got {got_code.name}: {details}"
            )
    assert not failures, "\n".join(failures)
    # The server is still healthy and serving after all of that.
    assert stub.ListBackbones(pb.ListBackbonesRequest(), timeout=30).backbones


@pytest.mark.parametrize(
    ("method", "shape"),
    [
        ("Predict", "unary"),
        ("ListBackbones", "unary"),
        ("GetJob", "unary"),
        ("FineTune", "server-stream"),
        ("UploadDataset", "client-stream"),
    ],
)
def test_bytes_that_are_not_a_message_are_invalid_argument(
    server: RunningServer, method: str, shape: str
) -> None:
    garbage = b"\xff\xff\xff\xff\x0f not protobuf"
    path = f"/transfer.v1.TransferService/{method}"
    with grpc.insecure_channel(server.address) as channel, pytest.raises(grpc.RpcError) as raised:
        if shape == "unary":
            channel.unary_unary(path)(garbage, timeout=30)
        elif shape == "server-stream":
            list(channel.unary_stream(path)(garbage, timeout=30))
        else:
            channel.stream_unary(path)(iter([garbage]), timeout=30)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
    assert "not a valid transfer.v1." in (raised.value.details() or "")  # type: ignore[attr-defined]
