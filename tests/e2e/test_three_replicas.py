"""Three replicas on one PostgreSQL database, as real `python -m transfer_service` processes (so
SIGKILL is a real SIGKILL), called through the real client. Jobs are a queue in the database
(docs/design.md, "Jobs as a queue"): any replica claims a queued job, a killed replica's job is
taken over once its lease (3 s here) runs out, any replica streams any job.

1. Train through A, watch through B, predict through C; GetJob, ListJobs and ListHeads agree
   on all three.
2. SIGKILL the replica running a job: another finishes it; a client watching through a
   surviving replica sees one stream (sequences 1..n, one `completed`), and one head exists.
3. DeleteHead on A: Predict on A, B and C answers NOT_FOUND within 1.5 s.
4. Restart all three one at a time (SIGTERM, wait, start, SERVING) while a client sends
   Predicts round_robin over the three: no call fails.
6. 20 FineTunes submitted across the three: each runs exactly once (one run, one `started`,
   one head, `attempts` 1, claimed by one replica).
7. Restart PostgreSQL while a job runs: its writes wait for the database, and it finishes,
   once, with one head.

(5, two replicas migrating an empty database at once, is in tests/unit/test_store_contract.py.)
"""

from __future__ import annotations

import re
import threading
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import pytest
from transfer_client import (
    JobCompleted,
    JobStarted,
    JobWarning,
    NotFoundError,
    TrainingConfig,
    TransferClient,
    TransferError,
)
from transfer_client.types import FineTuneEvent, JobState

from tests.postgres_server import PostgresServer
from tools.reliability.common import ServerProcess, server_env
from tools.reliability.replica_set import (
    ReplicaSet,
    query_all,
    query_one,
    replica_extra,
    serving,
)

BACKBONE = "minilm_l6"
LEASE_SECONDS = 3.0
NAMES = ("a", "b", "c")
TEXTS = [(f"a great and wonderful film, number {i}", "good") for i in range(5)] + [
    (f"an awful and boring film, number {i}", "bad") for i in range(5)
]
PROBES = ["what a wonderful film", "a boring, awful film"]
# A linear probe on cached features: well under a second.
QUICK = TrainingConfig(epochs=2, seed=3)
# Two transformer blocks trained, one example a step: a few seconds on 2 CPUs, long enough to
# kill its replica (or restart the database) while it runs.
LONG = TrainingConfig(
    epochs=15, batch_size=1, trainable_blocks=2, early_stopping_patience=0, seed=3
)
# 20 jobs of one tenant in the queue at once (test 6).
MAX_JOBS_PER_TENANT = 32


# ---- the replicas -------------------------------------------------------------------------


def start_three(url: str, directory: Path) -> ReplicaSet:
    """Three server processes on one database (tools/reliability/replica_set.py). Each keeps
    its environment (so its ports) when restarted: a client's target names the same three
    addresses throughout."""
    return ReplicaSet(
        url,
        directory,
        NAMES,
        lease_seconds=LEASE_SECONDS,
        preload=BACKBONE,
        metrics=True,
        extra={
            "TRANSFER_MAX_JOBS_PER_TENANT": str(MAX_JOBS_PER_TENANT),
            "TRANSFER_GRACE_SECONDS": "5",
        },
    )


def predicts_served(process: ServerProcess) -> int:
    """Predicts the process answered OK, from its Prometheus metrics."""
    port = process.env["TRANSFER_METRICS_PORT"]
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    pattern = r'^transfer_rpc_requests_total\{code="OK",method="Predict"\} (\S+)$'
    found = re.search(pattern, text, re.MULTILINE)
    return int(float(found.group(1))) if found else 0


def client_of(address: str) -> TransferClient:
    return TransferClient(address, timeout=120)


def kinds(events: list[FineTuneEvent]) -> list[str]:
    return [type(event).__name__ for event in events]


def assert_one_stream(events: list[FineTuneEvent], job_id: str) -> None:
    """One job's whole log: sequences 1..n without gaps or repeats, ending in its one
    `completed` event."""
    assert {event.job_id for event in events} == {job_id}
    assert [event.sequence for event in events] == list(range(1, len(events) + 1)), kinds(events)
    assert sum(isinstance(event, JobCompleted) for event in events) == 1, kinds(events)
    assert isinstance(events[-1], JobCompleted), kinds(events)


