"""The SDK's retry policy against a real gRPC server that refuses calls UNAVAILABLE: which calls
the client sends again, how often, and which it never does. The server is a bare one in the
test (the real service never answers UNAVAILABLE on demand), serving every method of
transfer.v1.TransferService by name, so the policy is checked against the wire's method paths."""

from __future__ import annotations

import contextlib
import os
import tempfile
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest
from transfer_client import AsyncTransferClient, TransferClient, UnavailableError
from transfer_client.proto import transfer_service_pb2 as pb

SERVICE = pb.DESCRIPTOR.services_by_name["TransferService"]
PREFIX = f"/{SERVICE.full_name}/"


class FlakyService(grpc.GenericRpcHandler):  # type: ignore[type-arg]  # not subscriptable at run time
    """Answers the first `failures` calls of each method UNAVAILABLE (after response headers
    if `headers_first`), later ones OK with an empty response (an empty stream for streams),
    and counts the calls of each method."""

    def __init__(self, failures: int, *, headers_first: bool = False) -> None:
        self.failures = failures
        self.headers_first = headers_first
        self.calls: Counter[str] = Counter()
        self.request_ids: list[str] = []  # FineTune's, in arrival order
        self._lock = threading.Lock()

    def _answer(self, name: str, context: grpc.ServicerContext) -> bytes:
        with self._lock:
            self.calls[name] += 1
            refuse = self.calls[name] <= self.failures
        if refuse:
            if self.headers_first:
                context.send_initial_metadata((("x-request-id", "r-1"),))
            context.abort(grpc.StatusCode.UNAVAILABLE, f"{name}: refused on purpose")
        response_type = getattr(pb, SERVICE.methods_by_name[name].output_type.name)
        return bytes(response_type().SerializeToString())

    def service(
        self, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        path: str = handler_call_details.method  # type: ignore[attr-defined]
        if not path.startswith(PREFIX):
            return None
        name = path.removeprefix(PREFIX)
        method = SERVICE.methods_by_name[name]

        def unary(request: bytes, context: grpc.ServicerContext) -> bytes:
            return self._answer(name, context)

        def client_stream(requests: Iterable[bytes], context: grpc.ServicerContext) -> bytes:
            return self._answer(name, context)

        def server_stream(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
            if name == "FineTune":
                self.request_ids.append(pb.FineTuneRequest.FromString(request).request_id)
            self._answer(name, context)
            yield from ()

        if method.client_streaming:
            return grpc.stream_unary_rpc_method_handler(client_stream)
        if method.server_streaming:
            return grpc.unary_stream_rpc_method_handler(server_stream)
        return grpc.unary_unary_rpc_method_handler(unary)


Served = tuple[str, FlakyService]


@contextlib.contextmanager
def serve(failures: int, *, headers_first: bool = False) -> Iterator[Served]:
    service = FlakyService(failures, headers_first=headers_first)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), handlers=[service])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}", service
    finally:
        server.stop(grace=None)


@pytest.fixture()
def always_refusing() -> Iterator[Served]:
    with serve(failures=1_000_000) as served:
        yield served


@pytest.fixture()
def refusing_once() -> Iterator[Served]:
    with serve(failures=1) as served:
        yield served


# Where the ExportHead call would write (it fails first, and leaves nothing there).
EXPORT_PATH = Path(tempfile.gettempdir()) / f"test-retries-{os.getpid()}.onnx"

# Each RPC of the service, as the client makes it.
CALLS: dict[str, Callable[[TransferClient], object]] = {
    "ListBackbones": lambda client: client.list_backbones(),
    "Predict": lambda client: client.predict("head-1", "some text"),
    "GetJob": lambda client: client.get_job("job-1"),
    "ListJobs": lambda client: client.list_jobs(),
    "WatchJob": lambda client: list(client.watch_job("job-1")),
    "ListHeads": lambda client: client.list_heads(),
    "GetHead": lambda client: client.get_head("head-1"),
    "EvaluateHead": lambda client: client.evaluate_head("head-1", [("some text", "news")]),
    "ExportHead": lambda client: client.export_head("head-1", EXPORT_PATH),
    "FineTune": lambda client: list(client.fine_tune("minilm_l6", dataset_id="dataset-1")),
    "UploadDataset": lambda client: client.upload_dataset([("some text", "news")]),
    "CancelJob": lambda client: client.cancel_job("job-1"),
    "DeleteHead": lambda client: client.delete_head("head-1"),
    "DeleteDataset": lambda client: client.delete_dataset("dataset-1"),
    "SetHeadAlias": lambda client: client.set_head_alias("head", "production", 2),
    "DeleteHeadAlias": lambda client: client.delete_head_alias("head", "production"),
}
RETRIED = {
    "FineTune",
    "ListBackbones",
    "Predict",
    "GetJob",
    "ListJobs",
    "WatchJob",
    "ListHeads",
    "GetHead",
    "EvaluateHead",
    "ExportHead",
    "SetHeadAlias",
}


