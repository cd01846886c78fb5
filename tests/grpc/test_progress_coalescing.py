"""Mid-epoch progress is coalesced to one event per TRANSFER_PROGRESS_MIN_INTERVAL_MS, epoch
ends always stream, and with the interval at 0 every step's event goes out."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path

import pytest
from transfer_client import JobCompleted, JobProgress, TrainingConfig, TransferClient

from tests.conftest import RunningServer, make_settings, start_server
from tests.datasets import fashion_mnist

BACKBONE = "efficientnet_lite0"
EPOCHS = 3
EXAMPLES_PER_CLASS = 10  # x 3 classes, 20% held out: 24 steps of batch 1 per epoch


def server_with_interval(store: Path, interval_ms: float) -> RunningServer:
    return start_server(
        make_settings(store, preload_backbones=[], progress_min_interval_ms=interval_ms)
    )


@pytest.fixture(params=[0.0, 100.0], ids=["every-step", "coalesced-100ms"])
def running(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[tuple[RunningServer, float]]:
    server = server_with_interval(tmp_path, request.param)
    yield server, request.param
    server.stop()


def test_step_events_respect_the_interval(running: tuple[RunningServer, float]) -> None:
    server, interval_ms = running
    config = TrainingConfig(
        epochs=EPOCHS,
        batch_size=1,
        progress_every_steps=1,
        early_stopping_patience=0,
        trainable_blocks=1,  # steps of milliseconds, so the run spans several intervals
    )
    with TransferClient(server.address, timeout=300) as client:
        events = list(
            client.fine_tune(
                BACKBONE,
                fashion_mnist(EXAMPLES_PER_CLASS, classes=3, seed=5),
                head_name="coalesced",
                config=config,
            )
        )
        assert isinstance(events[-1], JobCompleted)
        job = client.get_job(events[-1].job_id)
    progress = [e.progress for e in events if isinstance(e, JobProgress)]
    epoch_ends = [p for p in progress if p.epoch_end]
    assert [p.epoch for p in epoch_ends] == list(range(1, EPOCHS + 1))
    steps = [p for p in progress if p.phase == "training" and not p.epoch_end]
    total_steps = epoch_ends[-1].step
    if interval_ms == 0:
        assert [p.step for p in steps] == list(range(1, total_steps + 1))
    else:
        training_seconds = epoch_ends[-1].elapsed_seconds
        assert 1 <= len(steps) <= training_seconds / (interval_ms / 1000) + 1 < total_steps
        gaps = [b.elapsed_seconds - a.elapsed_seconds for a, b in itertools.pairwise(steps)]
        # The gate reads the clock a moment after the trainer stamps the event.
        assert all(gap >= interval_ms / 1000 - 0.01 for gap in gaps)
    assert [e.sequence for e in events] == list(range(1, len(events) + 1))  # no gaps
    assert job.last_sequence == events[-1].sequence


def test_every_cross_validation_score_streams_whatever_the_interval(tmp_path: Path) -> None:
    """One event per C scored is the API's contract: an interval longer than the whole search
    must not drop any of them (a fast search used to lose all but the first)."""
    server = server_with_interval(tmp_path, 60_000.0)
    try:
        with TransferClient(server.address, timeout=300) as client:
            events = list(
                client.fine_tune(
                    BACKBONE,
                    fashion_mnist(EXAMPLES_PER_CLASS, classes=3, seed=6),
                    head_name="searched",
                    config=TrainingConfig(cv_folds=3),
                )
            )
    finally:
        server.stop()
    completed = events[-1]
    assert isinstance(completed, JobCompleted)
    scored = [
        e.progress
        for e in events
        if isinstance(e, JobProgress) and e.progress.phase == "cross_validation"
    ]
    assert len(scored) >= 3
    assert [p.step for p in scored] == list(range(1, len(scored) + 1))  # none dropped
    assert completed.metrics.regularization_c in {p.regularization_c for p in scored}
