"""Bearer-token auth, tenant isolation, the per-tenant job limit and request ids, on a real
server with tokens configured (a tokens file for alice, the env-style setting for bob)."""

from __future__ import annotations

import json
import re
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from transfer_client import (
    AuthenticationError,
    Job,
    JobCancelled,
    JobCompleted,
    NotFoundError,
    ResourceExhaustedError,
    TrainingConfig,
    TransferClient,
    TransferError,
)
from transfer_client.proto import transfer_service_pb2 as pb
from transfer_client.proto import transfer_service_pb2_grpc as pb_grpc

from tests.conftest import RunningServer, make_settings, start_server
from tests.datasets import fashion_mnist
from tests.grpc.test_metrics_traffic import Scrape

ALICE_TOKEN = "alice-0f3c9a7e5b1d4c28a6e0"
BOB_TOKEN = "bob-7d21e4b09c3a5f6e8d1b"

# Printable ASCII, so gRPC carries it, but not something to copy into a log line verbatim.
FORGED_ID = 'x" level="ERROR'
# A job that runs until cancelled: the whole trunk trained, one example per step, 1000 epochs.
ENDLESS = TrainingConfig(epochs=1000, batch_size=1, early_stopping_patience=0, trainable_blocks=-1)


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    root = tmp_path_factory.mktemp("secured")
    tokens_file = root / "tokens.json"
    tokens_file.write_text(json.dumps({ALICE_TOKEN: "alice"}))
    running = start_server(
        make_settings(
            root / "store",
            preload_backbones=[],
            auth_tokens_file=tokens_file,
            auth_tokens=f"{BOB_TOKEN}=bob",
            max_jobs_per_tenant=1,
        )
    )
    yield running
    running.stop()


def as_tenant(server: RunningServer, token: str | None) -> TransferClient:
    return TransferClient(server.address, token=token, timeout=120)


@pytest.fixture(scope="module")
def alice_head(secured: RunningServer) -> str:
    with as_tenant(secured, ALICE_TOKEN) as alice:
        done = alice.train(
            "efficientnet_lite0",
            fashion_mnist(6, classes=2, seed=11),
            head_name="private",
            config=TrainingConfig(epochs=3, seed=1),
        )
    return done.head_id


def test_calls_without_a_valid_token_are_unauthenticated(secured: RunningServer) -> None:
    for token in (None, "not-a-configured-token", ALICE_TOKEN[:-1]):
        with as_tenant(secured, token) as client:
            with pytest.raises(AuthenticationError):
                client.list_backbones()
            with pytest.raises(AuthenticationError):  # a server stream
                next(iter(client.fine_tune("efficientnet_lite0", [(b"x", "a"), (b"y", "b")])))
            with pytest.raises(AuthenticationError):  # a client stream
                client.upload_dataset([(b"x", "a")])
    with grpc.insecure_channel(secured.address) as channel:
        stub = pb_grpc.TransferServiceStub(channel)
        for value in (f"Basic {ALICE_TOKEN}", ALICE_TOKEN, "Bearer "):
            with pytest.raises(grpc.RpcError) as caught:
                stub.ListHeads(pb.ListHeadsRequest(), metadata=(("authorization", value),))
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    # Refusals are counted like any other outcome.
    refusals = Scrape(secured).value(
        "transfer_rpc_requests_total", method="ListBackbones", code="UNAUTHENTICATED"
    )
    assert refusals == 3
    # The scheme is case-insensitive, as HTTP has it.
    with grpc.insecure_channel(secured.address) as channel:
        stub = pb_grpc.TransferServiceStub(channel)
        stub.ListHeads(pb.ListHeadsRequest(), metadata=(("authorization", f"bearer {BOB_TOKEN}"),))


