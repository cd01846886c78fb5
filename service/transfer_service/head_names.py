"""Head references by name: parsing `name`, `name@3`, `name@latest` and `name@alias`, and the
cache that resolves them without a store read on the Predict path.

A reference is resolved once per call, to one head id: a call is answered wholly by the
version its reference pointed at when it arrived, so an alias that moves meanwhile never mixes
two versions within one call.

The cache keeps each (tenant, name)'s versions and aliases (HeadName) for at most
`max_age_seconds`, and this process's own changes (an alias set or removed, a version saved
or deleted here) drop the entry at once. On a store several replicas share, another replica's
change is therefore seen within `max_age_seconds`: the same bound as a delete's (the
PostgreSQL store's head watcher backstop, pg_head_changes.CHECK_SECONDS). An entry past its
age whose refresh fails (the database is down) keeps serving, logged once per entry: aliases
cannot move while nobody can reach the database either.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from transfer_service.domain import (
    ALIAS_PATTERN,
    DEFAULT_ALIAS,
    HEAD_NAME_PATTERN,
    LATEST_ALIAS,
    HeadName,
)
from transfer_service.errors import InvalidArgumentError, NotFoundError, UnavailableError
from transfer_service.store.ids import check_id

log = logging.getLogger(__name__)

# Names cached at once: a bound on memory whatever the callers send (each entry is a few
# hundred bytes; a miss costs one store read).
MAX_CACHED_NAMES = 4096


@dataclass(frozen=True, slots=True)
class HeadRef:
    """A parsed reference. `name` empty: `text` is a head id (it has no "@", and may also be a
    bare name: HeadCatalog tries the id first). `selector`: "" (a bare name), a version's
    digits, LATEST_ALIAS or an alias."""

    text: str
    name: str = ""
    selector: str = ""

    @property
    def by_name(self) -> bool:
        return bool(self.name)

    @property
    def version(self) -> int | None:
        return int(self.selector) if self.selector.isdigit() else None


def parse_head_ref(field: str, text: str) -> HeadRef:
    """INVALID_ARGUMENT, naming `field`, for text that is neither a head id nor a reference."""
    if "@" not in text:
        return HeadRef(check_id(field, text))
    name, selector = text.split("@", 1)
    if not HEAD_NAME_PATTERN.match(name):
        raise InvalidArgumentError(
            f"{field}: {text!r} is not a head reference: the name before '@' must match "
            f"{HEAD_NAME_PATTERN.pattern}"
        )
    if selector.isdigit() and len(selector) <= 9 and int(selector) >= 1:
        return HeadRef(text, name, str(int(selector)))
    if ALIAS_PATTERN.match(selector):
        return HeadRef(text, name, selector)
    raise InvalidArgumentError(
        f"{field}: {text!r} is not a head reference: after '@' comes a version (1, 2, ...), "
        f"'{LATEST_ALIAS}' or an alias matching {ALIAS_PATTERN.pattern}"
    )


def check_alias(field: str, alias: str) -> str:
    if not ALIAS_PATTERN.match(alias):
        raise InvalidArgumentError(f"{field}: {alias!r} must match {ALIAS_PATTERN.pattern}")
    if alias == LATEST_ALIAS:
        raise InvalidArgumentError(
            f"{field}: '{LATEST_ALIAS}' is reserved: it always means the newest version"
        )
    return alias


def check_name(field: str, name: str) -> str:
    if not HEAD_NAME_PATTERN.match(name):
        raise InvalidArgumentError(f"{field}: {name!r} must match {HEAD_NAME_PATTERN.pattern}")
    return name


def version_of(entry: HeadName, ref: HeadRef) -> int | None:
    """The version `ref` selects in `entry`, or None when it selects nothing (an unknown
    version or alias). A bare name is its DEFAULT_ALIAS where set, else its newest version."""
    if not entry.versions:
        return None
    if ref.version is not None:
        return ref.version if ref.version in entry.versions else None
    if ref.selector == LATEST_ALIAS:
        return max(entry.versions)
    if ref.selector:
        return entry.aliases.get(ref.selector)
    return entry.aliases.get(DEFAULT_ALIAS, max(entry.versions))


@dataclass(slots=True)
class _Entry:
    name: HeadName
    read_at: float
    stale_logged: bool = False


class HeadNameCache:
    """(tenant, name) -> HeadName, read through `read(tenant, name)` (the store's head_name;
    it raises NotFoundError for a name without versions, which is not cached). Thread-safe:
    `lookup` runs on the event loop, `read_through` on a worker thread."""

    def __init__(
        self,
        read: Callable[[str, str], HeadName],
        *,
        max_age_seconds: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._read = read
        self.max_age_seconds = max_age_seconds
        self._clock = clock
        self._entries: OrderedDict[tuple[str, str], _Entry] = OrderedDict()
        self._lock = threading.Lock()
        self._invalidations = 0  # how many invalidate() calls so far

    def lookup(self, tenant: str, name: str) -> HeadName | None:
        """The cached entry while it is fresh, else None (then call read_through)."""
        key = (tenant, name)
        with self._lock:
            entry = self._entries.get(key)
            if entry is None or self._clock() - entry.read_at > self.max_age_seconds:
                return None
            self._entries.move_to_end(key)
            return entry.name

    def read_through(self, tenant: str, name: str) -> HeadName:
        """Reads the name from the store and caches it. NotFoundError when it has no
        versions. A store that cannot be reached leaves a cached entry serving, however old."""
        key = (tenant, name)
        with self._lock:
            invalidations = self._invalidations
        try:
            fresh = self._read(tenant, name)
        except NotFoundError:
            self.invalidate(tenant, name)
            raise
        except UnavailableError:
            with self._lock:
                entry = self._entries.get(key)
                if entry is None:
                    raise
                if not entry.stale_logged:
                    entry.stale_logged = True
                    log.warning(
                        "head name %r of tenant %r: the store is unavailable; serving its "
                        "versions and aliases as read %.0f s ago",
                        name,
                        tenant,
                        self._clock() - entry.read_at,
                    )
                return entry.name
        with self._lock:
            if self._invalidations != invalidations:
                # A change here landed while the read ran: the read may predate it, so it
                # answers this call but is not kept (the next call reads again).
                return fresh
            self._entries[key] = _Entry(fresh, self._clock())
            self._entries.move_to_end(key)
            while len(self._entries) > MAX_CACHED_NAMES:
                self._entries.popitem(last=False)
        return fresh

    def invalidate(self, tenant: str, name: str) -> None:
        with self._lock:
            self._invalidations += 1
            self._entries.pop((tenant, name), None)
