"""Channel options, TLS credentials and call metadata shared by both clients."""

from __future__ import annotations

from pathlib import Path

import grpc

DEFAULT_TARGET = "localhost:50051"


def channel_options(max_message_bytes: int) -> list[tuple[str, int]]:
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
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
