"""The running server's lifecycle, beside the composition root (app.py) that builds it:
start (listen, load and warm start-up backbones, then SERVING), the finished-job retention
sweep, and the graceful stop (drain, stop, requeue running jobs, close the store)."""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import grpc

from transfer_service.backbones.background_upgrade import BackgroundUpgrader
from transfer_service.backbones.cache import BackboneCache
from transfer_service.edge.request_interceptor import RequestInterceptor
from transfer_service.edge.server import HealthReporter
from transfer_service.heads import HeadCache
from transfer_service.metrics import Metrics
from transfer_service.predict.predictor import Predictor
from transfer_service.settings import Settings
from transfer_service.store.interface import Store
from transfer_service.training.jobs import JobManager

log = logging.getLogger("transfer_service")


@dataclass
class Application:
    settings: Settings
    store: Store
    backbones: BackboneCache
    heads: HeadCache
    jobs: JobManager
    predictor: Predictor
    health: HealthReporter
    interceptor: RequestInterceptor
    metrics: Metrics
    server: grpc.aio.Server
    port: int
    metrics_port: int | None
    pools: tuple[ThreadPoolExecutor, ...]  # (blocking/preprocessing, Predict compute, ...)
    upgrader: BackgroundUpgrader | None = None  # TRANSFER_COMPILE=auto
    retention: asyncio.Task[None] | None = field(default=None, init=False)

    @property
    def compute_pool(self) -> ThreadPoolExecutor:
        """The one thread that runs Predict batches."""
        return self.pools[1]

    async def start(self) -> None:
        """Listens at once (health NOT_SERVING), loads and warms start-up backbones, then
        reports SERVING."""
        self.jobs.start()
        if self.settings.job_retention_seconds > 0:
            self.retention = asyncio.create_task(self._apply_job_retention())
        await self.health.set_serving(False)
        await self.server.start()
        loop = asyncio.get_running_loop()
        for name in self.settings.preload_backbones:
            backbone = await loop.run_in_executor(self.pools[0], self.backbones.get, name)
            await self.predictor.warm_up(backbone)
        await self.health.set_serving(True)
        if self.upgrader is not None:  # after SERVING: no request waits for a compile
            self.upgrader.start()

    async def _apply_job_retention(self) -> None:
        """Deletes finished jobs (and their events) older than TRANSFER_JOB_RETENTION_SECONDS:
        now, then hourly or every retention period if that is shorter. Without it the job
        table only grew (200,000 jobs made a listing take seconds). In the blocking pool: a
        large sweep must not hold up the loop."""
        retention = self.settings.job_retention_seconds
        interval = min(max(retention, 1.0), 3600.0)
        loop = asyncio.get_running_loop()
        while True:
            cutoff = datetime.now(UTC) - timedelta(seconds=retention)
            try:
                deleted = await loop.run_in_executor(
                    self.pools[0], self.store.delete_finished_jobs, cutoff
                )
            except Exception:
                log.exception("job retention sweep failed; trying again in %.0f s", interval)
            else:
                if deleted:
                    log.info("job retention: deleted %d jobs finished before %s", deleted, cutoff)
            await asyncio.sleep(interval)

    async def stop(self) -> None:
        """New calls are refused UNAVAILABLE and health goes NOT_SERVING; for the drain
        window the server still takes calls in (and refuses them) while in-flight ones run on;
        then it stops, giving those the rest of the grace period. Running jobs are put back in
        the queue (they run again from the start, here after a restart or on another
        replica). One deadline covers the whole stop."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.grace_seconds
        if self.upgrader is not None:  # a compile running now finishes in its daemon thread
            self.upgrader.close()
        # Refusing first: no call is answered after a client could have read NOT_SERVING.
        self.interceptor.begin_draining()
        await self.health.servicer.enter_graceful_shutdown()
        # Jobs first: their FineTune/WatchJob streams then end promptly instead of holding
        # the server's grace period open.
        self.jobs.begin_shutdown()
        # server.stop() cancels every call the core has received but Python has not picked
        # up yet: a call sent just before SIGTERM would read CANCELLED, which a client cannot
        # tell from its own cancellation. Draining first lets those calls be picked up and
        # refused UNAVAILABLE (retryable), while clients and load balancers see NOT_SERVING.
        drain = min(self.settings.drain_seconds, self.settings.grace_seconds / 2)
        await asyncio.sleep(drain)
        await self.server.stop(max(deadline - loop.time(), 0.0))
        try:
            await self.jobs.shutdown(max(deadline - loop.time(), 0.1))
        except TimeoutError:
            log.warning("training jobs did not stop within the grace period")
        await self.predictor.close()
        if self.retention is not None:
            self.retention.cancel()
        for pool in self.pools:
            pool.shutdown(wait=False, cancel_futures=True)
        self.store.close()
