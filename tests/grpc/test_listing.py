"""ListHeads and ListJobs page (page_size / page_token, AIP-158 style) and filter (name and
backbone; state for jobs) on a real server over gRPC; a token only continues the listing it
came from. The records are written into the server's store directly: listing reads records,
not weights, and training hundreds of heads would only slow the test down."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import pytest
import torch
from transfer_client import AsyncTransferClient, TransferClient
from transfer_client import JobState as ClientJobState
from transfer_client.proto import transfer_service_pb2 as pb
from transfer_client.proto import transfer_service_pb2_grpc as pb_grpc
from transfer_service import list_pages
from transfer_service.domain import (
    HeadRecord,
    JobRecord,
    JobState,
    Modality,
    TrainingConfig,
    TrainingMetrics,
)

from tests.conftest import RunningServer, make_settings, start_server

START = datetime(2026, 1, 1, tzinfo=UTC)
WEIGHTS = {"classifier.weight": torch.zeros(2, 4), "classifier.bias": torch.zeros(2)}


def head(number: int, name: str, backbone: str) -> HeadRecord:
    return HeadRecord(
        head_id=f"{name}-{number:08x}",
        name=name,
        backbone=backbone,
        modality=Modality.TEXT if backbone == "minilm_l6" else Modality.IMAGE,
        class_names=("a", "b"),
        trainable_blocks=0,
        input_size=224,
        hidden_dim=0,
        metrics=TrainingMetrics(0.1, 0.9, 0.2, 0.8, 3, 5, True, 1.5),
        config=TrainingConfig(),
        created_time=START + timedelta(seconds=number),
        size_bytes=40,
        job_id=f"job-{number}",
    )


@pytest.fixture(scope="module")
def listed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    running = start_server(make_settings(tmp_path_factory.mktemp("listing"), preload_backbones=[]))
    store = running.app.store
    for number in range(30):
        news = number % 3 == 0
        name, backbone = ("news", "minilm_l6") if news else ("pets", "efficientnet_lite0")
        store.save_head(head(number, name, backbone), WEIGHTS)
    for number in range(12):
        state = (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)[number % 3]
        when = START + timedelta(seconds=number)
        store.save_job(
            JobRecord(
                job_id=f"job-{number:04d}",
                state=state,
                backbone="minilm_l6" if number % 2 else "efficientnet_lite0",
                head_name="news" if number % 2 else "pets",
                created_time=when,
                updated_time=when,
            )
        )
    yield running
    running.stop()


def all_pages(call: Any, request: Any) -> list[list[str]]:
    """The ids of every page of a listing, following next_page_token with the same filters."""
    pages: list[list[str]] = []
    while True:
        response = call(request)
        if isinstance(request, pb.ListHeadsRequest):
            pages.append([item.head_id for item in response.heads])
        else:
            pages.append([item.job_id for item in response.jobs])
        if not response.next_page_token:
            return pages
        following = type(request)()
        following.CopyFrom(request)
        following.page_token = response.next_page_token
        request = following


def head_id(number: int) -> str:
    return f"{'news' if number % 3 == 0 else 'pets'}-{number:08x}"


def test_list_heads_pages_and_filters(listed: RunningServer) -> None:
    with grpc.insecure_channel(listed.address) as channel:
        stub = pb_grpc.TransferServiceStub(channel)
        pages = all_pages(stub.ListHeads, pb.ListHeadsRequest(page_size=7))
        assert [len(page) for page in pages] == [7, 7, 7, 7, 2]
        every = [head_id for page in pages for head_id in page]
        assert every == [head_id(number) for number in range(30)]
        news = all_pages(stub.ListHeads, pb.ListHeadsRequest(name="news", page_size=4))
        assert [len(page) for page in news] == [4, 4, 2]
        assert all(head_id.startswith("news-") for page in news for head_id in page)
        by_backbone = stub.ListHeads(pb.ListHeadsRequest(backbone="efficientnet_lite0"))
        assert len(by_backbone.heads) == 20 and not by_backbone.next_page_token
        assert {h.backbone for h in by_backbone.heads} == {"efficientnet_lite0"}
        # A token continues only the listing it came from.
        token = stub.ListHeads(pb.ListHeadsRequest(name="news", page_size=4)).next_page_token
        with pytest.raises(grpc.RpcError) as caught:
            stub.ListHeads(pb.ListHeadsRequest(name="pets", page_size=4, page_token=token))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "other filters" in (caught.value.details() or "")
        with pytest.raises(grpc.RpcError) as caught:
            stub.ListHeads(pb.ListHeadsRequest(backbone="no-such-backbone"))
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND


def test_list_jobs_filters_by_state_backbone_and_name(listed: RunningServer) -> None:
    with grpc.insecure_channel(listed.address) as channel:
        stub = pb_grpc.TransferServiceStub(channel)
        failed = stub.ListJobs(pb.ListJobsRequest(state=pb.JOB_STATE_FAILED))
        assert [j.job_id for j in failed.jobs] == ["job-0001", "job-0004", "job-0007", "job-0010"]
        news = all_pages(
            stub.ListJobs,
            pb.ListJobsRequest(backbone="minilm_l6", head_name="news", page_size=4),
        )
        assert news == [["job-0001", "job-0003", "job-0005", "job-0007"], ["job-0009", "job-0011"]]
        none = stub.ListJobs(pb.ListJobsRequest(state=pb.JOB_STATE_RUNNING))
        assert list(none.jobs) == [] and not none.next_page_token
        with pytest.raises(grpc.RpcError) as caught:
            stub.ListJobs(pb.ListJobsRequest(state=99))  # type: ignore[arg-type]
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_a_listing_reads_only_its_page_of_heads(
    listed: RunningServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ListHeads at many heads reads one page of head files, not every head's JSON."""
    store = listed.app.store
    reads: list[str] = []
    real_get = store._heads.get_head  # type: ignore[attr-defined]

    def counted(wanted: str) -> HeadRecord:
        reads.append(wanted)
        return real_get(wanted)  # type: ignore[no-any-return]

    monkeypatch.setattr(store._heads, "get_head", counted)  # type: ignore[attr-defined]
    with grpc.insecure_channel(listed.address) as channel:
        page = pb_grpc.TransferServiceStub(channel).ListHeads(pb.ListHeadsRequest(page_size=5))
    assert len(page.heads) == 5
    assert len(reads) == 6  # the page and the one that says another page follows


async def test_both_clients_read_every_page_with_filters(
    listed: RunningServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pages of 7 (the server's page cap, lowered for the test): the SDK follows every
    next_page_token, with the filters it was asked for."""
    monkeypatch.setattr(list_pages, "MAX_PAGE", 7)
    every = [head_id(number) for number in range(30)]
    news = [head_id(number) for number in range(0, 30, 3)]
    failed = [f"job-{number:04d}" for number in (1, 4, 7, 10)]
    with TransferClient(listed.address, timeout=60) as client:
        assert [h.head_id for h in client.list_heads()] == every
        assert [h.head_id for h in client.list_heads(name="news")] == news
        assert [j.job_id for j in client.list_jobs(state=ClientJobState.FAILED)] == failed
        assert len(client.list_jobs(backbone="minilm_l6", head_name="news")) == 6
    async with AsyncTransferClient(listed.address, timeout=60) as aclient:
        assert [h.head_id for h in await aclient.list_heads(backbone="minilm_l6")] == news
        failed_jobs = await aclient.list_jobs(state=ClientJobState.FAILED)
        assert [j.job_id for j in failed_jobs] == failed
