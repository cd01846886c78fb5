"""Several `python -m transfer_service` replicas on one PostgreSQL database, as the three-replica
e2e tests (tests/e2e/test_three_replicas.py), the scale-out bench (bench/scale_out.py) and the
replica chaos (replica_chaos.py) start them: real processes, so SIGKILL is a real SIGKILL.

A replica keeps its environment, so its ports, when restarted: a client's target names the
same addresses throughout. Which replica runs a job is read from the database: the job's
lease owner is `host-pid-random` (training/job_leases.py), and the pid names the process.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path

import psycopg

from tools.reliability.common import ServerProcess, server_env


def replica_extra(
    database_url: str, lease_seconds: float, extra: dict[str, str] | None = None
) -> dict[str, str]:
    """The TRANSFER_* settings every replica on `database_url` shares, then `extra`."""
    return {
        "TRANSFER_DATABASE_URL": database_url,
        "TRANSFER_JOB_LEASE_SECONDS": str(lease_seconds),
        # Several processes on a small machine: one torch thread each.
        "TRANSFER_TORCH_THREADS": "1",
        **(extra or {}),
    }


def owner_pid(lease_owner: str) -> int:
    """The process id in a lease owner's name (`host-pid-random`; the host may hold dashes)."""
    return int(lease_owner.rsplit("-", 2)[1])


def query_one(url: str, sql: str, *params: object) -> tuple[object, ...] | None:
    with psycopg.connect(url, autocommit=True, connect_timeout=10) as conn:
        return conn.execute(sql.encode(), params).fetchone()


def query_all(url: str, sql: str, *params: object) -> list[tuple[object, ...]]:
    with psycopg.connect(url, autocommit=True, connect_timeout=10) as conn:
        return conn.execute(sql.encode(), params).fetchall()


def serving(
    process: ServerProcess, respawn: Callable[[], ServerProcess], tries: int = 3
) -> ServerProcess:
    """`process` once it serves. On a shared machine another process may take a port between
    free_port() and the server's bind: then `respawn()` (on other ports) and wait again."""
    for attempt in range(tries):
        try:
            process.wait_serving()
            return process
        except RuntimeError:
            if "Failed to bind" not in process.log_tail() or attempt + 1 == tries:
                raise
        process.close()
        process = respawn()
    raise AssertionError("unreachable")


class ReplicaSet:
    """One server process per name on one database, each logging to `directory/<name>.log`,
    its store directory `directory/<name>`. Started and SERVING when constructed."""

    def __init__(
        self,
        url: str,
        directory: Path,
        names: Sequence[str],
        *,
        lease_seconds: float,
        preload: str,
        metrics: bool = False,
        extra: dict[str, str] | None = None,
    ) -> None:
        self.url = url
        self.directory = directory
        self.names = tuple(names)
        self._preload = preload
        self._metrics = metrics
        self._extra = replica_extra(url, lease_seconds, extra)
        self.envs = [self._fresh_env(index) for index in range(len(self.names))]
        self.processes: list[ServerProcess] = []
        try:
            for index in range(len(self.names)):
                self.processes.append(self._spawn(index))
            for index in range(len(self.names)):
                self._wait_first_start(index)
        except BaseException:
            self.close()
            raise

    def _fresh_env(self, index: int) -> dict[str, str]:
        """An environment on free ports (free when looked at)."""
        return server_env(
            self.directory / self.names[index],
            preload=self._preload,
            metrics=self._metrics,
            extra=self._extra,
        )

    def _wait_first_start(self, index: int) -> None:
        def respawn() -> ServerProcess:
            self.envs[index] = self._fresh_env(index)
            return self._spawn(index)

        self.processes[index] = serving(self.processes[index], respawn)

    def _spawn(self, index: int) -> ServerProcess:
        return ServerProcess(self.envs[index], self.directory / f"{self.names[index]}.log")

    @property
    def addresses(self) -> list[str]:
        return [process.address for process in self.processes]

    def target(self) -> str:
        """One target resolving to every replica (gRPC's ipv4: scheme takes a list)."""
        return "ipv4:" + ",".join(self.addresses)

    def restart(self, index: int) -> ServerProcess:
        """Starts replica `index` again (same ports) once its process has ended (killed
        here if it still runs); does not wait for it to serve."""
        self.processes[index].close()
        self.processes[index] = self._spawn(index)
        return self.processes[index]

    def revive(self) -> None:
        """Every replica serving again, after a test that left one down (or failed)."""
        for index, process in enumerate(self.processes):
            if not process.alive():
                self.restart(index)
        for process in self.processes:
            process.wait_serving()

    def holding(self, job_id: str, timeout: float = 60.0) -> int:
        """The index of the replica holding (or that last held) `job_id`'s lease, once the
        job has been claimed."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            row = query_one(self.url, "SELECT lease_owner FROM jobs WHERE job_id = %s", job_id)
            if row is not None and row[0]:
                pid = owner_pid(str(row[0]))
                for index, process in enumerate(self.processes):
                    if process.pid == pid:
                        return index
                raise RuntimeError(f"no replica has pid {pid} (lease owner {row[0]})")
            time.sleep(0.02)
        raise RuntimeError(f"job {job_id} was not claimed within {timeout} s")

    def logs(self) -> str:
        """The tail of every replica's log, for a failure's message."""
        return "\n".join(f"--- {p.log_path.name}\n{p.log_tail(3000)}" for p in self.processes)

    def close(self) -> None:
        for process in self.processes:
            process.close()
