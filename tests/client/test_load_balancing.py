"""Two real servers (replicas, each its own store) and one client whose target resolves to both,
as a `dns:///` target resolves to every replica of a headless Kubernetes Service: round_robin
spreads calls over them, and once one has stopped, calls go on on the other without one
failure (a call that still meets the closed connection fails UNAVAILABLE and is retried)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from transfer_client import NotFoundError, TransferClient, TransferError
from transfer_client._cli import main

from tests.conftest import RunningServer, make_settings, start_server


def replica(store: Path) -> RunningServer:
    # A short drain: the window in which a stopping replica refuses new calls UNAVAILABLE.
    return start_server(
        make_settings(store, preload_backbones=[], drain_seconds=1.0, grace_seconds=5.0)
    )


@pytest.fixture()
def replicas(tmp_path: Path) -> Iterator[tuple[RunningServer, RunningServer]]:
    first = replica(tmp_path / "a")
    try:
        second = replica(tmp_path / "b")
    except BaseException:
        first.stop()
        raise
    yield first, second
    for server in (first, second):
        if server.thread.is_alive():
            server.stop()


def both(servers: tuple[RunningServer, RunningServer]) -> str:
    """A target that resolves to both servers (gRPC's ipv4: scheme takes a list)."""
    return "ipv4:" + ",".join(server.address for server in servers)


def handled(server: RunningServer, method: str, code: str = "OK") -> int:
    value = server.app.metrics.registry.get_sample_value(
        "transfer_rpc_requests_total", {"method": method, "code": code}
    )
    return int(value or 0)


def counts(
    servers: tuple[RunningServer, RunningServer], method: str, code: str = "OK"
) -> tuple[int, int]:
    return handled(servers[0], method, code), handled(servers[1], method, code)


def settled(
    servers: tuple[RunningServer, RunningServer], method: str, total: int, code: str = "OK"
) -> tuple[int, int]:
    """The per-server counts once `total` calls are counted (a server counts a call just
    after answering it)."""
    deadline = time.monotonic() + 10
    while sum(seen := counts(servers, method, code)) < total and time.monotonic() < deadline:
        time.sleep(0.01)
    return seen


def connect_both(client: TransferClient, servers: tuple[RunningServer, RunningServer]) -> None:
    """Calls until each server has answered one: round_robin sends only to connected ones."""
    deadline = time.monotonic() + 30
    while 0 in counts(servers, "ListBackbones"):
        assert time.monotonic() < deadline, "a server was never called"
        client.list_backbones()


def test_round_robin_spreads_calls_over_every_address(
    replicas: tuple[RunningServer, RunningServer],
) -> None:
    with TransferClient(both(replicas), timeout=30) as client:
        connect_both(client, replicas)
        before = settled(replicas, "ListBackbones", 0)
        for _ in range(20):
            assert client.list_backbones()
        after = settled(replicas, "ListBackbones", sum(before) + 20)
        for _ in range(20):
            with pytest.raises(NotFoundError):
                client.predict("no-such-head", "some text")
        predicts = settled(replicas, "Predict", 20, code="NOT_FOUND")
    spread = (after[0] - before[0], after[1] - before[1])
    assert sum(spread) == 20
    # Taken in turn: about half each (exactly, unless a connection blipped).
    assert min(spread) >= 7, spread
    assert sum(predicts) == 20
    assert min(predicts) >= 7, predicts


def test_pick_first_sends_every_call_to_one_address(
    replicas: tuple[RunningServer, RunningServer],
) -> None:
    with TransferClient(both(replicas), timeout=30, load_balancing="pick_first") as client:
        for _ in range(20):
            assert client.list_backbones()
        spread = settled(replicas, "ListBackbones", 20)
    assert sorted(spread) == [0, 20]


def test_calls_go_on_without_a_failure_once_a_replica_has_stopped(
    replicas: tuple[RunningServer, RunningServer],
) -> None:
    with TransferClient(both(replicas), timeout=30) as client:
        connect_both(client, replicas)
        replicas[1].stop()
        before = counts(replicas, "ListBackbones")
        for _ in range(20):
            assert client.list_backbones()  # raises on a failure
        after = settled(replicas, "ListBackbones", sum(before) + 20)
    assert after == (before[0] + 20, before[1])


def test_calls_go_on_without_a_failure_while_a_replica_drains(
    replicas: tuple[RunningServer, RunningServer],
) -> None:
    failures: list[TransferError] = []
    answered = 0
    stop = threading.Event()

    def call_continuously(client: TransferClient) -> None:
        nonlocal answered
        while not stop.is_set():
            try:
                client.list_backbones()
                answered += 1
            except TransferError as err:
                failures.append(err)

    with TransferClient(both(replicas), timeout=30) as client:
        connect_both(client, replicas)
        caller = threading.Thread(target=call_continuously, args=(client,))
        caller.start()
        try:
            time.sleep(0.3)
            # Draining: the second refuses new calls UNAVAILABLE for drain_seconds, then stops.
            refused_before = handled(replicas[1], "ListBackbones", "UNAVAILABLE")
            replicas[1].stop()
            refused = handled(replicas[1], "ListBackbones", "UNAVAILABLE") - refused_before
            after_stop = answered
            time.sleep(0.5)
        finally:
            stop.set()
            caller.join(timeout=60)
    assert failures == []
    assert refused > 0  # the retries were needed: some calls met the draining replica
    assert answered > after_stop  # and calls went on once it was gone


@pytest.fixture()
def single(tmp_path: Path) -> Iterator[RunningServer]:
    server = replica(tmp_path)
    yield server
    server.stop()


def test_a_dns_target_reaches_the_server(single: RunningServer) -> None:
    # localhost resolves to ::1 too, where nothing listens: round_robin uses 127.0.0.1.
    with TransferClient(f"dns:///localhost:{single.app.port}", timeout=30) as client:
        names = {backbone.name for backbone in client.list_backbones()}
    assert "efficientnet_lite0" in names


def test_the_cli_takes_a_dns_target(
    single: RunningServer, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--target", f"dns:///localhost:{single.app.port}", "backbones"]) == 0
    assert "efficientnet_lite0" in capsys.readouterr().out
