"""Per-tenant admission (issue 15): one tenant's flood is held and throttled to its rate,
another tenant's calls run at once, refusals carry a retry hint and are counted."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from transfer_client.proto import transfer_service_pb2 as pb
from transfer_client.proto import transfer_service_pb2_grpc as pb_grpc
from transfer_service.edge.tenant_admission import (
    RETRY_AFTER_KEY,
    AdmissionLimits,
    TenantAdmission,
)

from tests.conftest import RunningServer, make_settings, start_server

FLOODER_TOKEN = "flooder-token-0123456789"
NEIGHBOUR_TOKEN = "neighbour-token-0123456789"
RATE = 20.0
BURST = 5
HOLD_SECONDS = 0.3


@pytest.fixture(scope="module")
def limited_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    running = start_server(
        make_settings(
            Path(tmp_path_factory.mktemp("admission")),
            auth_tokens=f"{FLOODER_TOKEN}=flooder,{NEIGHBOUR_TOKEN}=neighbour",
            tenant_requests_per_second=RATE,
            tenant_request_burst=BURST,
            tenant_admission_hold_ms=HOLD_SECONDS * 1000,
        )
    )
    yield running
    running.stop()


def _auth(token: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {token}"),)


def test_a_flood_is_throttled_and_the_neighbour_is_not(limited_server: RunningServer) -> None:
    seconds = 2.0
    outcomes: dict[str, int] = {}
    retry_hints: list[str] = []
    lock = threading.Lock()
    neighbour_latencies: list[float] = []
    neighbour_failures: list[str] = []

    with grpc.insecure_channel(limited_server.address) as channel:
        stub = pb_grpc.TransferServiceStub(channel)
        end = time.monotonic() + seconds

        def flood() -> None:
            while time.monotonic() < end:
                try:
                    stub.ListHeads(pb.ListHeadsRequest(), timeout=5, metadata=_auth(FLOODER_TOKEN))
                    name = "OK"
                except grpc.RpcError as error:
                    name = error.code().name
                    trailers = dict(error.trailing_metadata() or ())
                    if RETRY_AFTER_KEY in trailers:
                        with lock:
                            retry_hints.append(str(trailers[RETRY_AFTER_KEY]))
                with lock:
                    outcomes[name] = outcomes.get(name, 0) + 1

        def neighbour() -> None:
            while time.monotonic() < end:
                started = time.perf_counter()
                try:
                    stub.ListHeads(
                        pb.ListHeadsRequest(), timeout=5, metadata=_auth(NEIGHBOUR_TOKEN)
                    )
                    neighbour_latencies.append(time.perf_counter() - started)
                except grpc.RpcError as error:
                    neighbour_failures.append(error.code().name)
                time.sleep(0.1)  # 10 calls a second: under its own rate

        threads = [threading.Thread(target=flood) for _ in range(8)]
        threads.append(threading.Thread(target=neighbour))
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)

    admitted = outcomes.get("OK", 0)
    refused = outcomes.get("RESOURCE_EXHAUSTED", 0)
    assert set(outcomes) <= {"OK", "RESOURCE_EXHAUSTED"}, outcomes
    # The bucket's burst plus its rate over the flood (and the hold bound past its end).
    assert admitted <= BURST + RATE * (seconds + HOLD_SECONDS) + 2, outcomes
    assert admitted >= RATE * seconds * 0.5, outcomes
    assert refused > 0, outcomes
    # Held, not answered at once: 8 looping callers cannot spin faster than the hold bound.
    assert admitted + refused <= admitted + 8 * (seconds / HOLD_SECONDS + 1), outcomes
    assert retry_hints and all(int(hint) >= 1 for hint in retry_hints)

    assert not neighbour_failures
    assert len(neighbour_latencies) >= 10
    assert max(neighbour_latencies) < 0.25, neighbour_latencies

    samples = limited_server.app.metrics.registry.get_sample_value(
        "transfer_admission_refused_total", {"reason": "rate"}
    )
    assert samples is not None and samples >= refused
    held = limited_server.app.metrics.registry.get_sample_value(
        "transfer_admission_held_total", {"reason": "rate"}
    )
    assert held is not None and held >= refused


def test_a_sequential_caller_is_slowed_to_the_rate_never_refused(
    limited_server: RunningServer,
) -> None:
    time.sleep(BURST / RATE + HOLD_SECONDS + 0.2)  # the bucket full again after the last test
    with grpc.insecure_channel(limited_server.address) as channel:
        stub = pb_grpc.TransferServiceStub(channel)
        started = time.monotonic()
        calls = BURST + 20
        for _ in range(calls):
            stub.ListHeads(pb.ListHeadsRequest(), timeout=5, metadata=_auth(FLOODER_TOKEN))
        elapsed = time.monotonic() - started
    # 20 calls past the burst take at least 20 tokens' time at RATE.
    assert elapsed >= 20 / RATE * 0.9, elapsed


def test_in_flight_bound_holds_then_refuses() -> None:
    """Two slots: a third call waits for one to free; with none freed it is refused after the
    hold bound; another tenant is never held."""

    async def scenario() -> None:
        admission = TenantAdmission(AdmissionLimits(0, 1, 2, 0.2))
        assert await admission.enter_flight("a") is None
        assert await admission.enter_flight("a") is None
        started = time.monotonic()
        refusal = await admission.enter_flight("a")
        assert refusal is not None and refusal.reason == "in_flight"
        assert time.monotonic() - started >= 0.19
        assert await admission.enter_flight("b") is None  # not held by a's calls

        waiting = asyncio.ensure_future(admission.enter_flight("a"))
        await asyncio.sleep(0.05)
        assert not waiting.done()
        admission.leave_flight("a")
        assert await asyncio.wait_for(waiting, 1) is None

    asyncio.run(scenario())


def test_a_token_further_than_the_hold_bound_is_refused_with_a_hint() -> None:
    async def scenario() -> None:
        admission = TenantAdmission(AdmissionLimits(10, 2, 0, 0.05))
        assert await admission.take_token("a") is None
        assert await admission.take_token("a") is None
        # The third token is 0.1 s away, past the 0.05 s hold: refused after the hold.
        started = time.monotonic()
        refusal = await admission.take_token("a")
        assert refusal is not None and refusal.reason == "rate"
        assert time.monotonic() - started >= 0.045
        hint = int(dict(refusal.trailers())[RETRY_AFTER_KEY])
        assert 1 <= hint <= 100
        await asyncio.sleep(0.1)
        assert await admission.take_token("a") is None  # a token came back meanwhile

    asyncio.run(scenario())
