"""Leases on the jobs of a store that replicas share (PostgreSQL): each replica renews the
lease on every job it holds (queued or running) and settles the jobs whose lease ran out,
because the replica holding them stopped without ending them (SIGKILL, node lost).

Settling is start-up recovery (recovery.py) limited to expired leases: such a job ends FAILED
saying the server running it stopped (or SUCCEEDED, if its head was committed), so its
stream, GetJob and the tenant's job quota do not wait on it forever. Running it again from
the start on another replica is the job queue's work, not built yet. A store one process owns
(the embedded one) holds no leases, and nothing here runs for it."""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta

from transfer_service.store.interface import Store
from transfer_service.training.job_events import LiveJob
from transfer_service.training.recovery import recover_jobs

log = logging.getLogger(__name__)


def replica_name() -> str:
    """This process's name as a lease owner: host, pid and a random part (a restarted pod
    keeps its host name and may get the same pid)."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


class JobLeases:
    def __init__(
        self,
        store: Store,
        live: Mapping[str, LiveJob],
        lease_seconds: float,
        owner: str | None = None,
    ) -> None:
        """`live`: this replica's jobs (JobManager's, read on the event loop)."""
        self._store = store
        self._live = live
        self._lease = timedelta(seconds=lease_seconds)
        self.owner = owner or replica_name()

    def _held(self) -> list[str]:
        return [job_id for job_id, live in self._live.items() if not live.record.state.finished]

    def _cancel(self, job_ids: list[str]) -> None:
        """CancelJob from another replica, read back with the leases: stops at the next step."""
        for live in filter(None, map(self._live.get, job_ids)):
            live.cancel.set()  # a no-op for a job that has ended

    async def run(self) -> None:
        """Every third of a lease: renews this replica's leases, then settles the jobs whose
        lease expired. Failures (the database down) are logged and retried next period; a
        lease outlives two missed renewals."""
        period = self._lease.total_seconds() / 3
        while True:
            await self.renew_and_settle()
            await asyncio.sleep(period)

    def hold_now(self, job_ids: list[str]) -> None:
        """Takes the lease on new jobs at once (blocking; a no-op without leases)."""
        until = datetime.now(UTC) + self._lease
        self._store.hold_jobs(self.owner, job_ids, until)

    async def renew_and_settle(self) -> None:
        now = datetime.now(UTC)
        try:
            asked = await asyncio.to_thread(
                self._store.hold_jobs, self.owner, self._held(), now + self._lease
            )
            if asked:
                self._cancel(asked)
            # Measured against the time before renewing: this replica's own leases all run
            # past it, so only other (stopped) replicas' jobs can be settled here.
            await asyncio.to_thread(recover_jobs, self._store, now)
        except Exception:
            log.exception("job leases: renewing or settling failed; trying again next period")
