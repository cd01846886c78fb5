"""The local store: atomic heads, safe ids, no unpickling, durable jobs and datasets."""

from __future__ import annotations

import os
import pickle
from datetime import UTC, datetime
from pathlib import Path

import pytest
import torch
from transfer_service.domain import (
    HeadRecord,
    JobEvent,
    JobFailed,
    JobRecord,
    JobState,
    LabeledExample,
    Modality,
    ModelInput,
    TrainingConfig,
    TrainingMetrics,
)
from transfer_service.errors import FailedPreconditionError, InvalidArgumentError, NotFoundError
from transfer_service.store.local import LocalStore


def record(head_id: str = "cats-1234") -> HeadRecord:
    return HeadRecord(
        head_id=head_id,
        name="cats",
        backbone="efficientnet_lite0",
        modality=Modality.IMAGE,
        class_names=("cat", "dog"),
        trainable_blocks=0,
        input_size=224,
        hidden_dim=0,
        metrics=TrainingMetrics(0.1, 0.9, 0.2, 0.8, 3, 5, True, 1.5),
        config=TrainingConfig(),
        created_time=datetime.now(UTC),
        size_bytes=24,
        job_id="job-1",
    )


WEIGHTS = {"classifier.weight": torch.randn(2, 3), "classifier.bias": torch.zeros(2)}


def test_head_round_trip(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    store.save_head(record(), WEIGHTS)
    loaded = store.get_head("cats-1234")
    assert loaded.class_names == ("cat", "dog") and loaded.metrics.best_epoch == 3
    weights = store.load_head_weights("cats-1234")
    torch.testing.assert_close(weights["classifier.weight"], WEIGHTS["classifier.weight"])
    assert [r.head_id for r in store.list_heads()] == ["cats-1234"]
    # A new process sees the same.
    store.close()
    assert LocalStore(tmp_path).get_head("cats-1234").head_id == "cats-1234"


def test_partial_save_is_never_listed_and_is_cleaned(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    partial = tmp_path / "heads" / ".partial-cats-1234-abcd"
    partial.mkdir(parents=True)
    (partial / "weights.safetensors").write_bytes(b"half a file")
    assert store.list_heads() == []
    with pytest.raises(NotFoundError):
        store.get_head("cats-1234")
    store.close()
    LocalStore(tmp_path)
    assert not partial.exists()


def test_failed_save_leaves_nothing(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    with pytest.raises(Exception):  # noqa: B017 - any failure inside safetensors
        store.save_head(record(), {"bad": "not a tensor"})  # type: ignore[dict-item]
    assert store.list_heads() == []
    assert list((tmp_path / "heads").iterdir()) == []


def test_ids_cannot_escape_the_store(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    for bad in ("../x", "a/b", "", ".hidden", "UPPER", "x" * 65):
        with pytest.raises(InvalidArgumentError, match="head_id"):
            store.get_head(bad)
    with pytest.raises(InvalidArgumentError):
        store.dataset_info("../../etc")


def test_a_planted_pickle_is_refused_without_running_it(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    store.save_head(record(), WEIGHTS)
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return (os.system, (f"touch {marker}",))

    (tmp_path / "heads" / "cats-1234" / "weights.safetensors").write_bytes(pickle.dumps(Exploit()))
    with pytest.raises(FailedPreconditionError, match="not a valid safetensors"):
        store.load_head_weights("cats-1234")
    assert not marker.exists()


def test_delete_head(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    store.save_head(record(), WEIGHTS)
    store.delete_head("cats-1234")
    assert store.list_heads() == []
    with pytest.raises(NotFoundError):
        store.delete_head("cats-1234")


def test_jobs_and_events_survive_reopen(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    now = datetime.now(UTC)
    job = JobRecord("job-1", JobState.RUNNING, "minilm_l6", "news", now, now)
    store.save_job(job)
    store.append_event(JobEvent("job-1", 1, now, JobFailed("boom", "INTERNAL")))
    store.close()
    reopened = LocalStore(tmp_path)
    assert reopened.get_job("job-1").state is JobState.RUNNING
    [event] = reopened.events_after("job-1", 0)
    assert event.payload == JobFailed("boom", "INTERNAL")
    assert reopened.events_after("job-1", 1) == []


def test_dataset_visible_only_after_commit(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    writer = store.begin_dataset("default")
    writer.add([LabeledExample(ModelInput(text="hello"), "a")])
    with pytest.raises(NotFoundError):
        store.dataset_info(writer.dataset_id)
    writer.add([LabeledExample(ModelInput(text="bye"), "b")])
    info = writer.commit()
    assert info.example_count == 2 and dict(info.class_counts) == {"a": 1, "b": 1}
    loaded_info = store.dataset_info(writer.dataset_id)
    examples = store.dataset_examples(loaded_info)
    assert loaded_info == info
    assert [e.input.text for e in examples] == ["hello", "bye"]


def test_an_interrupted_upload_is_dropped_on_restart(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    writer = store.begin_dataset("default")
    writer.add([LabeledExample(ModelInput(text="hello"), "a")])
    store.close()  # the process dies before commit
    reopened = LocalStore(tmp_path)
    with pytest.raises(NotFoundError):
        reopened.dataset_info(writer.dataset_id)
