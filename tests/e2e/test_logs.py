"""The server's log output as `python -m transfer_service` writes it: one JSON object per line by
default, each line of a call carrying its request id; `--log-format text` for humans."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from transfer_client.proto import transfer_service_pb2 as pb
from transfer_client.proto import transfer_service_pb2_grpc as pb_grpc

from tests.e2e.test_server_process import REPO, free_port

TOKEN = "logs-token-5e1f0c2a9b7d"


def run_server(tmp_path: Path, *args: str, **env: str) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    environment = dict(os.environ)
    environment.update(
        TRANSFER_PORT=str(port),
        TRANSFER_METRICS_PORT="0",
        TRANSFER_STORE_DIR=str(tmp_path / "store"),
        TRANSFER_PRELOAD_BACKBONES="",
        TRANSFER_LOG_LEVEL="DEBUG",
        TRANSFER_AUTH_TOKENS=f"{TOKEN}=acme",
        TRANSFER_GRACE_SECONDS="2",
    )
    environment.pop("TRANSFER_LOG_FORMAT", None)
    environment.update(env)
    process = subprocess.Popen(
        [sys.executable, "-m", "transfer_service", *args],
        cwd=REPO,
        env=environment,
        stdout=open(tmp_path / "stdout.txt", "wb"),  # noqa: SIM115 - the child owns it
        stderr=open(tmp_path / "stderr.txt", "wb"),  # noqa: SIM115
    )
    return process, port


def wait_serving(process: subprocess.Popen[bytes], port: int, tmp_path: Path) -> None:
    deadline = time.monotonic() + 120
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            assert process.poll() is None, (tmp_path / "stderr.txt").read_text()
            try:
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=2).status == 1:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    raise AssertionError("server not SERVING")


def make_calls(port: int) -> None:
    """One good call, one refused for want of a token, one NOT_FOUND, each with its id."""
    auth = ("authorization", f"Bearer {TOKEN}")
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.TransferServiceStub(channel)
        stub.ListJobs(pb.ListJobsRequest(), metadata=(auth, ("x-request-id", "req-ok")))
        with pytest.raises(grpc.RpcError):
            stub.ListJobs(pb.ListJobsRequest(), metadata=(("x-request-id", "req-refused"),))
        with pytest.raises(grpc.RpcError):
            stub.GetHead(
                pb.GetHeadRequest(head_id="nope"), metadata=(auth, ("x-request-id", "req-missing"))
            )


def stop(process: subprocess.Popen[bytes]) -> int:
    process.send_signal(signal.SIGTERM)
    try:
        return process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        raise


def test_json_lines_carry_the_request_id(tmp_path: Path) -> None:
    process, port = run_server(tmp_path)
    try:
        wait_serving(process, port, tmp_path)
        make_calls(port)
    finally:
        assert stop(process) == 0
    lines = (tmp_path / "stderr.txt").read_text().splitlines()
    records: list[dict[str, Any]] = [json.loads(line) for line in lines if line.strip()]
    assert records, "no log lines"
    for record in records:
        assert {"time", "level", "logger", "message"} <= record.keys(), record
        assert datetime.fromisoformat(record["time"]).utcoffset() is not None
    by_id: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        by_id.setdefault(record.get("request_id", ""), []).append(record)

    serving = [r for r in by_id[""] if r["message"].startswith("SERVING")]
    assert serving and serving[0]["level"] == "INFO" and serving[0]["logger"] == "transfer_service"
    ok = by_id["req-ok"]
    assert any("ListJobs OK" in r["message"] and r["level"] == "DEBUG" for r in ok), ok
    assert all(r["tenant"] == "acme" for r in ok)
    refused = by_id["req-refused"]
    assert refused[0]["level"] == "WARNING" and "missing bearer token" in refused[0]["message"]
    assert "tenant" not in refused[0]
    assert any("GetHead NOT_FOUND" in r["message"] for r in by_id["req-missing"])
    assert TOKEN not in (tmp_path / "stderr.txt").read_text()


def test_text_format_for_humans(tmp_path: Path) -> None:
    process, port = run_server(tmp_path, "--log-format", "text")
    try:
        wait_serving(process, port, tmp_path)
        make_calls(port)
    finally:
        assert stop(process) == 0
    lines = (tmp_path / "stderr.txt").read_text().splitlines()
    assert not any(line.startswith("{") for line in lines)
    assert any(" INFO transfer_service: SERVING" in line for line in lines), lines
    assert any(
        "WARNING transfer_service.edge.request_interceptor [req-refused]: refused" in x
        for x in lines
    )


def test_a_bad_setting_is_one_logged_line_and_exit_status_2(tmp_path: Path) -> None:
    process, _ = run_server(tmp_path, TRANSFER_AUTH_TOKENS="no-tenant-here")
    assert process.wait(timeout=120) == 2
    lines = (tmp_path / "stderr.txt").read_text().splitlines()
    last = json.loads(lines[-1])
    assert last["level"] == "CRITICAL"
    assert "TRANSFER_AUTH_TOKENS" in last["message"]