def heads_of(url: str, job_id: str) -> int:
    row = query_one(url, "SELECT count(*) FROM heads WHERE job_id = %s", job_id)
    assert row is not None
    return int(str(row[0]))


def submit(client: TransferClient, config: TrainingConfig, name: str) -> str:
    """Queues a job and returns its id (from its first event); the stream is closed, the job
    goes on."""
    events = client.fine_tune(BACKBONE, TEXTS, head_name=name, config=config)
    try:
        first: FineTuneEvent = next(iter(events))
        return str(first.job_id)
    finally:
        events.close()  # type: ignore[attr-defined]


@pytest.fixture(scope="module")
def module_database(postgres_server: object) -> str:
    """One empty database for the module's three replicas."""
    assert isinstance(postgres_server, PostgresServer)
    return postgres_server.create_database("replicas")


@pytest.fixture(scope="module")
def three(module_database: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ReplicaSet]:
    replicas = start_three(module_database, tmp_path_factory.mktemp("replicas"))
    yield replicas
    replicas.close()


@pytest.fixture()
def replicas(three: ReplicaSet) -> ReplicaSet:
    """The module's replicas, all three serving (a test that killed one restarted it)."""
    three.revive()
    return three


# ---- 1 ------------------------------------------------------------------------------------


def test_1_train_through_a_watch_through_b_predict_through_c(replicas: ReplicaSet) -> None:
    a, b, c = replicas.addresses
    with client_of(a) as on_a, client_of(b) as on_b, client_of(c) as on_c:
        stream = on_a.fine_tune(BACKBONE, TEXTS, head_name="abc", config=QUICK)
        first = next(iter(stream))
        job_id = first.job_id
        watched = list(on_b.watch_job(job_id))
        trained = [first, *stream]
        assert_one_stream(watched, job_id)
        assert_one_stream(trained, job_id)
        assert kinds(watched) == kinds(trained)
        done = watched[-1]
        assert isinstance(done, JobCompleted)
        head_id = done.head_id

        predictions = [cl.predict(head_id, PROBES) for cl in (on_c, on_b, on_a)]
        labels = [[p.label for p in answer] for answer in predictions]
        assert labels[0] == labels[1] == labels[2], labels
        assert set(labels[0]) <= {"good", "bad"}
        for answer in predictions[1:]:
            for mine, theirs in zip(predictions[0], answer, strict=True):
                assert theirs.score == pytest.approx(mine.score, abs=1e-5)

        clients = (on_a, on_b, on_c)
        jobs = [cl.get_job(job_id) for cl in clients]
        assert jobs[0].state is JobState.SUCCEEDED
        assert jobs[0].head_id == head_id
        assert jobs[0].last_sequence == len(watched)
        assert jobs[0] == jobs[1] == jobs[2]
        listed = [cl.list_jobs() for cl in clients]
        assert job_id in {job.job_id for job in listed[0]}
        assert listed[0] == listed[1] == listed[2]
        heads = [cl.list_heads() for cl in clients]
        assert head_id in {head.head_id for head in heads[0]}
        assert heads[0] == heads[1] == heads[2]
        assert on_b.get_head(head_id) == on_c.get_head(head_id) == on_a.get_head(head_id)


# ---- 2 ------------------------------------------------------------------------------------


def test_2_a_killed_replicas_job_is_finished_by_another_in_one_stream(
    replicas: ReplicaSet,
) -> None:
    with client_of(replicas.addresses[0]) as on_a:
        job_id = submit(on_a, LONG, "survivor")
    doomed = replicas.holding(job_id)
    watching = (doomed + 1) % len(NAMES)  # a replica that survives
    events: list[FineTuneEvent] = []
    started = threading.Event()
    restarted = threading.Event()
    errors: list[BaseException] = []

    def watch() -> None:
        try:
            with client_of(replicas.addresses[watching]) as client:
                for event in client.watch_job(job_id):
                    events.append(event)
                    if isinstance(event, JobStarted):
                        started.set()
                    if isinstance(event, JobWarning) and event.code == "restarted":
                        restarted.set()
        except BaseException as exc:
            errors.append(exc)
        finally:
            started.set()
            restarted.set()

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    assert started.wait(60)
    replicas.processes[doomed].kill()  # SIGKILL: the job stays RUNNING, its lease runs out
    killed = time.monotonic()
    assert restarted.wait(60), replicas.logs()
    took_over = time.monotonic() - killed
    # Meanwhile the killed replica comes back (a fresh process, same ports) for what follows.
    replicas.restart(doomed)
    watcher.join(120)
    assert not watcher.is_alive(), "the watch did not end"
    assert not errors, errors
    assert_one_stream(events, job_id)
    warnings = [e.code for e in events if isinstance(e, JobWarning)]
    assert warnings.count("restarted") == 1, warnings
    assert sum(isinstance(e, JobStarted) for e in events) == 2, kinds(events)
    assert heads_of(replicas.url, job_id) == 1
    row = query_one(replicas.url, "SELECT state, attempts FROM jobs WHERE job_id = %s", job_id)
    assert row == ("succeeded", 2)
    with client_of(replicas.addresses[watching]) as client:
        assert client.get_job(job_id).head_id == events[-1].head_id  # type: ignore[attr-defined]
    print(f"replica {NAMES[doomed]} killed; its job ran again {took_over:.1f} s later")
    replicas.processes[doomed].wait_serving()


