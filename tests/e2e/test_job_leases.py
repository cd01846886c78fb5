"""Job leases on the shared PostgreSQL store: a replica starting up leaves the jobs another
live replica runs alone, CancelJob through any replica reaches the one running the job, and
the job of a replica that was SIGKILLed is taken over by a live one once its lease runs out:
it runs again from the start, and its stream goes on with the same job id."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from transfer_client import (
    JobCancelled,
    JobStarted,
    JobWarning,
    TrainingConfig,
    TransferClient,
)
from transfer_client.types import JobState

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


def test_a_killed_replicas_job_is_taken_over_by_a_live_one(
    tmp_path: Path, database_url: str
) -> None:
    settings = {
        "TRANSFER_DATABASE_URL": database_url,
        "TRANSFER_JOB_LEASE_SECONDS": str(LEASE_SECONDS),
    }
    doomed = ServerProcess(
        server_env(tmp_path / "doomed", preload="", extra=settings), tmp_path / "doomed.log"
    )
    try:
        doomed.wait_serving()
        job_id = start_job(doomed.address)  # only it serves yet: it runs the job
    except BaseException:
        doomed.close()
        raise
    survivor = start_server(
        make_settings(
            tmp_path / "survivor",
            database_url=database_url,
            preload_backbones=[],
            job_lease_seconds=LEASE_SECONDS,
        )
    )
    try:
        doomed.kill()  # SIGKILL: the job stays RUNNING in the database, its lease runs out
        killed = time.monotonic()
        with TransferClient(survivor.address, timeout=120) as client:
            restarted = None
            seen = []
            for event in client.watch_job(job_id):
                seen.append(event)
                if isinstance(event, JobWarning) and event.code == "restarted":
                    restarted = time.monotonic() - killed
                if restarted is not None and isinstance(event, JobStarted):
                    break
            assert restarted is not None, seen
            # One log: sequences continue across the takeover, without gaps or repeats.
            assert [e.sequence for e in seen] == list(range(1, len(seen) + 1))
            assert sum(isinstance(e, JobStarted) for e in seen) == 2
            assert client.get_job(job_id).state is JobState.RUNNING
            client.cancel_job(job_id)  # endless: stop it
            assert isinstance(list(client.watch_job(job_id))[-1], JobCancelled)
            # The lease runs out LEASE_SECONDS after its last renewal (at most a third of a
            # lease before the kill); then the next claim poll (1 s) takes it.
            assert restarted < LEASE_SECONDS + 2.5, f"taken over {restarted:.1f} s after SIGKILL"
            print(
                f"killed replica's job running again on a live one {restarted:.1f} s after SIGKILL"
            )
    finally:
        survivor.stop()
        doomed.close()
