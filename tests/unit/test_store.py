"""The local store: atomic heads, safe ids, no unpickling, durable jobs and datasets."""

from __future__ import annotations

import os
import pickle
import sqlite3
from dataclasses import replace
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


def indexed_record(
    head_id: str, minute: int, *, tenant: str = "acme", name: str = "cats"
) -> HeadRecord:
    return replace(
        record(head_id),
        tenant=tenant,
        name=name,
        created_time=datetime(2026, 1, 1, 0, minute, tzinfo=UTC),
    )


def test_a_listing_page_reads_only_its_heads_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ListHeads reads one page of head files through the SQLite index, not every head's
    JSON: with 40 heads stored, a page of 5 opens 5."""
    store = LocalStore(tmp_path)
    for minute in range(40):
        store.save_head(indexed_record(f"cats-{minute:04d}", minute), WEIGHTS)
    reads: list[str] = []
    real_get = store._heads.get_head

    def counted_get(head_id: str) -> HeadRecord:
        reads.append(head_id)
        return real_get(head_id)

    monkeypatch.setattr(store._heads, "get_head", counted_get)
    page = store.list_heads("acme", limit=5)
    assert [head.head_id for head in page] == [f"cats-{m:04d}" for m in range(5)]
    assert reads == [head.head_id for head in page]
    after = (page[-1].created_time, page[-1].head_id)
    assert [h.head_id for h in store.list_heads("acme", after=after, limit=2)] == [
        "cats-0005",
        "cats-0006",
    ]


def test_the_head_index_filters_and_is_rebuilt_from_the_files(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    store.save_head(indexed_record("cats-0001", 1), WEIGHTS)
    store.save_head(indexed_record("dogs-0002", 2, name="dogs"), WEIGHTS)
    store.save_head(indexed_record("cats-0003", 3, tenant="other"), WEIGHTS)
    assert [h.head_id for h in store.list_heads("acme", name="dogs")] == ["dogs-0002"]
    assert [h.head_id for h in store.list_heads(backbone="nope")] == []
    assert [h.head_id for h in store.list_heads()] == ["cats-0001", "dogs-0002", "cats-0003"]
    store.close()
    # A crash between a save's files and its index row, and one between a delete's files
    # and the row's removal: the next start repairs both from the files.
    with sqlite3.connect(tmp_path / "store.sqlite3") as db:
        db.execute("DELETE FROM heads WHERE head_id = 'dogs-0002'")
        db.execute(
            "INSERT INTO heads (head_id, tenant, name, backbone, created) "
            "VALUES ('gone-0009', 'acme', 'gone', 'x', '2026-01-01T00:09:00')"
        )
    db.close()
    reopened = LocalStore(tmp_path)
    assert [h.head_id for h in reopened.list_heads("acme")] == ["cats-0001", "dogs-0002"]
    with sqlite3.connect(tmp_path / "store.sqlite3") as db:
        rows = sorted(str(row[0]) for row in db.execute("SELECT head_id FROM heads"))
    db.close()
    assert rows == ["cats-0001", "cats-0003", "dogs-0002"]
    reopened.delete_head("cats-0001")
    assert [h.head_id for h in reopened.list_heads("acme")] == ["dogs-0002"]


def test_a_save_the_index_refuses_leaves_no_head(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = LocalStore(tmp_path)

    def refuse(record: HeadRecord) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(store._head_index, "add", refuse)
    with pytest.raises(OSError):
        store.save_head(indexed_record("cats-0001", 1), WEIGHTS)
    with pytest.raises(NotFoundError):
        store.get_head("cats-0001")
