"""Graceful stop of `python -m transfer_service`: SIGTERM with 30 Predicts in flight. Health turns
NOT_SERVING (pushed to a Watch stream), every in-flight Predict the server has taken up
completes with the same answer as before (one still queued in the core may be refused
UNAVAILABLE), calls made in the drain window after NOT_SERVING get UNAVAILABLE, and the process
exits 0 within TRANSFER_GRACE_SECONDS.

A call that reaches the server in the last milliseconds before SIGTERM, before the server has
picked it up, must still be answered (OK, or UNAVAILABLE so the client retries elsewhere),
never CANCELLED: that is the second test (the service drains for TRANSFER_DRAIN_SECONDS
before grpc's server.stop(), which would cancel such calls)."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from transfer_client import TrainingConfig, TransferClient
from transfer_client.proto import transfer_service_pb2 as pb
from transfer_client.proto import transfer_service_pb2_grpc as pb_grpc
from transfer_service.edge.request_interceptor import DRAINING_DETAILS

from tests.datasets import fashion_mnist
from tools.reliability.common import NOT_SERVING, ServerProcess, server_env

GRACE_SECONDS = 20.0
DRAIN_SECONDS = 1.0
IN_FLIGHT = 30
IMAGES_PER_CALL = 24
# Client threads observe the health push and the first refusal on different connections;
# this much scheduling skew between them is tolerated.
OBSERVATION_SKEW_S = 0.5


@dataclass
class HealthWatch:
    """Follows grpc.health.v1 Watch on its own channel; notes when NOT_SERVING arrives."""

    address: str
    not_serving_at: float | None = None
    statuses: list[int] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        with grpc.insecure_channel(self.address) as channel:
            call = health_pb2_grpc.HealthStub(channel).Watch(
                health_pb2.HealthCheckRequest(service=""), timeout=GRACE_SECONDS + 120
            )
            try:
                for response in call:
                    self.statuses.append(response.status)
                    if response.status == NOT_SERVING:
                        self.not_serving_at = time.monotonic()
                        break  # a client that saw NOT_SERVING goes away
            except grpc.RpcError:
                pass
            finally:
                call.cancel()


@dataclass
class Prober:
    """New Predict calls, one after another, until the process is gone."""

    address: str
    request: pb.PredictRequest
    calls: list[tuple[float, float, grpc.StatusCode]] = field(default_factory=list)
    details: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        with grpc.insecure_channel(self.address) as channel:
            stub = pb_grpc.TransferServiceStub(channel)
            deadline = time.monotonic() + GRACE_SECONDS + 30
            while not self.stop.is_set() and time.monotonic() < deadline:
                started = time.monotonic()
                try:
                    stub.Predict(self.request, timeout=10)
                    code, details = grpc.StatusCode.OK, ""
                except grpc.RpcError as error:
                    code, details = error.code(), error.details() or ""  # type: ignore[attr-defined]
                self.calls.append((started, time.monotonic(), code))
                self.details.append(details)
                time.sleep(0.005)


def _serving_with_a_head(tmp_path: Path) -> tuple[ServerProcess, str]:
    env = server_env(
        tmp_path / "store",
        grace_seconds=GRACE_SECONDS,
        extra={"TRANSFER_DRAIN_SECONDS": str(DRAIN_SECONDS)},
    )
    server = ServerProcess(env, tmp_path / "server.log")
    server.wait_serving()
    with TransferClient(server.address, timeout=120) as client:
        head_id = client.train(
            "efficientnet_lite0",
            fashion_mnist(5, classes=3, seed=52),
            head_name="drain",
            config=TrainingConfig(epochs=3),
        ).head_id
    return server, head_id


def test_sigterm_drains_in_flight_predicts_and_exits_within_grace(tmp_path: Path) -> None:
    images = [image for image, _ in fashion_mnist(8, split="test", classes=3, seed=51)]
    request = pb.PredictRequest(
        inputs=[pb.Input(image=images[i % len(images)]) for i in range(IMAGES_PER_CALL)], top_k=2
    )
    server, head_id = _serving_with_a_head(tmp_path)
    with server:
        request.head_id = head_id
        channel = grpc.insecure_channel(server.address)
        stub = pb_grpc.TransferServiceStub(channel)
        reference = stub.Predict(request, timeout=60)

        watch = HealthWatch(server.address)
        watcher = threading.Thread(target=watch.run, daemon=True)
        watcher.start()
        assert _wait(lambda: bool(watch.statuses), 10), "health Watch sent nothing"

        in_flight = [stub.Predict.future(request, timeout=120) for _ in range(IN_FLIGHT)]
        time.sleep(0.5)  # the 30 reach the server (loopback) and queue for the trunk
        pending = [not future.done() for future in in_flight]
        small = pb.PredictRequest(head_id=head_id, inputs=[pb.Input(image=images[0])])
        prober = Prober(server.address, small)
        probing = threading.Thread(target=prober.run, daemon=True)

        terminated = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        probing.start()
        try:
            code = server.process.wait(timeout=GRACE_SECONDS + 30)
        finally:
            prober.stop.set()
        exited = time.monotonic()
        probing.join(15)
        watcher.join(15)
        results = [future.exception() or future.result() for future in in_flight]
        channel.close()
        log = server.log_tail(10**6)

    assert code == 0, log[-3000:]
    assert exited - terminated <= GRACE_SECONDS, f"exit took {exited - terminated:.1f}s"
    # A call the server had taken up by SIGTERM is answered. One still queued in the core
    # then (on a busy machine, 0.5 s is not always enough for 30) is refused UNAVAILABLE, as
    # the second test allows; anything else is a failure.
    answered_after_sigterm = 0
    for response, was_pending in zip(results, pending, strict=True):
        if isinstance(response, pb.PredictResponse):
            labels = [p.label for p in response.predictions]
            assert labels == [p.label for p in reference.predictions]
            answered_after_sigterm += was_pending
        else:
            assert response.code() == grpc.StatusCode.UNAVAILABLE, response  # type: ignore[attr-defined]
            assert response.details() == DRAINING_DETAILS, response  # type: ignore[attr-defined]
    assert answered_after_sigterm >= IN_FLIGHT // 2, (
        f"only {answered_after_sigterm} of {IN_FLIGHT} calls were answered after SIGTERM"
    )
    assert watch.not_serving_at is not None, f"health never read NOT_SERVING: {watch.statuses}"
    after = [call for call in prober.calls if call[0] >= watch.not_serving_at]
    assert after, "no call was made after health read NOT_SERVING"
    # In the drain window every new call is refused UNAVAILABLE; one that lands in the instant
    # grpc's stop() begins, after it, may read CANCELLED (see below).
    drain_ends = watch.not_serving_at + DRAIN_SECONDS - OBSERVATION_SKEW_S
    in_drain = [(round(s - watch.not_serving_at, 3), c.name) for s, e, c in after if e < drain_ends]
    assert in_drain, "no call was made in the drain window"
    assert {code for _, code in in_drain} == {"UNAVAILABLE"}, in_drain
    assert all(c != grpc.StatusCode.OK for _, _, c in after), "a call was served after NOT_SERVING"
    refused = [end for _, end, c in prober.calls if c == grpc.StatusCode.UNAVAILABLE]
    assert refused and min(refused) >= watch.not_serving_at - OBSERVATION_SKEW_S, (
        "calls were refused before health read NOT_SERVING"
    )
    # The prober ignores NOT_SERVING: a call of it that lands in the instant grpc's stop()
    # begins, after the drain window, may read CANCELLED. The next test holds calls sent
    # before SIGTERM to OK/UNAVAILABLE.
    allowed = {grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED}
    unexpected = [
        (round(start - terminated, 3), code.name, details)
        for (start, _, code), details in zip(prober.calls, prober.details, strict=True)
        if code not in allowed
    ]
    assert not unexpected, unexpected[:10]
    assert "Traceback" not in log


def test_calls_sent_just_before_sigterm_are_answered_not_cancelled(tmp_path: Path) -> None:
    image = fashion_mnist(1, split="test", classes=1, seed=53)[0][0]
    server, head_id = _serving_with_a_head(tmp_path)
    request = pb.PredictRequest(head_id=head_id, inputs=[pb.Input(image=image)] * IMAGES_PER_CALL)
    with server, grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.TransferServiceStub(channel)
        stub.Predict(request, timeout=60)  # connected and warm
        calls = [stub.Predict.future(request, timeout=120) for _ in range(IN_FLIGHT)]
        server.process.send_signal(signal.SIGTERM)  # the calls are on the wire, not yet served
        code = server.process.wait(timeout=GRACE_SECONDS + 30)
        outcomes = [call.exception() for call in calls]
    codes = [grpc.StatusCode.OK if e is None else e.code() for e in outcomes]  # type: ignore[attr-defined]
    assert code == 0
    cancelled = codes.count(grpc.StatusCode.CANCELLED)
    assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE}, (
        f"{cancelled} of {IN_FLIGHT} calls sent just before SIGTERM were CANCELLED"
    )


def _wait(condition: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False
