"""A real Prometheus (Debian package `prometheus`, installed by `make testdata`) scrapes the
server's metrics port on loopback; its HTTP API then answers queries for transfer_* series."""

from __future__ import annotations

import importlib.metadata
import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from transfer_client import TransferClient

from tests.conftest import RunningServer, make_settings, start_server
from tests.e2e.test_server_process import free_port

PROMETHEUS = Path("/usr/bin/prometheus")
SCRAPE_INTERVAL = "1s"


@pytest.fixture()
def metered_server(tmp_path: Path) -> Iterator[RunningServer]:
    running = start_server(make_settings(tmp_path / "store", preload_backbones=[]))
    yield running
    running.stop()


class Prometheus:
    """A Prometheus process scraping one target, on a free loopback port, data in `root`."""

    def __init__(self, root: Path, target: str) -> None:
        if not PROMETHEUS.is_file():
            pytest.fail(f"{PROMETHEUS} is missing: `make testdata` installs the Debian package")
        config = root / "prometheus.yml"
        config.write_text(
            f"global:\n  scrape_interval: {SCRAPE_INTERVAL}\n  evaluation_interval: 1s\n"
            "scrape_configs:\n"
            "  - job_name: transfer\n"
            f"    static_configs:\n      - targets: ['{target}']\n"
        )
        self.address = f"127.0.0.1:{free_port()}"
        self.log = root / "prometheus.log"
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(
                [
                    str(PROMETHEUS),
                    f"--config.file={config}",
                    f"--storage.tsdb.path={root / 'data'}",
                    f"--web.listen-address={self.address}",
                    "--log.level=warn",
                ],
                cwd=root,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def query(self, promql: str) -> list[dict[str, Any]]:
        """The instant-query result vector; [] while Prometheus is still starting."""
        assert self.process.poll() is None, self.log.read_text()
        url = f"http://{self.address}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                body = json.load(response)
        except OSError:  # not listening yet, or 503 while the TSDB opens
            return []
        assert body["status"] == "success", body
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    def wait_for(self, promql: str, timeout: float = 90) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            result = self.query(promql)
            if result:
                return result
            time.sleep(0.5)
        raise AssertionError(f"no result for {promql} in {timeout}s:\n{self.log.read_text()}")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)


@pytest.fixture()
def prometheus(tmp_path: Path, metered_server: RunningServer) -> Iterator[Prometheus]:
    root = tmp_path / "prometheus"
    root.mkdir()
    running = Prometheus(root, f"127.0.0.1:{metered_server.app.metrics_port}")
    yield running
    running.stop()
    shutil.rmtree(root, ignore_errors=True)


def test_prometheus_scrapes_the_service(
    metered_server: RunningServer, prometheus: Prometheus
) -> None:
    with TransferClient(metered_server.address, timeout=30) as client:
        for _ in range(3):
            client.list_backbones()
    up = prometheus.wait_for('up{job="transfer"} == 1')
    assert up[0]["metric"]["instance"] == f"127.0.0.1:{metered_server.app.metrics_port}"
    calls = prometheus.wait_for(
        'transfer_rpc_requests_total{job="transfer",method="ListBackbones",code="OK"} >= 3'
    )
    assert float(calls[0]["value"][1]) == 3
    # Histograms arrive whole: a latency quantile can be computed from the buckets.
    quantile = prometheus.wait_for(
        "histogram_quantile(0.5, transfer_rpc_duration_seconds_bucket"
        '{job="transfer",method="ListBackbones"})'
    )
    assert 0 < float(quantile[0]["value"][1]) < 30
    # The app's registry carries the process's series and the build's versions too.
    memory = prometheus.wait_for('process_resident_memory_bytes{job="transfer"}')
    assert float(memory[0]["value"][1]) > 1_000_000
    build = prometheus.wait_for('transfer_build_info{job="transfer"} == 1')
    assert build[0]["metric"]["version"] == importlib.metadata.version("transfer-service")
    assert build[0]["metric"]["torch"] == importlib.metadata.version("torch")
