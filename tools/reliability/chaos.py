"""Crash consistency: SIGKILL a `python -m transfer_service` at random points, restart it on
the same store, and check that nothing was lost or half-written.

    python -m tools.reliability.chaos --kills 100            # make chaos
    python -m tools.reliability.chaos --kills 20 --minutes 10 --modes saving,delete

Each round restarts the server on the same store, verifies it, then starts some work and
kills the process (SIGKILL: no handler runs) at a point chosen by the round's mode:

  training  a long training job, after a random number of its progress events
  saving    a short job, the moment its head's `.partial-*` directory appears on disk
  commit    a short job, between its head directory being renamed into place and its job
            row reading SUCCEEDED (found by freezing the process with SIGSTOP when the head
            directory appears and reading the job row; missed windows just continue)
  random    a short job, at a random time between the FineTune call and well after it ends
  delete    a DeleteHead, a random few milliseconds after it was sent
  startup   the server itself, at a random time before it reports SERVING

After every restart (the check a round begins with):
  * the server comes back to SERVING on the same store without anyone touching the files
    (the store never needs manual repair); no `.partial-*`/`.deleted-*` directory remains;
    SQLite's integrity_check reads ok;
  * every head the client saw completed is listed, loads, and predicts exactly what it
    predicted before (labels equal, scores within 1e-5); a deleted head stays deleted;
  * every listed head belongs to a job that reads SUCCEEDED with that head id (a head whose
    job reads FAILED is a half-committed save);
  * no job is QUEUED or RUNNING; a job cut off by a kill reads FAILED with a reason; a job seen
    finished keeps its state; its event log replays with contiguous sequences to a terminal
    event.
Exit status 0 when no check failed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import sqlite3
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from transfer_client.proto import transfer_service_pb2 as pb
from transfer_client.proto import transfer_service_pb2_grpc as pb_grpc

from tests.datasets import fashion_mnist
from tools.reliability.common import BIG_MESSAGES, ServerProcess, problems_with_stream, server_env

MODES = ("training", "saving", "commit", "random", "delete", "startup")
COMMIT_ATTEMPTS = 10
TERMINAL = ("completed", "failed", "cancelled")
JOB_STATE_NAMES = {value: name for name, value in pb.JobState.items()}
MAX_LIVE_HEADS = 10
SCORE_TOLERANCE = 1e-5

Truth = list[tuple[str, tuple[tuple[str, float], ...]]]


@dataclass
class ChaosReport:
    kills: Counter[str] = field(default_factory=Counter)
    restarts: int = 0
    restart_seconds: list[float] = field(default_factory=list)
    heads_completed: int = 0
    head_checks: int = 0
    jobs_interrupted: int = 0
    jobs_checked: int = 0
    mid_save_kills: int = 0
    violations: list[str] = field(default_factory=list)
    stopped: str = ""
    seconds: float = 0.0

    @property
    def total_kills(self) -> int:
        return sum(self.kills.values())

    def summary(self) -> str:
        kills = ", ".join(f"{mode} {count}" for mode, count in sorted(self.kills.items()))
        restart = (
            f"{min(self.restart_seconds):.1f}-{max(self.restart_seconds):.1f}s"
            if self.restart_seconds
            else "n/a"
        )
        lines = [
            f"kills: {self.total_kills} ({kills}); {self.mid_save_kills} saving kills landed "
            "while the head's .partial directory was on disk",
            f"restarts: {self.restarts} (to SERVING in {restart}); wall time {self.seconds:.0f}s",
            f"heads completed: {self.heads_completed}; head checks after restarts "
            f"(listed, loaded, same predictions): {self.head_checks}",
            f"jobs cut off by a kill: {self.jobs_interrupted}; job checks: {self.jobs_checked}",
            f"violations: {len(self.violations)}",
        ]
        lines += [f"  - {violation}" for violation in self.violations[:20]]
        if self.stopped:
            lines.append(f"stopped early: {self.stopped}")
        return "\n".join(lines)


class _Stream(threading.Thread):
    """Reads one FineTune stream on a thread, recording events as they come."""

    def __init__(self, address: str, request: pb.FineTuneRequest) -> None:
        super().__init__(daemon=True)
        self._channel = grpc.insecure_channel(address, options=BIG_MESSAGES)
        self._call = pb_grpc.TransferServiceStub(self._channel).FineTune(request, timeout=300)
        self.events: list[pb.FineTuneEvent] = []
        self.error: grpc.RpcError | None = None
        self.progress = threading.Event()
        self.done = threading.Event()
        self.started_event = threading.Event()

    def run(self) -> None:
        try:
            for event in self._call:
                self.events.append(event)
                if event.WhichOneof("event") == "started":
                    self.started_event.set()
                if event.WhichOneof("event") == "progress":
                    self.progress.set()
        except grpc.RpcError as error:
            self.error = error
        finally:
            self._channel.close()
            self.done.set()

    def training_steps(self) -> int:
        return sum(
            1
            for e in self.events
            if e.WhichOneof("event") == "progress" and e.progress.phase == "training"
        )

    @property
    def job_id(self) -> str:
        return self.events[0].job_id if self.events else ""

    @property
    def terminal(self) -> pb.FineTuneEvent | None:
        if self.events and self.events[-1].WhichOneof("event") in TERMINAL:
            return self.events[-1]
        return None


class Chaos:
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
        self.truth: dict[str, Truth | None] = {}  # completed heads -> predictions (once seen)
        self.deleted: set[str] = set()
        self.maybe_deleted: set[str] = set()
        self.job_states: dict[str, str] = {}  # jobs seen finished -> state name
        self.interrupted: set[str] = set()
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
        """Everything the module docstring promises, checked against the running server."""
        assert self.server is not None
        self._verify_files()
        with grpc.insecure_channel(self.server.address, options=BIG_MESSAGES) as channel:
            stub = pb_grpc.TransferServiceStub(channel)
            heads = {h.head_id: h for h in stub.ListHeads(pb.ListHeadsRequest(), timeout=30).heads}
            jobs = {j.job_id: j for j in stub.ListJobs(pb.ListJobsRequest(), timeout=30).jobs}
            for head_id in self.truth:
                if head_id not in heads and head_id not in self.maybe_deleted:
                    self._violate(f"completed head {head_id} is missing after a restart")
            for head in heads.values():
                self._verify_head(stub, head, jobs.get(head.job_id))
            for job in jobs.values():
                self._verify_job(stub, job)
            # A delete cut off by a kill has settled now: gone or whole.
            for head_id in list(self.maybe_deleted):
                if head_id not in heads:
                    self.maybe_deleted.discard(head_id)
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

    def _verify_head(
        self, stub: pb_grpc.TransferServiceStub, head: pb.Head, job: pb.Job | None
    ) -> None:
        head_id = head.head_id
        if head_id in self.deleted:
            self._violate(f"deleted head {head_id} is listed again")
            return
        if job is None or job.state != pb.JOB_STATE_SUCCEEDED or job.head_id != head_id:
            state = JOB_STATE_NAMES.get(job.state, "?") if job is not None else "missing"
            error = job.error if job is not None else ""
            self._violate(
                f"head {head_id} is listed but its job {head.job_id} reads {state} "
                f"(head_id {job.head_id if job else ''!r}, error {error!r}): a half-committed save"
            )
        if head_id not in self.truth:
            self.truth[head_id] = None  # first seen here (its completed event was cut off)
        try:
            got = self._predict(stub, head_id)
            stub.GetHead(pb.GetHeadRequest(head_id=head_id), timeout=30)
        except grpc.RpcError as error:
            self._violate(f"listed head {head_id} does not serve: {error.code()} {error.details()}")  # type: ignore[attr-defined]
            return
        expected = self.truth[head_id]
        self.report.head_checks += 1
        if expected is None:
            self.truth[head_id] = got
        elif not _same_predictions(expected, got):
            self._violate(f"head {head_id} predicts differently after a restart")

    def _verify_job(self, stub: pb_grpc.TransferServiceStub, job: pb.Job) -> None:
        state = JOB_STATE_NAMES.get(job.state, "?")
        self.report.jobs_checked += 1
        if job.state in (pb.JOB_STATE_QUEUED, pb.JOB_STATE_RUNNING, pb.JOB_STATE_UNSPECIFIED):
            self._violate(f"job {job.job_id} reads {state} after a restart")
        if job.state == pb.JOB_STATE_FAILED and not job.error.strip():
            self._violate(f"job {job.job_id} reads FAILED without a reason")
        seen = self.job_states.get(job.job_id)
        if seen is not None and seen != state:
            self._violate(f"job {job.job_id} finished {seen} but reads {state} after a restart")
        if job.job_id in self.interrupted and job.state not in (
            pb.JOB_STATE_FAILED,
            pb.JOB_STATE_SUCCEEDED,
        ):
            self._violate(f"job {job.job_id} cut off by a kill reads {state}")
        if seen is None or job.job_id in self.interrupted:
            events = list(stub.WatchJob(pb.WatchJobRequest(job_id=job.job_id), timeout=30))
            problems = problems_with_stream(events)
            if events and events[0].sequence != 1:
                problems.append(f"replay starts at sequence {events[0].sequence}")
            if events and events[-1].sequence != job.last_sequence:
                problems.append(
                    f"last event {events[-1].sequence} != job.last_sequence {job.last_sequence}"
                )
            # An interrupted job's INTERNAL-free failure is what problems_with_stream checks.
            for problem in problems:
                self._violate(f"job {job.job_id} event log: {problem}")
            if job.state in (pb.JOB_STATE_SUCCEEDED, pb.JOB_STATE_FAILED, pb.JOB_STATE_CANCELLED):
                self.job_states[job.job_id] = state
                self.interrupted.discard(job.job_id)

    def _predict(self, stub: pb_grpc.TransferServiceStub, head_id: str) -> Truth:
        response = stub.Predict(
            pb.PredictRequest(head_id=head_id, inputs=self.probe, top_k=3), timeout=60
        )
        return [(p.label, tuple((s.label, s.score) for s in p.top_k)) for p in response.predictions]

    # ---- the work that gets killed ----

    def _fine_tune(self, *, long: bool) -> _Stream:
        assert self.server is not None
        self._jobs_started += 1
        if long:
            config = pb.TrainingConfig(
                epochs=1000, batch_size=1, early_stopping_patience=0, progress_every_steps=1
            )
        else:
            config = pb.TrainingConfig(
                epochs=self.rng.randint(1, 4),
                trainable_blocks=self.rng.choice((0, 0, 1, 2)),
                progress_every_steps=self.rng.choice((1, 5, 100)),
                seed=self.rng.randrange(1000),
            )
        request = pb.FineTuneRequest(
            backbone="efficientnet_lite0",
            head_name=f"chaos-{self._jobs_started}",
            examples=self.examples,
            config=config,
        )
        stream = _Stream(self.server.address, request)
        stream.start()
        return stream

    def _settle(self, stream: _Stream) -> None:
        """After the kill: what did the client learn about its job?"""
        stream.done.wait(30)
        if not stream.job_id:
            return  # the kill came before the started event; ListJobs will show the job
        terminal = stream.terminal
        if terminal is None:
            self.interrupted.add(stream.job_id)
            self.report.jobs_interrupted += 1
            return
        kind = terminal.WhichOneof("event")
        for problem in problems_with_stream(stream.events):
            self._violate(f"job {stream.job_id} stream: {problem}")
        if kind == "completed":
            self.truth.setdefault(terminal.completed.head_id, None)
            self.report.heads_completed += 1
            self.job_states[stream.job_id] = "JOB_STATE_SUCCEEDED"
        elif kind == "failed":
            self.job_states[stream.job_id] = "JOB_STATE_FAILED"
        else:
            self.job_states[stream.job_id] = "JOB_STATE_CANCELLED"

    def _round_training(self) -> None:
        stream = self._fine_tune(long=True)
        target = self.rng.randint(1, 40)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not stream.done.is_set():
            if stream.training_steps() >= target:
                break
            time.sleep(0.001)
        self._kill("training")
        self._settle(stream)

    def _round_saving(self) -> None:
        stream = self._fine_tune(long=False)
        delay = self.rng.choice(self.saving_delays)
        deadline = time.monotonic() + 60
        mid_save = False
        while time.monotonic() < deadline and not stream.done.is_set():
            with contextlib.suppress(FileNotFoundError):
                if any(name.startswith(".partial-") for name in _listdir(self.heads_dir)):
                    if delay:
                        time.sleep(delay)
                    break
            time.sleep(0.0002)
        self._kill("saving")
        mid_save = any(name.startswith(".partial-") for name in _listdir(self.heads_dir))
        self.report.mid_save_kills += int(mid_save)
        self._settle(stream)

    def _round_commit(self) -> None:
        """Kills between the head's rename into place and its job's SUCCEEDED row."""
        assert self.server is not None
        for _ in range(COMMIT_ATTEMPTS):
            before = set(_listdir(self.heads_dir))
            stream = self._fine_tune(long=False)
            frozen = False
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and not stream.done.is_set():
                fresh = [n for n in _listdir(self.heads_dir) if n not in before and n[0] != "."]
                if fresh:
                    os.kill(self.server.pid, signal.SIGSTOP)
                    frozen = True
                    break
                time.sleep(0.0002)
            if frozen and stream.job_id and self._job_row_state(stream.job_id) == "running":
                self._kill("commit")  # SIGKILL ends a stopped process too
                self._settle(stream)
                return
            if frozen:
                os.kill(self.server.pid, signal.SIGCONT)
            stream.done.wait(60)
            self._settle(stream)
        self.log(f"commit: the window was never caught in {COMMIT_ATTEMPTS} jobs")
        self._kill("commit-missed")

    def _job_row_state(self, job_id: str) -> str:
        uri = f"file:{self.store / 'store.sqlite3'}?mode=ro"
        with contextlib.closing(sqlite3.connect(uri, uri=True, timeout=10)) as db:
            row = db.execute("SELECT state FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
        return str(row[0]) if row else ""

    def _round_random(self, typical_seconds: float) -> None:
        stream = self._fine_tune(long=False)
        time.sleep(self.rng.uniform(0.0, typical_seconds * 1.3))
        self._kill("random")
        self._settle(stream)

    def _round_delete(self) -> None:
        assert self.server is not None
        candidates = sorted(h for h in self.truth if h not in self.deleted)
        if not candidates:
            self._round_random(1.0)
            return
        head_id = self.rng.choice(candidates)
        channel = grpc.insecure_channel(self.server.address)
        future = pb_grpc.TransferServiceStub(channel).DeleteHead.future(
            pb.DeleteHeadRequest(head_id=head_id), timeout=30
        )
        time.sleep(self.rng.uniform(0.0, 0.01))
        self._kill("delete")
        try:
            future.result(timeout=30)
            self.deleted.add(head_id)
            self.truth.pop(head_id, None)
        except grpc.RpcError:
            self.maybe_deleted.add(head_id)
        channel.close()

    def _round_startup(self, typical_start: float) -> None:
        server = self._spawn()
        time.sleep(self.rng.uniform(0.0, typical_start))
        server.kill()
        server.close()
        self.report.kills["startup"] += 1

    def _trim_heads(self) -> None:
        """Keeps the number of live heads bounded (plain deletes, not killed)."""
        assert self.server is not None
        live = [h for h in self.truth if h not in self.deleted]
        if len(live) <= MAX_LIVE_HEADS:
            return
        with grpc.insecure_channel(self.server.address) as channel:
            stub = pb_grpc.TransferServiceStub(channel)
            for head_id in live[: len(live) - MAX_LIVE_HEADS]:
                stub.DeleteHead(pb.DeleteHeadRequest(head_id=head_id), timeout=30)
                self.deleted.add(head_id)
                self.truth.pop(head_id, None)

    def _baseline(self) -> float:
        """Two heads trained and predicted before any kill; returns a short job's seconds."""
        assert self.server is not None
        started = time.monotonic()
        for _ in range(2):
            stream = self._fine_tune(long=False)
            stream.done.wait(120)
            self._settle(stream)
        seconds = (time.monotonic() - started) / 2
        with grpc.insecure_channel(self.server.address, options=BIG_MESSAGES) as channel:
            stub = pb_grpc.TransferServiceStub(channel)
            for head_id in list(self.truth):
                self.truth[head_id] = self._predict(stub, head_id)
        return seconds

    # ---- the run ----

    def run(
        self, kills: int, modes: Sequence[str], time_limit_s: float, *, shuffle: bool = True
    ) -> ChaosReport:
        started = time.monotonic()
        if not self._start():
            return self.report
        typical_job = self._baseline()
        typical_start = self.report.restart_seconds[0]
        plan = [modes[i % len(modes)] for i in range(kills)]
        if shuffle:
            self.rng.shuffle(plan)
        for number, mode in enumerate(plan, 1):
            if time.monotonic() - started > time_limit_s:
                self.report.stopped = f"time limit after {number - 1} kills"
                break
            self._trim_heads()
            if mode == "training":
                self._round_training()
            elif mode == "saving":
                self._round_saving()
            elif mode == "commit":
                self._round_commit()
            elif mode == "random":
                self._round_random(typical_job)
            elif mode == "delete":
                self._round_delete()
            elif mode == "startup":
                self._kill_running_gracelessly()
                self._round_startup(typical_start)
            else:
                raise ValueError(f"unknown mode {mode!r}")
            self.log(f"kill {number}/{len(plan)} ({mode}); restarting")
            if not self._start():
                break
            self.verify()
        if self.server is not None:
            self.server.close()
            self.server = None
        self.report.seconds = time.monotonic() - started
        return self.report

    def _kill_running_gracelessly(self) -> None:
        """Startup rounds kill a fresh process; the running one goes first (also a kill)."""
        if self.server is not None:
            self._kill("idle")


