"""TrainingHistory and job_history (issue 19): a job's per-epoch or per-C table, built from its
replayed events by a real client against a real server, equal to what the live stream showed;
CSV and JSON lines; `best`; a running job's rows so far."""

from __future__ import annotations

import csv
import io
import json
from datetime import UTC, datetime
from pathlib import Path

import pytest
from transfer_client import (
    AsyncTransferClient,
    FineTuneEvent,
    HistoryRow,
    JobCancelled,
    JobCompleted,
    JobProgress,
    JobStarted,
    TrainingConfig,
    TrainingHistory,
    TransferClient,
)
from transfer_client.types import TrainingMetrics, TrainingPlan, TrainingProgress

from tests.conftest import RunningServer

Images = tuple[list[tuple[bytes, str]], list[tuple[bytes, str]]]
COLUMNS = [
    "epoch",
    "regularization_c",
    "train_loss",
    "train_accuracy",
    "validation_loss",
    "validation_accuracy",
    "learning_rate",
    "elapsed_seconds",
]


def _trained(client: TransferClient, images: Images, config: TrainingConfig) -> list[FineTuneEvent]:
    events: list[FineTuneEvent] = []
    client.train("efficientnet_lite0", images[0], config=config, on_event=events.append)
    return events


def _epoch_ends(events: list[FineTuneEvent]) -> list[TrainingProgress]:
    return [e.progress for e in events if isinstance(e, JobProgress) and e.progress.epoch_end]


def test_an_epoch_job_has_one_row_per_epoch(client: TransferClient, fashion_small: Images) -> None:
    config = TrainingConfig(epochs=4, early_stopping_patience=0, solver="adamw", seed=5)
    events = _trained(client, fashion_small, config)
    completed = events[-1]
    assert isinstance(completed, JobCompleted)

    history = client.job_history(completed.job_id)

    assert history.kind == "epochs" and history.job_id == completed.job_id
    assert history.outcome == completed and history.completed == completed
    assert isinstance(history.started, JobStarted)
    live = _epoch_ends(events)
    assert [row.epoch for row in history.rows] == [1, 2, 3, 4] == [p.epoch for p in live]
    for row, progress in zip(history.rows, live, strict=True):
        assert row.train_loss == progress.train_loss
        assert row.train_accuracy == progress.train_accuracy
        assert row.validation_loss == progress.validation_loss is not None
        assert row.validation_accuracy == progress.validation_accuracy is not None
        assert row.learning_rate == progress.learning_rate
        assert row.regularization_c is None
    assert history.rows[0].learning_rate > 0  # the schedule decays it (to 0 at the end)
    best = history.best
    assert best is not None and best.epoch == completed.metrics.best_epoch
    assert best.validation_accuracy == pytest.approx(completed.metrics.validation_accuracy)


def test_a_cross_validated_job_has_one_row_per_c(
    client: TransferClient, fashion_small: Images
) -> None:
    events = _trained(client, fashion_small, TrainingConfig(cv_folds=3))
    completed = events[-1]
    assert isinstance(completed, JobCompleted)

    history = client.job_history(completed.job_id)

    scored = [
        e.progress
        for e in events
        if isinstance(e, JobProgress) and e.progress.phase == "cross_validation"
    ]
    assert history.kind == "cross_validation" and len(scored) >= 3
    assert [row.regularization_c for row in history.rows] == [p.regularization_c for p in scored]
    assert [row.epoch for row in history.rows] == list(range(1, len(scored) + 1))
    assert all(row.validation_loss is not None for row in history.rows)
    best = history.best
    assert best is not None
    assert best.regularization_c == pytest.approx(completed.metrics.regularization_c)
    assert best.validation_accuracy == pytest.approx(completed.metrics.validation_accuracy)
    # Before the job completes, `best` is the solver's rule: the lowest held-out loss.
    so_far = TrainingHistory(history.job_id, history.kind, history.rows)
    assert so_far.best == min(history.rows, key=lambda r: (r.validation_loss, r.regularization_c))


async def test_the_async_client_builds_the_same_table(
    server: RunningServer, client: TransferClient, fashion_small: Images
) -> None:
    config = TrainingConfig(epochs=2, early_stopping_patience=0, solver="adamw", seed=6)
    completed = _trained(client, fashion_small, config)[-1]
    async with AsyncTransferClient(server.address, timeout=120) as aio:
        from_async = await aio.job_history(completed.job_id)
    assert from_async == client.job_history(completed.job_id)
    assert len(from_async.rows) == 2


