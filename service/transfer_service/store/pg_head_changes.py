"""Heads deleted or replaced by any replica, seen by every replica: the PostgreSQL store's
head-cache invalidation.

A delete or a replacing save sends `NOTIFY transfer_heads, '<head_id>'` in its own
transaction (delivered on commit, never for a rolled-back one). `HeadWatcher` holds one
connection of its own (not the pool's), LISTENs on that channel in a daemon thread and calls
`on_changed(head_id)` for each notification. Notifications are not replayed: one sent while
the connection is down is lost. So a backstop runs on the same connection, at most once per
`check_seconds` and at once after every (re)connect: one query over the ids `resident()`
names, and `on_changed` for each that is gone or whose content (weights checksum, record)
differs from what the previous check saw. Nothing here runs on the Predict path."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable

from transfer_service.store.pg_pool import Connection, Database, ListenerThread

CHANNEL = "transfer_heads"
# A head name whose versions or aliases changed (issue 18): payload JSON [tenant, name]. The
# name caches (head_names.HeadNameCache) drop the entry; their age bound is the backstop.
NAMES_CHANNEL = "transfer_head_names"
# How often the backstop checks the resident heads (seconds); a module default so that a
# deployment (or a test) can change it.
CHECK_SECONDS = 1.0
# The longest the thread waits for a notification before looking at the clock and at close().
_POLL_SECONDS = 0.2

log = logging.getLogger(__name__)


def notify_name_changed(conn: Connection, tenant: str, name: str) -> None:
    """Tells every replica's name cache that (tenant, name)'s versions or aliases changed,
    when `conn`'s transaction commits."""
    conn.execute("SELECT pg_notify(%s, %s)", (NAMES_CHANNEL, json.dumps([tenant, name])))


def notify_head_changed(conn: Connection, head_id: str) -> None:
    """Tells every replica's watcher that `head_id` changed or went, when `conn`'s transaction
    commits."""
    conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, head_id))


class HeadWatcher(ListenerThread):
    """Calls `on_changed(head_id)` for every head another replica (or this one) deletes or
    replaces: at once on its notification, and within `check_seconds` (plus one query) when
    the notification was lost. Start with `start()`, stop with `close()` (returns within
    about 0.2 s plus any query in flight)."""

    def __init__(
        self,
        db: Database,
        on_changed: Callable[[str], None],
        resident: Callable[[], list[str]],
        *,
        check_seconds: float | None = None,
        on_name_changed: Callable[[str, str], None] = lambda tenant, name: None,
    ) -> None:
        # `connected` is set from the first check on, while LISTENing.
        super().__init__(db, [CHANNEL, NAMES_CHANNEL], name="head watcher")
        self._on_changed = on_changed
        self._on_name_changed = on_name_changed
        self._resident = resident
        # Read before every wait: a change applies at once.
        self.check_seconds = CHECK_SECONDS if check_seconds is None else check_seconds
        # Content fingerprints of resident heads as the previous check saw them (this
        # thread's own).
        self._seen: dict[str, str] = {}
        self.backend_pid: int | None = None
        self.checks = 0  # backstop queries run, for tests and logs

    def _serve(self, conn: Connection) -> None:
        self.backend_pid = conn.info.backend_pid
        try:
            # Notifications sent while it was not listening are lost: it checks at once.
            self._listen(conn)
        finally:
            self.connected.clear()

    def _listen(self, conn: Connection) -> None:
        """Until close(): delivers notifications and runs the backstop when due (first at
        once)."""
        last_check: float | None = None
        while not self._stop.is_set():
            now = time.monotonic()
            if last_check is None or now >= last_check + self.check_seconds:
                self._check(conn)
                last_check = time.monotonic()
                self.connected.set()
                continue
            wait = min(_POLL_SECONDS, last_check + self.check_seconds - now)
            for notification in conn.notifies(timeout=wait):
                if notification.channel == NAMES_CHANNEL:
                    self._name_notified(notification.payload)
                else:
                    self._notified(notification.payload)
                if self._stop.is_set():
                    return

    def _name_notified(self, payload: str) -> None:
        try:
            tenant, name = json.loads(payload)
            self._on_name_changed(str(tenant), str(name))
        except Exception:
            log.exception("head watcher: name notification %r failed", payload)

    def _notified(self, head_id: str) -> None:
        self._seen.pop(head_id, None)
        self._call(head_id)

    def _check(self, conn: Connection) -> None:
        """The backstop: one query over the resident heads (none when nothing is resident);
        those gone, or changed since the previous check, are reported."""
        resident = sorted(set(self._resident()))
        if not resident:
            self._seen.clear()
            return
        rows = conn.execute(
            "SELECT head_id, weights_sha256 || ':' || md5(record) FROM heads "
            "WHERE head_id = ANY(%s)",
            (resident,),
        ).fetchall()
        self.checks += 1
        current: dict[str, str] = {head_id: fingerprint for head_id, fingerprint in rows}
        seen = self._seen
        self._seen = {}
        for head_id in resident:
            fingerprint = current.get(head_id)
            before = seen.get(head_id)
            if fingerprint is None or (before is not None and before != fingerprint):
                self._call(head_id)
            else:
                self._seen[head_id] = fingerprint

    def _call(self, head_id: str) -> None:
        try:
            self._on_changed(head_id)
        except Exception:
            log.exception("head watcher: discarding head %r failed", head_id)
