"""Head names, versions and aliases (issue 18) on a real server with two tenants.

Two FineTunes named "cats" make versions 1 and 2 (trained on label sets that share no label,
so a call answered partly by each version would show it). Predict resolves a head id,
`cats` (the production alias where set, else the newest version), `cats@N`, `cats@latest`
and `cats@alias`; unknown versions and aliases, and another tenant's name, are NOT_FOUND;
malformed references INVALID_ARGUMENT. SetHeadAlias moves an alias atomically: Predicts
running while it flips are each answered wholly by one version, never an error. Deleting an
aliased version is FAILED_PRECONDITION unless forced.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import grpc
import pytest
from transfer_client import TrainingConfig, TransferClient
from transfer_client.proto import transfer_service_pb2 as pb
from transfer_client.proto import transfer_service_pb2_grpc as pb_grpc

from tests.conftest import RunningServer, make_settings, start_server
from tests.datasets import fashion_mnist

ALICE = "alice-7d3c9e1a5b2f48c6"
BOB = "bob-4e8a2c6f0d1b97e3"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    root = tmp_path_factory.mktemp("head-names")
    running = start_server(
        make_settings(root / "store", auth_tokens=f"{ALICE}=alice,{BOB}=bob", preload_backbones=[])
    )
    yield running
    running.stop()


def _stub(server: RunningServer, token: str) -> tuple[grpc.Channel, pb_grpc.TransferServiceStub]:
    channel = grpc.insecure_channel(server.address)
    return channel, pb_grpc.TransferServiceStub(channel)


def _metadata(token: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")]


def _relabelled(prefix: str, seed: int) -> list[tuple[bytes, str]]:
    return [(image, f"{prefix}-{label}") for image, label in fashion_mnist(6, classes=2, seed=seed)]


@pytest.fixture(scope="module")
def versions(server: RunningServer) -> dict[int, str]:
    """Version -> head id of alice's "cats" (v1 labels "one-*", v2 labels "two-*"), and bob's
    own "cats" (version 1 of bob's name)."""
    made: dict[int, str] = {}
    with TransferClient(server.address, token=ALICE, timeout=300) as alice:
        for version, prefix, seed in ((1, "one", 3), (2, "two", 4)):
            completed = alice.train(
                "efficientnet_lite0",
                _relabelled(prefix, seed),
                head_name="cats",
                config=TrainingConfig(seed=version),
            )
            assert completed.head_version == version
            made[version] = completed.head_id
    with TransferClient(server.address, token=BOB, timeout=300) as bob:
        bob.train("efficientnet_lite0", _relabelled("bob", 5), head_name="dogs")
    return made


@pytest.fixture(scope="module")
def probes() -> list[bytes]:
    return [image for image, _ in fashion_mnist(2, split="test", classes=2, seed=9)]


def _predict(
    stub: pb_grpc.TransferServiceStub, token: str, ref: str, images: list[bytes]
) -> pb.PredictResponse:
    response: pb.PredictResponse = stub.Predict(
        pb.PredictRequest(head_id=ref, inputs=[pb.Input(image=image) for image in images]),
        metadata=_metadata(token),
        timeout=60,
    )
    return response


def _code(call: object) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as caught:
        call()  # type: ignore[operator]
    code: grpc.StatusCode = caught.value.code()
    return code


def test_references_resolve_to_the_version_they_name(
    server: RunningServer, versions: dict[int, str], probes: list[bytes]
) -> None:
    channel, stub = _stub(server, ALICE)
    with channel:
        answered = {
            ref: _predict(stub, ALICE, ref, probes)
            for ref in (versions[1], versions[2], "cats", "cats@1", "cats@2", "cats@latest")
        }
        expected = {
            versions[1]: 1,
            versions[2]: 2,
            "cats": 2,  # no production alias: the newest version
            "cats@1": 1,
            "cats@2": 2,
            "cats@latest": 2,
        }
        for ref, version in expected.items():
            response = answered[ref]
            assert (response.head_id, response.head_version) == (versions[version], version), ref
            prefix = "one-" if version == 1 else "two-"
            assert all(p.label.startswith(prefix) for p in response.predictions), ref

        head = stub.SetHeadAlias(
            pb.SetHeadAliasRequest(name="cats", alias="production", version=1),
            metadata=_metadata(ALICE),
        )
        assert (head.head_id, head.version, list(head.aliases)) == (versions[1], 1, ["production"])
        assert _predict(stub, ALICE, "cats", probes).head_version == 1
        assert _predict(stub, ALICE, "cats@production", probes).head_version == 1
        assert _predict(stub, ALICE, "cats@latest", probes).head_version == 2

        got = stub.GetHead(pb.GetHeadRequest(head_id="cats@production"), metadata=_metadata(ALICE))
        assert (got.head_id, got.version, list(got.aliases)) == (versions[1], 1, ["production"])
        listed = stub.ListHeads(pb.ListHeadsRequest(name="cats"), metadata=_metadata(ALICE))
        assert [(h.version, list(h.aliases)) for h in listed.heads] == [
            (1, ["production"]),
            (2, []),
        ]

        stub.DeleteHeadAlias(
            pb.DeleteHeadAliasRequest(name="cats", alias="production"), metadata=_metadata(ALICE)
        )
        assert _predict(stub, ALICE, "cats", probes).head_version == 2


def test_unknown_and_foreign_references_are_not_found(
    server: RunningServer, versions: dict[int, str], probes: list[bytes]
) -> None:
    channel, stub = _stub(server, ALICE)
    with channel:
        for ref in ("cats@7", "cats@staging", "mice", "mice@1", "dogs", "dogs@1", "dogs@latest"):
            assert _code(lambda ref=ref: _predict(stub, ALICE, ref, probes)) == (
                grpc.StatusCode.NOT_FOUND
            ), ref
        # bob cannot see alice's name or move its aliases, exactly as if it did not exist
        for ref in ("cats", "cats@1", versions[1]):
            assert _code(lambda ref=ref: _predict(stub, BOB, ref, probes)) == (
                grpc.StatusCode.NOT_FOUND
            ), ref
        set_as_bob = pb.SetHeadAliasRequest(name="cats", alias="production", version=1)
        assert _code(lambda: stub.SetHeadAlias(set_as_bob, metadata=_metadata(BOB))) == (
            grpc.StatusCode.NOT_FOUND
        )
        missing = pb.SetHeadAliasRequest(name="cats", alias="production", version=9)
        assert _code(lambda: stub.SetHeadAlias(missing, metadata=_metadata(ALICE))) == (
            grpc.StatusCode.NOT_FOUND
        )
        for ref in ("cats@", "Cats@1", "cats@0", "cats@-1", "@1", "cats@1@2", "cats@Prod"):
            assert _code(lambda ref=ref: _predict(stub, ALICE, ref, probes)) == (
                grpc.StatusCode.INVALID_ARGUMENT
            ), ref
        for alias in ("latest", "Prod", "1", ""):
            bad = pb.SetHeadAliasRequest(name="cats", alias=alias, version=1)
            assert _code(lambda bad=bad: stub.SetHeadAlias(bad, metadata=_metadata(ALICE))) == (
                grpc.StatusCode.INVALID_ARGUMENT
            ), alias


def test_alias_moves_under_concurrent_predicts_never_mix_versions(
    server: RunningServer, versions: dict[int, str], probes: list[bytes]
) -> None:
    channel, stub = _stub(server, ALICE)
    answers: list[tuple[str, int, list[str]]] = []
    failures: list[BaseException] = []
    stop = threading.Event()

    def caller() -> None:
        while not stop.is_set():
            try:
                response = _predict(stub, ALICE, "cats@canary", probes * 2)
            except grpc.RpcError as exc:
                failures.append(exc)
                return
            labels = [p.label for p in response.predictions]
            answers.append((response.head_id, response.head_version, labels))

    with channel:
        stub.SetHeadAlias(
            pb.SetHeadAliasRequest(name="cats", alias="canary", version=1),
            metadata=_metadata(ALICE),
        )
        callers = [threading.Thread(target=caller) for _ in range(3)]
        for thread in callers:
            thread.start()
        # Each flip waits for 4 answers: more than the 3 callers had in flight, so at least one
        # call began after it and was answered by the new version, however slow the machine
        # (the callers keep calling across every flip).
        for flip in range(12):
            stub.SetHeadAlias(
                pb.SetHeadAliasRequest(name="cats", alias="canary", version=2 - flip % 2),
                metadata=_metadata(ALICE),
            )
            answered = len(answers)
            deadline = time.monotonic() + 60
            while len(answers) < answered + 4 and not failures and time.monotonic() < deadline:
                time.sleep(0.01)
        stop.set()
        for thread in callers:
            thread.join(timeout=60)
    assert not failures, failures
    seen = [version for _, version, _ in answers]
    assert seen.count(1) >= 6 and seen.count(2) >= 6, f"{len(answers)} calls saw versions {seen}"
    for head_id, version, labels in answers:
        assert head_id == versions[version]
        prefix = "one-" if version == 1 else "two-"
        assert all(label.startswith(prefix) for label in labels), (version, labels)


def test_several_references_in_one_predict(
    server: RunningServer, versions: dict[int, str], probes: list[bytes]
) -> None:
    channel, stub = _stub(server, ALICE)
    with channel:
        response = stub.Predict(
            pb.PredictRequest(
                head_ids=["cats@1", "cats@2"], inputs=[pb.Input(image=image) for image in probes]
            ),
            metadata=_metadata(ALICE),
        )
        assert [(h.head_id, h.head_version) for h in response.heads] == [
            (versions[1], 1),
            (versions[2], 2),
        ]
        twice = pb.PredictRequest(head_ids=["cats", "cats@2"], inputs=[pb.Input(image=probes[0])])
        with pytest.raises(grpc.RpcError) as caught:
            stub.Predict(twice, metadata=_metadata(ALICE))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "head_ids[1]" in (caught.value.details() or "")


def test_a_new_version_and_deleting_aliased_versions(
    server: RunningServer, versions: dict[int, str], probes: list[bytes]
) -> None:
    channel, stub = _stub(server, ALICE)
    with channel, TransferClient(server.address, token=ALICE, timeout=300) as alice:
        stub.SetHeadAlias(
            pb.SetHeadAliasRequest(name="cats", alias="production", version=2),
            metadata=_metadata(ALICE),
        )
        third = alice.train("efficientnet_lite0", _relabelled("three", 6), head_name="cats")
        # `cats@latest` is the new version at once; `cats` stays on production.
        assert _predict(stub, ALICE, "cats@latest", probes).head_id == third.head_id
        assert _predict(stub, ALICE, "cats", probes).head_version == 2

        by_alias = pb.DeleteHeadRequest(head_id="cats@production")
        assert _code(lambda: stub.DeleteHead(by_alias, metadata=_metadata(ALICE))) == (
            grpc.StatusCode.INVALID_ARGUMENT
        )
        aliased = pb.DeleteHeadRequest(head_id="cats@2")
        with pytest.raises(grpc.RpcError) as caught:
            stub.DeleteHead(aliased, metadata=_metadata(ALICE))
        assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "production" in (caught.value.details() or "")
        assert _predict(stub, ALICE, "cats@production", probes).head_version == 2

        stub.DeleteHead(
            pb.DeleteHeadRequest(head_id=versions[2], force=True), metadata=_metadata(ALICE)
        )
        assert _code(lambda: _predict(stub, ALICE, "cats@production", probes)) == (
            grpc.StatusCode.NOT_FOUND
        )
        assert _code(lambda: _predict(stub, ALICE, versions[2], probes)) == (
            grpc.StatusCode.NOT_FOUND
        )
        # No production alias now: `cats` is the newest version (3); versions are never reused.
        assert _predict(stub, ALICE, "cats", probes).head_version == 3
        fourth = alice.train("efficientnet_lite0", _relabelled("four", 7), head_name="cats")
        assert alice.get_head(fourth.head_id).version == 4
