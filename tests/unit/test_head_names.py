"""Head references (head_names.py): parsing, what a reference selects, and the name cache's
age bound, invalidation (including a read racing a change), its outage behaviour and its
size bound. Injected clock and store reads: no server needed for these rules."""

from __future__ import annotations

import threading

import pytest
from transfer_service import head_names
from transfer_service.domain import HeadName
from transfer_service.errors import InvalidArgumentError, NotFoundError, UnavailableError
from transfer_service.head_names import HeadNameCache, HeadRef, parse_head_ref, version_of

CATS = HeadName("t", "cats", {1: "cats-a", 2: "cats-b", 4: "cats-d"}, {"canary": 1})


def test_parse_head_ref() -> None:
    assert parse_head_ref("f", "cats-1a2b3c4d") == HeadRef("cats-1a2b3c4d")
    assert parse_head_ref("f", "cats@3") == HeadRef("cats@3", "cats", "3")
    assert parse_head_ref("f", "cats@007").version == 7
    assert parse_head_ref("f", "cats@latest") == HeadRef("cats@latest", "cats", "latest")
    assert parse_head_ref("f", "my.cats_2@prod-eu") == HeadRef(
        "my.cats_2@prod-eu", "my.cats_2", "prod-eu"
    )
    for bad in (
        "",
        "Cats",
        "cats@",
        "@1",
        "cats@0",
        "cats@1@2",
        "cats@Prod",
        "cats@-1",
        "c@9999999999",
    ):
        with pytest.raises(InvalidArgumentError, match=r"^f: "):
            parse_head_ref("f", bad)


def test_what_a_reference_selects() -> None:
    def select(text: str) -> int | None:
        ref = parse_head_ref("f", text)
        return version_of(CATS, ref if ref.by_name else HeadRef(text, text))

    assert select("cats@1") == 1
    assert select("cats@3") is None  # never trained, or deleted
    assert select("cats@latest") == 4
    assert select("cats@canary") == 1
    assert select("cats@staging") is None
    assert select("cats") == 4  # no production alias: the newest
    production = HeadName("t", "cats", CATS.versions, {"production": 2})
    assert version_of(production, HeadRef("cats", "cats")) == 2
    assert CATS.aliases_of(1) == ("canary",) and CATS.aliases_of(2) == ()


class FakeStore:
    def __init__(self) -> None:
        self.names = {("t", "cats"): CATS}
        self.reads = 0
        self.down = False
        self.during_read = lambda: None

    def read(self, tenant: str, name: str) -> HeadName:
        self.reads += 1
        self.during_read()
        if self.down:
            raise UnavailableError("the database is down")
        try:
            return self.names[(tenant, name)]
        except KeyError:
            raise NotFoundError(f"no head named {name!r}") from None


def test_entries_live_for_the_age_bound_and_changes_here_drop_them() -> None:
    now = [0.0]
    store = FakeStore()
    cache = HeadNameCache(store.read, max_age_seconds=1.0, clock=lambda: now[0])
    assert cache.lookup("t", "cats") is None
    assert cache.read_through("t", "cats") is CATS
    now[0] = 0.9
    assert cache.lookup("t", "cats") is CATS
    now[0] = 1.2
    assert cache.lookup("t", "cats") is None  # too old: the caller reads through again
    cache.read_through("t", "cats")
    cache.invalidate("t", "cats")
    assert cache.lookup("t", "cats") is None
    with pytest.raises(NotFoundError):
        cache.read_through("t", "dogs")
    assert cache.lookup("t", "dogs") is None  # misses are not cached
    assert cache.lookup("other", "cats") is None  # tenants never share entries


def test_a_read_that_raced_a_change_is_not_kept() -> None:
    store = FakeStore()
    cache = HeadNameCache(store.read, max_age_seconds=60.0)
    # The change lands (and invalidates) while the read that predates it is in flight.
    store.during_read = lambda: cache.invalidate("t", "cats")
    assert cache.read_through("t", "cats") is CATS  # answers its own call
    store.during_read = lambda: None
    assert cache.lookup("t", "cats") is None  # but the next call reads again


def test_an_unreachable_store_keeps_a_cached_name_serving() -> None:
    now = [0.0]
    store = FakeStore()
    cache = HeadNameCache(store.read, max_age_seconds=1.0, clock=lambda: now[0])
    cache.read_through("t", "cats")
    store.down = True
    now[0] = 30.0
    assert cache.read_through("t", "cats") is CATS
    with pytest.raises(UnavailableError):
        cache.read_through("t", "dogs")  # nothing cached: the outage shows


def test_the_cache_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(head_names, "MAX_CACHED_NAMES", 3)
    store = FakeStore()
    for i in range(5):
        store.names[("t", f"n{i}")] = HeadName("t", f"n{i}", {1: f"n{i}-x"}, {})
    cache = HeadNameCache(store.read, max_age_seconds=60.0)
    for i in range(5):
        cache.read_through("t", f"n{i}")
    assert [cache.lookup("t", f"n{i}") is not None for i in range(5)] == [False, False] + [True] * 3


def test_lookups_and_reads_from_many_threads() -> None:
    store = FakeStore()
    cache = HeadNameCache(store.read, max_age_seconds=0.0)
    errors: list[BaseException] = []

    def work() -> None:
        try:
            for _ in range(200):
                cache.lookup("t", "cats")
                assert cache.read_through("t", "cats") is CATS
                cache.invalidate("t", "cats")
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
