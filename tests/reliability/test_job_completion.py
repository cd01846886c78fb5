"""A job's success commits its head, its SUCCEEDED row and its completed event together
(Store.complete_job): a store that refuses that commit leaves no head, and the job fails
with the store's reason instead of announcing a head that does not exist."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
from transfer_client import JobFailed, TrainingConfig, TransferClient
from transfer_service.domain import JobCompleted, JobEvent, JobRecord, JobState
from transfer_service.errors import NotFoundError, ResourceExhaustedError
from transfer_service.store.local import LocalStore

from tests.conftest import make_settings, start_server
from tests.datasets import fashion_mnist
from tests.unit.test_store import WEIGHTS, indexed_record


def disk_full(job: JobRecord, event: JobEvent) -> None:
    raise ResourceExhaustedError("the store's disk is full: simulated")


def test_a_refused_completion_leaves_no_head_and_fails_the_job(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    running = start_server(make_settings(tmp_path / "store", preload_backbones=[]))
    try:
        store = running.app.store
        monkeypatch.setattr(store._jobs, "finish_job", disk_full)
        with TransferClient(running.address, timeout=120) as client:
            events = list(
                client.fine_tune(
                    "efficientnet_lite0",
                    fashion_mnist(4, classes=2, seed=3),
                    head_name="doomed",
                    config=TrainingConfig(epochs=2, seed=1),
                )
            )
            ended = events[-1]
            assert isinstance(ended, JobFailed), ended
            assert ended.reason.startswith("the trained head could not be stored: ")
            assert ended.code == "RESOURCE_EXHAUSTED"
            assert client.list_heads() == []
        assert not any((tmp_path / "store" / "heads").iterdir())
    finally:
        running.stop()


def test_complete_job_removes_the_head_when_the_job_row_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = LocalStore(tmp_path)
    record = replace(indexed_record("cats-0001", 1), job_id="job-1")
    when = record.created_time
    job = JobRecord("job-1", JobState.SUCCEEDED, record.backbone, "cats", when, when)
    event = JobEvent("job-1", 1, when, JobCompleted(record.head_id, record.metrics))
    monkeypatch.setattr(store._jobs, "finish_job", disk_full)
    with pytest.raises(ResourceExhaustedError):
        store.complete_job(job, event, record, WEIGHTS)
    assert store.list_heads() == []
    with pytest.raises(NotFoundError):
        store.get_head("cats-0001")
    monkeypatch.undo()
    store.complete_job(job, event, record, WEIGHTS)  # the same commit, accepted
    assert [head.head_id for head in store.list_heads()] == ["cats-0001"]
    assert store.get_job("job-1").state is JobState.SUCCEEDED
    assert store.events_after("job-1", 0) == [event]
