"""HeadCatalog's store reads for the calls that need no weights (GetHead, DeleteHead): every
reference form (a head id, a bare name, `name@alias`, `name@N`) resolves to the head it did,
reading the head's record once and its name once. A real LocalStore, its reads counted."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, cast

import pytest
from transfer_service.domain import HeadName, HeadRecord
from transfer_service.errors import NotFoundError
from transfer_service.head_catalog import HeadCatalog
from transfer_service.head_names import HeadNameCache
from transfer_service.heads import HeadCache
from transfer_service.store.interface import Store
from transfer_service.store.local import LocalStore

from tests.devices import backbone_cache
from tests.unit.test_store_head_names import saved


class CountingStore:
    """The real store, counting its head record and head name reads."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self.reads: Counter[str] = Counter()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    def get_head(self, head_id: str) -> HeadRecord:
        self.reads["record"] += 1
        return self._store.get_head(head_id)

    def head_name(self, tenant: str, name: str) -> HeadName:
        self.reads["name"] += 1
        return self._store.head_name(tenant, name)


@pytest.fixture()
def counted(tmp_path: Path) -> Iterator[tuple[HeadCatalog, CountingStore]]:
    store = LocalStore(tmp_path / "store")
    saved(store, "cats-a")  # version 1
    saved(store, "cats-b")  # version 2
    store.set_head_alias("default", "cats", "production", 1)
    counting = CountingStore(store)
    typed = cast(Store, counting)
    backbones = backbone_cache(48)  # nothing is loaded: these calls read no weights
    with ThreadPoolExecutor(2) as pool:
        catalog = HeadCatalog(
            store=typed,
            backbones=backbones,
            heads=HeadCache(backbones, typed.get_head, typed.load_head_weights, 4),
            names=HeadNameCache(typed.head_name, max_age_seconds=60.0),
            blocking_pool=pool,
        )
        yield catalog, counting
    store.close()


@pytest.mark.parametrize(
    ("text", "head_id", "aliases", "record_reads"),
    [
        ("cats@production", "cats-a", ("production",), 1),
        ("cats@2", "cats-b", (), 1),
        ("cats@latest", "cats-b", (), 1),
        # A bare name is tried as a head id first: one record read that finds nothing.
        ("cats", "cats-a", ("production",), 2),
        ("cats-b", "cats-b", (), 1),
    ],
)
def test_get_head_reads_the_record_and_the_name_once(
    counted: tuple[HeadCatalog, CountingStore],
    text: str,
    head_id: str,
    aliases: tuple[str, ...],
    record_reads: int,
) -> None:
    catalog, store = counted
    record, found_aliases = asyncio.run(catalog.get_head("default", text))
    assert (record.head_id, found_aliases) == (head_id, aliases)
    assert store.reads == Counter(record=record_reads, name=1)


def test_get_head_of_another_tenant_or_an_unknown_version_is_not_found(
    counted: tuple[HeadCatalog, CountingStore],
) -> None:
    catalog, _ = counted
    for tenant, text in (("acme", "cats-a"), ("acme", "cats@1"), ("default", "cats@3")):
        with pytest.raises(NotFoundError, match=rf"^head_id: no head '{text}'$"):
            asyncio.run(catalog.get_head(tenant, text))


def test_delete_head_by_id_or_version_reads_the_record_once(
    counted: tuple[HeadCatalog, CountingStore],
) -> None:
    catalog, store = counted
    asyncio.run(catalog.delete_head("default", "cats-b"))
    assert store.reads == Counter(record=1)
    asyncio.run(catalog.delete_head("default", "cats@1", force=True))
    assert store.reads == Counter(record=2, name=1)
    with pytest.raises(NotFoundError):
        asyncio.run(catalog.get_head("default", "cats"))
