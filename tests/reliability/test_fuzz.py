"""Property-based fuzzing (hypothesis) of every RPC against the real server: a small,
derandomised run of the fuzzer behind `make fuzz` (tools/reliability/fuzz.py). No crash, no
hang (every call has a deadline), no UNKNOWN/INTERNAL, the server SERVING throughout."""

from __future__ import annotations

import pytest

pytest.importorskip("hypothesis", reason="the fuzzer needs `hypothesis` (dev extra)")

from transfer_client.proto import transfer_service_pb2 as pb
from transfer_client.proto import transfer_service_pb2_grpc as pb_grpc

from tests.conftest import RunningServer
from tests.datasets import fashion_mnist
from tests.reliability.conftest import assert_serving
from tools.reliability.fuzz import ORDER, Fuzzer, Pools

EXAMPLES_PER_RPC = 100
SECONDS_PER_RPC = 20.0  # a bound, not a target: cheap RPCs take well under a second
CORRUPT_EXAMPLES_PER_RPC = 10


@pytest.fixture(scope="module")
def pools(stub: pb_grpc.TransferServiceStub, image_head: str, text_head: str) -> Pools:
    """The session's heads (never deleted), their jobs and one uploaded dataset."""
    made = Pools(protected=[image_head, text_head])
    made.modality = {image_head: "image", text_head: "text"}
    for head_id in (image_head, text_head):
        made.jobs.append(stub.GetHead(pb.GetHeadRequest(head_id=head_id), timeout=30).job_id)
    examples = [pb.Example(image=x, label=y) for x, y in fashion_mnist(2, classes=2, seed=41)]
    upload = stub.UploadDataset(iter([pb.UploadDatasetRequest(examples=examples)]), timeout=60)
    made.datasets.append(upload.dataset_id)
    return made


@pytest.fixture(scope="module")
def fuzzer(server: RunningServer, pools: Pools) -> Fuzzer:
    return Fuzzer(server.address, pools)


@pytest.mark.parametrize("method", ORDER)  # creators first: later RPCs reuse what they made
def test_generated_requests_never_crash_hang_or_fail_internally(
    method: str,
    fuzzer: Fuzzer,
    server: RunningServer,
    stub: pb_grpc.TransferServiceStub,
    image_head: str,
) -> None:
    report = fuzzer.fuzz(method, EXAMPLES_PER_RPC, time_limit_s=SECONDS_PER_RPC)
    assert report.ok, f"{report.line()}\n{report.error}\n" + "\n".join(report.violations[:5])
    # The time bound must not quietly turn the run into a handful of requests.
    assert report.sent >= EXAMPLES_PER_RPC // 2, report.line()
    assert_serving(server.address, stub, image_head)


@pytest.mark.parametrize("method", ORDER)
def test_generated_undecodable_requests_get_invalid_argument(
    method: str, fuzzer: Fuzzer, server: RunningServer
) -> None:
    report = fuzzer.fuzz(
        method,
        CORRUPT_EXAMPLES_PER_RPC,
        time_limit_s=SECONDS_PER_RPC,
        corrupt=True,
        keep_going=True,
    )
    assert report.ok, f"{report.line()}\n" + "\n".join(report.violations[:3])
