"""The server on the PostgreSQL store while its database is down (issue 17): Predict on warm
heads keeps working; every call that needs the database answers UNAVAILABLE, saying the
database is unreachable (never INTERNAL or UNKNOWN), within a few seconds, not at the
caller's deadline; health stays SERVING (the warm heads are still served, and
a probe that failed would take every replica out of the Service at once); and once the
database is back, the pool reconnects by itself and those calls succeed again, without a
restart.

The server runs on a PostgreSQL of its own (the session's is shared: this test stops it). A job
running while the database goes down is out of scope here (job leases come later)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from transfer_client import TrainingConfig, TransferClient
from transfer_client.errors import TransferError
from transfer_service.errors import UnavailableError
from transfer_service.store.pg_pool import Database

from tests.conftest import RunningServer, make_settings, start_server
from tests.datasets import fashion_mnist
from tests.postgres_server import PostgresServer

BACKBONE = "efficientnet_lite0"
UNREACHABLE = "the store's database is unreachable"
# A call that needs the database fails within this many seconds while it is down: one slice of
# the pool's wait (pg_pool.WAIT_SLICE, 1 s; before, its whole `timeout`, 10 s) plus slack for 2
# busy CPUs. The caller's deadline is far beyond it.
FAILS_WITHIN_S = 4.0
CALL_DEADLINE_S = 60.0
# Once the database is back, calls that need it succeed again within this many seconds.
RECOVERS_WITHIN_S = 10.0
WARM_PREDICTS = 20
# Long enough for psycopg_pool's reconnection backoff to reach 16 s between attempts, and how
# soon the pool must take connections again after it.
OUTAGE_S = 17.0
RECONNECTS_WITHIN_S = 5.0


@pytest.fixture()
def own_postgres() -> Iterator[PostgresServer]:
    """A PostgreSQL for this test alone, which it stops and starts again."""
    server = PostgresServer().start()
    yield server
    server.stop()


@pytest.fixture()
def running(tmp_path: Path, own_postgres: PostgresServer) -> Iterator[RunningServer]:
    url = own_postgres.create_database()
    server = start_server(make_settings(tmp_path, database_url=url, preload_backbones=[BACKBONE]))
    yield server
    server.stop()


def _unavailable(call: Callable[[], object]) -> tuple[TransferError, float]:
    """Runs `call`, which must fail; returns its error and how long it took."""
    started = time.monotonic()
    with pytest.raises(TransferError) as caught:
        call()
    return caught.value, time.monotonic() - started


def _health(address: str) -> int:
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        response = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
    return int(response.status)


def test_warm_predicts_survive_a_database_outage_and_the_pool_reconnects(
    running: RunningServer, own_postgres: PostgresServer
) -> None:
    train = fashion_mnist(8, split="train", seed=1, classes=3)
    images = [image for image, _ in fashion_mnist(2, split="test", seed=2, classes=3)]
    # max_attempts=1 and reattach_seconds=0: each failure is seen as the server answers it, not
    # after the SDK's retries or re-attaching.
    with TransferClient(
        running.address, timeout=CALL_DEADLINE_S, max_attempts=1, reattach_seconds=0
    ) as client:
        config = TrainingConfig(epochs=2, seed=3)
        warm = client.train(BACKBONE, train, head_name="warm", config=config)
        cold = client.train(BACKBONE, train, head_name="cold", config=config)
        expected = [p.label for p in client.predict(warm.head_id, images)]
        running.app.heads.discard(cold.head_id)  # only the database has it now

        own_postgres.pause()

        # Predict on a warm head never touches the database.
        failures = 0
        for _ in range(WARM_PREDICTS):
            try:
                assert [p.label for p in client.predict(warm.head_id, images)] == expected
            except TransferError:
                failures += 1
        assert failures == 0

        # Every call that needs the database: UNAVAILABLE, saying so, within seconds.
        needs_database: dict[str, Callable[[], object]] = {
            "ListHeads": client.list_heads,
            # A job this replica does not hold in memory (another replica's, or an old one).
            "GetJob": lambda: client.get_job("job-" + "0" * 16),
            "ListJobs": client.list_jobs,
            "GetHead": lambda: client.get_head(cold.head_id),
            "Predict (cold head)": lambda: client.predict(cold.head_id, images),
            "FineTune": lambda: client.train(BACKBONE, train, head_name="down", config=config),
            "UploadDataset": lambda: client.upload_dataset(train),
        }
        for name, call in needs_database.items():
            error, took = _unavailable(call)
            assert error.code == "UNAVAILABLE", (name, error)
            assert UNREACHABLE in error.message, (name, error)
            assert took < FAILS_WITHIN_S, (name, took)

        # A job this replica ran is still answered from memory.
        assert client.get_job(warm.job_id).head_id == warm.head_id

        # Health stays SERVING: warm heads are still served, and the database is every
        # replica's, so failing the probe on it would take them all out of the Service at once
        # (README, "Operating it").
        assert _health(running.address) == health_pb2.HealthCheckResponse.SERVING
        # ... and so are warm Predicts, after all those failures.
        assert [p.label for p in client.predict(warm.head_id, images)] == expected

        own_postgres.resume()

        back = time.monotonic()
        while True:
            try:
                heads = client.list_heads()
                break
            except TransferError as exc:
                assert exc.code == "UNAVAILABLE", exc
                assert time.monotonic() - back < RECOVERS_WITHIN_S, "the pool did not reconnect"
                time.sleep(0.2)
        recovered_after = time.monotonic() - back
        assert {head.head_id for head in heads} == {warm.head_id, cold.head_id}
        assert recovered_after < RECOVERS_WITHIN_S
        assert client.get_job(warm.job_id).head_id == warm.head_id
        assert client.get_head(cold.head_id).head_id == cold.head_id
        assert [p.label for p in client.predict(cold.head_id, images)]
        again = client.train(BACKBONE, train, head_name="again", config=config)
        assert client.predict(again.head_id, images)


def test_the_pool_reconnects_soon_after_a_long_outage(own_postgres: PostgresServer) -> None:
    """The pool replaces lost connections in the background, backing off. With psycopg_pool's
    default (keep backing off for 5 minutes) its attempts came 1, 2, 4, 8, 16 s... apart, so a
    database back after 17 s went unused for ~14 s more (after minutes, for a minute or two).
    Now calls succeed within a few seconds of its return; while it is down, each fails within
    about a second, as the pool's direct user sees it."""
    database = Database(own_postgres.create_database())
    database.open()
    try:
        with database.transaction() as conn:
            conn.execute("SELECT 1")
        own_postgres.pause()
        down = time.monotonic()
        while time.monotonic() - down < OUTAGE_S:
            started = time.monotonic()
            with (
                pytest.raises(UnavailableError, match="database is unreachable"),
                database.transaction() as conn,
            ):
                conn.execute("SELECT 1")
            assert time.monotonic() - started < FAILS_WITHIN_S
            time.sleep(1.0)
        own_postgres.resume()
        back = time.monotonic()
        while True:
            try:
                with database.transaction() as conn:
                    conn.execute("SELECT 1")
                break
            except UnavailableError:
                assert time.monotonic() - back < RECONNECTS_WITHIN_S, "no reconnection"
                time.sleep(0.2)
    finally:
        database.close()
