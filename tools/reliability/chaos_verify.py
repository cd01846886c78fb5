"""The single-server chaos run's state and checks (tools/reliability/chaos.py lists them):
what the client learnt of each job and head, the server process it restarts on one embedded
store, and the verification a round begins with (job and head rules in chaos_checks.py)."""

from __future__ import annotations

import contextlib
import random
import sqlite3
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from transfer_client.proto import transfer_service_pb2 as pb
from transfer_client.proto import transfer_service_pb2_grpc as pb_grpc

from tests.datasets import fashion_mnist
from tools.reliability import chaos_checks as checks
from tools.reliability.common import BIG_MESSAGES, ServerProcess, problems_with_stream, server_env

SETTLE_SECONDS = 180.0  # for the jobs a kill cut off to run again and end


@dataclass
class ChaosReport:
    kills: Counter[str] = field(default_factory=Counter)
    restarts: int = 0
    restart_seconds: list[float] = field(default_factory=list)
    heads_completed: int = 0
    head_checks: int = 0
    jobs_checked: int = 0
    mid_save_kills: int = 0
    outcomes: checks.JobOutcomes = field(default_factory=checks.JobOutcomes)
    violations: list[str] = field(default_factory=list)
    stopped: str = ""
    seconds: float = 0.0

    @property
    def total_kills(self) -> int:
        return sum(self.kills.values())

    @property
    def jobs_rerun(self) -> int:
        return len(self.outcomes.cut_off)

    def summary(self) -> str:
        kills = ", ".join(f"{mode} {count}" for mode, count in sorted(self.kills.items()))
        seconds = self.restart_seconds
        restart = f"{min(seconds):.1f}-{max(seconds):.1f}s" if seconds else "n/a"
        lines = [
            f"kills: {self.total_kills} ({kills}); {self.mid_save_kills} saving kills landed "
            "while the head's .partial directory was on disk",
            f"restarts: {self.restarts} (to SERVING in {restart}); wall time {self.seconds:.0f}s",
            f"heads completed: {self.heads_completed}; head checks after restarts "
            f"(listed, loaded, same predictions): {self.head_checks}; job checks: "
            f"{self.jobs_checked}",
            *self.outcomes.summary_lines(),
            f"violations: {len(self.violations)}",
        ]
        lines += [f"  - {violation}" for violation in self.violations[:20]]
        if self.stopped:
            lines.append(f"stopped early: {self.stopped}")
        return "\n".join(lines)

    def as_dict(self) -> dict[str, object]:
        return {
            "kills": dict(self.kills),
            "restarts": self.restarts,
            "restart_seconds": self.restart_seconds,
            "heads_completed": self.heads_completed,
            "head_checks": self.head_checks,
            "jobs_checked": self.jobs_checked,
            "mid_save_kills": self.mid_save_kills,
            "jobs": self.outcomes.as_dict(),
            "violations": self.violations,
            "stopped": self.stopped,
            "seconds": self.seconds,
        }


