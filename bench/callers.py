"""Predict callers in a child process, as in production, where callers are other services.

In the benchmark's own process the client's protobuf and asyncio work competes with the
server's event loop and compute thread for one GIL, which no deployed client does; in a child
process it still costs CPU on the same machine (so it is still charged to the server's side of
a ratio), but not the server's GIL. `CallerProcess` runs an `AsyncTransferClient` on one
channel in a spawned child and returns the child's own timings, so pipe traffic between the
processes is outside every measured interval.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

from bench.common import CLIENT_TIMEOUT_S, Call, Environment, run_callers

if TYPE_CHECKING:
    from transfer_client import AsyncTransferClient


Outcome = TypeVar("Outcome")


@dataclass(frozen=True, slots=True)
class CallerRun:
    seconds: float  # wall time of the whole list of calls
    latencies: list[float]  # one per call, in completion order


class CallerProcess:
    """A child process holding one client channel to `address`; use as a context manager."""

    def __init__(self, address: str) -> None:
        context = multiprocessing.get_context("spawn")  # no forked copy of torch or grpc state
        self._conn, child_conn = context.Pipe()
        self._process = context.Process(
            target=_serve, args=(child_conn, address), name="bench-callers", daemon=True
        )

    def __enter__(self) -> CallerProcess:
        self._process.start()
        kind, ready = self._conn.recv()
        if (kind, ready) != ("ok", "ready"):
            raise RuntimeError(f"caller process failed to start: {ready}")
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        with contextlib.suppress(OSError):  # the child may already be gone
            self._conn.send(None)
        self._process.join(timeout=30)
        if self._process.is_alive():
            self._process.kill()

    @property
    def pids(self) -> tuple[int, ...]:
        """For `CpuMeter`: the child's CPU is the benchmark's own, not another process's."""
        pid = self._process.pid
        assert pid is not None, "caller process not started"
        return (pid,)

    async def run(self, calls: Sequence[Call], concurrency: int) -> CallerRun:
        """`concurrency` callers share `calls` (each takes the next when its last returns)."""
        return await asyncio.to_thread(self._request, list(calls), concurrency)

    async def call(self, function: Callable[..., Awaitable[Outcome]], *args: Any) -> Outcome:
        """`await function(client, *args)` in the child; `function` is a module-level
        coroutine function and its result is sent back (both pickled, between our own
        processes)."""
        return await asyncio.to_thread(self._exchange, ("call", function, args))  # type: ignore[no-any-return]

    def _request(self, calls: list[Call], concurrency: int) -> CallerRun:
        seconds, latencies = self._exchange(("callers", calls, concurrency))
        return CallerRun(seconds, latencies)

    def _exchange(self, request: tuple[Any, ...]) -> Any:
        self._conn.send(request)
        kind, reply = self._conn.recv()
        if kind == "error":
            raise RuntimeError(f"caller process: {reply}")
        return reply


def _serve(conn: Connection, address: str) -> None:
    """The child: one event loop and one channel for its whole life."""
    from transfer_client import AsyncTransferClient

    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)

    async def open_client() -> AsyncTransferClient:
        # grpc.aio binds a channel to the loop running when it is made.
        return await AsyncTransferClient(address, timeout=CLIENT_TIMEOUT_S).__aenter__()

    client = loop.run_until_complete(open_client())
    conn.send(("ok", "ready"))
    try:
        while True:
            request = conn.recv()
            if request is None:
                break
            started = time.perf_counter()
            try:
                if request[0] == "callers":
                    _, calls, concurrency = request
                    result: Any = loop.run_until_complete(run_callers(client, calls, concurrency))
                else:
                    _, function, args = request
                    result = loop.run_until_complete(function(client, *args))
            except Exception as exc:  # reported to the parent, which raises it
                elapsed = time.perf_counter() - started
                conn.send(("error", f"{type(exc).__name__}: {exc} after {elapsed:.1f} s"))
                continue
            conn.send(("ok", result))
    finally:
        loop.run_until_complete(client.__aexit__(None, None, None))
        loop.close()


class InProcessCallers:
    """The same interface over a client in this process (`--callers-in-process`): the old
    set-up, where client and server share one GIL; kept to compare the two."""

    pids: tuple[int, ...] = ()

    def __init__(self, client: AsyncTransferClient) -> None:
        self._client = client

    async def run(self, calls: Sequence[Call], concurrency: int) -> CallerRun:
        seconds, latencies = await run_callers(self._client, calls, concurrency)
        return CallerRun(seconds, latencies)


Callers = CallerProcess | InProcessCallers


def add_callers_option(arguments: argparse.ArgumentParser) -> None:
    arguments.add_argument(
        "--callers-in-process",
        action="store_true",
        help="run the Predict callers in the benchmark's own process, sharing the server's "
        "GIL (default: a child process, as a deployed caller would be)",
    )


@contextlib.contextmanager
def open_callers(
    arguments: argparse.Namespace,
    address: str,
    client: AsyncTransferClient,
    environment: Environment,
) -> Iterator[Callers]:
    """The callers the command line asked for, noted in `environment` (and a child's CPU
    counted as the benchmark's own there, not another process's load)."""
    if arguments.callers_in_process:
        environment.note(
            "callers", "in the benchmark's process (one AsyncTransferClient channel, shared GIL)"
        )
        yield InProcessCallers(client)
        return
    environment.note("callers", "a child process (one AsyncTransferClient channel)")
    with CallerProcess(address) as process:
        for pid in process.pids:
            environment.meter.include(pid)
        yield process
