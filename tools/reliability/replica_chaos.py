"""Chaos on replicas: N `python -m transfer_service` processes share one PostgreSQL store
(jobs are a queue there: docs/design.md, "Jobs as a queue"). Clients keep submitting small
FineTunes while a random replica is SIGKILLed at random moments (mostly one running a job)
and restarted; a killed replica's jobs are claimed by another once their lease runs out
(TRANSFER_JOB_LEASE_SECONDS, 3 s here) and run again from the start.

    python -m tools.reliability.chaos --replicas 3 --kills 100     # make chaos-replicas

Each client's FineTune carries a request_id: a call cut off before the job's first event is
sent again (same job); a stream cut off later goes on with WatchJob(job_id, after_sequence)
on a live replica, and must continue exactly where it stopped. At the end, once every job
ended, it checks (chaos_checks.py, plus the database read directly with psycopg):
  * every job ended: SUCCEEDED, or FAILED for a legitimate reason (the attempts limit,
    TRANSFER_JOB_MAX_ATTEMPTS; counted); none lost (every job id a client saw exists), no job
    the clients never saw (a retried request queued twice); no job left with examples;
  * no duplicate heads: `heads` grouped by job_id has no count above 1, every SUCCEEDED
    job's head_id exists, no head whose job is not SUCCEEDED with that head id;
  * each job's log replays contiguously to one terminal event, its client saw exactly that
    log, and a job whose log has a `restarted` warning is counted as re-run;
  * every head is listed, loads and predicts, the same on two replicas.
"""

from __future__ import annotations

import contextlib
import random
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import grpc
import psycopg
from transfer_client.proto import transfer_service_pb2 as pb
from transfer_client.proto import transfer_service_pb2_grpc as pb_grpc

from tests.datasets import fashion_mnist
from tests.postgres_server import PostgresServer
from tools.reliability import chaos_checks as checks
from tools.reliability.chaos_checks import ReplicaReport
from tools.reliability.common import BIG_MESSAGES, ServerProcess, server_env
from tools.reliability.replica_set import owner_pid, replica_extra

LEASE_SECONDS = 3
IN_FLIGHT = 4  # client jobs at once (the tenant's quota is 8)
JOB_SECONDS = 600.0  # one client job's limit, retries included
RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


class _ClientJob(threading.Thread):
    """One FineTune followed to its end across kills: resent with its request_id until the
    job's first event arrives, then WatchJob(after_sequence) on any live replica."""

    def __init__(self, chaos: ReplicaChaos, request: pb.FineTuneRequest) -> None:
        super().__init__(daemon=True)
        self.chaos = chaos
        self.request = request
        self.events: list[pb.FineTuneEvent] = []
        self.problems: list[str] = []
        self.job_id = ""

    def run(self) -> None:
        deadline = time.monotonic() + JOB_SECONDS
        calls = 0
        while time.monotonic() < deadline:
            address = self.chaos.address()
            calls += 1
            with grpc.insecure_channel(address, options=BIG_MESSAGES) as channel:
                stub = pb_grpc.TransferServiceStub(channel)
                try:
                    if not self.job_id:
                        self.chaos.count("resent_calls", int(calls > 1))
                        call = stub.FineTune(self.request, timeout=120)
                    else:
                        self.chaos.count("resumed_streams", 1)
                        after = self.events[-1].sequence
                        request = pb.WatchJobRequest(job_id=self.job_id, after_sequence=after)
                        call = stub.WatchJob(request, timeout=120)
                    for event in call:
                        if self._take(event):
                            return
                    self.problems.append(f"a stream of {self.job_id} ended with no end event")
                except grpc.RpcError as error:
                    code = error.code()  # type: ignore[attr-defined]
                    # A killed replica's connection may also end as INTERNAL/UNKNOWN.
                    if code not in RETRYABLE and self.chaos.is_live(address):
                        self.problems.append(
                            f"{self.job_id or 'FineTune'}: {code} {error.details()}"
                        )  # type: ignore[attr-defined]
                        return
            time.sleep(0.2)
        self.problems.append(f"job {self.job_id or '(no id)'} did not end in {JOB_SECONDS:.0f}s")

    def _take(self, event: pb.FineTuneEvent) -> bool:
        """Records one event; True at the terminal one."""
        expected = self.events[-1].sequence + 1 if self.events else 1
        if event.sequence != expected or (self.job_id and event.job_id != self.job_id):
            self.problems.append(
                f"job {event.job_id}: event {event.sequence} where {expected} was due"
            )
        self.job_id = event.job_id
        self.events.append(event)
        return event.WhichOneof("event") in checks.TERMINAL


