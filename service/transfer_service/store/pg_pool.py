"""The PostgreSQL store's connections: a bounded pool (psycopg_pool), one transaction per
`transaction()` block, and the database's failures as domain errors.

A database that cannot be reached (refused, timed out, restarting, out of connections, the
pool waited too long) is UnavailableError, saying the database is unreachable: retryable, never
INTERNAL. A database whose disk is full is ResourceExhaustedError, as a full local disk is.

While the database is down a call fails in about a second (WAIT_SLICE), not after the pool's
whole wait, and once it is back the pool reconnects within a few seconds however long the
outage was (`reconnect_timeout`): see `Database`."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.rows import TupleRow
from psycopg_pool import ConnectionPool, PoolTimeout

from transfer_service.errors import ResourceExhaustedError, UnavailableError

Connection = psycopg.Connection[TupleRow]

log = logging.getLogger(__name__)

# A call waits for a connection in slices of this many seconds; between two, it gives up if the
# database is down (the last connection attempt failed) rather than wait the pool's whole
# `timeout`.
WAIT_SLICE = 1.0


class Database:
    """A pool of at most `max_connections` connections to `url`. A call waits at most
    `timeout` seconds for a free (or new) connection; a connection attempt gives up after
    `connect_timeout` seconds (unless the URL sets its own); a statement after
    `statement_timeout` seconds. Sessions run in UTC.

    While the database is down (a connection attempt failed after the last one that
    succeeded), a call gives up after one WAIT_SLICE instead: the pool's wait is for a busy
    pool, and waiting it out against a dead database only held every caller (and the SDK's
    retries) for `timeout` seconds each. The pool replaces lost connections in the background,
    backing off (1, 2, 4 s...) for at most `reconnect_timeout` seconds before it gives up;
    psycopg_pool's default, 5 minutes, let the backoff grow to a minute, so a database back
    after a long outage went unused for up to a minute. After it gives up, the next call that
    finds no connection starts a fresh attempt at once."""

    def __init__(
        self,
        url: str,
        *,
        max_connections: int = 8,
        timeout: float = 10.0,
        connect_timeout: float = 5.0,
        statement_timeout: float = 120.0,
        reconnect_timeout: float = 5.0,
    ) -> None:
        try:
            params = conninfo_to_dict(url)
        except psycopg.ProgrammingError as exc:
            # The URL itself is malformed: say so without echoing it (it may hold a password).
            raise UnavailableError(f"the database URL is not a valid libpq URL ({exc})") from None
        self.where = f"{params.get('host', 'localhost')}:{params.get('port', 5432)}"
        self.where += f"/{params.get('dbname', '')}"
        extra: dict[str, str | int] = {}
        if "connect_timeout" not in params:
            extra["connect_timeout"] = max(1, round(connect_timeout))
        if "application_name" not in params:
            extra["application_name"] = "transfer-service"
        statement_ms = round(statement_timeout * 1000)

        def configure(conn: Connection) -> None:
            # A new connection: the database is up (as of the failures counted so far).
            self._errors_when_connected = self._connection_errors()
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
            reconnect_timeout=reconnect_timeout,
            name="transfer-store",
        )
        self._timeout = timeout
        self._errors_when_connected = 0
        self._url = url
        self._connect_kwargs = extra

    def connect(self) -> Connection:
        """A connection of its own, outside the pool and in autocommit (the head-change
        listener's): its failures raise as psycopg's, for its owner to retry."""
        conninfo = make_conninfo(self._url, **self._connect_kwargs)
        conn: Connection = psycopg.connect(conninfo, autocommit=True)
        return conn

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
        with self.faults(), contextlib.ExitStack() as stack:
            yield self._checkout(stack)

    def _checkout(self, stack: contextlib.ExitStack) -> Connection:
        """A connection from the pool, entered on `stack`: waits up to `timeout` seconds for
        one, in WAIT_SLICE slices, and gives up at the end of a slice while the database is
        down. Raises PoolTimeout."""
        deadline = time.monotonic() + self._timeout
        while True:
            wait = max(0.001, min(WAIT_SLICE, deadline - time.monotonic()))
            try:
                conn: Connection = stack.enter_context(self._pool.connection(timeout=wait))
                return conn
            except PoolTimeout:
                if time.monotonic() >= deadline:
                    raise
                if self._database_down():
                    raise PoolTimeout(
                        "no connection, and the last attempt to connect failed"
                    ) from None

    def _database_down(self) -> bool:
        """Whether a connection attempt failed after the last one that succeeded."""
        return self._connection_errors() > self._errors_when_connected

    def _connection_errors(self) -> int:
        # psycopg_pool counts every failed connection attempt (nothing here pops its stats).
        return self._pool.get_stats().get("connections_errors", 0)

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


def keep_listening(
    db: Database,
    channels: Sequence[str],
    stop: threading.Event,
    serve: Callable[[Connection], None],
    *,
    name: str,
    on_reconnect: Callable[[], None],
    first_backoff: float,
    max_backoff: float,
) -> None:
    """Until `stop` is set: a connection of its own (Database.connect) LISTENing on
    `channels`, handed to `serve` (which returns once `stop` is set); when the database
    drops it, reconnects with a backoff doubling from `first_backoff` to `max_backoff`,
    calling `on_reconnect` once listening again. The loop of the store's listener threads
    (`name` in their logs); a bug in `serve` is logged and the loop goes on."""
    backoff = first_backoff
    connected_before = False
    while not stop.is_set():
        try:
            with db.connect() as conn:
                for channel in channels:
                    conn.execute(f"LISTEN {channel}")
                if connected_before:
                    on_reconnect()
                    log.info("%s: reconnected to %s", name, db.where)
                connected_before = True
                backoff = first_backoff
                serve(conn)
        except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
            if stop.is_set():
                break
            log.warning(
                "%s: the database %s is unreachable (%s); reconnecting in %.1f s",
                name,
                db.where,
                _first_line(exc),
                backoff,
            )
            stop.wait(backoff)
            backoff = min(backoff * 2, max_backoff)
        except Exception:  # a bug: keep listening rather than die silently
            log.exception("%s failed; restarting in %.1f s", name, max_backoff)
            stop.wait(max_backoff)


class ListenerThread:
    """A daemon thread of its own running keep_listening on `channels`: each connection goes
    to `_serve`, which a subclass writes (it returns once `_stop` is set). Start with
    `start()`, stop with `close()` (returns once `_serve` sees `_stop`, plus any query in
    flight). `connected` is for `_serve` to set while it listens; `reconnects` counts the
    times the database dropped the connection and it came back."""

    # Reconnect backoff after the connection drops: doubled per failure up to the maximum;
    # read when the thread starts (a test may change them).
    first_backoff_seconds = 0.1
    max_backoff_seconds = 5.0

    def __init__(self, db: Database, channels: Sequence[str], *, name: str) -> None:
        self._db = db
        self._channels = tuple(channels)
        self._name = name
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name.replace(" ", "-"), daemon=True)
        self.connected = threading.Event()
        self.reconnects = 0

    def start(self) -> None:
        self._thread.start()

    def close(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    def _serve(self, conn: Connection) -> None:
        raise NotImplementedError

    def _run(self) -> None:
        keep_listening(
            self._db,
            self._channels,
            self._stop,
            self._serve,
            name=self._name,
            on_reconnect=self._reconnected,
            first_backoff=self.first_backoff_seconds,
            max_backoff=self.max_backoff_seconds,
        )

    def _reconnected(self) -> None:
        self.reconnects += 1


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
