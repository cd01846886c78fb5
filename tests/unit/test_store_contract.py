"""The store contract (store/interface.py), one suite run against both backends: LocalStore
(a temp dir) and PostgresStore (a fresh database on a real PostgreSQL, tests/postgres_server).
Whatever the rest of the server may rely on is asserted here for both: the same records back,
the same orderings, filters and pages, the same errors with the same messages."""

from __future__ import annotations

import contextlib
import dataclasses
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest
import torch
from transfer_service.domain import (
    ClaimedJob,
    DatasetInfo,
    FineTuneSpec,
    HeadRecord,
    JobCancelled,
    JobCompleted,
    JobEvent,
    JobFailed,
    JobQueued,
    JobRecord,
    JobState,
    JobWarning,
    LabeledExample,
    Modality,
    ModelInput,
    TrainingConfig,
    TrainingMetrics,
    TrainingProgress,
)
from transfer_service.errors import (
    FailedPreconditionError,
    InvalidArgumentError,
    LeaseLostError,
    NotFoundError,
    ResourceExhaustedError,
    UnavailableError,
    UnreadableHeadError,
)
from transfer_service.store.interface import LeaseRenewal, Store
from transfer_service.store.local import LocalStore
from transfer_service.store.pg_migrations import MIGRATION_LOCK, available_migrations, migrate
from transfer_service.store.postgres import PostgresStore

T0 = datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
WEIGHTS = {"classifier.weight": torch.randn(3, 4), "classifier.bias": torch.zeros(3)}
METRICS = TrainingMetrics(0.1, 0.9, 0.2, 0.8, 3, 5, True, 1.5)


@dataclass
class Backend:
    """A store under test, reopenable (a restart, or another replica), and the back doors
    that damage a stored head as a bad disk or a bad hand would."""

    name: str
    open: Callable[[], Store]
    damage_record: Callable[[str, str], None]
    damage_weights: Callable[[str, bytes], None]
    job_examples: Callable[[str], int]  # how many examples are stored for a job


def _local(root: Path) -> Backend:
    def damage_record(head_id: str, text: str) -> None:
        (root / "heads" / head_id / "head.json").write_text(text)

    def damage_weights(head_id: str, data: bytes) -> None:
        (root / "heads" / head_id / "weights.safetensors").write_bytes(data)

    def job_examples(job_id: str) -> int:
        with contextlib.closing(sqlite3.connect(root / "store.sqlite3")) as db:
            row = db.execute("SELECT count(*) FROM job_examples WHERE job_id = ?", (job_id,))
            return int(row.fetchone()[0])

    return Backend("local", lambda: LocalStore(root), damage_record, damage_weights, job_examples)


def _postgres(url: str) -> Backend:
    def update(column: str, head_id: str, value: object) -> None:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(
                f"UPDATE heads SET {column} = %s WHERE head_id = %s".encode(), (value, head_id)
            )

    def job_examples(job_id: str) -> int:
        with psycopg.connect(url, autocommit=True) as conn:
            row = conn.execute("SELECT count(*) FROM job_examples WHERE job_id = %s", (job_id,))
            found = row.fetchone()
            return int(found[0]) if found is not None else 0

    return Backend(
        "postgres",
        lambda: PostgresStore(url, max_connections=4),
        lambda head_id, text: update("record", head_id, text),
        lambda head_id, data: update("weights", head_id, data),
        job_examples,
    )


def head(
    head_id: str,
    *,
    tenant: str = "default",
    name: str = "cats",
    backbone: str = "efficientnet_lite0",
    created: datetime = T0,
    version: int = 0,
) -> HeadRecord:
    return HeadRecord(
        head_id=head_id,
        name=name,
        backbone=backbone,
        modality=Modality.IMAGE,
        class_names=("cat", "dog", "émeu"),
        trainable_blocks=0,
        input_size=224,
        hidden_dim=0,
        metrics=METRICS,
        config=TrainingConfig(epochs=3, seed=7),
        created_time=created,
        size_bytes=64,
        job_id="job-" + head_id,
        tenant=tenant,
        version=version,
    )


def job(
    job_id: str,
    *,
    tenant: str = "default",
    state: JobState = JobState.QUEUED,
    backbone: str = "efficientnet_lite0",
    name: str = "cats",
    created: datetime = T0,
) -> JobRecord:
    return JobRecord(
        job_id=job_id,
        state=state,
        backbone=backbone,
        head_name=name,
        created_time=created,
        updated_time=created,
        tenant=tenant,
    )


def event(job_id: str, sequence: int, payload: object | None = None) -> JobEvent:
    return JobEvent(
        job_id,
        sequence,
        T0 + timedelta(seconds=sequence),
        payload or JobQueued("efficientnet_lite0", "cats"),  # type: ignore[arg-type]
    )


def progress(step: int) -> TrainingProgress:
    return TrainingProgress(
        "train", 1, 3, step, 30, 0.5, 0.75, None, None, 3e-3, 120.0, 1.25, 9.5, False
    )


def image(label: str, size: int = 10) -> LabeledExample:
    return LabeledExample(ModelInput(image=bytes(range(size))), label)


# ---- heads ----


def test_a_head_round_trips_and_survives_a_restart(backend: Backend, store: Store) -> None:
    record = head("cats-1", version=store.reserve_head_version("default", "cats"))
    store.save_head(record, WEIGHTS)
    assert store.get_head("cats-1") == record
    for key, value in store.load_head_weights("cats-1").items():
        torch.testing.assert_close(value, WEIGHTS[key])
    assert store.list_heads() == [record]
    reopened = backend.open()
    try:
        assert reopened.get_head("cats-1") == record
        assert reopened.list_heads() == [record]
    finally:
        reopened.close()


def test_unknown_heads_are_not_found(store: Store) -> None:
    with pytest.raises(NotFoundError, match=r"^head_id: no head 'nope'$"):
        store.get_head("nope")
    with pytest.raises(NotFoundError, match=r"^head_id: no head 'nope'$"):
        store.load_head_weights("nope")
    with pytest.raises(NotFoundError, match=r"^head_id: no head 'nope'$"):
        store.delete_head("nope")


