"""Throw-away certificate authorities and certificates for TLS tests, made with the openssl CLI
at test time (nothing secret is checked in)."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

_KEY = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]


@dataclass(frozen=True)
class PkiFiles:
    ca_cert: Path
    server_cert: Path  # for localhost and 127.0.0.1
    server_key: Path
    client_cert: Path  # signed by ca_cert
    client_key: Path
    stranger_cert: Path  # a client certificate from another CA
    stranger_key: Path


def issue_test_pki(directory: Path) -> PkiFiles:
    directory.mkdir(parents=True, exist_ok=True)
    ca_cert, ca_key = _authority(directory, "test-ca")
    server_cert, server_key = _leaf(
        directory,
        "server",
        (ca_cert, ca_key),
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
    )
    client_cert, client_key = _leaf(
        directory, "client", (ca_cert, ca_key), "extendedKeyUsage=clientAuth\n"
    )
    other_ca = _authority(directory, "other-ca")
    stranger_cert, stranger_key = _leaf(
        directory, "stranger", other_ca, "extendedKeyUsage=clientAuth\n"
    )
    return PkiFiles(
        ca_cert, server_cert, server_key, client_cert, client_key, stranger_cert, stranger_key
    )


def _authority(directory: Path, name: str) -> tuple[Path, Path]:
    cert, key = directory / f"{name}.pem", directory / f"{name}.key"
    _openssl(
        "req", "-x509", *_KEY, "-keyout", key, "-out", cert, "-days", "2", "-subj", f"/CN={name}",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
    )  # fmt: skip
    return cert, key


def _leaf(
    directory: Path, name: str, issuer: tuple[Path, Path], extensions: str
) -> tuple[Path, Path]:
    cert, key, request = (directory / f"{name}{suffix}" for suffix in (".pem", ".key", ".csr"))
    extensions_file = directory / f"{name}.ext"
    extensions_file.write_text(
        "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n" + extensions
    )
    _openssl("req", "-new", *_KEY, "-keyout", key, "-out", request, "-subj", f"/CN={name}")
    _openssl(
        "x509", "-req", "-in", request, "-CA", issuer[0], "-CAkey", issuer[1],
        "-CAcreateserial", "-out", cert, "-days", "2", "-extfile", extensions_file,
    )  # fmt: skip
    return cert, key


def _openssl(*args: str | Path) -> None:
    subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True, timeout=60)
