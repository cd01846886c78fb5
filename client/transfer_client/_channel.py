"""Channel options, TLS credentials and call metadata shared by both clients."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import grpc

DEFAULT_TARGET = "localhost:50051"
DEFAULT_MAX_ATTEMPTS = 4
LOAD_BALANCING_POLICIES = ("round_robin", "pick_first")
_SERVICE = "transfer.v1.TransferService"
# Calls that may run twice with the effect (and answer) of running once, so gRPC may resend one
# that failed UNAVAILABLE: reads, Predict, WatchJob (it replays from `after_sequence`; gRPC
# retries a stream only before its first message) and FineTune (the SDK gives every call a
# `request_id`, so a resent one returns the job the first queued; gRPC buffers at most 256 KiB
# of request for a retry, so a larger inline FineTune is not resent). Not UploadDataset (a
# second dataset), nor the deletes or CancelJob: their effect is idempotent, but not their
# answer. If the reply to a DeleteHead is lost, its retry finds the head gone and turns
# the success into NOT_FOUND (DeleteDataset and DeleteHeadAlias alike; CancelJob into
# FAILED_PRECONDITION once the job is cancelled). SetHeadAlias is retried: setting an alias
# to the version it already points at is a no-op with the same answer (that head).
RETRIED_METHODS = (
    "FineTune",
    "ListBackbones",
    "Predict",
    "GetJob",
    "ListJobs",
    "WatchJob",
    "ListHeads",
    "GetHead",
    "EvaluateHead",  # a read: the head is not changed
    "ExportHead",  # a read (retried only before its first chunk, as any stream)
    "SetHeadAlias",  # idempotent, answer included: "point alias at version N"
)

ChannelOptions = list[tuple[str, int | str]]


def service_config(
    *, load_balancing: str = "round_robin", max_attempts: int = DEFAULT_MAX_ATTEMPTS
) -> dict[str, Any]:
    """gRPC's service config for the channel: the load-balancing policy over every address the
    target resolves to (`dns:///` gives each replica's), and the retry policy of the calls in
    RETRIED_METHODS; `max_attempts` counts the first (1: no retries; gRPC allows up to 5)."""
    if load_balancing not in LOAD_BALANCING_POLICIES:
        raise ValueError(
            f"load_balancing: {load_balancing!r} is none of {', '.join(LOAD_BALANCING_POLICIES)}"
        )
    if not 1 <= max_attempts <= 5:
        raise ValueError(f"max_attempts: {max_attempts} is not from 1 to 5")
    config: dict[str, Any] = {"loadBalancingConfig": [{load_balancing: {}}]}
    if max_attempts > 1:
        config["methodConfig"] = [
            {
                "name": [{"service": _SERVICE, "method": method} for method in RETRIED_METHODS],
                "retryPolicy": {
                    "maxAttempts": max_attempts,
                    "initialBackoff": "0.1s",
                    "maxBackoff": "2s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ]
    return config


# Keepalive: a ping every 30 s on a connection with calls open, answered within 10 s or the
# connection is taken as dead, so a stream through a silently dropped connection (a NAT or
# load balancer that forgot it, a host gone without a FIN) breaks and re-attaches instead of
# waiting forever. No pings without calls. The transfer server accepts pings 20 s apart
# (service edge/server.py). A server on gRPC's default policy (5 min) counts pings on a
# silent call as abuse and ends the connection with GOAWAY too_many_pings after about 3
# minutes (measured: 180 s), which fails a long silent call UNAVAILABLE: use
# `keepalive=False` against such a server.
KEEPALIVE_OPTIONS: ChannelOptions = [
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 0),
]


def channel_options(
    max_message_bytes: int,
    *,
    load_balancing: str = "round_robin",
    max_attempts: int = DEFAULT_MAX_ATTEMPTS,
    keepalive: bool = True,
) -> ChannelOptions:
    config = service_config(load_balancing=load_balancing, max_attempts=max_attempts)
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.service_config", json.dumps(config)),
        ("grpc.enable_retries", 1),
        *(KEEPALIVE_OPTIONS if keepalive else []),
    ]


def call_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    # Metadata rather than call credentials: those are refused on an insecure channel, and a
    # token over plain text is still useful behind a TLS-terminating proxy or on localhost.
    return (("authorization", f"Bearer {token}"),) if token else ()


def tls_credentials(
    ca_cert: str | Path | None = None,
    *,
    client_cert: str | Path | None = None,
    client_key: str | Path | None = None,
) -> grpc.ChannelCredentials:
    """Credentials for a TLS server: trust `ca_cert` (PEM; None: the system's roots) and, for a
    server that requires mutual TLS, present `client_cert` (PEM chain) with `client_key`."""
    if (client_cert is None) != (client_key is None):
        raise ValueError("client_cert and client_key go together")
    return grpc.ssl_channel_credentials(
        root_certificates=Path(ca_cert).read_bytes() if ca_cert is not None else None,
        private_key=Path(client_key).read_bytes() if client_key is not None else None,
        certificate_chain=Path(client_cert).read_bytes() if client_cert is not None else None,
    )
