"""Each call's request id comes back in its own initial metadata, also when many calls run at
once and when a call fails after its handler has started work (the id is sent while the
handler runs, so the failure's status must wait for it)."""

from __future__ import annotations

import grpc
from transfer_client.proto import transfer_service_pb2 as pb
from transfer_client.proto import transfer_service_pb2_grpc as pb_grpc

from tests.conftest import RunningServer

# (request, expected status): a prediction, a failure in preprocessing (after a thread hop),
# and a failure before any work (an unknown head).
CallCase = tuple[pb.PredictRequest, grpc.StatusCode]


def _cases(text_head: str) -> list[CallCase]:
    def predict(head_id: str, text: str) -> pb.PredictRequest:
        return pb.PredictRequest(head_id=head_id, inputs=[pb.Input(text=text)])

    return [
        (predict(text_head, "markets rallied"), grpc.StatusCode.OK),
        (predict(text_head, "   "), grpc.StatusCode.INVALID_ARGUMENT),
        (predict("no-such-head", "x"), grpc.StatusCode.NOT_FOUND),
    ]


def test_concurrent_calls_each_get_their_own_request_id(
    server: RunningServer, text_head: str
) -> None:
    cases = _cases(text_head)
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.TransferServiceStub(channel)
        calls = []
        for i in range(36):
            request, expected = cases[i % len(cases)]
            request_id = f"concurrent-{i}"
            future = stub.Predict.future(
                request, metadata=(("x-request-id", request_id),), timeout=30
            )
            calls.append((request_id, expected, future))
        for request_id, expected, future in calls:
            assert future.code() == expected, (request_id, future.details())
            assert ("x-request-id", request_id) in future.initial_metadata()
            if expected == grpc.StatusCode.OK:
                assert future.result(timeout=60).predictions[0].label


def test_generated_request_ids_are_distinct(server: RunningServer) -> None:
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.TransferServiceStub(channel)
        generated = set()
        for _ in range(20):
            _, call = stub.ListJobs.with_call(pb.ListJobsRequest(), timeout=10)
            generated.add(dict(call.initial_metadata())["x-request-id"])
        assert len(generated) == 20
