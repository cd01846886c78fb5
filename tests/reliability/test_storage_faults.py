"""Storage faults (issue 15): a full or read-only disk, a damaged or missing database, a job
table that only grew, a tenant filling the store with datasets. Each says what is wrong, to the
caller (RESOURCE_EXHAUSTED, never INTERNAL) or to the operator (exit status 2, one line).

Real faults where the machine allows: a tmpfs filled to the last byte or remounted read-only
(needs root; skipped otherwise), SQLite's own SQLITE_FULL through `PRAGMA max_page_count`
everywhere else."""

from __future__ import annotations

import errno
import os
import shutil
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from transfer_client import NotFoundError as ClientNotFoundError
from transfer_client import ResourceExhaustedError as ClientResourceExhaustedError
from transfer_client import TransferClient
from transfer_client.proto import transfer_service_pb2 as pb
from transfer_client.proto import transfer_service_pb2_grpc as pb_grpc
from transfer_service.domain import (
    DatasetInfo,
    JobEvent,
    JobFailed,
    JobRecord,
    JobState,
    LabeledExample,
    ModelInput,
    TrainingProgress,
)
from transfer_service.errors import ConfigurationError, NotFoundError, ResourceExhaustedError
from transfer_service.store.local import LocalStore
from transfer_service.training.recovery import recover_jobs

from tests.conftest import RunningServer, make_settings, start_server
from tests.e2e.test_server_process import REPO, ServerProcess, free_port
from tests.unit.test_store import WEIGHTS, record
from tests.unit.test_store_tenancy import write_version_0_store

ALICE = "alice-token-0123456789"
BOB = "bob-token-0123456789"
QUOTA_BYTES = 4000
NOW = datetime.now(UTC)


# ---- helpers ----------------------------------------------------------------------------


@pytest.fixture()
def volume(tmp_path: Path) -> Iterator[Path]:
    """A 16 MiB tmpfs of its own: a disk that can really fill up or turn read-only."""
    mount_point = tmp_path / "volume"
    mount_point.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=16M", "tmpfs", str(mount_point)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], capture_output=True, check=False)