def test_every_method_of_the_service_is_accounted_for() -> None:
    assert set(CALLS) == set(SERVICE.methods_by_name)


@pytest.mark.parametrize("method", sorted(CALLS))
def test_idempotent_calls_are_retried_and_the_others_are_not(
    always_refusing: Served, method: str
) -> None:
    target, service = always_refusing
    # The channel's retry policy alone: re-attaching streams (tests/client/test_reattach.py)
    # would send FineTune and WatchJob again for reattach_seconds.
    with (
        TransferClient(target, timeout=20, reattach_seconds=0) as client,
        pytest.raises(UnavailableError),
    ):
        CALLS[method](client)
    assert service.calls == {method: 4 if method in RETRIED else 1}


@pytest.mark.parametrize("max_attempts", [1, 2, 5])
def test_max_attempts_counts_every_try(always_refusing: Served, max_attempts: int) -> None:
    target, service = always_refusing
    with (
        TransferClient(target, timeout=20, max_attempts=max_attempts) as client,
        pytest.raises(UnavailableError),
    ):
        client.get_head("head-1")
    assert service.calls == {"GetHead": max_attempts}


def test_a_call_refused_once_succeeds_on_its_retry(refusing_once: Served) -> None:
    target, service = refusing_once
    with TransferClient(target, timeout=20) as client:
        assert client.list_backbones() == []
        assert client.list_heads() == []
    assert service.calls == {"ListBackbones": 2, "ListHeads": 2}


def test_without_retries_the_refusal_reaches_the_caller(refusing_once: Served) -> None:
    target, service = refusing_once
    with TransferClient(target, timeout=20, max_attempts=1) as client:
        with pytest.raises(UnavailableError):
            client.list_backbones()
        assert client.list_backbones() == []  # the server's second answer is OK
    assert service.calls == {"ListBackbones": 2}


def test_fine_tune_refused_once_is_sent_again_with_the_same_request_id(
    refusing_once: Served,
) -> None:
    """Safe because the server answers a repeated request_id with the first call's job."""
    target, service = refusing_once
    with TransferClient(target, timeout=20) as client:
        list(client.fine_tune("minilm_l6", dataset_id="dataset-1"))
        list(client.fine_tune("minilm_l6", dataset_id="dataset-1", request_id="mine-1"))
    assert service.calls == {"FineTune": 3}
    first, resent, own = service.request_ids
    assert first and first == resent  # a UUID made by the SDK, kept for the retry
    assert own == "mine-1"


async def test_the_async_client_retries_alike(refusing_once: Served) -> None:
    target, service = refusing_once
    async with AsyncTransferClient(target, timeout=20) as client:
        assert await client.list_heads() == []
        with pytest.raises(UnavailableError):
            await client.delete_head("head-1")
    assert service.calls == {"ListHeads": 2, "DeleteHead": 1}


def test_a_refusal_after_response_headers_is_not_retried() -> None:
    """gRPC commits a call once its response headers arrive: a server must refuse with a
    trailers-only response (no initial metadata first) for the client to retry elsewhere."""
    with serve(failures=1, headers_first=True) as (target, service):
        with (
            TransferClient(target, timeout=20) as client,
            pytest.raises(UnavailableError) as refused,
        ):
            client.list_backbones()
        assert service.calls == {"ListBackbones": 1}
        assert refused.value.request_id == "r-1"  # the server's x-request-id, for its logs


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"load_balancing": "least_request"}, "load_balancing"),
        ({"max_attempts": 0}, "max_attempts"),
        ({"max_attempts": 6}, "max_attempts"),
        ({"reattach_seconds": -1}, "reattach_seconds"),
    ],
)
def test_unusable_options_are_refused(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TransferClient("localhost:1", **options)


def _dead_target() -> str:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{probe.getsockname()[1]}"


def test_a_stream_waiting_for_ready_gives_up_after_the_timeout() -> None:
    """wait_for_ready on a FineTune stream (no deadline of its own) waits for the server as
    long as a unary call would, then raises UNAVAILABLE, instead of waiting forever."""
    import time

    started = time.monotonic()
    with (
        pytest.raises(UnavailableError, match="no server became ready within 1 s"),
        TransferClient(_dead_target(), wait_for_ready=True, timeout=1.0) as client,
    ):
        client.train("efficientnet_lite0", [(b"not used", "a")])
    assert time.monotonic() - started < 10


async def test_an_async_stream_waiting_for_ready_gives_up_after_the_timeout() -> None:
    import time

    started = time.monotonic()
    with pytest.raises(UnavailableError, match="no server became ready within 1 s"):
        async with AsyncTransferClient(_dead_target(), wait_for_ready=True, timeout=1.0) as client:
            await client.train("efficientnet_lite0", [(b"not used", "a")])
    assert time.monotonic() - started < 10
