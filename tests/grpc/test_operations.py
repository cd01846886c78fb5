"""Health, reflection and the Prometheus endpoint of a running server."""

from __future__ import annotations

import urllib.request

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from transfer_client import TransferClient

from tests.conftest import RunningServer


def test_health_reports_serving_for_the_server_and_the_service(server: RunningServer) -> None:
    with grpc.insecure_channel(server.address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", "transfer.v1.TransferService"):
            response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert response.status == health_pb2.HealthCheckResponse.SERVING


def test_reflection_describes_the_service(server: RunningServer) -> None:
    with grpc.insecure_channel(server.address) as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        services = set(database.get_services())
        assert {"transfer.v1.TransferService", "grpc.health.v1.Health"} <= services
        descriptor = database.FindFileContainingSymbol("transfer.v1.TransferService")
        methods = {m.name for m in descriptor.service[0].method}
        assert {"FineTune", "Predict", "ListBackbones", "WatchJob", "UploadDataset"} <= methods


def test_metrics_endpoint_counts_calls(server: RunningServer, client: TransferClient) -> None:
    url = f"http://127.0.0.1:{server.app.metrics_port}/metrics"

    def calls() -> float:
        body = urllib.request.urlopen(url, timeout=10).read().decode()
        for line in body.splitlines():
            if line.startswith('transfer_rpc_requests_total{code="OK",method="ListBackbones"}'):
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    before = calls()
    client.list_backbones()
    client.list_backbones()
    assert calls() == before + 2
