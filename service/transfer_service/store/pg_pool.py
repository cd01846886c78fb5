"""The PostgreSQL store's connections: a bounded pool (psycopg_pool), one transaction per
`transaction()` block, and the database's failures as domain errors.

A database that cannot be reached (refused, timed out, restarting, out of connections, the
pool waited too long) is UnavailableError, saying the database is unreachable: retryable, never
INTERNAL. A database whose disk is full is ResourceExhaustedError, as a full local disk is."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import psycopg
from psycopg.conninfo import conninfo_to_dict
from psycopg.rows import TupleRow
from psycopg_pool import ConnectionPool

from transfer_service.errors import ResourceExhaustedError, UnavailableError

Connection = psycopg.Connection[TupleRow]

log = logging.getLogger(__name__)


class Database:
    """A pool of at most `max_connections` connections to `url`. A call waits at most
    `timeout` seconds for a free (or new) connection; a connection attempt gives up after
    `connect_timeout` seconds (unless the URL sets its own); a statement after
    `statement_timeout` seconds. Sessions run in UTC."""

    def __init__(
        self,
        url: str,
        *,
        max_connections: int = 8,
        timeout: float = 10.0,
        connect_timeout: float = 5.0,
        statement_timeout: float = 120.0,
    ) -> None:
        try:
            params = conninfo_to_dict(url)
        except psycopg.ProgrammingError as exc:
            # The URL itself is malformed: say so without echoing it (it may hold a password).
            raise UnavailableError(f"the database URL is not a valid libpq URL ({exc})") from None
        self.where = f"{params.get('host', 'localhost')}:{params.get('port', 5432)}"
        self.where += f"/{params.get('dbname', '')}"
        extra: dict[str, object] = {}
        if "connect_timeout" not in params:
            extra["connect_timeout"] = max(1, round(connect_timeout))
        if "application_name" not in params:
            extra["application_name"] = "transfer-service"
        statement_ms = round(statement_timeout * 1000)

        def configure(conn: Connection) -> None:
            conn.execute("SET TIME ZONE 'UTC'")
            conn.execute(b"SET statement_timeout = %d" % statement_ms)
            conn.commit()

        self._pool: ConnectionPool[Connection] = ConnectionPool(
            url,
            kwargs=extra,
            min_size=1,
            max_size=max_connections,
            open=False,
            configure=configure,
            # A connection the server has dropped since (a restart) is replaced, not handed out.
            check=ConnectionPool.check_connection,
            timeout=timeout,
            name="transfer-store",
        )
        self._timeout = timeout

    def open(self) -> None:
        """Connects (at most `timeout` seconds): UnavailableError when the database cannot be
        reached, and the pool is closed again."""
        try:
            with self.faults():
                self._pool.open(wait=True, timeout=self._timeout)
        except BaseException:
            self._pool.close()
            raise

    def close(self) -> None:
        self._pool.close()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Connection]:
        """A connection for one transaction: committed when the block ends, rolled back when
        it raises; the database's failures raised as domain errors (`faults`)."""
        with self.faults(), self._pool.connection() as conn:
            yield conn

    @contextlib.contextmanager
    def faults(self) -> Iterator[None]:
        """psycopg's connection-level failures as domain errors; anything else (a bug: a bad
        statement, a violated constraint) passes through and ends INTERNAL."""
        try:
            yield
        except psycopg.errors.DiskFull as exc:
            log.warning("the database %s is out of disk space: %s", self.where, exc)
            raise ResourceExhaustedError(
                "the store's database is out of disk space; free space on its volume, then "
                "try again"
            ) from exc
        except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
            log.warning("the database %s is unreachable: %s", self.where, _first_line(exc))
            raise UnavailableError(
                "the store's database is unreachable; try again shortly"
            ) from exc


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
