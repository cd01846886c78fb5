"""The server as `make run` starts it (`python -m transfer_service`, settings from TRANSFER_* env):
fine-tune and predict through the SDK, restart the process, predict again with the same head."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from transfer_client import (
    JobCancelled,
    JobStarted,
    JobState,
    JobWarning,
    TrainingConfig,
    TransferClient,
)

from tests.datasets import fashion_mnist

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ServerProcess:
    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.port = int(env["TRANSFER_PORT"])
        self._log = open(log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "transfer_service"],
            cwd=REPO,
            env=env,
            stdout=self._log,
            stderr=self._log,
        )
        self.log_path = log_path

    def wait_serving(self, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        with grpc.insecure_channel(f"127.0.0.1:{self.port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                assert self.process.poll() is None, self.log_path.read_text()
                try:
                    response = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=2)
                    if response.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
                time.sleep(0.2)
        raise AssertionError(f"server not SERVING in {timeout}s:\n{self.log_path.read_text()}")

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=60)
        finally:
            self._log.close()


@pytest.fixture()
def server_env(tmp_path: Path) -> Iterator[dict[str, str]]:
    env = dict(os.environ)
    env.update(
        TRANSFER_PORT=str(free_port()),
        TRANSFER_METRICS_PORT=str(free_port()),
        TRANSFER_STORE_DIR=str(tmp_path / "store"),
        TRANSFER_IMAGE_SIZE="64",
        TRANSFER_PRELOAD_BACKBONES="efficientnet_lite0",
        TRANSFER_GRACE_SECONDS="5",
        # No background compile (TRANSFER_COMPILE=auto): it would eat CI's cores mid-test.
        TRANSFER_COMPILE="false",
    )
    yield env


def test_head_survives_a_restart(server_env: dict[str, str], tmp_path: Path) -> None:
    train = fashion_mnist(10, classes=3, seed=4)
    test_images = [x for x, _ in fashion_mnist(5, split="test", classes=3, seed=5)]

    first = ServerProcess(server_env, tmp_path / "server.log")
    try:
        first.wait_serving()
        with TransferClient(f"127.0.0.1:{first.port}", timeout=60) as client:
            done = client.train(
                "efficientnet_lite0", train, head_name="survivor", config=TrainingConfig(epochs=5)
            )
            before = client.predict(done.head_id, test_images, top_k=3)
            job_id = done.job_id
    finally:
        assert first.stop() == 0, (tmp_path / "server.log").read_text()

    second = ServerProcess(server_env, tmp_path / "server.log")
    try:
        second.wait_serving()
        with TransferClient(f"127.0.0.1:{second.port}", timeout=60) as client:
            assert [h.head_id for h in client.list_heads()] == [done.head_id]
            after = client.predict(done.head_id, test_images, top_k=3)
            assert client.get_job(job_id).state is JobState.SUCCEEDED
            # The whole event log is still there to replay.
            assert [e.sequence for e in client.watch_job(job_id)][-1] == done.sequence
    finally:
        assert second.stop() == 0
    for old, new in zip(before, after, strict=True):
        assert new.label == old.label
        assert [s.label for s in new.top_k] == [s.label for s in old.top_k]
        assert new.score == pytest.approx(old.score, abs=1e-5)
    log = (tmp_path / "server.log").read_text()
    assert f"listening on 127.0.0.1:{server_env['TRANSFER_PORT']}" in log
    assert "Traceback" not in log


def test_a_job_cut_off_by_a_crash_runs_again_after_restart(
    server_env: dict[str, str], tmp_path: Path
) -> None:
    """It stays in the queue (no longer FAILED "the server stopped"): the restarted server
    claims it, says so in its log, and it can be cancelled as any running job."""
    train = fashion_mnist(6, classes=2, seed=6)
    first = ServerProcess(server_env, tmp_path / "server.log")
    try:
        first.wait_serving()
        with TransferClient(f"127.0.0.1:{first.port}", timeout=60) as client:
            stream = client.fine_tune(
                "efficientnet_lite0", train, head_name="crashy",
                config=TrainingConfig(epochs=1000, batch_size=1, early_stopping_patience=0),
            )  # fmt: skip
            job_id = next(event for event in stream if isinstance(event, JobStarted)).job_id
            first.process.kill()  # SIGKILL: no chance to clean up
            first.process.wait(timeout=30)
    finally:
        first.stop() if first.process.poll() is None else None

    second = ServerProcess(server_env, tmp_path / "server.log")
    try:
        second.wait_serving()
        with TransferClient(f"127.0.0.1:{second.port}", timeout=60) as client:
            restarted = None
            for event in client.watch_job(job_id):
                if isinstance(event, JobWarning) and event.code == "restarted":
                    restarted = event
                    break
            assert restarted is not None
            assert client.get_job(job_id).state is JobState.RUNNING
            client.cancel_job(job_id)
            assert isinstance(list(client.watch_job(job_id))[-1], JobCancelled)
            assert client.list_heads() == []
    finally:
        assert second.stop() == 0