def test_a_failed_save_leaves_nothing(store: Store) -> None:
    with pytest.raises(Exception):  # noqa: B017 - whatever safetensors raises
        store.save_head(head("cats-1"), {"bad": "not a tensor"})  # type: ignore[dict-item]
    assert store.list_heads() == []
    with pytest.raises(NotFoundError):
        store.get_head("cats-1")


def test_a_deleted_head_is_gone(store: Store) -> None:
    store.save_head(head("cats-1"), WEIGHTS)
    store.save_head(head("cats-2"), WEIGHTS)
    store.delete_head("cats-1")
    with pytest.raises(NotFoundError):
        store.get_head("cats-1")
    with pytest.raises(NotFoundError):
        store.load_head_weights("cats-1")
    assert [r.head_id for r in store.list_heads()] == ["cats-2"]


def test_list_heads_orders_filters_and_pages(store: Store) -> None:
    # Saved out of order; two share a creation time (ties by id, byte order: "-" < "." < "_").
    records = [
        head("h_c", created=T0 + timedelta(seconds=2), tenant="acme"),
        head("h-b", created=T0 + timedelta(seconds=1), backbone="minilm_l6", name="news"),
        head("h.b", created=T0 + timedelta(seconds=1), tenant="acme", name="dogs"),
        head("h-a", created=T0),
        head("h-d", created=T0 + timedelta(seconds=3), tenant="acme", backbone="minilm_l6"),
    ]
    for record in records:
        store.save_head(record, WEIGHTS)
    ordered = ["h-a", "h-b", "h.b", "h_c", "h-d"]

    def ids(found: list[HeadRecord]) -> list[str]:
        return [record.head_id for record in found]

    assert ids(store.list_heads()) == ordered
    assert ids(store.list_heads("acme")) == ["h.b", "h_c", "h-d"]
    assert ids(store.list_heads(backbone="minilm_l6")) == ["h-b", "h-d"]
    assert ids(store.list_heads(name="cats")) == ["h-a", "h_c", "h-d"]
    assert ids(store.list_heads("acme", backbone="minilm_l6", name="cats")) == ["h-d"]
    assert store.list_heads("nobody") == []
    assert ids(store.list_heads(limit=2)) == ["h-a", "h-b"]
    by_id = {record.head_id: record for record in records}
    assert ids(store.list_heads(after=(by_id["h-b"].created_time, "h-b"), limit=2)) == [
        "h.b",
        "h_c",
    ]
    assert ids(store.list_heads("acme", after=(by_id["h.b"].created_time, "h.b"))) == [
        "h_c",
        "h-d",
    ]
    # Walking pages of one visits every head once, in order.
    walked: list[str] = []
    after: tuple[datetime, str] | None = None
    while page := store.list_heads(after=after, limit=1):
        walked += ids(page)
        after = (page[-1].created_time, page[-1].head_id)
    assert walked == ordered


def test_a_damaged_head_record_is_unreadable_names_its_owner_and_is_not_listed(
    backend: Backend, store: Store
) -> None:
    store.save_head(head("cats-1", tenant="acme"), WEIGHTS)
    store.save_head(head("cats-2", tenant="acme", created=T0 + timedelta(seconds=1)), WEIGHTS)
    backend.damage_record("cats-1", '{"format_version": 1, "head_id": 3')
    with pytest.raises(UnreadableHeadError, match="metadata unreadable") as caught:
        store.get_head("cats-1")
    assert caught.value.owner == "acme"
    with pytest.raises(UnreadableHeadError):
        store.load_head_weights("cats-1")
    assert [r.head_id for r in store.list_heads()] == ["cats-2"]
    assert [r.head_id for r in store.list_heads("acme", limit=5)] == ["cats-2"]
    store.delete_head("cats-1")  # its owner can still delete it
    with pytest.raises(NotFoundError):
        store.get_head("cats-1")


def test_a_head_record_filed_under_another_id_is_unreadable(backend: Backend, store: Store) -> None:
    from transfer_service.store.codec import head_to_json

    store.save_head(head("cats-1"), WEIGHTS)
    backend.damage_record("cats-1", head_to_json(head("cats-9")))
    with pytest.raises(UnreadableHeadError, match="names another head"):
        store.get_head("cats-1")


def test_a_damaged_head_never_shortens_a_page(backend: Backend, store: Store) -> None:
    """A page of `limit` past a damaged head is still full: ListHeads reads limit + 1 to tell
    whether another page follows, so a short page would hide every head after it."""
    for n in range(4):
        store.save_head(head(f"cats-{n}", created=T0 + timedelta(seconds=n)), WEIGHTS)
    backend.damage_record("cats-1", "not json")
    assert [r.head_id for r in store.list_heads(limit=2)] == ["cats-0", "cats-2"]


@pytest.mark.parametrize(
    "data, problem",
    [
        (b"\x80\x04\x95 a planted pickle", "not a valid safetensors file"),
        (None, "fail their checksum"),
    ],
)
def test_damaged_weights_fail_loudly(
    backend: Backend, store: Store, data: bytes | None, problem: str
) -> None:
    from safetensors.torch import save

    store.save_head(head("cats-1"), WEIGHTS)
    if data is None:  # still a valid safetensors file, of other values
        data = save({key: value + 1 for key, value in WEIGHTS.items()})
    backend.damage_weights("cats-1", data)
    with pytest.raises(FailedPreconditionError, match=problem):
        store.load_head_weights("cats-1")
    assert store.get_head("cats-1").head_id == "cats-1"  # the record is fine


@pytest.mark.parametrize("bad_id", ["../etc", "Cats", "", "a/b", "x" * 65])
def test_ids_are_checked(store: Store, bad_id: str) -> None:
    calls: list[Callable[[], object]] = [
        lambda: store.get_head(bad_id),
        lambda: store.load_head_weights(bad_id),
        lambda: store.delete_head(bad_id),
        lambda: store.save_head(head(bad_id), WEIGHTS),
        lambda: store.get_job(bad_id),
        lambda: store.dataset_info(bad_id),
        lambda: store.delete_dataset(bad_id),
    ]
    for call in calls:
        with pytest.raises(InvalidArgumentError, match="is not a valid id"):
            call()


