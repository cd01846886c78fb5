"""Fixtures of the reliability suite (issue 6): raw stubs on the session server and a check
that the server is still healthy and serving."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest
from transfer_client.proto import transfer_service_pb2 as pb
from transfer_client.proto import transfer_service_pb2_grpc as pb_grpc

from tests.conftest import RunningServer
from tests.datasets import fashion_mnist
from tools.reliability.common import BIG_MESSAGES, SERVING, health_status


@pytest.fixture(scope="module")
def channel(server: RunningServer) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server.address, options=BIG_MESSAGES) as opened:
        yield opened


@pytest.fixture(scope="module")
def stub(channel: grpc.Channel) -> pb_grpc.TransferServiceStub:
    return pb_grpc.TransferServiceStub(channel)


def probe_images(count: int = 4) -> list[bytes]:
    return [image for image, _ in fashion_mnist(count, split="test", classes=1, seed=21)]


def assert_serving(address: str, stub: pb_grpc.TransferServiceStub, head_id: str) -> None:
    """Health reads SERVING and an ordinary Predict still works."""
    assert health_status(address) == SERVING, "health is not SERVING"
    response = stub.Predict(
        pb.PredictRequest(head_id=head_id, inputs=[pb.Input(image=probe_images(1)[0])]),
        timeout=60,
    )
    assert len(response.predictions) == 1
