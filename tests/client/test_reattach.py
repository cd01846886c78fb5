"""The SDK re-attaches a job's broken event stream (issue 19): a server stopped (SIGTERM) in the
middle of a job and started again on the same port and store, with a real client following the
job the whole time. `train` (sync) and `fine_tune` (async) go on through `WatchJob(after_sequence)`
and end with the completed event, every event once, in sequence order; with no server coming
back, the call gives up after `reattach_seconds` with the last UnavailableError."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest
from transfer_client import (
    AsyncTransferClient,
    FineTuneEvent,
    JobCompleted,
    JobProgress,
    JobWarning,
    NotFoundError,
    TrainingConfig,
    TransferClient,
    UnavailableError,
)
from transfer_client.proto import transfer_service_pb2 as pb

from tests.client.test_retries import serve
from tests.datasets import fashion_mnist
from tools.reliability.common import ServerProcess, server_env

# A few seconds of training: the whole trunk, one example per step (as in test_durable_jobs).
SLOW = TrainingConfig(
    epochs=12, batch_size=1, early_stopping_patience=0, trainable_blocks=-1, seed=11
)
BACKBONE = "efficientnet_lite0"


@pytest.fixture
def store_env(tmp_path: Path) -> dict[str, str]:
    # The same env dict gives the same port on every start: the client reconnects there.
    return server_env(tmp_path / "store", preload=BACKBONE, grace_seconds=5.0)


class Restarts:
    """Servers on one store and port, started in turn; `restart()` (from any thread) stops the
    running one with SIGTERM and starts the next. All are killed at the end of the test."""

    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.env = env
        self.log = log
        self.servers = [self._started()]
        self.done = threading.Event()

    def _started(self) -> ServerProcess:
        server = ServerProcess(self.env, self.log)
        server.wait_serving()
        return server

    @property
    def address(self) -> str:
        return self.servers[0].address

    def restart(self) -> None:
        self.servers[-1].terminate()
        self.servers.append(self._started())
        self.done.set()

    def restart_in_background(self) -> threading.Thread:
        thread = threading.Thread(target=self.restart)
        thread.start()
        return thread

    def close(self) -> None:
        for server in self.servers:
            server.close()


@pytest.fixture
def restarts(store_env: dict[str, str], tmp_path: Path) -> Iterator[Restarts]:
    servers = Restarts(store_env, tmp_path / "server.log")
    try:
        yield servers
    finally:
        servers.close()


def training(event: FineTuneEvent) -> bool:
    return isinstance(event, JobProgress) and event.progress.phase == "training"


def assert_one_log(events: list[FineTuneEvent]) -> None:
    """Every event of the job once, in order: 1, 2, 3, ... and one completed event, last."""
    assert [e.sequence for e in events] == list(range(1, len(events) + 1)), [
        (e.sequence, type(e).__name__) for e in events
    ]
    assert len({e.job_id for e in events}) == 1
    assert sum(isinstance(e, JobCompleted) for e in events) == 1
    assert isinstance(events[-1], JobCompleted)
    # The stop was seen, and the job went on after it (it ran again on the new server).
    assert "requeued" in [e.code for e in events if isinstance(e, JobWarning)], events


def test_train_goes_on_across_a_server_restart(restarts: Restarts) -> None:
    seen: list[FineTuneEvent] = []
    restarting: list[threading.Thread] = []

    def on_event(event: FineTuneEvent) -> None:
        seen.append(event)
        if training(event) and not restarting:
            restarting.append(restarts.restart_in_background())

    examples = fashion_mnist(4, classes=2, seed=8)
    with TransferClient(restarts.address, timeout=60, reattach_seconds=120) as client:
        completed = client.train(
            BACKBONE, examples, head_name="restarted", config=SLOW, on_event=on_event
        )
        restarting[0].join()
        assert restarts.done.is_set() and len(restarts.servers) == 2
        assert_one_log(seen)
        assert completed == seen[-1]
        assert [h.head_id for h in client.list_heads(name="restarted")] == [completed.head_id]


async def test_async_fine_tune_goes_on_across_a_server_restart(restarts: Restarts) -> None:
    seen: list[FineTuneEvent] = []
    restarting: list[threading.Thread] = []
    examples = fashion_mnist(4, classes=2, seed=9)
    async with AsyncTransferClient(restarts.address, timeout=60, reattach_seconds=120) as client:
        async for event in client.fine_tune(
            BACKBONE, examples, head_name="restarted-async", config=SLOW
        ):
            seen.append(event)
            if training(event) and not restarting:
                restarting.append(restarts.restart_in_background())
        restarting[0].join()
        assert len(restarts.servers) == 2
        assert_one_log(seen)


def test_without_a_server_the_stream_gives_up_after_reattach_seconds(
    restarts: Restarts,
) -> None:
    examples = fashion_mnist(4, classes=2, seed=10)
    with TransferClient(restarts.address, timeout=60, reattach_seconds=3) as client:
        stream = client.fine_tune(BACKBONE, examples, head_name="abandoned", config=SLOW)
        seen = []
        for event in stream:
            seen.append(event)
            if training(event):
                break
        server = restarts.servers[0]
        stopping = threading.Thread(target=server.terminate)
        stopping.start()
        started = time.monotonic()
        with pytest.raises(UnavailableError):
            for event in stream:  # the "requeued" warning, then the break, then re-attaching
                seen.append(event)
        elapsed = time.monotonic() - started
        stopping.join()
    # The break comes within the server's grace (5 s), then 3 s of tries.
    assert elapsed < 5 + 3 + 3, elapsed
    assert elapsed > 3, elapsed
    assert [e.sequence for e in seen] == list(range(1, len(seen) + 1))


def test_a_fine_tune_refused_past_the_channel_retries_is_resent_with_its_request_id() -> None:
    """Before the first event the job id is unknown: the loop sends the same FineTune again
    (same request_id, so the server would answer with one job) beyond gRPC's 4 tries."""
    with serve(failures=6) as (target, service):
        with TransferClient(target, timeout=20, reattach_seconds=30) as client:
            assert list(client.fine_tune(BACKBONE, dataset_id="dataset-1")) == []
        assert service.calls == {"FineTune": 7}
        assert len(set(service.request_ids)) == 1 and service.request_ids[0]