# ---- jobs ----


def test_a_job_round_trips_and_is_replaced(backend: Backend, store: Store) -> None:
    record = job("job-1", tenant="acme")
    store.save_job(record)
    assert store.get_job("job-1") == record
    running = dataclasses.replace(
        record,
        state=JobState.RUNNING,
        updated_time=T0 + timedelta(seconds=5),
        last_sequence=4,
        progress=progress(12),
        error="",
    )
    store.save_job(running)
    reopened = backend.open()
    try:
        assert reopened.get_job("job-1") == running
    finally:
        reopened.close()
    with pytest.raises(NotFoundError, match=r"^job_id: no job 'job-2'$"):
        store.get_job("job-2")


def test_list_jobs_orders_filters_and_pages(store: Store) -> None:
    jobs = [
        job("j-c", created=T0 + timedelta(seconds=2), tenant="acme", state=JobState.RUNNING),
        job("j-b", created=T0 + timedelta(seconds=1), backbone="minilm_l6", name="news"),
        job("j.b", created=T0 + timedelta(seconds=1), tenant="acme", name="dogs"),
        job("j-a", created=T0, state=JobState.SUCCEEDED),
    ]
    for record in jobs:
        store.save_job(record)

    def ids(found: list[JobRecord]) -> list[str]:
        return [record.job_id for record in found]

    assert ids(store.list_jobs()) == ["j-a", "j-b", "j.b", "j-c"]
    assert ids(store.list_jobs("acme")) == ["j.b", "j-c"]
    assert ids(store.list_jobs(state=JobState.QUEUED)) == ["j-b", "j.b"]
    assert ids(store.list_jobs(backbone="minilm_l6")) == ["j-b"]
    assert ids(store.list_jobs(name="cats")) == ["j-a", "j-c"]
    assert ids(store.list_jobs("acme", state=JobState.RUNNING, name="cats")) == ["j-c"]
    assert ids(store.list_jobs(after=(T0 + timedelta(seconds=1), "j-b"), limit=1)) == ["j.b"]
    assert ids(store.list_jobs(after=(T0 + timedelta(seconds=2), "j-c"))) == []


def test_events_replay_after_a_cursor(store: Store) -> None:
    store.save_job(job("job-1"))
    for sequence in (1, 2, 3):
        store.append_event(event("job-1", sequence))
    store.append_event(event("job-2", 1))
    assert [e.sequence for e in store.events_after("job-1", 0)] == [1, 2, 3]
    assert [e.sequence for e in store.events_after("job-1", 2)] == [3]
    assert store.events_after("job-1", 2**64 - 1) == []
    assert store.events_after("nobody", 0) == []
    assert store.events_after("job-1", 0)[0] == event("job-1", 1)


def test_progress_is_stored_with_or_without_its_job_row(store: Store) -> None:
    store.save_job(job("job-1", state=JobState.RUNNING))
    store.append_progress(event("job-1", 1, progress(1)), None)
    assert store.get_job("job-1").progress is None
    later = dataclasses.replace(
        job("job-1", state=JobState.RUNNING), last_sequence=2, progress=progress(2)
    )
    store.append_progress(event("job-1", 2, progress(2)), later)
    assert store.get_job("job-1") == later
    assert [e.payload for e in store.events_after("job-1", 0)] == [progress(1), progress(2)]


def test_finish_job_is_atomic(store: Store) -> None:
    running = dataclasses.replace(job("job-1", state=JobState.RUNNING), last_sequence=1)
    store.save_job(running)
    store.append_event(event("job-1", 1))
    done = dataclasses.replace(running, state=JobState.SUCCEEDED, head_id="h-1", last_sequence=2)
    # An event whose sequence is already taken cannot be appended: neither is the row saved.
    with pytest.raises(Exception):  # noqa: B017 - the backend's integrity error
        store.finish_job(done, event("job-1", 1, JobCompleted("h-1", METRICS)))
    assert store.get_job("job-1") == running
    assert len(store.events_after("job-1", 0)) == 1
    store.finish_job(done, event("job-1", 2, JobCompleted("h-1", METRICS)))
    assert store.get_job("job-1") == done
    assert store.events_after("job-1", 1)[0].payload == JobCompleted("h-1", METRICS)


def test_complete_job_commits_head_row_and_event_together(store: Store) -> None:
    running = dataclasses.replace(job("job-1", state=JobState.RUNNING), last_sequence=1)
    store.save_job(running)
    store.append_event(event("job-1", 1))
    record = head("h-1", version=store.reserve_head_version("default", "cats"))
    done = dataclasses.replace(running, state=JobState.SUCCEEDED, head_id="h-1", last_sequence=2)
    # A refused event (its sequence is taken): no head, no SUCCEEDED row.
    with pytest.raises(Exception):  # noqa: B017 - the backend's integrity error
        store.complete_job(done, event("job-1", 1, JobCompleted("h-1", METRICS)), record, WEIGHTS)
    assert store.list_heads() == []
    with pytest.raises(NotFoundError):
        store.get_head("h-1")
    assert store.get_job("job-1") == running
    store.complete_job(done, event("job-1", 2, JobCompleted("h-1", METRICS)), record, WEIGHTS)
    assert store.list_heads() == [record]
    assert store.load_head_weights("h-1").keys() == WEIGHTS.keys()
    assert store.get_job("job-1") == done
    assert store.events_after("job-1", 1)[0].payload == JobCompleted("h-1", METRICS)
    assert store.unsettled_jobs() == []


def test_unsettled_jobs_are_those_recovery_must_settle(store: Store) -> None:
    def finished(job_id: str, terminal_at: int | None, last_sequence: int = 2) -> None:
        record = dataclasses.replace(
            job(job_id, state=JobState.FAILED), last_sequence=last_sequence
        )
        store.save_job(record)
        store.append_event(event(job_id, 1))
        if terminal_at is not None:
            store.append_event(event(job_id, terminal_at, JobFailed("boom", "INTERNAL")))

    store.save_job(job("queued"))
    store.save_job(job("running", state=JobState.RUNNING))
    finished("settled", terminal_at=2)
    finished("no-end", terminal_at=None)
    finished("stale-end", terminal_at=2, last_sequence=3)
    assert sorted(r.job_id for r in store.unsettled_jobs()) == [
        "no-end",
        "queued",
        "running",
        "stale-end",
    ]