def test_a_running_job_gives_its_rows_so_far(client: TransferClient, fashion_small: Images) -> None:
    slow = TrainingConfig(
        epochs=30, batch_size=1, early_stopping_patience=0, trainable_blocks=-1, seed=7
    )
    events = client.fine_tune("efficientnet_lite0", fashion_small[0][:30], config=slow)
    seen: list[TrainingProgress] = []
    for event in events:
        if isinstance(event, JobProgress) and event.progress.epoch_end:
            seen.append(event.progress)
            break
    job_id = event.job_id
    try:
        history = client.job_history(job_id)
        assert history.outcome is None  # still running: the rows so far
        assert 1 <= len(history.rows) < 30
        assert history.rows[0].train_loss == seen[0].train_loss
    finally:
        client.cancel_job(job_id)
    followed = client.job_history(job_id, follow=True)
    assert isinstance(followed.outcome, JobCancelled)
    assert len(followed.rows) >= len(history.rows)


def test_csv_and_json_lines(tmp_path: Path) -> None:
    rows = (
        HistoryRow(1, None, 1.25, 0.5, 0.75, 0.625, 0.001, 1.5),
        HistoryRow(2, None, 0.5, 0.75, None, None, 0.0005, 3.0),
    )
    history = TrainingHistory("job-1", "epochs", rows)
    history.to_csv(tmp_path / "h.csv")
    with (tmp_path / "h.csv").open(newline="") as file:
        table = list(csv.reader(file))
    assert table[0] == COLUMNS
    assert table[1] == ["1", "", "1.25", "0.5", "0.75", "0.625", "0.001", "1.5"]
    assert table[2] == ["2", "", "0.5", "0.75", "", "", "0.0005", "3.0"]

    stream = io.StringIO()
    history.to_jsonl(stream)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [list(line) for line in lines] == [COLUMNS, COLUMNS]
    assert lines[1]["validation_loss"] is None and lines[0]["train_loss"] == 1.25
    assert history.best == rows[0]  # the only validated row


def _progress(epoch: int, loss: float, *, c: float | None = None) -> TrainingProgress:
    return TrainingProgress(
        epoch=epoch, epochs=3, step=1, total_steps=1, train_loss=loss, train_accuracy=0.5,
        validation_loss=loss, validation_accuracy=1 - loss, learning_rate=0.01,
        examples_per_second=0.0, elapsed_seconds=0.0, eta_seconds=0.0,
        epoch_end=c is None, phase="cross_validation" if c is not None else "training",
        regularization_c=c,
    )  # fmt: skip


def _started(sequence: int) -> JobStarted:
    plan = TrainingPlan(3, 8, 0.01, 0, False, True, 1, "cpu", 0)
    return JobStarted("j", sequence, NOW, "b", "h", ("a", "b"), 4, 2, plan, {"a": 2, "b": 2})


NOW = datetime(2026, 1, 1, tzinfo=UTC)


def test_a_job_run_again_starts_its_table_again() -> None:
    """A server restart puts a running job back in the queue; its next run sends its events
    again from epoch 1 under the same job id: the table is the last run's."""
    events: list[FineTuneEvent] = [
        _started(1),
        JobProgress("j", 2, NOW, _progress(1, 0.9)),
        JobProgress("j", 3, NOW, _progress(2, 0.8)),
        _started(4),
        JobProgress("j", 5, NOW, _progress(1, 0.7)),
    ]
    history = TrainingHistory.from_events(events)
    assert history.job_id == "j" and history.outcome is None
    assert [(row.epoch, row.train_loss) for row in history.rows] == [(1, 0.7)]


def test_best_follows_the_completed_metrics() -> None:
    metrics = TrainingMetrics(0.5, 0.8, 0.6, 0.7, best_epoch=2, epochs_run=3,
                              stopped_early=False, training_seconds=1.0)  # fmt: skip
    events: list[FineTuneEvent] = [
        JobProgress("j", 1, NOW, _progress(1, 0.9)),
        JobProgress("j", 2, NOW, _progress(2, 0.8)),
        JobProgress("j", 3, NOW, _progress(3, 0.1)),
        JobCompleted("j", 4, NOW, "head-1", metrics),
    ]
    history = TrainingHistory.from_events(events)
    assert history.best is not None and history.best.epoch == 2  # the kept epoch, not the last
    assert TrainingHistory.from_events(events[:3]).best == history.rows[2]  # best so far
