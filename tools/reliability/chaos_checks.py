"""What both chaos modes (tools/reliability/chaos.py: one server on the embedded store;
replica_chaos.py: replicas on PostgreSQL) check about jobs, heads and event logs once the
queue has settled.

Jobs are a durable queue (docs/design.md, "Jobs as a queue"): a job cut off by a kill is not
failed, it runs again from the start, so every job must END: SUCCEEDED, or FAILED for a
legitimate reason (the attempts limit, TRANSFER_JOB_MAX_ATTEMPTS). A job the client saw must
exist (none lost), each job has at most one head, a SUCCEEDED job has exactly its own head,
and no head belongs to a job that is not SUCCEEDED with that head id.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field

import grpc
from transfer_client.proto import transfer_service_pb2 as pb
from transfer_client.proto import transfer_service_pb2_grpc as pb_grpc

from tools.reliability.common import BIG_MESSAGES, problems_with_stream

TERMINAL = ("completed", "failed", "cancelled")
JOB_STATE_NAMES = {value: name for name, value in pb.JobState.items()}
UNFINISHED = (pb.JOB_STATE_QUEUED, pb.JOB_STATE_RUNNING, pb.JOB_STATE_UNSPECIFIED)
SCORE_TOLERANCE = 1e-5
RESTARTED = "restarted"
REQUEUED = "requeued"
ATTEMPTS_LIMIT = "attempts limit"

Truth = list[tuple[str, tuple[tuple[str, float], ...]]]


def failure_kind(error: str) -> str:
    """A FAILED job's reason as a legitimate kind ("attempts limit"), or "" when no
    legitimate reason explains it (a chaos run's jobs fail for no other reason)."""
    return ATTEMPTS_LIMIT if "TRANSFER_JOB_MAX_ATTEMPTS" in error else ""


@dataclass
class JobOutcomes:
    """How the jobs ended, and what happened to those a kill cut off."""

    ended: Counter[str] = field(default_factory=Counter)  # state name -> jobs
    failed: Counter[str] = field(default_factory=Counter)  # legitimate kind -> jobs
    cut_off: set[str] = field(default_factory=set)  # a kill cut the client's stream off
    restarted: set[str] = field(default_factory=set)  # a `restarted` warning in the log
    requeued: set[str] = field(default_factory=set)  # a `requeued` warning in the log
    rerun_succeeded: set[str] = field(default_factory=set)
    rerun_failed: set[str] = field(default_factory=set)
    lost: set[str] = field(default_factory=set)
    duplicate_heads: set[str] = field(default_factory=set)  # job ids with more than one head

    def summary_lines(self) -> list[str]:
        ended = ", ".join(
            f"{name.removeprefix('JOB_STATE_').lower()} {count}"
            for name, count in sorted(self.ended.items())
        )
        failed = ", ".join(f"{kind} {count}" for kind, count in sorted(self.failed.items()))
        return [
            f"jobs ended: {sum(self.ended.values())} ({ended or 'none'}); failed for a "
            f"legitimate reason: {sum(self.failed.values())} ({failed or 'none'})",
            f"jobs cut off by a kill (re-run): {len(self.cut_off)}; restarted (a `restarted` "
            f"warning) and finished: {len(self.restarted)} (succeeded "
            f"{len(self.rerun_succeeded)}, failed {len(self.rerun_failed)})",
            f"lost jobs: {len(self.lost)}; jobs with duplicate heads: {len(self.duplicate_heads)}",
        ]

    def as_dict(self) -> dict[str, object]:
        return {
            "ended": dict(self.ended),
            "failed": dict(self.failed),
            "cut_off": len(self.cut_off),
            "restarted": len(self.restarted),
            "requeued": len(self.requeued),
            "rerun_succeeded": len(self.rerun_succeeded),
            "rerun_failed": len(self.rerun_failed),
            "lost": sorted(self.lost),
            "duplicate_heads": sorted(self.duplicate_heads),
        }


@dataclass
class ReplicaReport:
    replicas: int = 0
    kills: int = 0
    kills_during_jobs: int = 0  # the killed replica held a running job's lease
    restarts: int = 0
    restart_seconds: list[float] = field(default_factory=list)
    jobs_submitted: int = 0
    resumed_streams: int = 0  # streams continued with WatchJob after a cut
    resent_calls: int = 0  # FineTunes sent again (same request_id) before the first event
    heads_checked: int = 0
    outcomes: JobOutcomes = field(default_factory=JobOutcomes)
    violations: list[str] = field(default_factory=list)
    stopped: str = ""
    seconds: float = 0.0

    def summary(self) -> str:
        seconds = self.restart_seconds
        restart = f"{min(seconds):.1f}-{max(seconds):.1f}s" if seconds else "n/a"
        lines = [
            f"replicas: {self.replicas}; kills: {self.kills} ({self.kills_during_jobs} while the "
            f"replica ran a job); restarts: {self.restarts} (to SERVING in {restart}); wall "
            f"time {self.seconds:.0f}s",
            f"jobs submitted: {self.jobs_submitted}; streams continued with WatchJob after a "
            f"cut: {self.resumed_streams}; FineTunes resent (same request_id): "
            f"{self.resent_calls}",
            *self.outcomes.summary_lines(),
            f"heads checked (listed, loaded, same predictions on two replicas): "
            f"{self.heads_checked}",
            f"violations: {len(self.violations)}",
        ]
        lines += [f"  - {violation}" for violation in self.violations[:20]]
        if self.stopped:
            lines.append(f"stopped early: {self.stopped}")
        return "\n".join(lines)

    def as_dict(self) -> dict[str, object]:
        return {
            "replicas": self.replicas,
            "kills": self.kills,
            "kills_during_jobs": self.kills_during_jobs,
            "restarts": self.restarts,
            "restart_seconds": self.restart_seconds,
            "jobs_submitted": self.jobs_submitted,
            "resumed_streams": self.resumed_streams,
            "resent_calls": self.resent_calls,
            "heads_checked": self.heads_checked,
            "jobs": self.outcomes.as_dict(),
            "violations": self.violations,
            "stopped": self.stopped,
            "seconds": self.seconds,
        }


def list_jobs(stub: pb_grpc.TransferServiceStub) -> dict[str, pb.Job]:
    jobs: dict[str, pb.Job] = {}
    token = ""
    while True:
        page = stub.ListJobs(pb.ListJobsRequest(page_token=token), timeout=60)
        jobs.update((job.job_id, job) for job in page.jobs)
        token = page.next_page_token
        if not token:
            return jobs


def list_heads(stub: pb_grpc.TransferServiceStub) -> dict[str, pb.Head]:
    heads: dict[str, pb.Head] = {}
    token = ""
    while True:
        page = stub.ListHeads(pb.ListHeadsRequest(page_token=token), timeout=60)
        heads.update((head.head_id, head) for head in page.heads)
        token = page.next_page_token
        if not token:
            return heads


def wait_for_jobs_to_end(
    stub: pb_grpc.TransferServiceStub, timeout: float
) -> tuple[dict[str, pb.Job], list[str]]:
    """Polls ListJobs until no job is queued or running; returns the jobs and the ids of
    those still unfinished at the timeout."""
    deadline = time.monotonic() + timeout
    while True:
        jobs = list_jobs(stub)
        unfinished = [job_id for job_id, job in jobs.items() if job.state in UNFINISHED]
        if not unfinished or time.monotonic() > deadline:
            return jobs, unfinished
        time.sleep(0.2)


def check_ended(job: pb.Job, outcomes: JobOutcomes) -> list[str]:
    """A job must have ended: SUCCEEDED, or FAILED for a legitimate reason (counted)."""
    state = JOB_STATE_NAMES.get(job.state, "?")
    if job.state in UNFINISHED:
        return [f"job {job.job_id} never ended: it reads {state}"]
    outcomes.ended[state] += 1
    if job.state == pb.JOB_STATE_FAILED:
        kind = failure_kind(job.error)
        if not kind:
            return [f"job {job.job_id} failed for no legitimate reason: {job.error!r}"]
        outcomes.failed[kind] += 1
    return []


def check_log(
    stub: pb_grpc.TransferServiceStub,
    job: pb.Job,
    outcomes: JobOutcomes,
    *,
    client_events: list[pb.FineTuneEvent] | None = None,
) -> list[str]:
    """Replays an ended job's log (WatchJob from 0): contiguous from 1 to its
    last_sequence, one terminal event that agrees with its state, no INTERNAL failure. Notes
    the job's `restarted`/`requeued` warnings. `client_events`, when given, are what a client
    saw of it, the stream continued by WatchJob after a cut: they must be the log, in order."""
    events = list(stub.WatchJob(pb.WatchJobRequest(job_id=job.job_id), timeout=60))
    problems = problems_with_stream(events)
    if not events or events[0].sequence != 1:
        problems.append(f"replay starts at {events[0].sequence if events else 'nothing'}")
    elif events[-1].sequence != job.last_sequence:
        problems.append(f"last event {events[-1].sequence} != last_sequence {job.last_sequence}")
    kind = events[-1].WhichOneof("event") if events else None
    expected = {
        pb.JOB_STATE_SUCCEEDED: "completed",
        pb.JOB_STATE_FAILED: "failed",
        pb.JOB_STATE_CANCELLED: "cancelled",
    }.get(job.state)
    if kind != expected:
        problems.append(f"the log ends {kind} but the job reads {JOB_STATE_NAMES[job.state]}")
    if kind == "completed" and events[-1].completed.head_id != job.head_id:
        problems.append(f"completed event names {events[-1].completed.head_id}, not the job's head")
    warnings = {e.warning.code for e in events if e.WhichOneof("event") == "warning"}
    if RESTARTED in warnings:
        outcomes.restarted.add(job.job_id)
        if job.state == pb.JOB_STATE_SUCCEEDED:
            outcomes.rerun_succeeded.add(job.job_id)
        elif job.state == pb.JOB_STATE_FAILED:
            outcomes.rerun_failed.add(job.job_id)
    if REQUEUED in warnings:
        outcomes.requeued.add(job.job_id)
    if client_events is not None:
        seen = [(e.sequence, e.WhichOneof("event")) for e in client_events]
        logged = [(e.sequence, e.WhichOneof("event")) for e in events]
        if seen != logged[: len(seen)]:
            problems.append(f"the client's stream {seen[:8]}... is not the log {logged[:8]}...")
    return [f"job {job.job_id} event log: {problem}" for problem in problems]


def check_heads(
    jobs: Mapping[str, pb.Job],
    heads: Iterable[pb.Head],
    outcomes: JobOutcomes,
    deleted: Collection[str] = (),
) -> list[str]:
    """At most one head per job; a SUCCEEDED job has exactly its head, listed (unless the run
    deleted it on purpose: `deleted`, a DeleteHead leaves its job SUCCEEDED); no head whose
    job is not SUCCEEDED with that head id."""
    problems = []
    per_job = Counter(head.job_id for head in heads)
    listed = {head.head_id: head for head in heads}
    for job_id, count in per_job.items():
        if count > 1:
            outcomes.duplicate_heads.add(job_id)
            problems.append(f"job {job_id} has {count} heads")
    for head in listed.values():
        job = jobs.get(head.job_id)
        if job is None or job.state != pb.JOB_STATE_SUCCEEDED or job.head_id != head.head_id:
            state = JOB_STATE_NAMES.get(job.state, "?") if job is not None else "missing"
            problems.append(
                f"head {head.head_id} is listed but its job {head.job_id} reads {state} "
                f"(head_id {job.head_id if job else ''!r}): a half-committed or second head"
            )
    for job in jobs.values():
        if (
            job.state == pb.JOB_STATE_SUCCEEDED
            and job.head_id not in listed
            and job.head_id not in deleted
        ):
            problems.append(f"job {job.job_id} SUCCEEDED but its head {job.head_id} is not listed")
    return problems


def predict(stub: pb_grpc.TransferServiceStub, head_id: str, probe: list[pb.Input]) -> Truth:
    response = stub.Predict(pb.PredictRequest(head_id=head_id, inputs=probe, top_k=3), timeout=60)
    return [(p.label, tuple((s.label, s.score) for s in p.top_k)) for p in response.predictions]


def same_predictions(expected: Truth, got: Truth) -> bool:
    if len(expected) != len(got):
        return False
    for (label_a, top_a), (label_b, top_b) in zip(expected, got, strict=True):
        if label_a != label_b or [s[0] for s in top_a] != [s[0] for s in top_b]:
            return False
        if any(abs(a[1] - b[1]) > SCORE_TOLERANCE for a, b in zip(top_a, top_b, strict=True)):
            return False
    return True


class StreamReader(threading.Thread):
    """Reads one FineTune stream on a thread, recording events as they come."""

    def __init__(self, address: str, request: pb.FineTuneRequest) -> None:
        super().__init__(daemon=True)
        self._channel = grpc.insecure_channel(address, options=BIG_MESSAGES)
        self._call = pb_grpc.TransferServiceStub(self._channel).FineTune(request, timeout=300)
        self.events: list[pb.FineTuneEvent] = []
        self.error: grpc.RpcError | None = None
        self.progress = threading.Event()
        self.done = threading.Event()

    def run(self) -> None:
        try:
            for event in self._call:
                self.events.append(event)
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