def test_retention_deletes_only_jobs_finished_before_the_cutoff(store: Store) -> None:
    old, new = T0, T0 + timedelta(days=10)
    for job_id, state, updated in [
        ("old-done", JobState.SUCCEEDED, old),
        ("old-failed", JobState.FAILED, old),
        ("old-running", JobState.RUNNING, old),
        ("new-done", JobState.SUCCEEDED, new),
    ]:
        store.save_job(dataclasses.replace(job(job_id, state=state), updated_time=updated))
        store.append_event(event(job_id, 1))
    assert store.delete_finished_jobs(T0 + timedelta(days=1)) == 2
    assert sorted(r.job_id for r in store.list_jobs()) == ["new-done", "old-running"]
    assert store.events_after("old-done", 0) == []
    assert len(store.events_after("new-done", 0)) == 1
    with pytest.raises(NotFoundError):
        store.get_job("old-failed")


# ---- datasets ----


def test_a_dataset_is_visible_only_once_committed(store: Store) -> None:
    examples = [
        image("cat", 12),
        image("dog\x00", 7),  # a NUL in a label is just a character
        image("émeu"),
    ]
    writer = store.begin_dataset("acme")
    writer.add(examples[:2])
    writer.add(examples[2:])
    assert store.dataset_bytes("acme") == 12 + 3 + 7 + 4 + 10 + 5  # counted before commit
    info = writer.commit()
    assert info.example_count == 3 and info.tenant == "acme"
    assert info.class_counts == (("cat", 1), ("dog\x00", 1), ("émeu", 1))
    assert store.dataset_info(info.dataset_id) == info
    assert store.dataset_examples(info) == examples
    texts = [LabeledExample(ModelInput(text="héllo\x00 there"), "greeting")]
    text_writer = store.begin_dataset("acme")
    text_writer.add(texts)
    with pytest.raises(NotFoundError, match="no dataset"):
        store.dataset_info(getattr(text_writer, "dataset_id", "ds-unknown"))
    text_info = text_writer.commit()
    assert text_info.modality is Modality.TEXT
    assert store.dataset_examples(store.dataset_info(text_info.dataset_id)) == texts


def test_an_aborted_upload_leaves_nothing(store: Store) -> None:
    writer = store.begin_dataset("acme")
    writer.add([image("cat")])
    writer.abort()
    assert store.dataset_bytes("acme") == 0
    with pytest.raises(NotFoundError):
        store.dataset_info(getattr(writer, "dataset_id", "ds-unknown"))


def test_an_empty_upload_cannot_be_committed(store: Store) -> None:
    with pytest.raises(InvalidArgumentError, match="the uploaded dataset is empty"):
        store.begin_dataset("acme").commit()


def test_the_quota_counts_every_upload_of_the_tenant(store: Store) -> None:
    first = store.begin_dataset("acme", quota_bytes=100)
    first.add([image("a", 39)])  # 40 bytes
    second = store.begin_dataset("acme", quota_bytes=100)
    second.add([image("b", 39)])  # 80 in all, uploads in progress included
    with pytest.raises(ResourceExhaustedError, match="quota of 100 bytes") as caught:
        second.add([image("c", 39)])
    assert "80 in use" in caught.value.message
    assert store.dataset_bytes("acme") == 80  # the refused chunk left nothing
    store.begin_dataset("other", quota_bytes=100).add([image("d", 99)])  # another tenant's
    info = second.commit()
    assert info.example_count == 1  # the writer is as it was before the refused chunk
    first.abort()
    second_more = store.begin_dataset("acme", quota_bytes=100)
    second_more.add([image("e", 59)])  # 40 freed by the abort
    assert store.dataset_bytes("acme") == 100


def test_a_deleted_dataset_is_gone(store: Store) -> None:
    writer = store.begin_dataset("acme")
    writer.add([image("cat"), image("dog")])
    info = writer.commit()
    store.delete_dataset(info.dataset_id)
    assert store.dataset_bytes("acme") == 0
    with pytest.raises(NotFoundError, match=rf"^dataset_id: no dataset '{info.dataset_id}'$"):
        store.dataset_info(info.dataset_id)
    with pytest.raises(NotFoundError, match="no dataset"):
        store.dataset_examples(info)  # read after its info: deleted since
    with pytest.raises(NotFoundError, match="no dataset"):
        store.delete_dataset(info.dataset_id)


def test_an_upload_in_progress_cannot_be_deleted(store: Store) -> None:
    writer = store.begin_dataset("acme")
    writer.add([image("cat")])
    dataset_id = getattr(writer, "dataset_id", "ds-unknown")
    with pytest.raises(NotFoundError):
        store.delete_dataset(dataset_id)
    info = writer.commit()
    assert store.dataset_info(dataset_id) == info
    assert isinstance(info, DatasetInfo)


# ---- PostgreSQL only: an unreachable database, migrations, replicas sharing one ----


def test_an_unreachable_database_is_unavailable() -> None:
    from tests.postgres_server import free_port

    url = f"postgresql://postgres@127.0.0.1:{free_port()}/nothing"  # nobody listens there
    with pytest.raises(UnavailableError, match="database is unreachable"):
        PostgresStore(url, timeout=1, connect_timeout=1)


def test_a_database_gone_mid_life_is_unavailable(postgres_server: object) -> None:
    from tests.postgres_server import PostgresServer

    assert isinstance(postgres_server, PostgresServer)
    url = postgres_server.create_database()
    store = PostgresStore(url, timeout=1, connect_timeout=1)
    try:
        store.save_head(head("cats-1"), WEIGHTS)
        postgres_server.drop_database(url)  # its connections are closed with it
        for call in (
            lambda: store.get_head("cats-1"),
            lambda: store.list_heads(),
            lambda: store.save_job(job("job-1")),
            lambda: store.begin_dataset("acme"),
        ):
            with pytest.raises(UnavailableError, match="database is unreachable"):
                call()
    finally:
        store.close()


