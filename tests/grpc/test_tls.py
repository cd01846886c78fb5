"""TLS and mutual TLS from certificate files, with a CA and certificates made at test time."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from transfer_client import TransferClient, UnavailableError, tls_credentials
from transfer_client._cli import main as transfer_cli
from transfer_service.edge.server import server_credentials
from transfer_service.errors import ConfigurationError

from tests.conftest import RunningServer, make_settings, start_server
from tests.tls_material import PkiFiles, issue_test_pki


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PkiFiles:
    return issue_test_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory, pki: PkiFiles) -> Iterator[RunningServer]:
    settings = make_settings(
        tmp_path_factory.mktemp("tls-store"),
        preload_backbones=[],
        tls_cert_file=pki.server_cert,
        tls_key_file=pki.server_key,
    )
    running = start_server(settings)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def mtls_server(tmp_path_factory: pytest.TempPathFactory, pki: PkiFiles) -> Iterator[RunningServer]:
    settings = make_settings(
        tmp_path_factory.mktemp("mtls-store"),
        preload_backbones=[],
        tls_cert_file=pki.server_cert,
        tls_key_file=pki.server_key,
        tls_client_ca_file=pki.ca_cert,
    )
    running = start_server(settings)
    yield running
    running.stop()


def target(server: RunningServer) -> str:
    return f"localhost:{server.app.port}"  # the name on the server certificate


def test_tls_serves_clients_that_trust_the_ca(tls_server: RunningServer, pki: PkiFiles) -> None:
    with TransferClient(
        target(tls_server), credentials=tls_credentials(pki.ca_cert), timeout=10
    ) as client:
        assert {b.name for b in client.list_backbones()} >= {"efficientnet_lite0"}
    # Health over TLS too (what a TLS-aware probe does).
    channel_credentials = grpc.ssl_channel_credentials(pki.ca_cert.read_bytes())
    with grpc.secure_channel(target(tls_server), channel_credentials) as channel:
        response = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=10
        )
        assert response.status == health_pb2.HealthCheckResponse.SERVING


def test_tls_refuses_plaintext_and_untrusted_servers_are_refused(
    tls_server: RunningServer, pki: PkiFiles
) -> None:
    with (
        TransferClient(target(tls_server), timeout=10) as plaintext,
        pytest.raises(UnavailableError),
    ):
        plaintext.list_backbones()
    # A client trusting another CA does not accept this server's certificate.
    other_ca = pki.stranger_cert.parent / "other-ca.pem"
    with (
        TransferClient(
            target(tls_server), credentials=tls_credentials(other_ca), timeout=10
        ) as wary,
        pytest.raises(UnavailableError),
    ):
        wary.list_backbones()


def test_mutual_tls_needs_a_client_certificate_from_the_ca(
    mtls_server: RunningServer, pki: PkiFiles
) -> None:
    with TransferClient(
        target(mtls_server),
        credentials=tls_credentials(
            pki.ca_cert, client_cert=pki.client_cert, client_key=pki.client_key
        ),
        timeout=10,
    ) as client:
        assert client.list_backbones()
    no_certificate = tls_credentials(pki.ca_cert)
    certificate_from_another_ca = tls_credentials(
        pki.ca_cert, client_cert=pki.stranger_cert, client_key=pki.stranger_key
    )
    for credentials in (no_certificate, certificate_from_another_ca):
        client = TransferClient(target(mtls_server), credentials=credentials, timeout=10)
        with client, pytest.raises(UnavailableError):
            client.list_backbones()


def test_cli_speaks_mutual_tls(
    mtls_server: RunningServer, pki: PkiFiles, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["--target", target(mtls_server), "--ca-cert", str(pki.ca_cert)]
    client_cert = ["--client-cert", str(pki.client_cert), "--client-key", str(pki.client_key)]
    assert transfer_cli([*base, *client_cert, "backbones", "--json"]) == 0
    assert "efficientnet_lite0" in capsys.readouterr().out
    assert transfer_cli([*base, "backbones"]) == 1
    assert "UNAVAILABLE" in capsys.readouterr().err
    assert transfer_cli([*base, "--client-cert", str(pki.client_cert), "backbones"]) == 1
    assert "--client-key" in capsys.readouterr().err


def test_unreadable_certificate_files_stop_the_start(tmp_path: Path, pki: PkiFiles) -> None:
    missing = make_settings(
        tmp_path, tls_cert_file=tmp_path / "absent.pem", tls_key_file=pki.server_key
    )
    with pytest.raises(ConfigurationError, match="TRANSFER_TLS_CERT_FILE"):
        server_credentials(missing)
    not_pem = tmp_path / "key.txt"
    not_pem.write_text("not a key")
    wrong = make_settings(tmp_path, tls_cert_file=pki.server_cert, tls_key_file=not_pem)
    with pytest.raises(ConfigurationError, match="TRANSFER_TLS_KEY_FILE"):
        server_credentials(wrong)


def test_tls_settings_must_be_complete(tmp_path: Path, pki: PkiFiles) -> None:
    with pytest.raises(ValueError, match="go together"):
        make_settings(tmp_path, tls_cert_file=pki.server_cert)
    with pytest.raises(ValueError, match="needs TLS"):
        make_settings(tmp_path, tls_client_ca_file=pki.ca_cert)