def test_health_and_reflection_need_no_token(secured: RunningServer) -> None:
    with grpc.insecure_channel(secured.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        response = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
        assert response.status == health_pb2.HealthCheckResponse.SERVING
        services = set(ProtoReflectionDescriptorDatabase(channel).get_services())
        assert "transfer.v1.TransferService" in services


def test_request_id_is_echoed_or_generated(secured: RunningServer) -> None:
    auth = ("authorization", f"Bearer {ALICE_TOKEN}")
    with grpc.insecure_channel(secured.address) as channel:
        stub = pb_grpc.TransferServiceStub(channel)
        _, call = stub.ListJobs.with_call(
            pb.ListJobsRequest(), metadata=(auth, ("x-request-id", "trace-42.a")), timeout=10
        )
        assert ("x-request-id", "trace-42.a") in call.initial_metadata()
        _, call = stub.ListJobs.with_call(pb.ListJobsRequest(), metadata=(auth,), timeout=10)
        generated = dict(call.initial_metadata())["x-request-id"]
        assert re.fullmatch(r"[0-9a-f]{32}", generated)
        # An id that could forge log lines is replaced, not echoed.
        _, call = stub.ListJobs.with_call(
            pb.ListJobsRequest(), metadata=(auth, ("x-request-id", FORGED_ID)), timeout=10
        )
        assert dict(call.initial_metadata())["x-request-id"] != FORGED_ID
        # Refused and failed calls carry it too, and so do streams.
        with pytest.raises(grpc.RpcError) as refused:
            stub.ListJobs(pb.ListJobsRequest(), metadata=(("x-request-id", "no-token-1"),))
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert ("x-request-id", "no-token-1") in refused.value.initial_metadata()
        with pytest.raises(grpc.RpcError) as missing:
            stub.GetHead(
                pb.GetHeadRequest(head_id="nothing-here"),
                metadata=(auth, ("x-request-id", "missing-1")),
            )
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND
        assert ("x-request-id", "missing-1") in missing.value.initial_metadata()
        stream = stub.WatchJob(
            pb.WatchJobRequest(job_id="job-0000"), metadata=(auth, ("x-request-id", "watch-1"))
        )
        assert ("x-request-id", "watch-1") in stream.initial_metadata()
        with pytest.raises(grpc.RpcError):
            list(stream)


def _not_found_message(error: TransferError, hidden_id: str) -> str:
    return error.message.replace(hidden_id, "<id>")


def test_another_tenants_head_is_not_found(secured: RunningServer, alice_head: str) -> None:
    image = fashion_mnist(1, split="test", classes=2, seed=12)[0][0]
    with as_tenant(secured, BOB_TOKEN) as bob:
        assert alice_head not in {head.head_id for head in bob.list_heads()}
        attempts = {
            "predict": lambda head_id: bob.predict(head_id, [image]),
            "get_head": bob.get_head,
            "delete_head": bob.delete_head,
        }
        for name, attempt in attempts.items():
            with pytest.raises(NotFoundError) as foreign:
                attempt(alice_head)
            unknown_id = alice_head[:-1] + ("0" if alice_head[-1] != "0" else "1")
            with pytest.raises(NotFoundError) as unknown:
                attempt(unknown_id)
            # Indistinguishable from an id that does not exist.
            assert _not_found_message(foreign.value, alice_head) == _not_found_message(
                unknown.value, unknown_id
            ), name
    with as_tenant(secured, ALICE_TOKEN) as alice:
        assert alice.get_head(alice_head).head_id == alice_head
        assert alice_head in {head.head_id for head in alice.list_heads()}
        assert len(alice.predict(alice_head, [image])) == 1


def test_a_cold_predict_reads_the_head_once_and_checks_its_owner_first(
    secured: RunningServer, alice_head: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Predict resolves its head once: a head out of the cache costs one read of its record
    and one of its weights, and another tenant's call is refused after the record alone."""
    heads, store = secured.app.heads, secured.app.store
    reads: Counter[str] = Counter()
    # Records are read by the head cache's loader and by anything asking the store directly.
    read_record, read_store_record = heads._load_record, store.get_head
    read_weights = heads._load_weights

    def counted_record(head_id: str) -> Any:
        reads["record"] += 1
        return read_record(head_id)

    def counted_store_record(head_id: str) -> Any:
        reads["record"] += 1
        return read_store_record(head_id)

    def counted_weights(head_id: str) -> Any:
        reads["weights"] += 1
        return read_weights(head_id)

    monkeypatch.setattr(heads, "_load_record", counted_record)
    monkeypatch.setattr(store, "get_head", counted_store_record)
    monkeypatch.setattr(heads, "_load_weights", counted_weights)
    image = fashion_mnist(1, classes=2, seed=5)[0][0]
    heads.discard(alice_head)
    with as_tenant(secured, BOB_TOKEN) as bob, pytest.raises(NotFoundError):
        bob.predict(alice_head, [image])
    assert reads == {"record": 1}, "bob's call read alice's weights"
    assert heads.peek(alice_head) is None
    with as_tenant(secured, ALICE_TOKEN) as alice:
        assert len(alice.predict(alice_head, [image])) == 1
        assert reads == {"record": 2, "weights": 1}
        assert len(alice.predict(alice_head, [image])) == 1  # resident: no read at all
    assert reads == {"record": 2, "weights": 1}


def test_another_tenants_jobs_and_datasets_are_not_found(
    secured: RunningServer, alice_head: str
) -> None:
    with as_tenant(secured, ALICE_TOKEN) as alice:
        alice_job = alice.get_head(alice_head).job_id
        assert alice_job in {job.job_id for job in alice.list_jobs()}
        dataset = alice.upload_dataset(fashion_mnist(3, classes=2, seed=13))
    with as_tenant(secured, BOB_TOKEN) as bob:
        assert alice_job not in {job.job_id for job in bob.list_jobs()}
        with pytest.raises(NotFoundError):
            bob.get_job(alice_job)
        with pytest.raises(NotFoundError):
            bob.cancel_job(alice_job)
        with pytest.raises(NotFoundError):
            list(bob.watch_job(alice_job))
        with pytest.raises(NotFoundError, match="dataset_id"):
            bob.train("efficientnet_lite0", dataset_id=dataset.dataset_id)


def test_jobs_per_tenant_are_limited(secured: RunningServer, alice_head: str) -> None:
    train = fashion_mnist(4, classes=2, seed=14)
    with (
        as_tenant(secured, ALICE_TOKEN) as alice,
        as_tenant(secured, BOB_TOKEN) as bob,
        ThreadPoolExecutor(1) as reader,
    ):
        first = alice.fine_tune("efficientnet_lite0", train, head_name="endless", config=ENDLESS)
        first_job = next(first).job_id  # queued at once; it takes the one training slot
        bob_stream = None
        try:
            with pytest.raises(ResourceExhaustedError, match="jobs"):
                next(alice.fine_tune("efficientnet_lite0", train, config=ENDLESS))
            # The limit is per tenant: bob's job is accepted and queues behind alice's (its
            # stream waits after its queued event until it starts, so it is read on a thread).
            bob_stream = reader.submit(
                lambda: list(bob.fine_tune("efficientnet_lite0", train, config=ENDLESS))
            )
            bob_job = _wait_for_one_job(bob)
            assert bob_job.state.value == "queued"
            bob.cancel_job(bob_job.job_id)
        finally:
            alice.cancel_job(first_job)
        assert isinstance(list(first)[-1], JobCancelled)
        assert bob_stream is not None
        assert isinstance(bob_stream.result(timeout=120)[-1], JobCancelled)
        # Finished jobs no longer count.
        done = alice.train("efficientnet_lite0", train, config=TrainingConfig(epochs=1))
        assert isinstance(done, JobCompleted)


def _wait_for_one_job(client: TransferClient) -> Job:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        jobs = client.list_jobs()
        if jobs:
            assert len(jobs) == 1
            return jobs[0]
        time.sleep(0.05)
    raise AssertionError("the job never appeared")