def test_replicas_starting_together_migrate_once(database_url: str) -> None:
    """Two replicas migrate an empty database at once: the second waits on the migration
    lock, then finds every version applied. The test holds the lock until both wait on it."""
    holder = psycopg.connect(database_url)
    holder.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
    results: list[list[int]] = []
    errors: list[BaseException] = []

    def replica() -> None:
        try:
            with psycopg.connect(database_url) as conn:
                results.append(migrate(conn))
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=replica) for _ in range(2)]
    for thread in threads:
        thread.start()
    with psycopg.connect(database_url, autocommit=True) as watcher:
        deadline = time.monotonic() + 30
        while True:
            waiting = watcher.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                "AND wait_event = 'advisory' AND datname = current_database()"
            ).fetchone()
            if waiting is not None and waiting[0] == 2:
                break
            assert time.monotonic() < deadline, "the replicas never waited on the lock"
            time.sleep(0.05)
    holder.rollback()  # releases the lock
    holder.close()
    for thread in threads:
        thread.join(timeout=60)
    assert errors == []
    everything = [migration.version for migration in available_migrations()]
    assert sorted(results) == [[], everything]
    with psycopg.connect(database_url) as conn:
        rows = conn.execute("SELECT version FROM schema_migrations ORDER BY version").fetchall()
        assert [row[0] for row in rows] == everything
        assert conn.execute("SELECT count(*) FROM heads").fetchone() == (0,)
    # A later start migrates nothing.
    PostgresStore(database_url).close()
    with psycopg.connect(database_url) as conn:
        assert conn.execute("SELECT count(*) FROM schema_migrations").fetchone() == (
            len(everything),
        )


