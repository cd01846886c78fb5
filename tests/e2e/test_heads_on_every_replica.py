"""Heads on every replica (issue 17): two real servers, A and B, on one PostgreSQL database,
called through the real client. A head trained on A and warm in B's cache:

- deleted on A, B answers Predict NOT_FOUND within 1 s (A's NOTIFY, heard by B's watcher);
- with B deaf to notifications, B's backstop (one check of its resident ids a second) still
  gets it there within 2 s (1 s interval + the query + the polling here);
- a warm Predict on B touches the database not at all: 50 of them open no connection from
  B's pool, and (the backstop's interval made long meanwhile) run no backstop query either;
- an alias moved on A (issue 18) answers `name` on B within a second (A's NOTIFY on the
  names channel drops B's cached name; the cache's 1 s age bound is the backstop), and B's
  calls meanwhile never fail."""

from __future__ import annotations

import time
import traceback
from collections.abc import Iterator

import pytest
from transfer_client import NotFoundError, TrainingConfig, TransferClient
from transfer_service.store.pg_head_changes import CHECK_SECONDS, HeadWatcher
from transfer_service.store.postgres import PostgresStore

from tests.conftest import RunningServer, make_settings, start_server
from tests.datasets import fashion_mnist

BACKBONE = "efficientnet_lite0"


@pytest.fixture(scope="module")
def replicas(
    postgres_server: object, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[RunningServer, RunningServer]]:
    from tests.postgres_server import PostgresServer

    assert isinstance(postgres_server, PostgresServer)
    url = postgres_server.create_database()
    servers: list[RunningServer] = []
    try:
        for name in ("a", "b"):
            settings = make_settings(
                tmp_path_factory.mktemp(name), database_url=url, preload_backbones=[BACKBONE]
            )
            servers.append(start_server(settings))
        yield servers[0], servers[1]
    finally:
        for server in servers:
            server.stop()


@pytest.fixture(scope="module")
def images() -> list[bytes]:
    return [x for x, _ in fashion_mnist(2, split="test", seed=2, classes=2)]


def store_of(server: RunningServer) -> PostgresStore:
    store = server.app.store
    assert isinstance(store, PostgresStore)
    return store


def watcher_of(server: RunningServer) -> HeadWatcher:
    watcher = store_of(server).watcher
    assert watcher is not None and watcher.connected.wait(10)
    return watcher


def train_on(server: RunningServer, name: str) -> str:
    with TransferClient(server.address, timeout=300) as client:
        done = client.train(
            BACKBONE,
            fashion_mnist(4, split="train", seed=1, classes=2),
            head_name=name,
            config=TrainingConfig(epochs=2, seed=3),
        )
    return done.head_id


def seconds_until_not_found(client: TransferClient, head_id: str, image: bytes) -> float:
    """Polls Predict (every 10 ms) until it answers NOT_FOUND; the seconds that took."""
    started = time.monotonic()
    while True:
        try:
            client.predict(head_id, image)
        except NotFoundError:
            return time.monotonic() - started
        assert time.monotonic() - started < 10, "the deleted head is still served"
        time.sleep(0.01)