class ChaosState:
    """The server on its store, what the client knows, and the checks."""

    def __init__(
        self,
        work_dir: Path,
        *,
        seed: int,
        log: Callable[[str], None] = print,
        saving_delays: Sequence[float] = (0.0, 0.0, 0.0005, 0.001, 0.002),
    ) -> None:
        self.saving_delays = tuple(saving_delays)
        self.work_dir = work_dir
        self.store = work_dir / "store"
        self.heads_dir = self.store / "heads"
        self.rng = random.Random(seed)
        self.log = log
        self.report = ChaosReport()
        train = fashion_mnist(4, classes=3, seed=seed % 1000)
        self.examples = [pb.Example(image=image, label=label) for image, label in train]
        self.probe = [
            pb.Input(image=image) for image, _ in fashion_mnist(2, split="test", classes=3, seed=7)
        ]
        self.truth: dict[str, checks.Truth | None] = {}  # completed heads -> predictions
        self.deleted: set[str] = set()
        self.maybe_deleted: set[str] = set()
        self.job_states: dict[str, str] = {}  # jobs seen ended -> state name
        self.seen_jobs: set[str] = set()  # every job id the client was given
        self.interrupted: dict[str, list[pb.FineTuneEvent]] = {}  # cut off -> events seen
        self.client_ends: dict[str, str] = {}  # jobs whose stream ended -> state it implies
        self.server: ServerProcess | None = None
        self._jobs_started = 0

    # ---- process control ----

    def _spawn(self) -> ServerProcess:
        env = server_env(self.store, grace_seconds=2.0)
        return ServerProcess(env, self.work_dir / "server.log")

    def _start(self) -> bool:
        server = self._spawn()
        try:
            seconds = server.wait_serving(timeout=120)
        except (RuntimeError, TimeoutError) as error:
            server.close()
            detail = str(error).strip().splitlines()[-1] if str(error).strip() else repr(error)
            self._violate(f"the server did not come back on its store: {detail}")
            self.report.stopped = "restart failed; the store would need manual repair"
            return False
        self.report.restarts += 1
        self.report.restart_seconds.append(seconds)
        self.server = server
        return True

    def _kill(self, mode: str) -> None:
        assert self.server is not None
        self.server.kill()
        self.server.close()
        self.server = None
        self.report.kills[mode] += 1

    def _violate(self, message: str) -> None:
        if message in self.report.violations:
            return  # the same broken thing, seen again after a later restart
        self.report.violations.append(message)
        self.log(f"VIOLATION: {message}")

    # ---- the checks ----

    def verify(self) -> None:
        """Everything the module docstring promises, checked against the running server once
        the jobs a kill cut off have run again and ended."""
        assert self.server is not None
        self._verify_files()
        with grpc.insecure_channel(self.server.address, options=BIG_MESSAGES) as channel:
            stub = pb_grpc.TransferServiceStub(channel)
            jobs, unfinished = checks.wait_for_jobs_to_end(stub, SETTLE_SECONDS)
            for job_id in unfinished:
                self._violate(f"job {job_id} did not end within {SETTLE_SECONDS:.0f}s")
            heads = checks.list_heads(stub)
            for job_id in self.seen_jobs - jobs.keys():
                self.report.outcomes.lost.add(job_id)
                self._violate(f"job {job_id} the client was given is lost")
            for head_id in self.truth:
                if head_id not in heads and head_id not in self.maybe_deleted:
                    self._violate(f"completed head {head_id} is missing after a restart")
            live = {h.head_id: h for h in heads.values() if h.head_id not in self.deleted}
            removed = self.deleted | self.maybe_deleted
            for problem in checks.check_heads(jobs, live.values(), self.report.outcomes, removed):
                self._violate(problem)
            for head in heads.values():
                self._verify_head(stub, head)
            for job in jobs.values():
                if job.state not in checks.UNFINISHED:
                    self._verify_job(stub, job)
            # A delete cut off by a kill has settled now: gone or whole.
            for head_id in list(self.maybe_deleted):
                if head_id not in heads:
                    self.deleted.add(head_id)
                    self.truth.pop(head_id, None)
            self.maybe_deleted.clear()

    def _verify_files(self) -> None:
        leftovers = [
            p.name for p in self.heads_dir.iterdir() if p.name.startswith((".partial", ".deleted"))
        ]
        if leftovers:
            self._violate(f"the store kept half-written entries after a restart: {leftovers}")
        uri = f"file:{self.store / 'store.sqlite3'}?mode=ro"
        with contextlib.closing(sqlite3.connect(uri, uri=True, timeout=10)) as db:
            result = db.execute("PRAGMA integrity_check").fetchone()[0]
        if result != "ok":
            self._violate(f"SQLite integrity_check: {result}")

    def _verify_head(self, stub: pb_grpc.TransferServiceStub, head: pb.Head) -> None:
        head_id = head.head_id
        if head_id in self.deleted:
            self._violate(f"deleted head {head_id} is listed again")
            return
        if head_id not in self.truth:
            self.truth[head_id] = None  # first seen here (its completed event was cut off)
        try:
            got = checks.predict(stub, head_id, self.probe)
            stub.GetHead(pb.GetHeadRequest(head_id=head_id), timeout=30)
        except grpc.RpcError as error:
            self._violate(f"listed head {head_id} does not serve: {error.code()} {error.details()}")  # type: ignore[attr-defined]
            return
        expected = self.truth[head_id]
        self.report.head_checks += 1
        if expected is None:
            self.truth[head_id] = got
        elif not checks.same_predictions(expected, got):
            self._violate(f"head {head_id} predicts differently after a restart")

    def _verify_job(self, stub: pb_grpc.TransferServiceStub, job: pb.Job) -> None:
        """An ended job: checked in full once, then only that its state stays."""
        state = checks.JOB_STATE_NAMES.get(job.state, "?")
        self.report.jobs_checked += 1
        seen = self.job_states.get(job.job_id)
        if seen is not None:
            if seen != state:
                self._violate(f"job {job.job_id} ended {seen} but reads {state} after a restart")
            return
        outcomes = self.report.outcomes
        problems = checks.check_ended(job, outcomes)
        if self.client_ends.get(job.job_id, state) != state:
            problems.append(
                f"job {job.job_id} streamed {self.client_ends[job.job_id]}, reads {state}"
            )
        client_events = self.interrupted.pop(job.job_id, None)
        problems += checks.check_log(stub, job, outcomes, client_events=client_events)
        if client_events:
            # The stream a client would continue after the cut: from its last event on.
            after = client_events[-1].sequence
            rest = list(
                stub.WatchJob(
                    pb.WatchJobRequest(job_id=job.job_id, after_sequence=after), timeout=60
                )
            )
            if not rest or rest[0].sequence != after + 1 or rest[-1].sequence != job.last_sequence:
                problems.append(f"job {job.job_id}: WatchJob after {after} does not continue it")
        for problem in problems:
            self._violate(problem)
        self.job_states[job.job_id] = state

    def _settle(self, stream: checks.StreamReader) -> None:
        """After the kill: what did the client learn about its job?"""
        stream.done.wait(30)
        if not stream.job_id:
            return  # the kill came before the queued event; ListJobs will show the job
        self.seen_jobs.add(stream.job_id)
        terminal = stream.terminal
        if terminal is None:
            self.interrupted[stream.job_id] = list(stream.events)
            self.report.outcomes.cut_off.add(stream.job_id)
            return
        for problem in problems_with_stream(stream.events):
            self._violate(f"job {stream.job_id} stream: {problem}")
        if terminal.WhichOneof("event") == "completed":
            self.truth.setdefault(terminal.completed.head_id, None)
            self.report.heads_completed += 1
        self.client_ends[stream.job_id] = {
            "completed": "JOB_STATE_SUCCEEDED",
            "failed": "JOB_STATE_FAILED",
        }.get(terminal.WhichOneof("event") or "", "JOB_STATE_CANCELLED")