def _listdir(path: Path) -> list[str]:
    try:
        return [entry.name for entry in os.scandir(path)]
    except FileNotFoundError:
        return []


def _same_predictions(expected: Truth, got: Truth) -> bool:
    if len(expected) != len(got):
        return False
    for (label_a, top_a), (label_b, top_b) in zip(expected, got, strict=True):
        if label_a != label_b or [s[0] for s in top_a] != [s[0] for s in top_b]:
            return False
        if any(abs(a[1] - b[1]) > SCORE_TOLERANCE for a, b in zip(top_a, top_b, strict=True)):
            return False
    return True


def run_chaos(
    kills: int,
    *,
    modes: Sequence[str] = MODES,
    seed: int = 0,
    work_dir: Path | None = None,
    time_limit_s: float = 3600.0,
    shuffle: bool = True,
    saving_delays: Sequence[float] = (0.0, 0.0, 0.0005, 0.001, 0.002),
    log: Callable[[str], None] = print,
) -> ChaosReport:
    with contextlib.ExitStack() as stack:
        if work_dir is None:
            work_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="chaos-")))
        work_dir.mkdir(parents=True, exist_ok=True)
        chaos = Chaos(work_dir, seed=seed, log=log, saving_delays=saving_delays)
        try:
            return chaos.run(kills, modes, time_limit_s, shuffle=shuffle)
        finally:
            if chaos.server is not None:
                chaos.server.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kills", type=int, default=100)
    parser.add_argument("--minutes", type=float, default=60.0, help="stop early after this")
    parser.add_argument("--modes", default=",".join(MODES), help=f"subset of {','.join(MODES)}")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--work-dir", type=Path, default=None, help="kept for inspection")
    parser.add_argument("--json", type=Path, default=None, help="write the report here too")
    arguments = parser.parse_args(argv)
    modes = [m.strip() for m in arguments.modes.split(",") if m.strip()]
    unknown = set(modes) - set(MODES)
    if unknown:
        parser.error(f"unknown modes: {sorted(unknown)}")
    seed = arguments.seed if arguments.seed is not None else random.randrange(2**31)
    print(f"chaos: {arguments.kills} kills, modes {modes}, seed {seed}", flush=True)
    report = run_chaos(
        arguments.kills,
        modes=modes,
        seed=seed,
        work_dir=arguments.work_dir,
        time_limit_s=arguments.minutes * 60,
        log=lambda line: print(line, flush=True),
    )
    print(report.summary())
    if arguments.json is not None:
        data = {
            "seed": seed,
            "kills": dict(report.kills),
            "restarts": report.restarts,
            "restart_seconds": report.restart_seconds,
            "heads_completed": report.heads_completed,
            "head_checks": report.head_checks,
            "jobs_interrupted": report.jobs_interrupted,
            "jobs_checked": report.jobs_checked,
            "mid_save_kills": report.mid_save_kills,
            "violations": report.violations,
            "stopped": report.stopped,
            "seconds": report.seconds,
        }
        arguments.json.write_text(json.dumps(data, indent=2), encoding="utf-8")
    return 1 if report.violations else 0


if __name__ == "__main__":
    sys.exit(main())
