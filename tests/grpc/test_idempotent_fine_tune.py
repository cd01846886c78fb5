"""FineTune's request_id (AIP-155): a FineTune sent again with the same key, as after a lost
connection, answers with the job the first one queued and trains nothing more; the key is
the tenant's, bound to the request it first came with, and checked."""

from __future__ import annotations

import grpc
import pytest
from transfer_client import (
    FailedPreconditionError,
    InvalidArgumentError,
    JobCompleted,
    TrainingConfig,
    TransferClient,
)
from transfer_client.proto import transfer_service_pb2 as pb
from transfer_client.proto import transfer_service_pb2_grpc as pb_grpc

from tests.conftest import RunningServer

CONFIG = TrainingConfig(epochs=2)


def test_a_repeated_request_id_returns_the_first_job_and_trains_once(
    client: TransferClient, text_small: tuple[list[tuple[str, str]], list[tuple[str, str]]]
) -> None:
    examples = text_small[0]
    first = list(
        client.fine_tune(
            "minilm_l6", examples, head_name="once", config=CONFIG, request_id="retry-1"
        )
    )
    again = list(
        client.fine_tune(
            "minilm_l6", examples, head_name="once", config=CONFIG, request_id="retry-1"
        )
    )
    assert {e.job_id for e in first} == {e.job_id for e in again}
    # The second call streams the same, finished log from its start.
    assert [e.sequence for e in again] == [e.sequence for e in first]
    assert isinstance(again[-1], JobCompleted) and isinstance(first[-1], JobCompleted)
    assert [h.name for h in client.list_heads(name="once")] == ["once"]
    assert sum(j.head_name == "once" for j in client.list_jobs()) == 1

    # Without a key (or with another) the same request is a new job.
    other = list(
        client.fine_tune(
            "minilm_l6", examples, head_name="once", config=CONFIG, request_id="retry-2"
        )
    )
    assert other[0].job_id != first[0].job_id


def test_a_request_id_reused_for_another_request_is_refused(
    client: TransferClient, text_small: tuple[list[tuple[str, str]], list[tuple[str, str]]]
) -> None:
    examples = text_small[0]
    list(client.fine_tune("minilm_l6", examples, head_name="reuse", config=CONFIG, request_id="k"))
    with pytest.raises(FailedPreconditionError, match="request_id"):
        list(
            client.fine_tune(
                "minilm_l6", examples[:-1], head_name="reuse", config=CONFIG, request_id="k"
            )
        )


@pytest.mark.parametrize("request_id", ["x" * 101, "has space", "slash/", "ü"])
def test_a_malformed_request_id_is_invalid_argument(
    client: TransferClient,
    text_small: tuple[list[tuple[str, str]], list[tuple[str, str]]],
    request_id: str,
) -> None:
    with pytest.raises(InvalidArgumentError, match="request_id"):
        list(client.fine_tune("minilm_l6", text_small[0], head_name="bad", request_id=request_id))


def test_the_raw_api_without_a_request_id_queues_a_new_job_each_time(
    server: RunningServer, text_small: tuple[list[tuple[str, str]], list[tuple[str, str]]]
) -> None:
    request = pb.FineTuneRequest(
        backbone="minilm_l6",
        head_name="raw",
        examples=[pb.Example(text=text, label=label) for text, label in text_small[0]],
        config=pb.TrainingConfig(epochs=1),
    )
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.TransferServiceStub(channel)
        jobs = {next(iter(stub.FineTune(request, timeout=120))).job_id for _ in range(2)}
    assert len(jobs) == 2