def test_two_replicas_cannot_both_fill_the_room_left_for_one(database_url: str) -> None:
    replicas = [PostgresStore(database_url), PostgresStore(database_url)]
    try:
        writers = [r.begin_dataset("acme", quota_bytes=100) for r in replicas]
        start = threading.Barrier(2)
        outcomes: list[str] = []

        def upload(index: int) -> None:
            start.wait()
            try:
                writers[index].add([image("x", 59)])  # 60 bytes: room for one of the two
                outcomes.append("stored")
            except ResourceExhaustedError:
                outcomes.append("refused")

        threads = [threading.Thread(target=upload, args=(i,)) for i in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
        assert sorted(outcomes) == ["refused", "stored"]
        assert replicas[1].dataset_bytes("acme") == 60
    finally:
        for replica in replicas:
            replica.close()


def test_a_start_removes_only_abandoned_uploads(database_url: str) -> None:
    store = PostgresStore(database_url)
    stale, live = store.begin_dataset("acme"), store.begin_dataset("acme")
    stale.add([image("a")])
    live.add([image("b")])
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(
            "UPDATE datasets SET touched = now() - interval '2 hours' WHERE dataset_id = %s",
            (getattr(stale, "dataset_id", ""),),
        )
    PostgresStore(database_url).close()  # another replica starting
    assert store.dataset_bytes("acme") == 11  # the live upload's, still streaming
    with pytest.raises(FailedPreconditionError, match="upload again"):
        stale.add([image("c")])
    assert live.commit().example_count == 1
    store.close()


def test_only_expired_leases_are_abandoned_while_replicas_run(store: Store) -> None:
    """With `abandoned_before`, recovery sees only unfinished jobs nobody holds: on a store
    with leases those whose lease ran out, on the embedded store (one process runs every job)
    none. Without it, every unfinished job (the start of the embedded store's only process)."""
    now = datetime.now(UTC)
    enqueue(store, "job-held")
    enqueue(store, "job-expired", created=T0 + timedelta(seconds=1))
    assert claim(store, "replica-a", now + timedelta(seconds=30)).record.job_id == "job-held"
    assert claim(store, "replica-b", now - timedelta(seconds=1)).record.job_id == "job-expired"
    later = [j.job_id for j in store.unsettled_jobs(now)]
    assert later == (["job-expired"] if store.holds_leases else [])
    assert sorted(j.job_id for j in store.unsettled_jobs()) == ["job-expired", "job-held"]
    # A finished job is never held again.
    store.save_job(job("job-done", state=JobState.FAILED))
    renewal = store.hold_jobs("replica-a", ["job-done"], now + timedelta(seconds=30))
    assert renewal == LeaseRenewal(lost=["job-done"])
    assert store.get_job("job-done").state is JobState.FAILED


def test_recovery_while_replicas_run_reads_no_job_waiting_in_the_queue(store: Store) -> None:
    """With `abandoned_before`, a queued job no process has claimed (or one released back to
    the queue) holds no lease, so it is not returned: recovery would only skip it, and the
    queue may be long. Only the expired lease's job and the finished log without its end."""
    now = datetime.now(UTC)
    for index in range(40):
        enqueue(store, f"job-{index:02d}", created=T0 + timedelta(seconds=index))
    run = dataclasses.replace(claim(store, "replica-a").record, state=JobState.RUNNING)
    assert run.job_id == "job-00"
    assert claim(store, "replica-b").record.job_id == "job-01"
    store.save_job(run)
    stopping = event("job-00", 2, JobWarning("SERVER_STOPPING", "the server is stopping"))
    store.release_job(dataclasses.replace(run, last_sequence=2), stopping)
    store.hold_jobs("replica-b", ["job-01"], now - timedelta(seconds=1))  # then it died
    store.save_job(dataclasses.replace(job("no-end", state=JobState.FAILED), last_sequence=2))
    store.append_event(event("no-end", 1))
    later = sorted(j.job_id for j in store.unsettled_jobs(now))
    assert later == (["job-01", "no-end"] if store.holds_leases else ["no-end"])
    assert len(store.unsettled_jobs()) == 41  # at its only process's start: all of them


def test_a_cancel_request_reaches_the_lease_holder(store: Store) -> None:
    """CancelJob on a process that does not hold the job: recorded in the store and returned
    to the holder by its next renewal."""
    until = datetime.now(UTC) + timedelta(seconds=30)
    enqueue(store, "job-run")
    claim(store, "replica-a", until)
    assert store.hold_jobs("replica-a", ["job-run"], until) == LeaseRenewal()
    assert store.request_cancel("job-run", cancel_event("job-run")) is None
    assert store.get_job("job-run").state is JobState.QUEUED  # its holder ends it
    assert store.hold_jobs("replica-a", ["job-run"], until) == LeaseRenewal(
        cancel_requested=["job-run"]
    )
    # Another process's heartbeat holds nothing of it.
    assert store.hold_jobs("replica-b", ["job-run"], until) == LeaseRenewal(lost=["job-run"])


# ---- the job queue ----


def spec(tenant: str = "default", **changes: object) -> FineTuneSpec:
    base = FineTuneSpec(
        backbone="efficientnet_lite0",
        head_name="cats",
        examples=(image("cat", 12), image("dog\x00", 7), image("émeu")),
        config=TrainingConfig(epochs=3, seed=7, head_type="mlp"),
        tenant=tenant,
    )
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


def enqueue(
    store: Store,
    job_id: str,
    *,
    tenant: str = "default",
    created: datetime = T0,
    max_unfinished: int = 100,
    key: str = "",
    digest: str = "",
    job_spec: FineTuneSpec | None = None,
) -> JobRecord:
    return store.enqueue_job(
        job(job_id, tenant=tenant, created=created),
        event(job_id, 1),
        job_spec or spec(tenant),
        max_unfinished=max_unfinished,
        request_key=key,
        request_digest=digest,
    )


def claim(store: Store, owner: str = "replica-a", until: datetime | None = None) -> ClaimedJob:
    claimed = store.claim_job(owner, until or datetime.now(UTC) + timedelta(seconds=30))
    assert claimed is not None, "nothing was claimable"
    return claimed


def cancel_event(job_id: str, sequence: int = 99) -> JobEvent:
    return event(job_id, sequence, JobCancelled("cancelled by the caller"))


def test_a_queued_job_round_trips_through_a_claim(backend: Backend, store: Store) -> None:
    texts = (
        LabeledExample(ModelInput(text="héllo\x00 there"), "greeting\x00"),
        LabeledExample(ModelInput(text=""), "empty"),
    )
    queued_spec = spec(
        "acme",
        examples=(*spec().examples, *texts),
        validation_examples=(image("cat", 3), image("dog\x00", 0)),
        candidate_backbones=("efficientnet_lite0", "mobilenet_v3"),
    )
    stored = enqueue(store, "job-1", tenant="acme", job_spec=queued_spec)
    assert stored == job("job-1", tenant="acme")
    assert store.get_job("job-1") == stored and stored.attempt == 0
    assert store.list_jobs("acme") == [stored]
    assert store.events_after("job-1", 0) == [event("job-1", 1)]
    assert backend.job_examples("job-1") == 7
    claimed = claim(store)
    assert claimed.spec == queued_spec
    assert claimed.record == dataclasses.replace(stored, attempt=1, last_sequence=1)
    assert store.get_job("job-1").attempt == 1  # read back from the store
    assert store.claim_job("replica-b", datetime.now(UTC) + timedelta(seconds=30)) is None
    # A row stored without the queue (older code) is claimed without a spec.
    store.save_job(job("job-old", created=T0 + timedelta(seconds=1)))
    old = claim(store)
    assert old.record.job_id == "job-old" and old.spec is None and old.record.attempt == 1


def test_the_quota_counts_the_tenants_queued_and_running_jobs(store: Store) -> None:
    enqueue(store, "job-1", tenant="acme", max_unfinished=2)
    enqueue(store, "job-2", tenant="acme", max_unfinished=2)
    claim(store)  # running counts as much as queued
    with pytest.raises(
        ResourceExhaustedError,
        match=r"^jobs: 2 jobs already queued or running for this tenant; wait for one to "
        "finish or cancel one$",
    ):
        enqueue(store, "job-3", tenant="acme", max_unfinished=2)
    with pytest.raises(NotFoundError):
        store.get_job("job-3")
    assert store.events_after("job-3", 0) == []
    enqueue(store, "job-4", tenant="other", max_unfinished=2)  # another tenant's room
    assert store.request_cancel("job-2", cancel_event("job-2")) is not None
    enqueue(store, "job-3", tenant="acme", max_unfinished=2)  # a finished job frees room


def test_a_request_key_finds_its_job_again(backend: Backend, store: Store) -> None:
    first = enqueue(store, "job-1", tenant="acme", key="req-1", digest="d1")
    again = enqueue(store, "job-2", tenant="acme", key="req-1", digest="d1")
    assert again == first
    with pytest.raises(NotFoundError):
        store.get_job("job-2")
    assert backend.job_examples("job-2") == 0
    # The job as it is now, not as it was queued.
    claimed = claim(store)
    current = store.get_job("job-1")
    assert current.attempt == claimed.record.attempt == 1
    assert enqueue(store, "job-2", tenant="acme", key="req-1", digest="d1") == current
    with pytest.raises(
        FailedPreconditionError,
        match="request_id: 'req-1' was already used for a different FineTune request",
    ):
        enqueue(store, "job-3", tenant="acme", key="req-1", digest="d2")
    with pytest.raises(NotFoundError):
        store.get_job("job-3")
    # Keys are per tenant; and no key is no key.
    assert enqueue(store, "job-4", tenant="beta", key="req-1", digest="d2").job_id == "job-4"
    assert enqueue(store, "job-5", tenant="acme").job_id == "job-5"
    assert enqueue(store, "job-6", tenant="acme").job_id == "job-6"


def test_claims_go_to_the_tenant_running_fewest_then_to_the_oldest(store: Store) -> None:
    enqueue(store, "a-1", tenant="acme", created=T0)
    enqueue(store, "a-2", tenant="acme", created=T0 + timedelta(seconds=1))
    enqueue(store, "a-3", tenant="acme", created=T0 + timedelta(seconds=2))
    enqueue(store, "b-1", tenant="beta", created=T0 + timedelta(seconds=3))
    enqueue(store, "b-0", tenant="beta", created=T0 + timedelta(seconds=3))  # a tie: by id
    order = [claim(store).record for _ in range(5)]
    # acme runs one, so beta goes next; then one each; then acme's last.
    assert [r.job_id for r in order] == ["a-1", "b-0", "a-2", "b-1", "a-3"]
    assert {r.attempt for r in order} == {1}
    assert store.claim_job("replica-a", datetime.now(UTC) + timedelta(seconds=30)) is None


def test_an_expired_lease_hands_the_job_to_a_later_run_and_fences_the_old_one(
    backend: Backend, store: Store
) -> None:
    enqueue(store, "job-1")
    # Run 1's lease runs out at once (its process stalled).
    first = claim(store, "replica-a", datetime.now(UTC) - timedelta(seconds=1))
    run1 = dataclasses.replace(first.record, state=JobState.RUNNING, last_sequence=2)
    store.save_job(run1)
    store.append_event(event("job-1", 2), attempt=1)
    store.append_progress(event("job-1", 3, progress(3)), None, attempt=1)  # row not moved
    second = claim(store, "replica-b")
    assert second.record == dataclasses.replace(run1, attempt=2, last_sequence=3)
    assert second.spec == spec()
    # Run 1 writes nothing more, whatever it tries.
    stale_done = dataclasses.replace(run1, state=JobState.SUCCEEDED, head_id="h-1", last_sequence=4)
    completed = event("job-1", 4, JobCompleted("h-1", METRICS))
    stale_writes: list[Callable[[], object]] = [
        lambda: store.save_job(dataclasses.replace(run1, progress=progress(9))),
        lambda: store.append_event(event("job-1", 4), attempt=1),
        lambda: store.append_progress(event("job-1", 4, progress(4)), None, attempt=1),
        lambda: store.append_progress(event("job-1", 4, progress(4)), run1),
        lambda: store.finish_job(stale_done, completed),
        lambda: store.complete_job(stale_done, completed, head("h-1"), WEIGHTS),
        lambda: store.release_job(run1, event("job-1", 4, JobWarning("STOPPING", "bye"))),
    ]
    for write in stale_writes:
        with pytest.raises(LeaseLostError, match="run 1 no longer holds the job"):
            write()
    assert store.get_job("job-1") == dataclasses.replace(run1, attempt=2)
    assert [e.sequence for e in store.events_after("job-1", 0)] == [1, 2, 3]
    assert store.list_heads() == []
    with pytest.raises(NotFoundError):
        store.get_head("h-1")
    assert backend.job_examples("job-1") == 3
    # Run 2 holds it: its writes apply, and its end deletes the stored examples.
    run2 = dataclasses.replace(second.record, state=JobState.RUNNING)
    store.append_event(event("job-1", 4), attempt=2)
    store.complete_job(
        dataclasses.replace(run2, state=JobState.SUCCEEDED, head_id="h-1", last_sequence=5),
        event("job-1", 5, JobCompleted("h-1", METRICS)),
        head("h-1"),
        WEIGHTS,
    )
    assert store.get_job("job-1").state is JobState.SUCCEEDED
    assert backend.job_examples("job-1") == 0
    # Finished: even its own run's writes are refused now.
    with pytest.raises(LeaseLostError):
        store.append_event(event("job-1", 6), attempt=2)


def test_finish_job_deletes_the_stored_examples(backend: Backend, store: Store) -> None:
    enqueue(store, "job-1")
    run = claim(store).record
    assert backend.job_examples("job-1") == 3
    failed = dataclasses.replace(run, state=JobState.FAILED, error="boom", last_sequence=2)
    store.finish_job(failed, event("job-1", 2, JobFailed("boom", "INTERNAL")))
    assert store.get_job("job-1") == failed
    assert backend.job_examples("job-1") == 0
    # Retention takes whatever a finished job still had (rows of older code's runs).
    enqueue(store, "job-2", created=T0 + timedelta(seconds=1))
    store.save_job(dataclasses.replace(job("job-2", state=JobState.CANCELLED)))
    assert backend.job_examples("job-2") == 3
    assert store.delete_finished_jobs(datetime.now(UTC)) == 2
    assert backend.job_examples("job-2") == 0


def test_a_released_job_is_queued_again_at_its_attempt_count(store: Store) -> None:
    enqueue(store, "job-1")
    run = dataclasses.replace(claim(store).record, state=JobState.RUNNING, last_sequence=2)
    store.save_job(run)
    stopping = event("job-1", 3, JobWarning("SERVER_STOPPING", "the server is stopping"))
    store.release_job(dataclasses.replace(run, last_sequence=3), stopping)
    released = store.get_job("job-1")
    assert released == dataclasses.replace(run, state=JobState.QUEUED, last_sequence=3, attempt=0)
    assert store.events_after("job-1", 2) == [stopping]
    again = claim(store, "replica-b")
    assert again.record.attempt == 1 and again.record.last_sequence == 3
    assert again.spec == spec()
    with pytest.raises(LeaseLostError):  # a run that never held it
        store.release_job(dataclasses.replace(run, attempt=5), stopping)


def test_abandon_leases_frees_every_job_of_the_embedded_store(store: Store) -> None:
    enqueue(store, "job-1")
    held = claim(store).record
    store.abandon_leases()
    if store.holds_leases:  # replicas share it: a start cannot tell whose leases are dead
        assert store.claim_job("replica-b", datetime.now(UTC) + timedelta(seconds=30)) is None
        return
    again = claim(store, "replica-b")
    assert again.record.job_id == held.job_id and again.record.attempt == 2  # count kept


def test_hold_jobs_renews_and_reports_what_was_lost(store: Store) -> None:
    now = datetime.now(UTC)
    enqueue(store, "job-1")
    enqueue(store, "job-2", created=T0 + timedelta(seconds=1))
    enqueue(store, "job-3", created=T0 + timedelta(seconds=2))
    assert claim(store, "replica-a", now + timedelta(seconds=30)).record.job_id == "job-1"
    assert claim(store, "replica-a", now - timedelta(seconds=1)).record.job_id == "job-2"
    assert claim(store, "replica-b").record.job_id == "job-2"  # taken over
    job3 = claim(store, "replica-a").record
    store.finish_job(
        dataclasses.replace(job3, state=JobState.FAILED, last_sequence=2),
        event("job-3", 2, JobFailed("boom", "INTERNAL")),
    )
    ids = ["job-1", "job-2", "job-3", "job-9"]
    renewal = store.hold_jobs("replica-a", ids, now + timedelta(seconds=60))
    assert renewal == LeaseRenewal(lost=["job-2", "job-3", "job-9"])
    assert store.request_cancel("job-1", cancel_event("job-1")) is None
    renewal = store.hold_jobs("replica-a", ids, now + timedelta(seconds=60))
    assert renewal == LeaseRenewal(cancel_requested=["job-1"], lost=["job-2", "job-3", "job-9"])
    assert store.hold_jobs("replica-a", [], now) == LeaseRenewal()
    # A renewed lease holds: the job is not claimable while it runs.
    assert store.claim_job("replica-c", now + timedelta(seconds=30)) is None


def test_request_cancel_ends_a_job_nobody_holds(backend: Backend, store: Store) -> None:
    queued = enqueue(store, "job-1")
    final = store.request_cancel("job-1", cancel_event("job-1"))
    expected = dataclasses.replace(
        queued,
        state=JobState.CANCELLED,
        error="cancelled by the caller",
        last_sequence=2,
        updated_time=cancel_event("job-1").time,
    )
    assert final == expected and store.get_job("job-1") == expected
    # The event as given, renumbered to follow the log.
    assert store.events_after("job-1", 1) == [
        dataclasses.replace(cancel_event("job-1"), sequence=2)
    ]
    assert backend.job_examples("job-1") == 0
    assert store.claim_job("replica-a", datetime.now(UTC) + timedelta(seconds=30)) is None
    with pytest.raises(
        FailedPreconditionError, match=r"^job_id: job job-1 is cancelled; not cancellable$"
    ):
        store.request_cancel("job-1", cancel_event("job-1"))
    with pytest.raises(NotFoundError, match=r"^job_id: no job 'job-9'$"):
        store.request_cancel("job-9", cancel_event("job-9"))
    with pytest.raises(InvalidArgumentError):
        store.request_cancel("../x", cancel_event("job-9"))
    # A job whose holder's lease ran out is nobody's either: ended here, after its log.
    enqueue(store, "job-2")
    run = claim(store, "replica-a", datetime.now(UTC) - timedelta(seconds=1)).record
    store.append_event(event("job-2", 2), attempt=run.attempt)
    ended = store.request_cancel("job-2", cancel_event("job-2"))
    assert ended is not None and ended.state is JobState.CANCELLED and ended.last_sequence == 3
    assert [e.sequence for e in store.events_after("job-2", 0)] == [1, 2, 3]


# ---- the job queue shared by replicas (PostgreSQL only) ----


def test_replicas_claiming_at_once_never_take_the_same_job(database_url: str) -> None:
    seed = PostgresStore(database_url)
    for n in range(20):
        enqueue(seed, f"job-{n:02d}", tenant=f"t{n % 3}", created=T0 + timedelta(seconds=n))
    replicas = [PostgresStore(database_url, max_connections=2) for _ in range(4)]
    start = threading.Barrier(4)
    claimed: list[list[str]] = [[] for _ in replicas]
    errors: list[BaseException] = []

    def claimer(index: int) -> None:
        try:
            start.wait()
            until = datetime.now(UTC) + timedelta(seconds=60)
            while (found := replicas[index].claim_job(f"replica-{index}", until)) is not None:
                claimed[index].append(found.record.job_id)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=claimer, args=(i,)) for i in range(4)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
    finally:
        for replica in [seed, *replicas]:
            replica.close()
    assert errors == []
    everything = [job_id for ids in claimed for job_id in ids]
    assert sorted(everything) == [f"job-{n:02d}" for n in range(20)]  # each exactly once


