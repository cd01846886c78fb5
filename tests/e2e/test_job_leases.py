"""Job leases on the shared PostgreSQL store: a replica starting up leaves the jobs another
live replica runs alone (start-up recovery used to fail every unfinished job in the database),
and the job of a replica that was SIGKILLed is ended by a live one once its lease runs out,
so its stream, GetJob and its tenant's job quota do not wait on it forever."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from transfer_client import JobCancelled, JobStarted, TrainingConfig, TransferClient
from transfer_client.types import JobState
from transfer_service.training.recovery import INTERRUPTED_REASON

from tests.conftest import RunningServer, make_settings, start_server
from tests.datasets import fashion_mnist
from tools.reliability.common import ServerProcess, server_env

LEASE_SECONDS = 3.0
# A job that runs until cancelled or its process dies: the whole trunk trained, one example
# per step, many epochs.
ENDLESS = TrainingConfig(epochs=1000, batch_size=1, early_stopping_patience=0, trainable_blocks=-1)


@pytest.fixture
def live_replica(tmp_path: Path, database_url: str) -> Iterator[RunningServer]:
    running = start_server(
        make_settings(
            tmp_path / "live",
            database_url=database_url,
            preload_backbones=[],
            job_lease_seconds=LEASE_SECONDS,
        )
    )
    yield running
    running.stop()


def start_job(address: str) -> str:
    """Starts an endless job through `address` and returns its id once it runs."""
    with TransferClient(address, timeout=120) as client:
        events = client.fine_tune(
            "efficientnet_lite0",
            fashion_mnist(4, classes=2, seed=8),
            head_name="long",
            config=ENDLESS,
        )
        for event in events:
            if isinstance(event, JobStarted):
                return event.job_id
    raise AssertionError("the job never started")


def test_a_starting_replica_leaves_a_live_replicas_job_running(
    live_replica: RunningServer, tmp_path: Path, database_url: str
) -> None:
    job_id = start_job(live_replica.address)
    newcomer = start_server(
        make_settings(
            tmp_path / "newcomer",
            database_url=database_url,
            preload_backbones=[],
            job_lease_seconds=LEASE_SECONDS,
        )
    )
    try:
        time.sleep(2 * LEASE_SECONDS)  # several renew-and-settle rounds on both replicas
        with TransferClient(newcomer.address, timeout=60) as client:
            assert client.get_job(job_id).state is JobState.RUNNING
        with TransferClient(live_replica.address, timeout=60) as client:
            assert client.get_job(job_id).state is JobState.RUNNING
            client.cancel_job(job_id)
    finally:
        newcomer.stop()


def test_cancel_job_through_another_replica_stops_the_job(
    live_replica: RunningServer, tmp_path: Path, database_url: str
) -> None:
    """CancelJob on B for a job A runs: recorded in the database, read back by A at its next
    lease renewal (a third of the lease), and the job ends CANCELLED."""
    job_id = start_job(live_replica.address)
    other = start_server(
        make_settings(
            tmp_path / "other",
            database_url=database_url,
            preload_backbones=[],
            job_lease_seconds=LEASE_SECONDS,
        )
    )
    try:
        with TransferClient(other.address, timeout=60) as client:
            asked = time.monotonic()
            assert client.cancel_job(job_id).state is JobState.RUNNING
        with TransferClient(live_replica.address, timeout=60) as client:
            ended = list(client.watch_job(job_id))[-1]
            took = time.monotonic() - asked
            assert isinstance(ended, JobCancelled), ended
            assert client.get_job(job_id).state is JobState.CANCELLED
        # A third of the lease between renewals, plus a training step and the round trips.
        assert took < LEASE_SECONDS, f"cancelled {took:.1f} s after CancelJob on the other replica"
        print(f"cancelled through another replica in {took:.2f} s")
    finally:
        other.stop()


def test_a_killed_replicas_job_is_ended_by_a_live_one(
    live_replica: RunningServer, tmp_path: Path, database_url: str
) -> None:
    env = server_env(
        tmp_path / "doomed",
        preload="",
        extra={
            "TRANSFER_DATABASE_URL": database_url,
            "TRANSFER_JOB_LEASE_SECONDS": str(LEASE_SECONDS),
        },
    )
    doomed = ServerProcess(env, tmp_path / "doomed.log")
    try:
        doomed.wait_serving()
        job_id = start_job(doomed.address)
        doomed.kill()  # SIGKILL: the job stays RUNNING in the database, its lease runs out
        killed = time.monotonic()
        with TransferClient(live_replica.address, timeout=60) as client:
            deadline = killed + 4 * LEASE_SECONDS
            job = client.get_job(job_id)
            while job.state is JobState.RUNNING and time.monotonic() < deadline:
                time.sleep(0.2)
                job = client.get_job(job_id)
            ended_after = time.monotonic() - killed
            assert job.state is JobState.FAILED, f"still {job.state} {ended_after:.1f} s on"
            assert job.error == INTERRUPTED_REASON
            events = list(client.watch_job(job_id))
            assert events[-1].reason == INTERRUPTED_REASON  # type: ignore[union-attr]
            print(f"killed replica's job ended by a live one {ended_after:.1f} s after SIGKILL")
    finally:
        doomed.close()
