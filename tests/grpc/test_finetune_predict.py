"""FineTune, Predict, jobs and heads through a real server and the real SDK."""

from __future__ import annotations

import math

import pytest
from transfer_client import (
    FailedPreconditionError,
    JobCancelled,
    JobCompleted,
    JobProgress,
    JobQueued,
    JobStarted,
    JobState,
    NotFoundError,
    TrainingConfig,
    TransferClient,
)

from tests.conftest import TEST_IMAGE_SIZE, RunningServer


def accuracy(predicted: list[str], truth: list[str]) -> float:
    return sum(p == t for p, t in zip(predicted, truth, strict=True)) / len(truth)


def test_fine_tune_streams_ordered_events_and_predicts(
    client: TransferClient,
    fashion_small: tuple[list[tuple[bytes, str]], list[tuple[bytes, str]]],
) -> None:
    train, test = fashion_small
    events = list(
        client.fine_tune(
            "efficientnet_lite0",
            train,
            head_name="events-check",
            config=TrainingConfig(epochs=4, progress_every_steps=1, validation_fraction=0.25),
        )
    )
    assert [e.sequence for e in events] == list(range(1, len(events) + 1))
    assert len({e.job_id for e in events}) == 1
    queued, started = events[:2]
    assert isinstance(queued, JobQueued) and queued.head_name == "events-check"
    assert isinstance(started, JobStarted)
    assert started.class_names == ("dress", "pullover", "t-shirt", "trouser")
    assert started.train_examples + started.validation_examples == len(train)
    assert started.validation_examples == 4 * round(15 * 0.25)
    assert started.plan.cached_features and started.plan.trainable_blocks == 0
    progress = [e for e in events if isinstance(e, JobProgress)]
    epoch_ends = [e.progress for e in progress if e.progress.epoch_end]
    assert [p.epoch for p in epoch_ends] == [1, 2, 3, 4]
    assert all(p.validation_accuracy is not None for p in epoch_ends)
    assert any(e.progress.phase == "extracting_features" for e in progress)
    steps = [e.progress for e in progress if e.progress.phase == "training"]
    assert all(p.train_loss > 0 and p.examples_per_second > 0 for p in steps)
    completed = events[-1]
    assert isinstance(completed, JobCompleted)
    assert 1 <= completed.metrics.best_epoch <= 4

    job = client.get_job(completed.job_id)
    assert job.state is JobState.SUCCEEDED and job.head_id == completed.head_id
    assert job.last_sequence == completed.sequence

    predictions = client.predict(completed.head_id, [x for x, _ in test], top_k=3)
    assert len(predictions) == len(test)
    for prediction in predictions:
        assert len(prediction.top_k) == 3
        assert prediction.top_k[0].label == prediction.label
        assert prediction.score == pytest.approx(prediction.top_k[0].score)
        assert [s.score for s in prediction.top_k] == sorted(
            (s.score for s in prediction.top_k), reverse=True
        )
    # 4 classes: chance is 0.25; pretrained features at 64 px do far better.
    assert accuracy([p.label for p in predictions], [y for _, y in test]) >= 0.6


def test_predict_keeps_request_order(
    client: TransferClient,
    image_head: str,
    fashion_small: tuple[list[tuple[bytes, str]], list[tuple[bytes, str]]],
) -> None:
    images = [x for x, _ in fashion_small[1][:12]]
    one_by_one = [client.predict(image_head, [image])[0] for image in images]
    together = client.predict(image_head, images)
    reversed_together = client.predict(image_head, images[::-1])[::-1]
    for single, batched, backwards in zip(one_by_one, together, reversed_together, strict=True):
        assert batched.label == single.label == backwards.label
        assert batched.score == pytest.approx(single.score, abs=1e-4)
        assert backwards.score == pytest.approx(single.score, abs=1e-4)


def test_return_embedding_is_the_feature_vector(
    client: TransferClient,
    image_head: str,
    fashion_small: tuple[list[tuple[bytes, str]], list[tuple[bytes, str]]],
) -> None:
    [with_embedding] = client.predict(image_head, [fashion_small[1][0][0]], return_embedding=True)
    [without] = client.predict(image_head, [fashion_small[1][0][0]])
    assert len(with_embedding.embedding) == 1280
    assert without.embedding == ()
    assert all(math.isfinite(v) for v in with_embedding.embedding)


def test_text_head_classifies_held_out_news(
    client: TransferClient,
    text_head: str,
    text_small: tuple[list[tuple[str, str]], list[tuple[str, str]]],
) -> None:
    _, test = text_small
    predictions = client.predict(text_head, [x for x, _ in test], top_k=5)
    assert {s.label for s in predictions[0].top_k} == {
        "business", "entertainment", "politics", "sports", "tech",
    }  # fmt: skip
    assert sum(s.score for s in predictions[0].top_k) == pytest.approx(1.0, abs=1e-4)
    # 5 classes: chance is 0.2.
    assert accuracy([p.label for p in predictions], [y for _, y in test]) >= 0.75


