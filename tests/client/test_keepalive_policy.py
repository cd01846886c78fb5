"""The SDK's keepalive pings and the server's ping policy agree: the server accepts pings at
the SDK's interval. With gRPC's default server policy (pings at least 5 min apart) a call
silent for 180 s was ended GOAWAY too_many_pings (measured by hand: a 200 s call failed
UNAVAILABLE at 180.0 s, and passed with the server's option); the real wait is too long for
the suite, so the settings are compared instead."""

from __future__ import annotations

from transfer_client._channel import KEEPALIVE_OPTIONS, channel_options
from transfer_service.edge.server import MIN_CLIENT_PING_INTERVAL_MS

GRPC_DEFAULT_MIN_PING_INTERVAL_MS = 300_000


def test_the_server_accepts_the_clients_ping_interval() -> None:
    options = dict(KEEPALIVE_OPTIONS)
    keepalive_ms = options["grpc.keepalive_time_ms"]
    assert isinstance(keepalive_ms, int)
    assert keepalive_ms > MIN_CLIENT_PING_INTERVAL_MS  # with margin for timer jitter
    assert keepalive_ms - MIN_CLIENT_PING_INTERVAL_MS >= 5_000
    # Without the server's option, gRPC's default would refuse the SDK's pings.
    assert keepalive_ms < GRPC_DEFAULT_MIN_PING_INTERVAL_MS
    assert options["grpc.keepalive_permit_without_calls"] == 0


def test_keepalive_can_be_turned_off() -> None:
    names = {name for name, _ in channel_options(1024, keepalive=False)}
    assert not names & set(dict(KEEPALIVE_OPTIONS))
