"""The leases of the jobs this process runs: renewed every third of a lease (a heartbeat), so
that a job whose process stopped without ending or releasing it (SIGKILL, node lost, a stall
longer than a lease) becomes claimable by another process once its lease runs out
(Store.claim_job). The renewal also brings back two things: CancelJob requests made through
another process (the run stops at its next step; on PostgreSQL the notice usually arrives
first), and jobs this process no longer holds (a later run took them over after its lease ran
out: this run stops, and the store already refuses its writes)."""

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

log = logging.getLogger(__name__)


def replica_name() -> str:
    """This process's name as a lease owner: host, pid and a random part (a restarted pod
    keeps its host name and may get the same pid)."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


class JobLeases:
    def __init__(
        self, store: Store, live: Mapping[str, LiveJob], lease_seconds: float, owner: str
    ) -> None:
        """`live`: this process's runs (JobManager's, read on the event loop)."""
        self._store = store
        self._live = live
        self._lease = timedelta(seconds=lease_seconds)
        self.owner = owner

    async def run(self) -> None:
        """Renews every third of a lease. Failures (the database down) are logged and
        retried next period; a lease outlives two missed renewals."""
        period = self._lease.total_seconds() / 3
        while True:
            await asyncio.sleep(period)
            await self.renew()

    async def renew(self) -> None:
        held = [job_id for job_id, live in self._live.items() if live.active]
        if not held:
            return
        try:
            renewal = await asyncio.to_thread(
                self._store.hold_jobs, self.owner, held, datetime.now(UTC) + self._lease
            )
        except Exception:
            log.exception("job leases: renewing failed; trying again next period")
            return
        for job_id in renewal.cancel_requested:
            live = self._live.get(job_id)
            if live is not None:
                live.cancel.set()  # a no-op for a run that has ended
        for job_id in renewal.lost:
            live = self._live.get(job_id)
            if live is not None and live.active:
                log.warning("job %s: this process no longer holds its lease; stopping", job_id)
                live.cancel.set()