class ReplicaChaos:
    def __init__(
        self,
        work_dir: Path,
        database_url: str,
        replicas: int,
        *,
        seed: int,
        log: Callable[[str], None],
    ) -> None:
        self.work_dir = work_dir
        self.url = database_url
        self.rng = random.Random(seed)
        self.log = log
        self.report = ReplicaReport(replicas=replicas)
        self.servers: list[ServerProcess] = []
        self._lock = threading.Lock()
        train = fashion_mnist(6, classes=2, seed=seed % 1000)
        self.examples = [pb.Example(image=image, label=label) for image, label in train]
        self.probe = [
            pb.Input(image=image) for image, _ in fashion_mnist(2, split="test", classes=2, seed=7)
        ]
        self.jobs: list[_ClientJob] = []
        self._count = replicas
        self.serving: set[int] = set()  # replicas that came to SERVING and were not killed
        self._restarts: list[threading.Thread] = []

    def _violate(self, message: str) -> None:
        if message not in self.report.violations:
            self.report.violations.append(message)
            self.log(f"VIOLATION: {message}")

    # ---- replicas ----

    def _spawn(self, number: int) -> ServerProcess:
        extra = replica_extra(self.url, LEASE_SECONDS)
        env = server_env(self.work_dir / f"replica-{number}", grace_seconds=2.0, extra=extra)
        return ServerProcess(env, self.work_dir / f"replica-{number}.log")

    def _restart(self, number: int) -> None:
        """Spawns replica `number` again and waits for it to serve (on a thread of its own:
        meanwhile another replica may be killed, while at least one other serves)."""
        server = self._spawn(number)
        with self._lock:
            self.servers[number] = server
        try:
            seconds = server.wait_serving(timeout=180)
        except (RuntimeError, TimeoutError) as error:
            self._violate(f"replica {number} did not start: {str(error)[-300:]}")
            return
        with self._lock:
            self.report.restart_seconds.append(seconds)
            self.report.restarts += 1
            if self.servers[number] is server:
                self.serving.add(number)

    def address(self) -> str:
        with self._lock:
            live = [self.servers[n].address for n in sorted(self.serving)]
        return self.rng.choice(live or ["127.0.0.1:1"])

    def is_live(self, address: str) -> bool:
        with self._lock:
            return any(self.servers[n].address == address for n in self.serving)

    def count(self, name: str, increment: int) -> None:
        with self._lock:
            setattr(self.report, name, getattr(self.report, name) + increment)

    def _running_on(self) -> set[int]:
        """The serving replicas holding a running job's current lease."""
        with psycopg.connect(self.url, autocommit=True) as conn:
            rows = conn.execute(
                "SELECT lease_owner FROM jobs WHERE state = 'running' AND lease_expires > now()"
            ).fetchall()
        pids = {owner_pid(owner) for (owner,) in rows if owner}
        with self._lock:
            return {n for n in self.serving if self.servers[n].pid in pids}

    def _kill_one(self) -> None:
        """Kills a serving replica (mostly one running a job) once at least two serve, and
        starts it again in the background."""
        deadline = time.monotonic() + 300
        while len(self.serving) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        deadline = time.monotonic() + self.rng.uniform(0.3, 4.0)
        busy: set[int] = set()
        while time.monotonic() < deadline:  # mostly while a job runs: wait for one
            busy = self._running_on()
            if busy and self.rng.random() < 0.5:
                break
            time.sleep(0.1)
        with self._lock:
            choices = sorted(busy) if busy and self.rng.random() < 0.9 else sorted(self.serving)
        if not choices:
            return
        number = self.rng.choice(choices)
        self.report.kills_during_jobs += int(number in self._running_on())
        with self._lock:
            server = self.servers[number]
            self.serving.discard(number)
        server.kill()
        server.close()
        self.report.kills += 1
        self.log(f"kill {self.report.kills}: replica {number} (pid {server.pid}); restarting")
        restart = threading.Thread(target=self._restart, args=(number,), daemon=True)
        restart.start()
        self._restarts.append(restart)

    # ---- clients ----

    def _submit(self) -> None:
        self.report.jobs_submitted += 1
        config = pb.TrainingConfig(
            epochs=self.rng.randint(2, 5),
            batch_size=2,
            trainable_blocks=self.rng.choice((-1, -1, 2, 0)),
            early_stopping_patience=0,
            seed=self.rng.randrange(1000),
        )
        request = pb.FineTuneRequest(
            backbone="efficientnet_lite0",
            head_name=f"replica-chaos-{self.report.jobs_submitted}",
            examples=self.examples,
            config=config,
            request_id=str(uuid.UUID(int=self.rng.getrandbits(128))),
        )
        job = _ClientJob(self, request)
        job.start()
        self.jobs.append(job)

    def _keep_submitting(self, stop: threading.Event) -> None:
        while not stop.is_set():
            if sum(job.is_alive() for job in self.jobs) < IN_FLIGHT:
                self._submit()
            stop.wait(0.2)

    # ---- the run ----

    def run(self, kills: int, time_limit_s: float) -> ReplicaReport:
        started = time.monotonic()
        self.servers = [self._spawn(n) for n in range(self._count)]
        for number, server in enumerate(self.servers):
            try:
                self.report.restart_seconds.append(server.wait_serving(timeout=300))
            except (RuntimeError, TimeoutError) as error:
                self._violate(f"replica {number} did not start: {str(error)[-300:]}")
                self.report.stopped = "the replicas did not start"
                return self.report
            self.serving.add(number)
        stop = threading.Event()
        submitter = threading.Thread(target=self._keep_submitting, args=(stop,), daemon=True)
        submitter.start()
        try:
            for _ in range(kills):
                if time.monotonic() - started > time_limit_s:
                    self.report.stopped = f"time limit after {self.report.kills} kills"
                    break
                self._kill_one()
        finally:
            stop.set()
            submitter.join(timeout=30)
            for restart in self._restarts:
                restart.join(timeout=200)
        self.log("kills done; waiting for every job to end")
        end = time.monotonic() + JOB_SECONDS + 30
        for job in self.jobs:
            job.join(timeout=max(0.1, end - time.monotonic()))
        self.verify()
        self.report.seconds = time.monotonic() - started
        return self.report

    def close(self) -> None:
        for server in self.servers:
            server.close()

    # ---- the checks ----

    def verify(self) -> None:
        outcomes = self.report.outcomes
        with grpc.insecure_channel(self.address(), options=BIG_MESSAGES) as channel:
            stub = pb_grpc.TransferServiceStub(channel)
            jobs, unfinished = checks.wait_for_jobs_to_end(stub, 120)
            for job_id in unfinished:
                self._violate(f"job {job_id} never ended")
            seen = {job.job_id: job for job in self.jobs if job.job_id}
            for job in self.jobs:
                if job.is_alive():
                    self._violate(
                        f"the client of {job.job_id or job.request.head_name} still waits"
                    )
                for problem in job.problems:
                    self._violate(problem)
                if not job.job_id:
                    self._violate(f"{job.request.head_name}: the client never got a job id")
                elif job.job_id not in jobs:
                    outcomes.lost.add(job.job_id)
                    self._violate(f"job {job.job_id} the client was given is lost")
            for job_id in jobs.keys() - seen.keys():
                self._violate(f"job {job_id} exists but no client was given it (queued twice?)")
            for job in jobs.values():
                client = seen.get(job.job_id)
                problems = checks.check_ended(job, outcomes)
                if job.state not in checks.UNFINISHED:
                    events = client.events if client is not None else None
                    problems += checks.check_log(stub, job, outcomes, client_events=events)
                for problem in problems:
                    self._violate(problem)
            heads = checks.list_heads(stub)
            for problem in checks.check_heads(jobs, heads.values(), outcomes):
                self._violate(problem)
        self._verify_database()
        self._verify_heads_serve(list(heads))

    def _verify_database(self) -> None:
        queries = {
            "jobs with more than one head": "SELECT job_id, count(*) FROM heads GROUP BY job_id "
            "HAVING count(*) > 1",
            "SUCCEEDED jobs whose head does not exist": "SELECT j.job_id FROM jobs j LEFT JOIN "
            "heads h ON h.head_id = j.head_id WHERE j.state = 'succeeded' AND h.head_id IS NULL",
            "heads whose job is not SUCCEEDED with them": "SELECT h.head_id FROM heads h LEFT "
            "JOIN jobs j ON j.job_id = h.job_id WHERE j.state IS DISTINCT FROM 'succeeded' OR "
            "j.head_id <> h.head_id",
            "unfinished jobs": "SELECT job_id FROM jobs WHERE state IN ('queued', 'running')",
            "ended jobs that kept their examples": "SELECT DISTINCT e.job_id FROM job_examples e "
            "JOIN jobs j USING (job_id) WHERE j.state NOT IN ('queued', 'running')",
        }
        with psycopg.connect(self.url, autocommit=True) as conn:
            # Cut off by a kill (or a lease lost in a stall): claimed again, run again.
            rerun = conn.execute("SELECT job_id FROM jobs WHERE attempts > 1").fetchall()
            self.report.outcomes.cut_off.update(str(row[0]) for row in rerun)
            for name, query in queries.items():
                rows = conn.execute(query).fetchall()
                if rows:
                    if name == "jobs with more than one head":
                        self.report.outcomes.duplicate_heads.update(str(r[0]) for r in rows)
                    self._violate(f"database: {name}: {rows[:5]}")

    def _verify_heads_serve(self, head_ids: list[str]) -> None:
        with self._lock:
            addresses = [self.servers[n].address for n in sorted(self.serving)][:2]
        channels = [grpc.insecure_channel(a, options=BIG_MESSAGES) for a in addresses]
        try:
            stubs = [pb_grpc.TransferServiceStub(channel) for channel in channels]
            for head_id in head_ids:
                try:
                    got = [checks.predict(stub, head_id, self.probe) for stub in stubs]
                    stubs[0].GetHead(pb.GetHeadRequest(head_id=head_id), timeout=30)
                except grpc.RpcError as error:
                    self._violate(
                        f"head {head_id} does not serve: {error.code()} {error.details()}"
                    )  # type: ignore[attr-defined]
                    continue
                self.report.heads_checked += 1
                if any(not checks.same_predictions(got[0], other) for other in got[1:]):
                    self._violate(f"head {head_id} predicts differently on two replicas")
        finally:
            for channel in channels:
                channel.close()


def run_replica_chaos(
    kills: int,
    *,
    replicas: int = 3,
    seed: int = 0,
    work_dir: Path | None = None,
    database_url: str | None = None,
    time_limit_s: float = 3600.0,
    log: Callable[[str], None] = print,
) -> ReplicaReport:
    """Runs the chaos on a PostgreSQL of its own (or `database_url`'s empty database)."""
    with contextlib.ExitStack() as stack:
        if work_dir is None:
            work_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="chaos-")))
        work_dir.mkdir(parents=True, exist_ok=True)
        if database_url is None:
            postgres = PostgresServer().start()
            stack.callback(postgres.stop)
            database_url = postgres.create_database("chaos")
        chaos = ReplicaChaos(work_dir, database_url, replicas, seed=seed, log=log)
        stack.callback(chaos.close)
        started = time.monotonic()
        try:
            return chaos.run(kills, time_limit_s)
        finally:
            chaos.report.seconds = time.monotonic() - started
    raise AssertionError("unreachable")  # for mypy: ExitStack may swallow exceptions
