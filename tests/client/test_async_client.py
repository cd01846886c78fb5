"""`AsyncTransferClient` against the real in-process server: real backbones, real gRPC."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
import pytest_asyncio
from transfer_client import (
    AsyncTransferClient,
    BackboneState,
    CancelledError,
    FailedPreconditionError,
    FineTuneEvent,
    InvalidArgumentError,
    JobCancelled,
    JobCompleted,
    JobProgress,
    JobQueued,
    JobStarted,
    JobState,
    Modality,
    NotFoundError,
    TrainingConfig,
    TransferError,
)

from tests.conftest import TEST_IMAGE_SIZE, RunningServer

ImageExamples = list[tuple[bytes, str]]
FashionSmall = tuple[ImageExamples, ImageExamples]
TextSmall = tuple[list[tuple[str, str]], list[tuple[str, str]]]
FASHION_LABELS = ("dress", "pullover", "t-shirt", "trouser")


def per_class(examples: ImageExamples, count: int) -> ImageExamples:
    """The first `count` examples of each class, in the order given."""
    seen: dict[str, int] = {}
    out: ImageExamples = []
    for image, label in examples:
        if seen.get(label, 0) < count:
            seen[label] = seen.get(label, 0) + 1
            out.append((image, label))
    return out


@pytest_asyncio.fixture(loop_scope="session")
async def aclient(server: RunningServer) -> AsyncIterator[AsyncTransferClient]:
    async with AsyncTransferClient(server.address, timeout=120) as transfer_client:
        yield transfer_client


@dataclass(frozen=True)
class TrainedHead:
    events: list[FineTuneEvent]
    head_id: str
    job_id: str


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def streamed_head(server: RunningServer, fashion_small: FashionSmall) -> TrainedHead:
    """One job on a small slice of Fashion-MNIST, its events read with `async for`."""
    async with AsyncTransferClient(server.address, timeout=120) as transfer_client:
        events = [
            event
            async for event in transfer_client.fine_tune(
                "efficientnet_lite0",
                per_class(fashion_small[0], 8),
                head_name="async-stream",
                config=TrainingConfig(epochs=3, seed=5, validation_fraction=0.25),
            )
        ]
    last = events[-1]
    assert isinstance(last, JobCompleted), events[-3:]
    return TrainedHead(events, last.head_id, last.job_id)


async def test_list_backbones_reports_loaded_and_unavailable(
    aclient: AsyncTransferClient,
) -> None:
    backbones = {b.name: b for b in await aclient.list_backbones()}
    assert {"efficientnet_lite0", "minilm_l6", "resnet18"} <= set(backbones)
    for name, modality in (("efficientnet_lite0", Modality.IMAGE), ("minilm_l6", Modality.TEXT)):
        backbone = backbones[name]
        assert backbone.state is BackboneState.LOADED, backbone
        assert backbone.modality is modality
        assert backbone.device  # e.g. "cpu"
        assert backbone.resident_bytes > 0
        assert backbone.parameter_count > 0 and backbone.feature_dim > 0
        assert backbone.unavailable_reason == ""
    assert backbones["efficientnet_lite0"].input_size == TEST_IMAGE_SIZE
    assert backbones["efficientnet_lite0"].feature_dim == 1280
    resnet = backbones["resnet18"]
    assert resnet.state is BackboneState.UNAVAILABLE
    assert "weights file" in resnet.unavailable_reason
    assert resnet.resident_bytes == 0


async def test_fine_tune_streams_one_job_to_completion(streamed_head: TrainedHead) -> None:
    events = streamed_head.events
    assert [e.sequence for e in events] == list(range(1, len(events) + 1))
    assert {e.job_id for e in events} == {streamed_head.job_id}
    assert isinstance(events[0], JobQueued)
    started = events[1]
    assert isinstance(started, JobStarted)
    assert started.backbone == "efficientnet_lite0" and started.head_name == "async-stream"
    assert started.class_names == FASHION_LABELS
    assert started.train_examples + started.validation_examples == 32
    assert started.class_counts == dict.fromkeys(FASHION_LABELS, 8)
    assert started.plan.epochs == 3
    epoch_ends = [
        e.progress.epoch for e in events if isinstance(e, JobProgress) and e.progress.epoch_end
    ]
    assert epoch_ends == [1, 2, 3]
    completed = events[-1]
    assert isinstance(completed, JobCompleted)
    assert completed.metrics.epochs_run == 3
    assert 1 <= completed.metrics.best_epoch <= 3
    assert completed.head_id.startswith("async-stream-")


async def test_predict_on_the_streamed_head(
    aclient: AsyncTransferClient, streamed_head: TrainedHead, fashion_small: FashionSmall
) -> None:
    test = fashion_small[1]
    predictions = await aclient.predict(streamed_head.head_id, [x for x, _ in test], top_k=2)
    assert len(predictions) == len(test)
    for prediction in predictions:
        assert prediction.label in FASHION_LABELS
        assert prediction.top_k[0].label == prediction.label
        assert len(prediction.top_k) == 2
        assert prediction.top_k[0].score >= prediction.top_k[1].score
        assert prediction.score == pytest.approx(prediction.top_k[0].score)
    correct = sum(p.label == y for p, (_, y) in zip(predictions, test, strict=True))
    assert correct / len(test) >= 0.5  # 4 classes: chance is 0.25

    # A single input (not a list) is one prediction, not one per byte.
    [single] = await aclient.predict(streamed_head.head_id, test[0][0], return_embedding=True)
    assert single.label == predictions[0].label
    assert len(single.embedding) == 1280


async def test_watch_job_replays_the_finished_job(
    aclient: AsyncTransferClient, streamed_head: TrainedHead
) -> None:
    replay = [e async for e in aclient.watch_job(streamed_head.job_id)]
    assert replay == streamed_head.events
    tail = [e async for e in aclient.watch_job(streamed_head.job_id, after_sequence=2)]
    assert tail == streamed_head.events[2:]


async def test_get_and_list_jobs_and_heads(
    aclient: AsyncTransferClient, streamed_head: TrainedHead
) -> None:
    job = await aclient.get_job(streamed_head.job_id)
    assert job.state is JobState.SUCCEEDED
    assert job.head_id == streamed_head.head_id
    assert job.backbone == "efficientnet_lite0" and job.head_name == "async-stream"
    assert job.last_sequence == streamed_head.events[-1].sequence
    assert job.error == ""
    assert job.created_time <= job.updated_time
    jobs = {j.job_id: j for j in await aclient.list_jobs()}
    assert jobs[streamed_head.job_id].state is JobState.SUCCEEDED

    head = await aclient.get_head(streamed_head.head_id)
    assert head.name == "async-stream" and head.backbone == "efficientnet_lite0"
    assert head.modality is Modality.IMAGE
    assert head.class_names == FASHION_LABELS
    assert head.job_id == streamed_head.job_id
    assert head.input_size == TEST_IMAGE_SIZE
    assert head.config.epochs == 3 and head.config.seed == 5
    assert head.metrics.epochs_run == 3
    assert 0 < head.size_bytes < 1_000_000
    image_heads = {h.head_id for h in await aclient.list_heads(backbone="efficientnet_lite0")}
    assert streamed_head.head_id in image_heads
    assert streamed_head.head_id in {h.head_id for h in await aclient.list_heads()}
    text_heads = {h.head_id for h in await aclient.list_heads(backbone="minilm_l6")}
    assert streamed_head.head_id not in text_heads


async def test_errors_are_translated(
    aclient: AsyncTransferClient, streamed_head: TrainedHead, fashion_small: FashionSmall
) -> None:
    image = fashion_small[1][0][0]
    with pytest.raises(NotFoundError) as not_found:
        await aclient.predict("no-such-head", [image])
    assert not_found.value.code == "NOT_FOUND"
    assert "head_id" in not_found.value.message
    assert isinstance(not_found.value, TransferError)
    with pytest.raises(NotFoundError):
        await aclient.get_head("no-such-head")
    with pytest.raises(NotFoundError):
        await aclient.delete_head("no-such-head")
    with pytest.raises(NotFoundError, match="job_id"):
        await aclient.get_job("job-0000")
    with pytest.raises(NotFoundError, match="job_id"):
        [e async for e in aclient.watch_job("job-0000")]

    with pytest.raises(InvalidArgumentError) as wrong_modality:
        await aclient.predict(streamed_head.head_id, ["a photo of a cat"])
    assert wrong_modality.value.code == "INVALID_ARGUMENT"
    assert "inputs[0]" in wrong_modality.value.message
    with pytest.raises(InvalidArgumentError, match="top_k"):
        await aclient.predict(streamed_head.head_id, [image], top_k=-1)
    with pytest.raises(FailedPreconditionError, match="not cancellable"):
        await aclient.cancel_job(streamed_head.job_id)


async def test_train_raises_the_failure_of_a_job_that_cannot_run(
    aclient: AsyncTransferClient, fashion_small: FashionSmall
) -> None:
    examples = per_class(fashion_small[0], 2)
    seen: list[FineTuneEvent] = []
    with pytest.raises(FailedPreconditionError) as unavailable:
        await aclient.train("resnet18", examples, on_event=seen.append)
    assert unavailable.value.code == "FAILED_PRECONDITION"
    assert "resnet18" in unavailable.value.message
    with pytest.raises(NotFoundError, match="backbone"):
        await aclient.train("no-such-backbone", examples, on_event=seen.append)
    one_class = [(image, "same") for image, _ in examples]
    with pytest.raises(InvalidArgumentError, match="at least 2"):
        await aclient.train("efficientnet_lite0", one_class, on_event=seen.append)
    with pytest.raises(InvalidArgumentError, match=r"examples\[0\]"):
        await aclient.train("efficientnet_lite0", [("a text", "a"), ("another", "b")])
    assert seen == []  # none of them started a job


async def test_train_raises_cancelled_when_another_task_cancels(
    aclient: AsyncTransferClient, fashion_small: FashionSmall
) -> None:
    started = asyncio.Event()
    events: list[FineTuneEvent] = []

    async def on_event(event: FineTuneEvent) -> None:  # a coroutine function is awaited
        events.append(event)
        started.set()

    training = asyncio.create_task(
        aclient.train(
            "efficientnet_lite0",
            fashion_small[0],
            head_name="async-cancel",
            config=TrainingConfig(epochs=1000, batch_size=1, early_stopping_patience=0),
            on_event=on_event,
        )
    )
    await asyncio.wait_for(started.wait(), timeout=60)
    job_id = events[0].job_id
    cancelled_job = await aclient.cancel_job(job_id)
    assert cancelled_job.job_id == job_id
    with pytest.raises(CancelledError) as raised:
        await asyncio.wait_for(training, timeout=60)
    assert raised.value.code == "CANCELLED"
    assert isinstance(events[0], JobQueued)
    assert isinstance(events[-1], JobCancelled)
    assert all(e.job_id == job_id for e in events)
    job = await aclient.get_job(job_id)
    assert job.state is JobState.CANCELLED and job.head_id == ""
    assert job.error == events[-1].reason


async def test_train_returns_completed_and_calls_a_plain_callback(
    aclient: AsyncTransferClient, text_small: TextSmall
) -> None:
    # Uploaded first (chunks built in a worker thread), then trained by dataset id.
    train_texts = text_small[0][:20]
    info = await aclient.upload_dataset(train_texts, chunk_size=6)
    assert info.example_count == 20 and info.modality is Modality.TEXT
    assert info.class_counts == {
        label: sum(y == label for _, y in train_texts) for _, label in train_texts
    }
    events: list[FineTuneEvent] = []
    done = await aclient.train(
        "minilm_l6",
        dataset_id=info.dataset_id,
        head_name="async-text",
        config=TrainingConfig(epochs=2),
        on_event=events.append,
    )
    assert isinstance(done, JobCompleted)
    assert events[-1] == done and isinstance(events[0], JobQueued)
    assert isinstance(events[1], JobStarted)
    head = await aclient.get_head(done.head_id)
    assert head.modality is Modality.TEXT
    assert head.class_names == tuple(sorted(info.class_counts))
    [prediction] = await aclient.predict(done.head_id, "The central bank raised interest rates.")
    assert prediction.label in head.class_names


async def test_leaving_the_stream_early_detaches_without_stopping_the_job(
    aclient: AsyncTransferClient, fashion_small: FashionSmall
) -> None:
    stream = aclient.fine_tune(
        "efficientnet_lite0",
        per_class(fashion_small[0], 3),
        head_name="async-detach",
        config=TrainingConfig(epochs=2),
    )
    async with contextlib.aclosing(stream) as events:  # type: ignore[type-var]
        first = await anext(events)
    assert isinstance(first, JobQueued)  # a job id at once, before the job starts
    rest = [e async for e in aclient.watch_job(first.job_id, after_sequence=first.sequence)]
    assert isinstance(rest[0], JobStarted)
    assert isinstance(rest[-1], JobCompleted)
    assert rest[0].sequence == first.sequence + 1
    assert (await aclient.get_job(first.job_id)).state is JobState.SUCCEEDED
