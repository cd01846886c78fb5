"""The options every `transfer` command takes (target, credentials, output format), and the
client they build."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import grpc

from transfer_client._channel import DEFAULT_MAX_ATTEMPTS, DEFAULT_TARGET, tls_credentials
from transfer_client._core import DEFAULT_REATTACH_SECONDS
from transfer_client._sync import TransferClient


def global_options(*, with_defaults: bool) -> argparse.ArgumentParser:
    """A parent parser of the global options. Without defaults (on each subcommand) they do
    not overwrite what came before the subcommand: `transfer --json jobs` and
    `transfer jobs --json` both work."""
    options = argparse.ArgumentParser(add_help=False)

    def default(value: object) -> object:
        return value if with_defaults else argparse.SUPPRESS

    options.add_argument(
        "--target",
        default=default(os.environ.get("TRANSFER_TARGET", DEFAULT_TARGET)),
        help=f"server address (env TRANSFER_TARGET, else {DEFAULT_TARGET})",
    )
    options.add_argument(
        "--token",
        default=default(os.environ.get("TRANSFER_TOKEN", "")),
        help="bearer token (env TRANSFER_TOKEN)",
    )
    options.add_argument("--tls", action="store_true", default=default(False), help="use TLS")
    options.add_argument(
        "--ca-cert",
        type=Path,
        default=default(None),
        metavar="PEM",
        help="trust this CA certificate (implies --tls)",
    )
    options.add_argument(
        "--client-cert",
        type=Path,
        default=default(None),
        metavar="PEM",
        help="client certificate chain for a server requiring mutual TLS (implies --tls)",
    )
    options.add_argument(
        "--client-key",
        type=Path,
        default=default(None),
        metavar="PEM",
        help="private key of --client-cert",
    )
    options.add_argument(
        "--timeout",
        type=float,
        default=default(30.0),
        help="deadline of each non-streaming call in seconds",
    )
    options.add_argument(
        "--max-attempts",
        type=int,
        default=default(DEFAULT_MAX_ATTEMPTS),
        help="tries of an idempotent call that fails UNAVAILABLE, the first included "
        "(1: no retries; at most 5)",
    )
    options.add_argument(
        "--wait-for-ready",
        action="store_true",
        default=default(False),
        help="wait (up to --timeout) for an unreachable server instead of failing at once",
    )
    options.add_argument(
        "--reattach-seconds",
        type=float,
        default=default(DEFAULT_REATTACH_SECONDS),
        metavar="SECONDS",
        help="how long finetune and watch keep re-attaching to a job whose stream broke (0: never)",
    )
    options.add_argument(
        "--stream-idle-seconds",
        type=float,
        default=default(None),
        metavar="SECONDS",
        help="a job's event stream silent this long is taken as broken and re-attached "
        "(default: wait as long as it takes)",
    )
    options.add_argument(
        "--json", action="store_true", default=default(False), help="print JSON, not tables"
    )
    return options


def open_client(args: argparse.Namespace) -> TransferClient:
    return TransferClient(
        args.target,
        credentials=credentials(args),
        token=args.token or None,
        timeout=args.timeout,
        max_attempts=args.max_attempts,
        wait_for_ready=args.wait_for_ready,
        reattach_seconds=args.reattach_seconds,
        stream_idle_seconds=args.stream_idle_seconds,
    )


def credentials(args: argparse.Namespace) -> grpc.ChannelCredentials | None:
    if (args.client_cert is None) != (args.client_key is None):
        raise ValueError("--client-cert and --client-key go together")
    if args.tls or args.ca_cert is not None or args.client_cert is not None:
        return tls_credentials(
            args.ca_cert, client_cert=args.client_cert, client_key=args.client_key
        )
    return None