# ---- 3 ------------------------------------------------------------------------------------


def test_3_a_head_deleted_on_a_is_not_found_on_all_three_within_1_5_s(
    replicas: ReplicaSet,
) -> None:
    clients = [client_of(address) for address in replicas.addresses]
    try:
        head_id = clients[1].train(BACKBONE, TEXTS, head_name="deleted", config=QUICK).head_id
        for client in clients:
            client.predict(head_id, PROBES)  # warm in every replica's cache
        clients[0].delete_head(head_id)
        deleted = time.monotonic()
        took = []
        for client in clients:
            while True:
                try:
                    client.predict(head_id, PROBES)
                except NotFoundError:
                    took.append(time.monotonic() - deleted)
                    break
                assert time.monotonic() - deleted < 5, "the deleted head is still served"
                time.sleep(0.01)
        print("delete on A -> NOT_FOUND on A, B, C after " + ", ".join(f"{t:.3f}" for t in took))
        assert max(took) < 1.5, took
        for client in clients[1:]:
            with pytest.raises(NotFoundError):
                client.delete_head(head_id)
    finally:
        for client in clients:
            client.close()


# ---- 4 ------------------------------------------------------------------------------------


def test_4_restarting_all_three_one_at_a_time_fails_no_predict(replicas: ReplicaSet) -> None:
    with client_of(replicas.addresses[2]) as on_c:
        head_id = on_c.train(BACKBONE, TEXTS, head_name="rolling", config=QUICK).head_id
    stop = threading.Event()
    served = [0]
    failures: list[BaseException] = []

    def predict_forever() -> None:
        with TransferClient(replicas.target(), timeout=30, load_balancing="round_robin") as cl:
            while not stop.is_set():
                try:
                    cl.predict(head_id, PROBES[served[0] % 2])
                    served[0] += 1
                except Exception as exc:
                    failures.append(exc)
                time.sleep(0.005)

    def reached(process: ServerProcess, timeout: float = 30.0) -> None:
        """Waits until the client's calls reach `process` (the channel reconnects to a
        restarted replica with backoff): only then may the next replica stop."""
        deadline = time.monotonic() + timeout
        while predicts_served(process) == 0:
            assert time.monotonic() < deadline, f"no Predict reached {process.address}"
            time.sleep(0.1)

    caller = threading.Thread(target=predict_forever, daemon=True)
    caller.start()
    try:
        for process in replicas.processes:
            reached(process)
        for index in range(len(NAMES)):
            before = served[0]
            assert replicas.processes[index].terminate() == 0  # SIGTERM: drains, then exits
            restarted = replicas.restart(index)
            restarted.wait_serving()
            reached(restarted)
            assert served[0] > before
    finally:
        stop.set()
        caller.join(60)
    assert not failures, failures[:3]
    print(f"{served[0]} Predicts over three rolling restarts, none failed")


# ---- 6 ------------------------------------------------------------------------------------


