"""Channel options and call metadata shared by the blocking and the asyncio client."""

from __future__ import annotations

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