def fill(directory: Path) -> Path:
    """Writes a file until the volume has not one byte left; delete it to free the space."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for size in (1 << 16, 512, 1):
            block = b"\0" * size
            while True:
                try:
                    if os.write(fd, block) == 0:
                        break
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC
                    break
    finally:
        os.close(fd)
    return filler


def job(job_id: str, state: JobState, tenant: str = "default", *, age: float = 0.0) -> JobRecord:
    when = NOW - timedelta(seconds=age)
    return JobRecord(job_id, state, "minilm_l6", "news", when, when, tenant=tenant)


def progress(phase: str, step: int = 1) -> TrainingProgress:
    return TrainingProgress(phase, 1, 2, step, 9, 0.5, 0.5, None, None, 0.1, 1.0, 1.0, 1.0, False)


def failed_event(job_id: str, sequence: int, reason: str = "it broke") -> JobEvent:
    return JobEvent(job_id, sequence, NOW, JobFailed(reason, "INTERNAL"))


def finish(store: LocalStore, record: JobRecord, reason: str = "it broke") -> None:
    store.save_job(record)
    store.finish_job(
        JobRecord(
            record.job_id,
            JobState.FAILED,
            record.backbone,
            record.head_name,
            record.created_time,
            record.updated_time,
            error=reason,
            last_sequence=1,
            tenant=record.tenant,
        ),
        failed_event(record.job_id, 1, reason),
    )


def text_examples(count: int, size: int = 100, label_offset: int = 0) -> list[tuple[str, str]]:
    """`count` examples of exactly `size` bytes each (text + one-letter label)."""
    return [(f"{i:04d}" + "x" * (size - 5), "ab"[(i + label_offset) % 2]) for i in range(count)]


def assert_full(error: BaseException) -> None:
    assert isinstance(error, ResourceExhaustedError), repr(error)
    assert error.message.startswith("the store's disk is full: "), error.message


def start_process(store_dir: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """`python -m transfer_service` on `store_dir`, expected to refuse to start."""
    environment = dict(os.environ)
    environment.update(
        TRANSFER_PORT=str(free_port()),
        TRANSFER_METRICS_PORT="-1",
        TRANSFER_STORE_DIR=str(store_dir),
        TRANSFER_PRELOAD_BACKBONES="",
        TRANSFER_LOG_FORMAT="text",
        **env,
    )
    return subprocess.run(
        [sys.executable, "-m", "transfer_service"],
        cwd=REPO,
        env=environment,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )


def assert_refused(result: subprocess.CompletedProcess[str], *phrases: str) -> None:
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert "Traceback" not in output, output
    (line,) = [line for line in output.splitlines() if "cannot start" in line]
    for phrase in phrases:
        assert phrase in line, line


# ---- 1. a full disk is RESOURCE_EXHAUSTED, saying so --------------------------------------


def test_every_store_write_on_a_full_database_is_resource_exhausted(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    store.save_job(job("job-a", JobState.RUNNING))
    # SQLite's own full-disk error: no page past the ones the database has now. Payloads
    # larger than a page need new (overflow) pages, so every write below must grow the file.
    pages = store._db.execute("PRAGMA page_count").fetchone()[0]
    store._db.execute(f"PRAGMA max_page_count = {pages}")
    big = "x" * 20_000
    running = job("job-a", JobState.RUNNING)
    writes: list[Callable[[], object]] = [
        lambda: store.save_job(job("job-b", JobState.QUEUED, tenant=big)),
        lambda: store.append_event(failed_event("job-a", 1, big)),
        lambda: store.finish_job(running, failed_event("job-a", 1, big)),
        lambda: store.append_progress(
            JobEvent("job-a", 1, NOW, progress(big)),
            None,
        ),
        lambda: store.begin_dataset(big),
        lambda: store.begin_dataset("alice").add([LabeledExample(ModelInput(text=big), "a")]),
    ]
    for write in writes:
        with pytest.raises(ResourceExhaustedError) as caught:
            write()
        assert_full(caught.value)
    # Nothing half-written, and the connection is not left inside a failed transaction.
    assert store.get_job("job-a").state is JobState.RUNNING
    assert store.events_after("job-a", 0) == []
    store._db.execute("PRAGMA max_page_count = 1073741823")
    store.finish_job(running, failed_event("job-a", 1))
    assert store.get_job("job-a").last_sequence == 0  # the row given, its event stored
    assert [event.sequence for event in store.events_after("job-a", 0)] == [1]


def test_a_full_volume_fails_writes_cleanly_and_recovers_when_space_is_freed(
    volume: Path,
) -> None:
    store = LocalStore(volume / "store")
    store.save_job(job("job-a", JobState.RUNNING))
    filler = fill(volume)
    with pytest.raises(ResourceExhaustedError) as caught:
        writer = store.begin_dataset("alice")
        try:
            for _ in range(100):  # refused once SQLite needs a block it cannot get
                writer.add([LabeledExample(ModelInput(text="y" * 50_000), "a")])
        finally:
            writer.abort()  # may itself be refused: never raises; the next start cleans up
    assert_full(caught.value)
    with pytest.raises(ResourceExhaustedError) as caught:
        for sequence in range(1, 200):
            store.append_progress(
                JobEvent("job-a", sequence, NOW, progress("z" * 5000, sequence)),
                None,
            )
    assert_full(caught.value)
    # Reads still work on a full disk.
    assert store.get_job("job-a").state is JobState.RUNNING
    assert [j.job_id for j in store.list_jobs()] == ["job-a"]
    # Space back: the same store object writes again.
    filler.unlink()
    finish(store, job("job-b", JobState.RUNNING))
    assert store.get_job("job-b").state is JobState.FAILED
    store.close()


# ---- 2 and 3. start-up refuses a store it cannot use, saying why ---------------------------


def test_a_corrupt_or_truncated_database_refuses_to_start(tmp_path: Path) -> None:
    store_dir = tmp_path / "store"
    LocalStore(store_dir).close()
    database = store_dir / "store.sqlite3"
    good = database.read_bytes()
    database.write_bytes(os.urandom(8192))
    with pytest.raises(ConfigurationError, match=r"is damaged \(file is not a database"):
        LocalStore(store_dir)
    database.write_bytes(good[:60])  # cut inside the header
    with pytest.raises(ConfigurationError, match="is damaged"):
        LocalStore(store_dir)
    assert_refused(start_process(store_dir), "is damaged", "TRANSFER_RECREATE_DATABASE")


def test_a_missing_or_empty_database_beside_heads_needs_recreate(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    store.save_head(record(), WEIGHTS)
    store.close()
    database = tmp_path / "store.sqlite3"
    for wal in tmp_path.glob("store.sqlite3-*"):
        wal.unlink()
    database.unlink()
    with pytest.raises(ConfigurationError, match="is missing, but 1 heads are stored"):
        LocalStore(tmp_path)
    assert not database.exists()  # refusing created nothing
    database.write_bytes(b"")
    with pytest.raises(ConfigurationError, match="is empty, but 1 heads are stored"):
        LocalStore(tmp_path)
    reopened = LocalStore(tmp_path, recreate_database=True)
    assert reopened.get_head("cats-1234").head_id == "cats-1234"
    assert reopened.list_jobs() == []
    reopened.close()
    LocalStore(tmp_path).close()  # now it has its schema: no flag needed again
    # A fresh directory (no heads, no database) starts as before.
    LocalStore(tmp_path / "fresh").close()


def test_the_server_refuses_a_missing_database_beside_heads_unless_told(tmp_path: Path) -> None:
    store_dir = tmp_path / "store"
    store = LocalStore(store_dir)
    store.save_head(record(), WEIGHTS)
    store.close()
    for path in store_dir.glob("store.sqlite3*"):
        path.unlink()
    assert_refused(start_process(store_dir), "is missing", "TRANSFER_RECREATE_DATABASE=true")
    env = dict(os.environ)
    env.update(
        TRANSFER_PORT=str(free_port()),
        TRANSFER_METRICS_PORT="-1",
        TRANSFER_STORE_DIR=str(store_dir),
        TRANSFER_PRELOAD_BACKBONES="",
        TRANSFER_RECREATE_DATABASE="true",
    )
    process = ServerProcess(env, tmp_path / "server.log")
    try:
        process.wait_serving(timeout=120)
    finally:
        assert process.stop() == 0


def test_start_up_on_a_full_disk_exits_2_saying_so(volume: Path) -> None:
    store = LocalStore(volume / "store")
    finish(store, job("job-a", JobState.RUNNING))
    store.close()
    fill(volume)
    assert_refused(start_process(volume / "store"), "the store's disk is full")


def test_start_up_on_a_read_only_disk_exits_2_saying_so(volume: Path) -> None:
    store = LocalStore(volume / "store")
    finish(store, job("job-a", JobState.RUNNING))
    store.close()
    subprocess.run(["mount", "-o", "remount,ro", str(volume)], check=True)
    assert_refused(start_process(volume / "store"), "the store's disk is read-only")
    with pytest.raises(ConfigurationError, match="read-only"):
        LocalStore(volume / "other")  # a new store there: the mkdir is refused (EROFS)


# ---- 5. retention, and 6. dataset sizes (store level) -----------------------------------


def test_retention_deletes_only_old_finished_jobs_and_their_events(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    store.save_head(record(), WEIGHTS)
    finish(store, job("job-old", JobState.RUNNING, age=3600))
    finish(store, job("job-new", JobState.RUNNING, age=10))
    store.save_job(job("job-queued", JobState.QUEUED, age=3600))
    store.save_job(job("job-running", JobState.RUNNING, age=3600))
    store.append_event(failed_event("job-running", 1))  # any event: it must stay
    deleted = store.delete_finished_jobs(NOW - timedelta(seconds=60))
    assert deleted == 1
    assert {j.job_id for j in store.list_jobs()} == {"job-new", "job-queued", "job-running"}
    assert store.events_after("job-old", 0) == []
    assert len(store.events_after("job-running", 0)) == 1
    assert [h.head_id for h in store.list_heads()] == ["cats-1234"]
    with pytest.raises(NotFoundError):
        store.get_job("job-old")
    store.close()


def test_list_jobs_of_one_tenant_reads_through_an_index(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    store.save_job(job("job-a", JobState.QUEUED, tenant="alice"))
    store.save_job(job("job-b", JobState.QUEUED, tenant="bob"))
    assert [j.job_id for j in store.list_jobs("alice")] == ["job-a"]
    assert {j.job_id for j in store.list_jobs()} == {"job-a", "job-b"}
    plan = store._db.execute(
        "EXPLAIN QUERY PLAN SELECT job_id FROM jobs WHERE tenant = ? ORDER BY created", ("x",)
    ).fetchall()
    assert any("jobs_by_tenant" in str(row) for row in plan), plan
    store.close()


def test_list_jobs_reads_pages_in_order_across_equal_created_times(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    for number in range(7):  # pairs created at the same instant: the id breaks the tie
        store.save_job(job(f"job-{number}", JobState.QUEUED, tenant="alice", age=-(number // 2)))
    store.save_job(job("job-other", JobState.QUEUED, tenant="bob"))
    pages: list[list[str]] = []
    after = None
    while True:
        page = store.list_jobs("alice", after=after, limit=3)
        pages.append([j.job_id for j in page])
        if len(page) < 3:
            break
        after = (page[-1].created_time, page[-1].job_id)
    assert pages == [["job-0", "job-1", "job-2"], ["job-3", "job-4", "job-5"], ["job-6"]]
    store.close()


def bulk_jobs(store: LocalStore, tenant: str, count: int) -> list[str]:
    """`count` finished jobs of `tenant`, written in one transaction (one by one, each commit
    waits for its fsync)."""
    ids = [f"job-{tenant}-{number:06d}" for number in range(count)]
    created = [(NOW + timedelta(microseconds=number)).isoformat() for number in range(count)]
    with store._lock:
        store._db.execute("BEGIN")
        store._db.executemany(
            "INSERT INTO jobs (job_id, state, backbone, head_name, head_id, error, created, "
            "updated, last_sequence, progress, tenant) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
            [
                (job_id, "failed", "minilm_l6", "news", "", "x", when, when, 1, "", tenant)
                for job_id, when in zip(ids, created, strict=True)
            ],
        )
        store._db.execute("COMMIT")
    return ids


def test_migration_to_version_2_computes_the_size_of_existing_datasets(tmp_path: Path) -> None:
    write_version_0_store(tmp_path)  # one dataset: label "a", text "hello"
    store = LocalStore(tmp_path)
    assert store.dataset_bytes("default") == len("a") + len("hello")
    store.close()
    db = sqlite3.connect(tmp_path / "store.sqlite3")
    assert db.execute("PRAGMA user_version").fetchone()[0] == 4
    db.close()


def test_the_quota_counts_uploads_in_progress_and_frees_on_delete(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    hundred = [LabeledExample(ModelInput(text="é" * 49), "a")]  # 98 + 1 = 99 bytes
    first = store.begin_dataset("alice", quota_bytes=250)
    second = store.begin_dataset("alice", quota_bytes=250)
    first.add(hundred)
    second.add(hundred)
    with pytest.raises(ResourceExhaustedError, match=r"quota of 250 bytes \(198 in use"):
        first.add(hundred)
    store.begin_dataset("bob", quota_bytes=250).add(hundred * 2)  # bob's own quota
    info = first.commit()
    second.abort()
    assert store.dataset_bytes("alice") == 99
    assert store.dataset_info(info.dataset_id).example_count == 1
    store.delete_dataset(info.dataset_id)
    assert store.dataset_bytes("alice") == 0
    with pytest.raises(NotFoundError):
        store.dataset_info(info.dataset_id)
    with pytest.raises(NotFoundError):
        store.delete_dataset(info.dataset_id)
    store.close()


# ---- 8. recovery keeps queued and running jobs in the queue ------------------------------


def test_jobs_queued_or_running_at_a_restart_stay_in_the_queue(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    store.save_job(job("job-queued", JobState.QUEUED))
    store.save_job(job("job-running", JobState.RUNNING))
    recover_jobs(store, sole_process=True)
    until = datetime.now(UTC) + timedelta(seconds=30)
    claimed = [store.claim_job("next", until), store.claim_job("next", until)]
    assert {c.record.job_id for c in claimed if c is not None} == {"job-queued", "job-running"}
    assert (
        store.get_job("job-queued").state is JobState.QUEUED
        and not store.get_job("job-running").error
    )
    store.close()


def test_recovery_reads_only_the_jobs_it_has_to_settle(tmp_path: Path) -> None:
    """Start-up recovery read every job's event log: 3.4 s for 200,000 settled jobs."""
    store = LocalStore(tmp_path)
    finish(store, job("job-settled", JobState.RUNNING))
    bulk_jobs(store, "crowd", 50)  # finished rows without a terminal event: unsettled
    store.save_job(job("job-queued", JobState.QUEUED))
    ended_early = job("job-progress-last", JobState.RUNNING)
    finish(store, ended_early)
    store.append_progress(JobEvent("job-progress-last", 2, NOW, progress("late")), None)
    unsettled = {j.job_id for j in store.unsettled_jobs()}
    assert unsettled == {"job-queued", "job-progress-last"} | {
        f"job-crowd-{number:06d}" for number in range(50)
    }
    recover_jobs(store, sole_process=True)
    # Only the unfinished job is left: it stays in the queue, to run again.
    assert [j.job_id for j in store.unsettled_jobs()] == ["job-queued"]
    store.close()


