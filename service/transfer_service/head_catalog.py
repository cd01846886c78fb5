"""A tenant's heads as products: listing, reading and deleting them, their names' versions
and aliases, and resolving a head reference (an id, `name`, `name@3`, `name@alias`) to the
loaded head that answers a call.

Every call names the caller's tenant. Another tenant's heads and names are reported exactly
like unknown ones (NOT_FOUND, same message), so nothing leaks across tenants. References by
name resolve through HeadNameCache (head_names.py): no store read on a warm Predict.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from typing import Any, TypeVar

from transfer_service.backbones.cache import BackboneCache
from transfer_service.domain import DEFAULT_TENANT, HeadName, HeadRecord
from transfer_service.errors import InvalidArgumentError, NotFoundError, UnreadableHeadError
from transfer_service.head_names import (
    HeadNameCache,
    HeadRef,
    check_alias,
    check_name,
    parse_head_ref,
    version_of,
)
from transfer_service.heads import HeadCache, LoadedHead
from transfer_service.list_pages import read_page
from transfer_service.store.interface import Store

T = TypeVar("T")

# (tenant, reference, field) -> the loaded head: HeadCatalog.resolve_head.
ResolveHead = Callable[[str, str, str], Awaitable[LoadedHead]]


class HeadCatalog:
    def __init__(
        self,
        *,
        store: Store,
        backbones: BackboneCache,
        heads: HeadCache,
        names: HeadNameCache,
        blocking_pool: Executor,
    ) -> None:
        self._store = store
        self._backbones = backbones
        self._heads = heads
        self._names = names
        self._pool = blocking_pool

    async def _blocking(self, function: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, function, *args)

    # ---- resolving references ----

    async def resolve_head(self, tenant: str, text: str, field: str = "head_id") -> LoadedHead:
        """The loaded head `text` refers to, its record read once: from the cache, or from
        the store by the load itself, owner-checked before its weights are read."""

        async def by_id(head_id: str, resident: LoadedHead | None, not_found: str) -> LoadedHead:
            if resident is not None:
                return resident
            return await self._load(tenant, head_id, not_found)

        async def by_name(ref: HeadRef, not_found: str) -> LoadedHead:
            for attempt in range(2):
                entry = await self._head_name(tenant, ref.name, not_found, fresh=attempt > 0)
                head_id = _version_id(entry, ref, not_found)
                try:
                    return await self._load(tenant, head_id, not_found)
                except NotFoundError:
                    # The cached name pointed at a version deleted since (by another
                    # replica): read the name again, once.
                    if attempt:
                        raise
            raise AssertionError("unreachable")

        return await self._by_id_or_name(tenant, text, field, by_id, by_name)

    async def _head_record(self, tenant: str, text: str) -> tuple[HeadRecord, HeadName | None]:
        """The record of the head `text` refers to, for calls that need no weights (GetHead,
        DeleteHead), read once from the store, with its name's entry when `text` named it
        (read fresh, so another replica's alias moves show at once; None for a head id)."""

        async def by_id(
            head_id: str, resident: LoadedHead | None, not_found: str
        ) -> tuple[HeadRecord, HeadName | None]:
            # Read even when resident: a head deleted by another replica is NOT_FOUND here too.
            return await self._record(tenant, head_id, not_found), None

        async def by_name(ref: HeadRef, not_found: str) -> tuple[HeadRecord, HeadName | None]:
            entry = await self._head_name(tenant, ref.name, not_found, fresh=True)
            return await self._record(tenant, _version_id(entry, ref, not_found), not_found), entry

        return await self._by_id_or_name(tenant, text, "head_id", by_id, by_name)

    async def _by_id_or_name(
        self,
        tenant: str,
        text: str,
        field: str,
        by_id: Callable[[str, LoadedHead | None, str], Awaitable[T]],
        by_name: Callable[[HeadRef, str], Awaitable[T]],
    ) -> T:
        """The one rule for what a reference names. With "@" it is a name. Without, it is a
        head id when a head by that id is resident here, or, when no cached name is spelled
        so, when the store has it (`by_id` raising NotFoundError: not an id); else a bare
        name. `by_id(head_id, the resident head or None, not_found)`,
        `by_name(ref, not_found)`."""
        ref = parse_head_ref(field, text)
        not_found = f"{field}: no head {text!r}"
        if not ref.by_name:
            resident = self._heads.get_resident(ref.text, self._admit(tenant, not_found))
            if resident is not None:
                return await by_id(ref.text, resident, not_found)
            if self._names.lookup(tenant, ref.text) is None:
                with contextlib.suppress(NotFoundError):
                    return await by_id(ref.text, None, not_found)
            ref = HeadRef(text, name=text)
        return await by_name(ref, not_found)

    def _admit(self, tenant: str, not_found: str) -> Callable[[HeadRecord], None]:
        def admit(record: HeadRecord) -> None:
            _check_owner(record.tenant, tenant, not_found)

        return admit

    async def _load(self, tenant: str, head_id: str, not_found: str) -> LoadedHead:
        admit = self._admit(tenant, not_found)
        # Warm: on the event loop, counted as a hit; cold: `get` counts the hit or miss.
        resident = self._heads.get_resident(head_id, admit)
        if resident is not None:
            return resident
        try:
            loaded: LoadedHead = await self._blocking(self._heads.get, head_id, admit)
        except UnreadableHeadError as exc:
            _check_owner(exc.owner if exc.owner is not None else DEFAULT_TENANT, tenant, not_found)
            raise
        except NotFoundError as exc:
            raise NotFoundError(not_found) from exc
        return loaded

    async def _head_name(
        self, tenant: str, name: str, not_found: str, *, fresh: bool = False
    ) -> HeadName:
        cached = None if fresh else self._names.lookup(tenant, name)
        if cached is not None:
            return cached
        try:
            entry: HeadName = await self._blocking(self._names.read_through, tenant, name)
        except NotFoundError as exc:
            raise NotFoundError(not_found) from exc
        return entry

    # ---- reading, listing, deleting ----

    async def _record(self, tenant: str, head_id: str, not_found: str) -> HeadRecord:
        """A damaged head is FAILED_PRECONDITION to its owner (as in delete_head) and
        NOT_FOUND to every other tenant, like any head of theirs."""
        try:
            record: HeadRecord = await self._blocking(self._store.get_head, head_id)
        except UnreadableHeadError as exc:
            _check_owner(exc.owner if exc.owner is not None else DEFAULT_TENANT, tenant, not_found)
            raise
        except NotFoundError as exc:
            raise NotFoundError(not_found) from exc
        _check_owner(record.tenant, tenant, not_found)
        return record

    async def get_head(self, tenant: str, text: str) -> tuple[HeadRecord, tuple[str, ...]]:
        """The head's record and the aliases of its name that point at it: the store read
        once for each (a reference by name has read the name already)."""
        record, entry = await self._head_record(tenant, text)
        if entry is not None:
            return record, entry.aliases_of(record.version)
        return record, await self._aliases_of(record)

    async def _aliases_of(self, record: HeadRecord) -> tuple[str, ...]:
        try:
            entry = await self._head_name(record.tenant, record.name, "", fresh=True)
        except NotFoundError:  # deleted meanwhile
            return ()
        return entry.aliases_of(record.version)

    async def list_heads(
        self,
        tenant: str,
        backbone: str = "",
        *,
        name: str = "",
        page_size: int = 0,
        page_token: str = "",
    ) -> tuple[list[tuple[HeadRecord, tuple[str, ...]]], str]:
        """One page of the tenant's heads, oldest first, filtered, each with its aliases, and
        the token of the next page ("" on the last); the store reads only that page's heads
        and each of its names once."""
        if backbone:
            self._backbones.spec(backbone)
        records, next_page = await read_page(
            functools.partial(
                self._store.list_heads, tenant, backbone=backbone or None, name=name or None
            ),
            self._blocking,
            lambda head: (head.created_time, head.head_id),
            page_size,
            page_token,
            (backbone, name),
        )
        names: dict[str, HeadName | None] = {}
        for record in records:
            if record.name not in names:
                try:
                    names[record.name] = await self._head_name(tenant, record.name, "")
                except NotFoundError:
                    names[record.name] = None
        return [
            (record, entry.aliases_of(record.version) if entry else ())
            for record in records
            for entry in (names[record.name],)
        ], next_page

    async def delete_head(self, tenant: str, text: str, *, force: bool = False) -> None:
        """Deletes one version: by head id or `name@N` (a bare name or an alias could point
        elsewhere by the time the delete lands). Damaged heads too: one whose metadata cannot
        be read is deleted by its owner as the store still knows it
        (UnreadableHeadError.owner), or, where even that is unknown, by DEFAULT_TENANT."""
        ref = parse_head_ref("head_id", text)
        if ref.by_name and ref.version is None:
            raise InvalidArgumentError(
                f"head_id: {text!r} names an alias; a delete names one version: a head id or "
                f"{ref.name}@N"
            )
        record: HeadRecord | None = None
        # Answers NOT_FOUND to everyone but the owner, damaged head or not; an
        # UnreadableHeadError that comes through is the owner's, who may delete it.
        with contextlib.suppress(UnreadableHeadError):
            record, _ = await self._head_record(tenant, text)
        head_id = record.head_id if record is not None else ref.text
        # Out of the cache before the files go (no more hits meanwhile) and again after: the
        # second discard also stops a Predict that was loading it from caching it.
        self._heads.discard(head_id)
        try:
            await self._blocking(functools.partial(self._store.delete_head, head_id, force=force))
        finally:
            self._heads.discard(head_id)
            if record is not None:
                self._names.invalidate(tenant, record.name)

    # ---- aliases ----

    async def set_head_alias(
        self, tenant: str, name: str, alias: str, version: int
    ) -> tuple[HeadRecord, tuple[str, ...]]:
        """Points `alias` at `version` (atomically, in the store) and returns that head with
        its aliases."""
        check_name("name", name)
        check_alias("alias", alias)
        if version < 1:
            raise InvalidArgumentError("version: must be an existing version (1, 2, ...)")
        try:
            entry: HeadName = await self._blocking(
                self._store.set_head_alias, tenant, name, alias, version
            )
        except NotFoundError as exc:
            raise NotFoundError(f"version: {name} has no version {version}") from exc
        finally:
            self._names.invalidate(tenant, name)
        record = await self._record(tenant, entry.versions[version], f"name: no head {name!r}")
        return record, entry.aliases_of(version)

    async def delete_head_alias(self, tenant: str, name: str, alias: str) -> None:
        check_name("name", name)
        check_alias("alias", alias)
        try:
            await self._blocking(self._store.delete_head_alias, tenant, name, alias)
        except NotFoundError as exc:
            raise NotFoundError(f"alias: {name} has no alias {alias!r}") from exc
        finally:
            self._names.invalidate(tenant, name)

    def head_saved(self, record: HeadRecord) -> None:
        """A version trained here: `name` and `name@latest` answer with it at once."""
        self._names.invalidate(record.tenant, record.name)


def _version_id(entry: HeadName, ref: HeadRef, not_found: str) -> str:
    """The head id of the version `ref` selects in `entry`; NotFoundError if none."""
    version = version_of(entry, ref)
    if version is None:
        raise NotFoundError(not_found)
    return entry.versions[version]


def _check_owner(owner: str, tenant: str, not_found_message: str) -> None:
    """Another tenant's record is reported exactly as a missing one."""
    if owner != tenant:
        raise NotFoundError(not_found_message)