def test_errors_carry_the_servers_request_id(restarts: Restarts) -> None:
    with (
        TransferClient(restarts.address, timeout=20) as client,
        pytest.raises(NotFoundError) as missing,
    ):
        client.get_head("no-such-head")
    assert missing.value.request_id, repr(missing.value)


class SilentAfterOne(grpc.GenericRpcHandler):  # type: ignore[type-arg]  # not subscriptable at run time
    """WatchJob answers its first call with the queued event and then nothing (a stream stuck
    behind a dead connection), and later calls with what comes after `after_sequence`."""

    def __init__(self) -> None:
        self.after: list[int] = []  # each WatchJob's after_sequence
        self.release = threading.Event()

    def service(
        self, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        if handler_call_details.method != "/transfer.v1.TransferService/WatchJob":  # type: ignore[attr-defined]
            return None

        def watch(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
            after = pb.WatchJobRequest.FromString(request).after_sequence
            self.after.append(after)
            log = [
                pb.FineTuneEvent(job_id="job-1", sequence=1, queued=pb.JobQueued()),
                pb.FineTuneEvent(job_id="job-1", sequence=2, completed=pb.JobCompleted()),
            ]
            if len(self.after) == 1:
                yield log[0].SerializeToString()
                self.release.wait(30)
                return
            for event in log[after:]:
                yield event.SerializeToString()

        return grpc.unary_stream_rpc_method_handler(watch)


@pytest.fixture
def silent() -> Iterator[tuple[str, SilentAfterOne]]:
    service = SilentAfterOne()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), handlers=[service])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}", service
    finally:
        service.release.set()
        server.stop(grace=None)


def test_a_silent_stream_is_re_attached_after_stream_idle_seconds(
    silent: tuple[str, SilentAfterOne],
) -> None:
    target, service = silent
    started = time.monotonic()
    with TransferClient(target, stream_idle_seconds=1.0) as client:
        events = list(client.watch_job("job-1"))
    assert time.monotonic() - started < 10
    assert [e.sequence for e in events] == [1, 2]
    assert isinstance(events[-1], JobCompleted)
    assert service.after == [0, 1]


async def test_the_async_client_re_attaches_a_silent_stream_alike(
    silent: tuple[str, SilentAfterOne],
) -> None:
    target, service = silent
    async with AsyncTransferClient(target, stream_idle_seconds=1.0) as client:
        events = [e async for e in client.watch_job("job-1")]
    assert [e.sequence for e in events] == [1, 2]
    assert service.after == [0, 1]


def test_a_silent_stream_without_re_attaching_raises_unavailable(
    silent: tuple[str, SilentAfterOne],
) -> None:
    target, service = silent
    with (
        TransferClient(target, stream_idle_seconds=1.0, reattach_seconds=0) as client,
        pytest.raises(UnavailableError, match="no event for 1 s"),
    ):
        list(client.watch_job("job-1"))
    assert service.after == [0]