# ---- through the server: quota, DeleteDataset, ownership, off-loop job calls, retention ---


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """Two tenants, a small dataset quota, an hour's retention, and a store that already holds
    an old finished job, a recent one and a job left queued by a stopped server."""
    root = tmp_path_factory.mktemp("faults")
    store = LocalStore(root / "store")
    finish(store, job("job-ancient", JobState.RUNNING, tenant="alice", age=2 * 86400))
    finish(store, job("job-recent", JobState.RUNNING, tenant="alice", age=60))
    store.save_job(job("job-waiting", JobState.QUEUED, tenant="alice", age=120))
    store.close()
    running = start_server(
        make_settings(
            root / "store",
            auth_tokens=f"{ALICE}=alice,{BOB}=bob",
            preload_backbones=[],
            max_dataset_bytes_per_tenant=QUOTA_BYTES,
            job_retention_seconds=3600,
        )
    )
    yield running
    running.stop()


def as_tenant(server: RunningServer, token: str) -> TransferClient:
    return TransferClient(server.address, token=token, timeout=60)


def test_an_upload_past_the_quota_is_refused_and_removed(secured: RunningServer) -> None:
    store = secured.app.store
    with as_tenant(secured, ALICE) as alice:
        kept = alice.upload_dataset(text_examples(30), chunk_size=10)  # 3000 bytes
        assert store.dataset_bytes("alice") == 3000
        with pytest.raises(ClientResourceExhaustedError) as caught:
            alice.upload_dataset(text_examples(20, label_offset=1), chunk_size=5)
        message = caught.value.message
        assert f"quota of {QUOTA_BYTES} bytes" in message and "DeleteDataset" in message
        assert store.dataset_bytes("alice") == 3000  # the refused upload left nothing
        # Another tenant cannot see or delete it: NOT_FOUND, worded as for an unknown id.
        with as_tenant(secured, BOB) as bob:
            with pytest.raises(ClientNotFoundError) as theirs:
                bob.delete_dataset(kept.dataset_id)
            with pytest.raises(ClientNotFoundError) as unknown:
                bob.delete_dataset("ds-0000000000000000")
        assert theirs.value.message == unknown.value.message.replace(
            "ds-0000000000000000", kept.dataset_id
        )
        alice.delete_dataset(kept.dataset_id)
        assert store.dataset_bytes("alice") == 0
        again = alice.upload_dataset(text_examples(20, label_offset=1), chunk_size=5)
        alice.delete_dataset(again.dataset_id)
        with pytest.raises(ClientNotFoundError):
            alice.delete_dataset(again.dataset_id)