def test_a_warm_predict_touches_no_database(
    replicas: tuple[RunningServer, RunningServer],
    images: list[bytes],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    a, b = replicas
    head_id = train_on(a, "counted")
    pool = store_of(b)._db._pool
    watcher = watcher_of(b)
    real_connection = pool.connection
    taken: list[int] = []

    def counted_connection(*args: object, **kwargs: object) -> object:
        # The job queue's own background queries (the claim poll, lease renewals) run on
        # their own schedule, whatever Predict does: not counted.
        background = {"claim_job", "hold_jobs"}
        if not any(frame.name in background for frame in traceback.extract_stack()):
            taken.append(1)
        return real_connection(*args, **kwargs)  # type: ignore[arg-type]

    # Either replica may have claimed and trained the job (the queue): cold on B for sure.
    b.app.heads.discard(head_id)
    monkeypatch.setattr(pool, "connection", counted_connection)
    with TransferClient(b.address, timeout=120) as client:
        client.predict(head_id, images[0])  # cold on B: loads the head from the database
        assert taken, "the count misses the store's queries"
        monkeypatch.setattr(watcher, "check_seconds", 3600.0)
        time.sleep(0.3)  # lets a check that was running end before counting
        taken.clear()
        checks = watcher.checks
        for i in range(50):
            client.predict(head_id, images[i % len(images)])
        assert len(taken) == 0
        assert watcher.checks == checks
    with TransferClient(a.address, timeout=120) as client:
        client.delete_head(head_id)


def test_a_delete_on_one_replica_is_not_found_on_the_other_within_a_second(
    replicas: tuple[RunningServer, RunningServer],
    images: list[bytes],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    a, b = replicas
    head_id = train_on(a, "deleted")
    # The notification alone: B's backstop would also get there within about a second.
    monkeypatch.setattr(watcher_of(b), "check_seconds", 3600.0)
    with (
        TransferClient(a.address, timeout=120) as on_a,
        TransferClient(b.address, timeout=120) as on_b,
    ):
        on_b.predict(head_id, images[0])  # warm on B
        assert head_id in b.app.heads.resident_ids()
        on_a.delete_head(head_id)
        elapsed = seconds_until_not_found(on_b, head_id, images[0])
    print(f"delete on A -> NOT_FOUND on B: {elapsed * 1000:.1f} ms")
    assert elapsed < 1.0
    assert head_id not in b.app.heads.resident_ids()


def test_a_lost_notification_is_made_up_by_the_backstop_within_two_seconds(
    replicas: tuple[RunningServer, RunningServer],
    images: list[bytes],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    a, b = replicas
    head_id = train_on(a, "unheard")
    watcher = watcher_of(b)
    heard: list[str] = []
    monkeypatch.setattr(watcher, "_notified", heard.append)  # B hears, but drops it
    with (
        TransferClient(a.address, timeout=120) as on_a,
        TransferClient(b.address, timeout=120) as on_b,
    ):
        on_b.predict(head_id, images[0])
        on_a.delete_head(head_id)
        elapsed = seconds_until_not_found(on_b, head_id, images[0])
    print(f"delete on A -> NOT_FOUND on B, notification lost: {elapsed * 1000:.1f} ms")
    deadline = time.monotonic() + 1
    while not heard and time.monotonic() < deadline:
        time.sleep(0.01)
    assert heard == [head_id]  # the notification came and was ignored: the backstop evicted
    assert elapsed < watcher.check_seconds + 1.0


def test_an_alias_moved_on_one_replica_answers_on_the_other_within_the_bound(
    replicas: tuple[RunningServer, RunningServer], images: list[bytes]
) -> None:
    a, b = replicas
    first, second = train_on(a, "promoted"), train_on(a, "promoted")
    with (
        TransferClient(a.address, timeout=120) as on_a,
        TransferClient(b.address, timeout=120) as on_b,
    ):
        assert on_a.get_head(first).version == 1 and on_a.get_head(second).version == 2
        on_a.set_head_alias("promoted", "production", 1)
        time.sleep(CHECK_SECONDS + 0.1)  # whatever B cached before the alias existed is gone
        [answer] = on_b.predict("promoted", images[0])
        assert (answer.head_id, answer.head_version) == (first, 1)  # the name is warm on B
        on_a.set_head_alias("promoted", "production", 2)
        started = time.monotonic()
        while True:
            [answer] = on_b.predict("promoted", images[0])
            if answer.head_version == 2:
                break
            assert answer.head_id == first
            assert time.monotonic() - started < 10, "B never saw the alias move"
            time.sleep(0.01)
        elapsed = time.monotonic() - started
        assert answer.head_id == second
        on_a.delete_head(first)
        on_a.delete_head(second, force=True)
    print(f"alias moved on A -> answered on B: {elapsed * 1000:.1f} ms")
    assert elapsed < CHECK_SECONDS
