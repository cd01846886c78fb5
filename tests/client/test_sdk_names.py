"""Head names, versions and aliases in the SDK (issue 18): the new fields reach the dataclasses
(conversion from the wire), and both clients' set_head_alias / delete_head_alias /
delete_head(force) and name references work against a real server with a real backbone."""

from __future__ import annotations

import pytest
from transfer_client import (
    AsyncTransferClient,
    FailedPreconditionError,
    JobCompleted,
    NotFoundError,
    TransferClient,
)
from transfer_client._convert import backbone_from_pb, event_from_pb, head_from_pb
from transfer_client._core import predict, predict_heads
from transfer_client.proto import transfer_service_pb2 as pb

from tests.conftest import RunningServer

Images = tuple[list[tuple[bytes, str]], list[tuple[bytes, str]]]
NAME = "sdk-names"


# --- the wire to the dataclasses ----------------------------------------------------------


def test_head_version_and_aliases() -> None:
    message = pb.Head(head_id="h-2", name="pets", version=2, aliases=["canary", "production"])
    message.modality = pb.MODALITY_IMAGE
    head = head_from_pb(message)
    assert (head.version, head.aliases) == (2, ("canary", "production"))
    older = head_from_pb(pb.Head(head_id="h-1", modality=pb.MODALITY_IMAGE))
    assert (older.version, older.aliases) == (0, ())  # a server older than names


def test_backbone_precision() -> None:
    message = pb.Backbone(
        name="efficientnet_lite0",
        modality=pb.MODALITY_IMAGE,
        state=pb.BACKBONE_STATE_LOADED,
        precision="bfloat16",
        measured_inputs_per_second=412.5,
    )
    backbone = backbone_from_pb(message)
    assert (backbone.precision, backbone.measured_inputs_per_second) == ("bfloat16", 412.5)


def test_predictions_say_which_head_answered() -> None:
    response = pb.PredictResponse(
        head_id="h-3",
        head_version=3,
        predictions=[pb.Prediction(label="cat", score=0.5), pb.Prediction(label="dog")],
    )
    got = predict("pets@production", "x", top_k=1, return_embedding=False).result(response)
    assert [(p.label, p.head_id, p.head_version) for p in got] == [
        ("cat", "h-3", 3),
        ("dog", "h-3", 3),
    ]


def test_several_heads_are_keyed_by_the_callers_references() -> None:
    call = predict_heads(["pets@1", "pets"], "x", top_k=1, return_embedding=False)
    assert list(call.request.head_ids) == ["pets@1", "pets"]
    response = pb.PredictResponse(
        heads=[
            pb.HeadPredictions(head_id="h-1", head_version=1, predictions=[pb.Prediction()]),
            pb.HeadPredictions(head_id="h-2", head_version=2, predictions=[pb.Prediction()]),
        ]
    )
    got = call.result(response)
    assert list(got) == ["pets@1", "pets"]
    assert [(p.head_id, p.head_version) for p in got["pets"]] == [("h-2", 2)]


def test_a_completed_event_carries_the_version() -> None:
    message = pb.FineTuneEvent(job_id="j", sequence=9)
    message.completed.head_id = "h-4"
    message.completed.head_version = 4
    event = event_from_pb(message)
    assert isinstance(event, JobCompleted) and event.head_version == 4


def test_an_alias_needs_a_version() -> None:
    with TransferClient("localhost:1") as client, pytest.raises(ValueError, match="version"):
        client.set_head_alias("pets", "production", 0)


# --- against the server --------------------------------------------------------------------


@pytest.fixture(scope="module")
def versions(server: RunningServer, fashion_small: Images) -> list[JobCompleted]:
    """Two versions of one head name."""
    with TransferClient(server.address, timeout=120) as client:
        return [
            client.train("efficientnet_lite0", fashion_small[0], head_name=NAME) for _ in range(2)
        ]


def test_names_versions_and_aliases(
    client: TransferClient, versions: list[JobCompleted], fashion_small: Images
) -> None:
    first, second = versions
    assert (first.head_version, second.head_version) == (1, 2)
    assert first.head_id != second.head_id
    image = fashion_small[1][0][0]

    listed = client.list_heads(name=NAME)
    assert [(h.head_id, h.version, h.aliases) for h in listed] == [
        (first.head_id, 1, ()),
        (second.head_id, 2, ()),
    ]
    assert client.get_head(f"{NAME}@1").head_id == first.head_id
    # A bare name is its newest version until a "production" alias is set.
    (latest,) = client.predict(NAME, image)
    assert (latest.head_id, latest.head_version) == (second.head_id, 2)

    head = client.set_head_alias(NAME, "production", 1)
    assert (head.head_id, head.version, head.aliases) == (first.head_id, 1, ("production",))
    for reference, answered in (
        (NAME, first),
        (f"{NAME}@production", first),
        (f"{NAME}@latest", second),
        (f"{NAME}@2", second),
        (second.head_id, second),
    ):
        (prediction,) = client.predict(reference, image)
        assert (prediction.head_id, prediction.head_version) == (
            answered.head_id,
            answered.head_version,
        ), reference
    both = client.predict_heads([f"{NAME}@production", f"{NAME}@latest"], image)
    assert [p.head_version for key in both for p in both[key]] == [1, 2]

    # Promote, then roll back: the alias moves, the versions stay.
    assert client.set_head_alias(NAME, "production", 2).head_id == second.head_id
    assert client.get_head(first.head_id).aliases == ()
    assert client.predict(NAME, image)[0].head_version == 2
    assert client.set_head_alias(NAME, "production", 1).version == 1
    assert client.predict(NAME, image)[0].head_version == 1

    with pytest.raises(NotFoundError):
        client.set_head_alias(NAME, "production", 9)
    with pytest.raises(NotFoundError):
        client.predict(f"{NAME}@no-such-alias", image)


async def test_deletes_and_the_async_client(
    server: RunningServer, versions: list[JobCompleted], fashion_small: Images
) -> None:
    first, second = versions
    image = fashion_small[1][0][0]
    async with AsyncTransferClient(server.address, timeout=120) as client:
        head = await client.set_head_alias(NAME, "canary", 2)
        assert "canary" in head.aliases
        # A version an alias points at is kept unless forced.
        with pytest.raises(FailedPreconditionError):
            await client.delete_head(f"{NAME}@2")
        await client.delete_head_alias(NAME, "canary")
        with pytest.raises(NotFoundError):
            await client.delete_head_alias(NAME, "canary")
        assert "canary" not in (await client.get_head(second.head_id)).aliases

        await client.set_head_alias(NAME, "production", 1)
        with pytest.raises(FailedPreconditionError):
            await client.delete_head(first.head_id)
        await client.delete_head(first.head_id, force=True)  # and its alias with it
        with pytest.raises(NotFoundError):
            await client.predict(f"{NAME}@production", image)
        remaining = await client.list_heads(name=NAME)
        assert [(h.head_id, h.version) for h in remaining] == [(second.head_id, 2)]
        (prediction,) = await client.predict(NAME, image)
        assert prediction.head_id == second.head_id