def test_6_twenty_fine_tunes_across_the_three_each_run_exactly_once(replicas: ReplicaSet) -> None:
    clients = [client_of(address) for address in replicas.addresses]
    try:
        job_ids = [submit(clients[i % len(clients)], QUICK, f"many-{i}") for i in range(20)]
        assert len(set(job_ids)) == 20

        def ended(job_id: str) -> list[FineTuneEvent]:
            return list(clients[job_ids.index(job_id) % len(clients)].watch_job(job_id))

        with ThreadPoolExecutor(4) as pool:
            streams = dict(zip(job_ids, pool.map(ended, job_ids), strict=True))
        for job_id, events in streams.items():
            assert_one_stream(events, job_id)
            assert sum(isinstance(e, JobStarted) for e in events) == 1, kinds(events)
            assert not [e for e in events if isinstance(e, JobWarning) and e.code == "restarted"]
        jobs = {job.job_id: job for job in clients[0].list_jobs() if job.job_id in job_ids}
        assert len(jobs) == 20
        assert {job.state for job in jobs.values()} == {JobState.SUCCEEDED}
        heads = [h for h in clients[1].list_heads() if h.name.startswith("many-")]
        assert sorted(h.head_id for h in heads) == sorted(j.head_id for j in jobs.values())
    finally:
        for client in clients:
            client.close()
    rows = query_all(
        replicas.url,
        "SELECT j.job_id, j.attempts, (SELECT count(*) FROM heads h WHERE h.job_id = j.job_id)"
        " FROM jobs j WHERE j.job_id = ANY(%s)",
        job_ids,
    )
    assert sorted((attempts, heads) for _, attempts, heads in rows) == [(1, 1)] * 20
    # Each job claimed by exactly one replica, once (every claim is logged).
    logs = [p.log_path.read_text(errors="replace") for p in replicas.processes]
    claims = {job_id: [log.count(f"job {job_id} claimed") for log in logs] for job_id in job_ids}
    assert all(sum(counts) == 1 for counts in claims.values()), claims
    per_replica = [sum(counts[i] for counts in claims.values()) for i in range(len(NAMES))]
    print(f"20 jobs, each run once; runs per replica (A, B, C): {per_replica}")


# ---- 7 ------------------------------------------------------------------------------------


def follow(client: TransferClient, job_id: str, events: list[FineTuneEvent]) -> int:
    """Appends the job's events after the last in `events` until it ends, watching again
    (after_sequence) when the stream breaks UNAVAILABLE; how many times it did."""
    again = 0
    deadline = time.monotonic() + 120
    while True:
        after = events[-1].sequence if events else 0
        try:
            events.extend(client.watch_job(job_id, after_sequence=after))
            return again
        except TransferError as exc:
            if exc.code != "UNAVAILABLE" or time.monotonic() > deadline:
                raise
            again += 1
            time.sleep(0.2)


@pytest.fixture()
def own_postgres() -> Iterator[PostgresServer]:
    """A PostgreSQL for this test alone, which it restarts."""
    server = PostgresServer().start()
    yield server
    server.stop()


def test_7_a_job_finishes_once_through_a_postgresql_restart(
    own_postgres: PostgresServer, tmp_path: Path
) -> None:
    url = own_postgres.create_database()
    # Job writes retry through an outage for up to a lease: ample for a restart here, so the
    # job is not taken over (run again) but goes on.
    extra = replica_extra(url, lease_seconds=15)

    def spawn(name: str) -> ServerProcess:
        env = server_env(tmp_path / name, preload=BACKBONE, extra=extra)
        return ServerProcess(env, tmp_path / f"{name}.log")

    servers = [spawn(name) for name in ("a", "b")]
    try:
        for index, name in enumerate(("a", "b")):
            servers[index] = serving(servers[index], partial(spawn, name))
        with client_of(servers[0].address) as on_a, client_of(servers[1].address) as on_b:
            job_id = submit(on_a, LONG, "outage")
            events: list[FineTuneEvent] = []
            for event in on_b.watch_job(job_id):
                events.append(event)
                if isinstance(event, JobStarted):
                    break
            own_postgres.pause()  # fast shutdown: every connection is closed
            time.sleep(1.0)
            own_postgres.resume()
            restarted = time.monotonic()
            rewatched = follow(on_b, job_id, events)
            print(
                f"job ended {time.monotonic() - restarted:.1f} s after PostgreSQL came back "
                f"(watch on B resumed {rewatched} times)"
            )
            assert_one_stream(events, job_id)
            assert sum(isinstance(e, JobStarted) for e in events) == 1, kinds(events)
            assert on_a.get_job(job_id).state is JobState.SUCCEEDED
        assert heads_of(url, job_id) == 1
        assert query_one(url, "SELECT attempts FROM jobs WHERE job_id = %s", job_id) == (1,)
        logs = "".join(server.log_tail(200_000) for server in servers)
        assert "retrying a job write" in logs  # the job did write into the outage
    finally:
        for server in servers:
            server.close()
