"""The store contract (store/interface.py), one suite run against both backends: LocalStore
(a temp dir) and PostgresStore (a fresh database on a real PostgreSQL, tests/postgres_server).
Whatever the rest of the server may rely on is asserted here for both: the same records back,
the same orderings, filters and pages, the same errors with the same messages."""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest
import torch
from transfer_service.domain import (
    DatasetInfo,
    HeadRecord,
    JobCompleted,
    JobEvent,
    JobFailed,
    JobQueued,
    JobRecord,
    JobState,
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
    NotFoundError,
    ResourceExhaustedError,
    UnavailableError,
    UnreadableHeadError,
)
from transfer_service.store.interface import Store
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


def _local(root: Path) -> Backend:
    def damage_record(head_id: str, text: str) -> None:
        (root / "heads" / head_id / "head.json").write_text(text)

    def damage_weights(head_id: str, data: bytes) -> None:
        (root / "heads" / head_id / "weights.safetensors").write_bytes(data)

    return Backend("local", lambda: LocalStore(root), damage_record, damage_weights)


def _postgres(url: str) -> Backend:
    def update(column: str, head_id: str, value: object) -> None:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(
                f"UPDATE heads SET {column} = %s WHERE head_id = %s".encode(), (value, head_id)
            )

    return Backend(
        "postgres",
        lambda: PostgresStore(url, max_connections=4),
        lambda head_id, text: update("record", head_id, text),
        lambda head_id, data: update("weights", head_id, data),
    )


@pytest.fixture(params=["local", "postgres"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    if request.param == "local":
        return _local(tmp_path / "store")
    url: str = request.getfixturevalue("database_url")
    return _postgres(url)


@pytest.fixture()
def store(backend: Backend) -> Iterator[Store]:
    opened = backend.open()
    yield opened
    opened.close()


def head(
    head_id: str,
    *,
    tenant: str = "default",
    name: str = "cats",
    backbone: str = "efficientnet_lite0",
    created: datetime = T0,
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
    record = head("cats-1")
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
    record = head("h-1")
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
    store.save_job(job("job-held", state=JobState.RUNNING))
    store.save_job(job("job-expired", state=JobState.RUNNING))
    store.hold_jobs("replica-a", ["job-held"], now + timedelta(seconds=30))
    store.hold_jobs("replica-b", ["job-expired"], now - timedelta(seconds=1))
    later = [j.job_id for j in store.unsettled_jobs(now)]
    assert later == (["job-expired"] if store.holds_leases else [])
    assert sorted(j.job_id for j in store.unsettled_jobs()) == ["job-expired", "job-held"]
    # A finished job is never held again.
    store.save_job(job("job-done", state=JobState.FAILED))
    store.hold_jobs("replica-a", ["job-done"], now + timedelta(seconds=30))
    assert store.get_job("job-done").state is JobState.FAILED


def test_a_cancel_request_reaches_the_lease_holder(store: Store) -> None:
    """CancelJob on a replica that does not hold the job: recorded in the store and returned
    to the holder by its next renewal. The embedded store's one process cancels in memory."""
    now = datetime.now(UTC)
    store.save_job(job("job-run", state=JobState.RUNNING))
    until = now + timedelta(seconds=30)
    assert store.hold_jobs("replica-a", ["job-run"], until) == []
    if not store.holds_leases:
        with pytest.raises(FailedPreconditionError):
            store.request_cancel("job-run")
        return
    store.request_cancel("job-run")
    assert store.hold_jobs("replica-a", ["job-run"], until) == ["job-run"]