def test_two_heads_on_one_backbone_answer_for_themselves(
    client: TransferClient,
    fashion_small: tuple[list[tuple[bytes, str]], list[tuple[bytes, str]]],
) -> None:
    train, test = fashion_small
    # Same images, two different labelings: clothing type vs. upper-body yes/no.
    upper = {"pullover": "upper", "t-shirt": "upper", "dress": "other", "trouser": "other"}
    type_head = client.train(
        "efficientnet_lite0", train, head_name="garment", config=TrainingConfig(epochs=10)
    ).head_id
    upper_head = client.train(
        "efficientnet_lite0",
        [(x, upper[y]) for x, y in train],
        head_name="upper",
        config=TrainingConfig(epochs=10),
    ).head_id
    images = [x for x, _ in test]
    garments = client.predict(type_head, images)
    uppers = client.predict(upper_head, images)
    assert {p.label for p in garments} <= {"dress", "pullover", "t-shirt", "trouser"}
    assert {p.label for p in uppers} <= {"upper", "other"}
    assert accuracy([p.label for p in uppers], [upper[y] for _, y in test]) >= 0.7
    assert accuracy([p.label for p in garments], [y for _, y in test]) >= 0.6
    heads = {h.head_id: h for h in client.list_heads(backbone="efficientnet_lite0")}
    assert heads[type_head].class_names == ("dress", "pullover", "t-shirt", "trouser")
    assert heads[upper_head].class_names == ("other", "upper")
    assert heads[upper_head].input_size == TEST_IMAGE_SIZE
    assert heads[upper_head].size_bytes < 1_000_000  # a probe head is a few KB


def test_upload_dataset_then_fine_tune_by_id(
    client: TransferClient, text_small: tuple[list[tuple[str, str]], list[tuple[str, str]]]
) -> None:
    train, _ = text_small
    info = client.upload_dataset(train, chunk_size=7)
    assert info.example_count == len(train)
    assert sum(info.class_counts.values()) == len(train)
    done = client.train(
        "minilm_l6", dataset_id=info.dataset_id, head_name="from-upload",
        config=TrainingConfig(epochs=3),
    )  # fmt: skip
    assert client.get_head(done.head_id).class_names == tuple(sorted(info.class_counts))


def test_watch_job_replays_after_a_sequence(client: TransferClient, image_head: str) -> None:
    job_id = client.get_head(image_head).job_id
    everything = list(client.watch_job(job_id))
    assert isinstance(everything[0], JobQueued) and isinstance(everything[1], JobStarted)
    assert isinstance(everything[-1], JobCompleted)
    tail = list(client.watch_job(job_id, after_sequence=3))
    assert [e.sequence for e in tail] == [e.sequence for e in everything[3:]]


def test_cancel_stops_a_running_job(
    client: TransferClient,
    fashion_small: tuple[list[tuple[bytes, str]], list[tuple[bytes, str]]],
) -> None:
    stream = client.fine_tune(
        "efficientnet_lite0",
        fashion_small[0],
        head_name="to-cancel",
        config=TrainingConfig(epochs=1000, batch_size=1, early_stopping_patience=0),
    )
    first = next(stream)
    cancelled = client.cancel_job(first.job_id)
    assert cancelled.job_id == first.job_id
    rest = list(stream)
    assert isinstance(rest[-1], JobCancelled)
    job = client.get_job(first.job_id)
    assert job.state is JobState.CANCELLED and job.head_id == ""
    with pytest.raises(FailedPreconditionError, match="not cancellable"):
        client.cancel_job(first.job_id)
    assert first.job_id in {j.job_id for j in client.list_jobs()}


def test_a_disconnected_client_does_not_stop_the_job(
    server: RunningServer,
    fashion_small: tuple[list[tuple[bytes, str]], list[tuple[bytes, str]]],
) -> None:
    with TransferClient(server.address) as first_client:
        stream = first_client.fine_tune(
            "efficientnet_lite0", fashion_small[0], head_name="orphan",
            config=TrainingConfig(epochs=5),
        )  # fmt: skip
        job_id = next(stream).job_id
    # The first channel is closed; a new client re-attaches and sees the job through.
    with TransferClient(server.address) as second_client:
        events = list(second_client.watch_job(job_id))
        assert isinstance(events[-1], JobCompleted)
        assert second_client.get_job(job_id).state is JobState.SUCCEEDED


def test_delete_head(
    client: TransferClient,
    fashion_small: tuple[list[tuple[bytes, str]], list[tuple[bytes, str]]],
) -> None:
    head_id = client.train(
        "efficientnet_lite0", fashion_small[0], head_name="doomed", config=TrainingConfig(epochs=2)
    ).head_id
    client.predict(head_id, [fashion_small[1][0][0]])  # loaded into the head cache
    client.delete_head(head_id)
    with pytest.raises(NotFoundError):
        client.get_head(head_id)
    with pytest.raises(NotFoundError):
        client.predict(head_id, [fashion_small[1][0][0]])
    assert head_id not in {h.head_id for h in client.list_heads()}
    with pytest.raises(NotFoundError):
        client.delete_head(head_id)
