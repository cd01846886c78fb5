"""The PostgreSQL store's head-change watcher (store/pg_head_changes.py) on a real database: two
PostgresStores stand for two replicas. A delete or a replacing save on one reaches the other's
`on_changed` at once (NOTIFY); a new head announces nothing; with notifications lost, the
backstop finds deleted and changed resident heads within its interval; after its connection
is killed the watcher reconnects, checks at once (what was deleted meanwhile is reported) and
hears later notifications again; close() returns promptly."""

from __future__ import annotations

import queue
import time
from collections.abc import Iterator

import psycopg
import pytest
import torch
from transfer_service.store import pg_head_changes
from transfer_service.store.pg_head_changes import HeadWatcher
from transfer_service.store.postgres import PostgresStore

from tests.unit.test_store_contract import head


class Replica:
    """A PostgresStore watching heads as a server's cache would: `resident` holds the ids it
    'caches'; `on_changed` discards one and records it."""

    def __init__(self, url: str, resident: set[str]) -> None:
        self.store = PostgresStore(url)
        self.resident = resident
        self.changed: queue.Queue[tuple[str, float]] = queue.Queue()

        def on_changed(head_id: str) -> None:
            self.resident.discard(head_id)
            self.changed.put((head_id, time.monotonic()))

        self.store.watch_heads(on_changed, lambda: sorted(self.resident))
        assert self.watcher.connected.wait(10)

    @property
    def watcher(self) -> HeadWatcher:
        assert self.store.watcher is not None
        return self.store.watcher

    def next_change(self, timeout: float) -> tuple[str, float]:
        try:
            return self.changed.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no head change reported within {timeout} s") from None

    def wait_for_check(self, timeout: float = 5.0) -> None:
        """Until a backstop check has run after this call (so it has seen the heads now)."""
        before = self.watcher.checks
        deadline = time.monotonic() + timeout
        while self.watcher.checks <= before:
            assert time.monotonic() < deadline, "the backstop did not run"
            time.sleep(0.02)


def weights(value: float) -> dict[str, torch.Tensor]:
    return {"w": torch.full((4, 3), value)}


@pytest.fixture()
def writer(database_url: str) -> Iterator[PostgresStore]:
    store = PostgresStore(database_url)
    yield store
    store.close()


def test_a_delete_or_replace_elsewhere_is_reported_at_once(
    database_url: str, writer: PostgresStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pg_head_changes, "CHECK_SECONDS", 3600.0)  # notifications alone
    writer.save_head(head("h1"), weights(1.0))
    replica = Replica(database_url, {"h1"})
    try:
        writer.save_head(head("h2"), weights(2.0))  # new: nobody can hold it yet
        with pytest.raises(queue.Empty):
            replica.changed.get(timeout=0.5)
        replica.resident.add("h2")  # loaded since
        writer.save_head(head("h2"), weights(2.0))  # a retried save replaces the row
        assert replica.next_change(1.0)[0] == "h2"

        started = time.monotonic()
        writer.delete_head("h1")
        head_id, seen = replica.next_change(1.0)
        assert head_id == "h1"
        assert seen - started < 1.0
        assert replica.watcher.checks == 1  # only the check at connect ran
    finally:
        replica.store.close()


def test_the_backstop_finds_deleted_and_changed_heads_when_notifications_are_lost(
    database_url: str, writer: PostgresStore
) -> None:
    writer.save_head(head("h1"), weights(1.0))
    writer.save_head(head("h2"), weights(2.0))
    writer.save_head(head("h3"), weights(3.0))
    replica = Replica(database_url, {"h1", "h2", "h3"})
    try:
        replica.watcher._notified = lambda head_id: None  # type: ignore[method-assign]
        replica.wait_for_check()
        started = time.monotonic()
        writer.delete_head("h1")
        head_id, seen = replica.next_change(2.0)
        assert head_id == "h1"
        assert seen - started <= replica.watcher.check_seconds + 0.5

        started = time.monotonic()
        writer.save_head(head("h2"), weights(20.0))  # same id, other weights
        head_id, seen = replica.next_change(2.0)
        assert head_id == "h2"
        assert seen - started <= replica.watcher.check_seconds + 0.5
        # The unchanged head stays; the changed one left the cache (and is reloaded there).
        with pytest.raises(queue.Empty):
            replica.changed.get(timeout=1.5)
        assert replica.resident == {"h3"}
    finally:
        replica.store.close()


def test_the_watcher_reconnects_checks_at_once_and_hears_notifications_again(
    database_url: str, writer: PostgresStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pg_head_changes, "CHECK_SECONDS", 3600.0)
    monkeypatch.setattr(HeadWatcher, "first_backoff_seconds", 1.0)
    writer.save_head(head("h1"), weights(1.0))
    writer.save_head(head("h2"), weights(2.0))
    replica = Replica(database_url, {"h1", "h2"})
    try:
        assert replica.watcher.checks == 1
        first_pid = replica.watcher.backend_pid
        with psycopg.connect(database_url, autocommit=True) as admin:
            assert admin.execute("SELECT pg_terminate_backend(%s)", (first_pid,)).fetchone() == (
                True,
            )
        deadline = time.monotonic() + 5
        while replica.watcher.connected.is_set():
            assert time.monotonic() < deadline, "the watcher did not notice its connection drop"
            time.sleep(0.01)
        # Deleted while nobody listens: its notification is lost for good.
        writer.delete_head("h1")
        head_id, _ = replica.next_change(5.0)
        assert head_id == "h1"
        assert replica.watcher.reconnects == 1
        assert replica.watcher.backend_pid != first_pid
        assert replica.watcher.checks == 2  # the check after the reconnect found it

        started = time.monotonic()
        writer.save_head(head("h2"), weights(2.5))
        head_id, seen = replica.next_change(1.0)
        assert head_id == "h2"
        assert seen - started < 1.0
        assert replica.watcher.checks == 2  # heard, not polled
    finally:
        started = time.monotonic()
        replica.store.close()
        assert time.monotonic() - started < 2.0
        assert not replica.watcher._thread.is_alive()