def test_fine_tune_checks_the_dataset_owner_before_reading_examples(
    secured: RunningServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    with as_tenant(secured, ALICE) as alice:
        dataset = alice.upload_dataset(text_examples(6))
    loads: list[str] = []
    original = secured.app.store.dataset_examples

    def counting(info: DatasetInfo) -> Any:
        loads.append(info.dataset_id)
        return original(info)

    monkeypatch.setattr(secured.app.store, "dataset_examples", counting)
    try:
        with as_tenant(secured, BOB) as bob, pytest.raises(ClientNotFoundError, match="no dataset"):
            bob.train("minilm_l6", None, dataset_id=dataset.dataset_id, head_name="stolen")
        assert loads == []  # bob's request never read alice's examples
    finally:
        monkeypatch.undo()
        with as_tenant(secured, ALICE) as alice:
            alice.delete_dataset(dataset.dataset_id)


def test_job_calls_read_the_store_off_the_event_loop(
    secured: RunningServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = secured.app.store
    threads: list[threading.Thread] = []
    for name in ("get_job", "list_jobs", "events_after"):
        original = getattr(store, name)

        def spy(*args: Any, _original: Any = original, **kwargs: Any) -> Any:
            threads.append(threading.current_thread())
            return _original(*args, **kwargs)

        monkeypatch.setattr(store, name, spy)
    with grpc.insecure_channel(secured.address) as channel:
        stub = pb_grpc.TransferServiceStub(channel)
        metadata = (("authorization", f"Bearer {ALICE}"),)
        assert stub.GetJob(pb.GetJobRequest(job_id="job-recent"), metadata=metadata).state
        listed = stub.ListJobs(pb.ListJobsRequest(), metadata=metadata)
        assert {j.job_id for j in listed.jobs} >= {"job-recent", "job-waiting"}
        with pytest.raises(grpc.RpcError) as caught:
            stub.CancelJob(pb.CancelJobRequest(job_id="job-recent"), metadata=metadata)
        assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        events = list(stub.WatchJob(pb.WatchJobRequest(job_id="job-recent"), metadata=metadata))
        assert [e.sequence for e in events] == [1]
        with pytest.raises(grpc.RpcError) as caught:
            stub.GetJob(
                pb.GetJobRequest(job_id="job-recent"),
                metadata=(("authorization", f"Bearer {BOB}"),),
            )
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert threads, "the store was not read at all"
    assert secured.thread not in threads, "a job call read the store on the event loop"


def test_start_up_applies_retention_and_tells_the_truth_about_queued_jobs(
    secured: RunningServer,
) -> None:
    with as_tenant(secured, ALICE) as alice:
        # Deleted by the sweep at start (finished two days ago; retention is an hour).
        for _ in range(100):
            try:
                alice.get_job("job-ancient")
            except ClientNotFoundError:
                break
            threading.Event().wait(0.1)
        else:
            pytest.fail("the finished job past its retention was not deleted")
        assert alice.get_job("job-recent").state.value == "failed"  # within retention: kept
        # Queued by a version that stored no examples with its jobs: claimed, it cannot run.
        waiting = alice.get_job("job-waiting")
        for _ in range(100):
            if waiting.state.value != "queued":
                break
            threading.Event().wait(0.1)
            waiting = alice.get_job("job-waiting")
        assert waiting.state.value == "failed"
        assert "without its examples" in waiting.error and "submit it again" in waiting.error


def test_an_upload_on_a_full_disk_is_resource_exhausted_not_internal(volume: Path) -> None:
    running = start_server(make_settings(volume / "store", preload_backbones=[]))
    try:
        filler = fill(volume)
        with TransferClient(running.address, timeout=60) as client:
            with pytest.raises(ClientResourceExhaustedError) as caught:
                client.upload_dataset(
                    [("w" * 100_000, "ab"[i % 2]) for i in range(100)], chunk_size=10
                )
            assert caught.value.message.startswith("the store's disk is full: ")
            filler.unlink()
            info = client.upload_dataset(text_examples(4))
            client.delete_dataset(info.dataset_id)
    finally:
        running.stop()


def test_list_jobs_answers_a_page_at_a_time(secured: RunningServer) -> None:
    """200,000 jobs in one answer took 2.7 s of the event loop to convert to protobuf alone."""
    ids = bulk_jobs(secured.app.store, "bob", 2500)
    metadata = (("authorization", f"Bearer {BOB}"),)
    with grpc.insecure_channel(secured.address) as channel:
        stub = pb_grpc.TransferServiceStub(channel)
        first = stub.ListJobs(pb.ListJobsRequest(), metadata=metadata)
        assert len(first.jobs) == 1000 and first.next_page_token
        seen = [j.job_id for j in first.jobs]
        token = first.next_page_token
        while token:
            page = stub.ListJobs(
                pb.ListJobsRequest(page_size=700, page_token=token), metadata=metadata
            )
            assert len(page.jobs) <= 700
            seen += [j.job_id for j in page.jobs]
            token = page.next_page_token
        assert seen == ids
        with pytest.raises(grpc.RpcError) as caught:
            stub.ListJobs(pb.ListJobsRequest(page_token="not-a-token"), metadata=metadata)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "page_token" in (caught.value.details() or "")
    with as_tenant(secured, BOB) as bob:
        assert [j.job_id for j in bob.list_jobs()] == ids  # the SDK reads every page