def test_replicas_enqueueing_at_once_share_one_quota(database_url: str) -> None:
    replicas = [PostgresStore(database_url), PostgresStore(database_url)]
    start = threading.Barrier(2)
    outcomes: list[str] = []

    def submit(index: int) -> None:
        start.wait()
        try:
            enqueue(replicas[index], f"job-{index}", tenant="acme", max_unfinished=1)
            outcomes.append("stored")
        except ResourceExhaustedError:
            outcomes.append("refused")

    threads = [threading.Thread(target=submit, args=(i,)) for i in range(2)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
        assert sorted(outcomes) == ["refused", "stored"]
        assert len(replicas[0].list_jobs("acme")) == 1
    finally:
        for replica in replicas:
            replica.close()


def test_watch_jobs_hears_other_replicas(database_url: str) -> None:
    watching, other = PostgresStore(database_url), PostgresStore(database_url)
    heard: list[tuple[str, str]] = []
    lock = threading.Condition()

    def note(kind: str) -> Callable[[str], None]:
        def record(job_id: str) -> None:
            with lock:
                heard.append((kind, job_id))
                lock.notify_all()

        return record

    def wait_for(notice: tuple[str, str]) -> None:
        with lock:
            assert lock.wait_for(lambda: notice in heard, timeout=5), (notice, heard)

    try:
        watching.watch_jobs(note("events"), lambda: note("queued")(""), note("cancel"))
        watcher = watching._queue.watcher
        assert watcher is not None and watcher.connected.wait(5)
        enqueue(other, "job-1")
        wait_for(("queued", ""))
        wait_for(("events", "job-1"))
        claim(other, "replica-b")
        assert other.request_cancel("job-1", cancel_event("job-1")) is None
        wait_for(("cancel", "job-1"))
        other.append_event(event("job-1", 2), attempt=1)
        with lock:
            count = heard.count(("events", "job-1"))
        assert count >= 1
    finally:
        watching.close()
        other.close()
