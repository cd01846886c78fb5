"""The gRPC server: TransferService, grpc.health.v1 and reflection, with message limits,
the request interceptor, and TLS or mutual TLS when certificate files are configured."""

from __future__ import annotations

from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from transfer_client.proto import transfer_service_pb2 as pb

from transfer_service.edge.request_interceptor import RequestInterceptor
from transfer_service.edge.servicer import TransferServicer
from transfer_service.edge.wire import add_transfer_service
from transfer_service.errors import ConfigurationError
from transfer_service.settings import Settings

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["TransferService"].full_name
# Clients may ping every 30 s while their calls are open (the SDK's keepalive). gRPC's
# default policy takes pings under 5 min apart, with no data sent between them, as abuse and
# ends the connection with GOAWAY too_many_pings: a call that stays silent for about 3
# minutes (a long Predict on a busy host, a WatchJob of a queued job) failed UNAVAILABLE, and
# a retried Predict was sent again. Pings 20 s apart are accepted.
MIN_CLIENT_PING_INTERVAL_MS = 20_000


class HealthReporter:
    """Health status of the whole server and of TransferService, switched together."""

    def __init__(self) -> None:
        self.servicer = health.aio.HealthServicer()  # type: ignore[attr-defined]

    async def set_serving(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for service in ("", SERVICE_NAME):
            await self.servicer.set(service, status)


def create_server(
    settings: Settings,
    servicer: TransferServicer,
    health_reporter: HealthReporter,
    interceptor: RequestInterceptor,
) -> tuple[grpc.aio.Server, int]:
    credentials = server_credentials(settings)
    server = grpc.aio.server(
        interceptors=[interceptor],
        options=[
            ("grpc.max_receive_message_length", settings.max_message_bytes),
            ("grpc.max_send_message_length", settings.max_message_bytes),
            ("grpc.so_reuseport", 0),
            ("grpc.http2.min_ping_interval_without_data_ms", MIN_CLIENT_PING_INTERVAL_MS),
        ],
    )
    add_transfer_service(servicer, server)
    health_pb2_grpc.add_HealthServicer_to_server(health_reporter.servicer, server)
    reflection.enable_server_reflection(
        (
            SERVICE_NAME,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ),
        server,
    )
    address = f"{settings.host}:{settings.port}"
    if credentials is None:
        port = server.add_insecure_port(address)
    else:
        port = server.add_secure_port(address, credentials)
    if port == 0:
        raise OSError(f"could not bind {settings.host}:{settings.port}")
    return server, port


def server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """TLS from the configured PEM files (None: plaintext). With a client CA, a client must
    present a certificate signed by it or the handshake fails (mutual TLS)."""
    if settings.tls_cert_file is None or settings.tls_key_file is None:
        return None
    chain = _read_pem("TRANSFER_TLS_CERT_FILE", settings.tls_cert_file)
    key = _read_pem("TRANSFER_TLS_KEY_FILE", settings.tls_key_file)
    client_ca = None
    if settings.tls_client_ca_file is not None:
        client_ca = _read_pem("TRANSFER_TLS_CLIENT_CA_FILE", settings.tls_client_ca_file)
    return grpc.ssl_server_credentials(
        [(key, chain)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


def _read_pem(setting: str, path: Path) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigurationError(f"{setting}: cannot read {path}: {exc.strerror}") from exc
    if b"-----BEGIN " not in data:
        raise ConfigurationError(f"{setting}: {path} is not a PEM file")
    return data
