"""The job queue's notices between replicas sharing the PostgreSQL store: events appended to
a job's log, a job become claimable, a cancel requested for a held job.

Each is a NOTIFY sent in the transaction that did it (delivered on commit, never for a
rolled-back one): `transfer_job_events` with the job id (every event insert, pg_jobs),
`transfer_jobs_queued` (enqueue, release) and `transfer_job_cancel` with the job id
(request_cancel of a held job). `JobWatcher` holds one connection of its own (not the
pool's), LISTENs on the three in a daemon thread, and calls the matching callback per
notification. Notices are best effort: one sent while the connection is down is lost, and
there is no backstop here (the callers poll the store as well)."""

from __future__ import annotations

import logging
from collections.abc import Callable

from transfer_service.store.pg_pool import Connection, Database, ListenerThread

EVENTS_CHANNEL = "transfer_job_events"
QUEUED_CHANNEL = "transfer_jobs_queued"
CANCEL_CHANNEL = "transfer_job_cancel"
# The longest the thread waits for a notification before looking at close().
_POLL_SECONDS = 0.2

log = logging.getLogger(__name__)


def notify_queued(conn: Connection) -> None:
    """Tells every replica's watcher that a job became claimable, when `conn`'s transaction
    commits."""
    conn.execute("SELECT pg_notify(%s, '')", (QUEUED_CHANNEL,))


def notify_cancel(conn: Connection, job_id: str) -> None:
    """Tells every replica's watcher (the holder's among them) that `job_id`'s cancel was
    requested, when `conn`'s transaction commits."""
    conn.execute("SELECT pg_notify(%s, %s)", (CANCEL_CHANNEL, job_id))


class JobWatcher(ListenerThread):
    """Calls `on_events(job_id)`, `on_queued()` or `on_cancel(job_id)` for each notice, from
    its own thread. Start with `start()`, stop with `close()` (returns within about 0.2 s)."""

    def __init__(
        self,
        db: Database,
        on_events: Callable[[str], None],
        on_queued: Callable[[], None],
        on_cancel: Callable[[str], None],
    ) -> None:
        self._handlers: dict[str, Callable[[str], None]] = {
            EVENTS_CHANNEL: on_events,
            QUEUED_CHANNEL: lambda _: on_queued(),
            CANCEL_CHANNEL: on_cancel,
        }
        super().__init__(db, list(self._handlers), name="job watcher")

    def _serve(self, conn: Connection) -> None:
        self.connected.set()
        try:
            self._listen(conn)
        finally:
            self.connected.clear()

    def _listen(self, conn: Connection) -> None:
        while not self._stop.is_set():
            for notification in conn.notifies(timeout=_POLL_SECONDS):
                self._call(notification.channel, notification.payload)
                if self._stop.is_set():
                    return

    def _call(self, channel: str, payload: str) -> None:
        handler = self._handlers.get(channel)
        if handler is None:
            return
        try:
            handler(payload)
        except Exception:
            log.exception("job watcher: the %s handler failed for %r", channel, payload)
