"""A throwaway PostgreSQL server for the tests, from Debian's `postgresql` package (`make
testdata` installs it): initdb into a temp dir, start on a free loopback port, create a database
per test (or module) on demand, stop and remove everything at the end.

initdb refuses to run as root, so as root the server runs as the `postgres` user in a temp dir
it owns (`runuser -u postgres -- ...`); otherwise as the current user. A missing package is a
clear failure, never a skip: the PostgreSQL store would go untested without a word."""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import psycopg

_BIN_GLOB = "/usr/lib/postgresql/*/bin"


class PostgresUnavailable(RuntimeError):
    """PostgreSQL is not installed here, or its server would not start."""


def postgres_bin_dir() -> Path:
    """The newest installed PostgreSQL's bin directory (the one holding pg_ctl)."""
    found = [path.parent for path in Path("/").glob(_BIN_GLOB.lstrip("/") + "/pg_ctl")]
    if not found:
        raise PostgresUnavailable(
            "PostgreSQL is not installed (no /usr/lib/postgresql/*/bin/pg_ctl): run `make "
            "testdata`, which installs Debian's postgresql package (apt-get install postgresql)"
        )

    def version(path: Path) -> tuple[int, ...]:
        return tuple(int(part) for part in re.findall(r"\d+", path.parent.name))

    return max(found, key=version)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class PostgresServer:
    """One running server (`start()`), superuser `postgres`, trust authentication, listening
    on 127.0.0.1 only. `create_database()` gives a fresh empty database's URL."""

    def __init__(self) -> None:
        self.bin_dir = postgres_bin_dir()
        self.port = free_port()
        self._as_postgres = os.geteuid() == 0
        self._dir = Path(tempfile.mkdtemp(prefix="transfer-pg-"))
        self._data = self._dir / "data"
        self._log = self._dir / "server.log"
        self._numbers = itertools.count(1)
        self._running = False
        self._options = (
            f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self._dir} -c fsync=off "
            "-c full_page_writes=off -c synchronous_commit=off -c max_connections=200"
        )
        if self._as_postgres:
            shutil.chown(self._dir, "postgres", "postgres")

    def _run(self, *command: str, timeout: float = 120) -> None:
        argv = [str(self.bin_dir / command[0]), *command[1:]]
        if self._as_postgres:
            argv = ["runuser", "-u", "postgres", "--", *argv]
        result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
        if result.returncode != 0:
            log = self._log.read_text(errors="replace")[-4000:] if self._log.exists() else ""
            raise PostgresUnavailable(
                f"{' '.join(argv)} failed ({result.returncode}):\n{result.stdout}"
                f"{result.stderr}\n{log}"
            )

    def start(self) -> PostgresServer:
        self._run("initdb", "-A", "trust", "-U", "postgres", "--no-sync", "-D", str(self._data))
        self._run(
            "pg_ctl", "-D", str(self._data), "-l", str(self._log), "-o", self._options, "start"
        )
        self._running = True
        deadline = time.monotonic() + 60
        while True:
            try:
                with psycopg.connect(self.url("postgres"), connect_timeout=2):
                    return self
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise
                time.sleep(0.1)

    def pause(self) -> None:
        """Stops the server (fast shutdown: open connections are closed) but keeps its files
        and port, so `resume()` brings the same databases back: a database outage."""
        self._run("pg_ctl", "-D", str(self._data), "-m", "fast", "-w", "stop")

    def resume(self) -> None:
        """Starts a server `pause()` stopped again, on the same port, and waits until it takes
        connections."""
        self._run(
            "pg_ctl",
            "-D",
            str(self._data),
            "-l",
            str(self._log),
            "-o",
            self._options,
            "-w",
            "start",
        )
        deadline = time.monotonic() + 60
        while True:
            try:
                with psycopg.connect(self.url("postgres"), connect_timeout=2):
                    return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def url(self, database: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self, prefix: str = "test") -> str:
        """A new empty database's URL."""
        name = f"{prefix}_{os.getpid()}_{next(self._numbers)}"
        with psycopg.connect(self.url("postgres"), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"'.encode())
        return self.url(name)

    def drop_database(self, url: str) -> None:
        """Drops the database `url` names, closing its connections first."""
        name = url.rsplit("/", 1)[1]
        with psycopg.connect(self.url("postgres"), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'.encode())

    def stop(self) -> None:
        """Stops the server (fast shutdown) and removes its files."""
        if self._running:
            self._running = False
            with contextlib.suppress(PostgresUnavailable):
                self._run("pg_ctl", "-D", str(self._data), "-m", "fast", "-w", "stop")
        shutil.rmtree(self._dir, ignore_errors=True)
