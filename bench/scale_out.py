"""Scale-out on PostgreSQL: several replicas (real `python -m transfer_service` processes) on
one database, jobs a queue in it (docs/design.md, "Jobs as a queue"). Four measurements, each
repeated and summarised by the median of its repeats:

(a) *Cold head load from the database.* Copies of one trained head are written into the
    database under new ids (Store.save_head, from this process): the first Predict of each
    on a replica is cold (the replica loads the head from the database: record, weights,
    checksum, build), the second, right after on the same head, is warm. p50 / p99 of both,
    per round (a round's heads go to one replica, the next round to the next one).
(b) *Completion on A -> Predict on B.* A FineTune's `completed` event (its own `time`, stamped
    by the replica that ran it, A, just before the commit) to the first successful Predict
    on the new head through another replica, B, returned to the client; B has never seen the
    head. Also the first Predict's own latency, and how many NOT_FOUND answers came first
    (the head commits with the completed event, so none should).
(c) *Takeover after SIGKILL.* The replica running a job is SIGKILLed; a client watching
    through a survivor waits for the `restarted` warning. Kill -> warning (the warning's own
    `time`), the lease left at the kill (from the database's `lease_expires`), and their
    difference: lease expiry -> running again (the survivors look for claimable jobs every
    second). Lease: 3 s (TRANSFER_JOB_LEASE_SECONDS).
(d) *Cross-replica event latency.* A job's events are stamped (`time`) on the replica that
    runs it, committed, and streamed to two watchers: one through that replica (in memory)
    and one through another (from the database, woken by NOTIFY). Receive time minus the
    event's `time`, p50 / p99 per job; only events stamped after the watch began.

Everything runs on this machine (clocks are one clock): the replicas, PostgreSQL
(tests/postgres_server.py: Debian's package, loopback, fsync off) and the client.

    .venv/bin/python -m bench.scale_out [--quick] [--replicas 3]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import secrets
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

from transfer_client import (
    JobCompleted,
    JobStarted,
    JobWarning,
    NotFoundError,
    TrainingConfig,
    TransferClient,
)
from transfer_client.types import FineTuneEvent
from transfer_service.store.postgres import PostgresStore

from bench.common import Environment, median, percentile, short_texts, spread, table
from tests.postgres_server import PostgresServer
from tools.reliability.common import ServerProcess
from tools.reliability.replica_set import ReplicaSet, query_one

BACKBONE = "minilm_l6"
LEASE_SECONDS = 3.0
QUICK_JOB = TrainingConfig(epochs=2, seed=3)
# A few seconds of progress events (coalesced to one per 100 ms), on 2 CPUs.
STREAMED_JOB = TrainingConfig(
    epochs=5, batch_size=1, trainable_blocks=2, early_stopping_patience=0, seed=3
)
ENDLESS_JOB = TrainingConfig(epochs=1000, batch_size=1, early_stopping_patience=0, seed=3)


@dataclass(frozen=True, slots=True)
class Plan:
    cold_rounds: int
    cold_heads: int  # per round
    completions: int
    takeovers: int
    streamed_jobs: int


FULL = Plan(cold_rounds=6, cold_heads=50, completions=15, takeovers=5, streamed_jobs=5)
QUICK = Plan(cold_rounds=1, cold_heads=5, completions=2, takeovers=1, streamed_jobs=1)


# --- replicas ------------------------------------------------------------------------------


class Replicas(ReplicaSet):
    """Server processes on one database, and a client for each; a restarted one keeps its
    ports."""

    def __init__(self, url: str, directory: Path, count: int) -> None:
        super().__init__(
            url,
            directory,
            [f"r{index}" for index in range(count)],
            lease_seconds=LEASE_SECONDS,
            preload=BACKBONE,
            extra={"TRANSFER_MAX_JOBS_PER_TENANT": "64", "TRANSFER_LOG_LEVEL": "WARNING"},
        )
        self.clients = [TransferClient(address, timeout=120) for address in self.addresses]

    def restart(self, index: int) -> ServerProcess:
        """Starts replica `index` again, and a fresh client for it (the old channel backs
        off reconnecting to the dead process for seconds)."""
        process = super().restart(index)
        self.clients[index].close()
        self.clients[index] = TransferClient(process.address, timeout=120)
        return process

    def close(self) -> None:
        for client in getattr(self, "clients", []):
            client.close()
        super().close()


def texts() -> list[tuple[str, str]]:
    return short_texts(6, seed=1, chars=200)


def submit(client: TransferClient, config: TrainingConfig, name: str) -> str:
    """Queues a job; returns its id once queued (the stream is closed, the job goes on)."""
    events = client.fine_tune(BACKBONE, texts(), head_name=name, config=config)
    try:
        first: FineTuneEvent = next(iter(events))
        return str(first.job_id)
    finally:
        events.close()  # type: ignore[attr-defined]


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f}"


# --- (a) cold head loads ---------------------------------------------------------------------


@dataclass(slots=True)
class ColdRound:
    replica: int
    cold: list[float] = field(default_factory=list)
    warm: list[float] = field(default_factory=list)


def cold_loads(replicas: Replicas, plan: Plan) -> list[ColdRound]:
    source = (
        replicas.clients[0]
        .train(BACKBONE, texts(), head_name="cold-source", config=QUICK_JOB)
        .head_id
    )
    store = PostgresStore(replicas.url, max_connections=2)
    try:
        record = store.get_head(source)
        weights = store.load_head_weights(source)
        rounds = []
        for number in range(plan.cold_rounds + 1):  # the first warms connections and code
            replica = number % len(replicas.processes)
            ids = []
            for index in range(plan.cold_heads):
                head_id = f"cold-{number}-{index}-{secrets.token_hex(4)}"
                copy = dataclasses.replace(
                    record,
                    head_id=head_id,
                    name=f"cold-{number}-{index}",
                    created_time=record.created_time + timedelta(milliseconds=index),
                )
                store.save_head(copy, weights)
                ids.append(head_id)
            measured = ColdRound(replica)
            client = replicas.clients[replica]
            for head_id in ids:
                for latencies in (measured.cold, measured.warm):
                    started = time.perf_counter()
                    client.predict(head_id, "a short piece of news about the markets")
                    latencies.append(time.perf_counter() - started)
            if number > 0:
                rounds.append(measured)
                print(
                    f"  round {number} (replica {replica}): cold p50 "
                    f"{ms(percentile(measured.cold, 50))} ms, warm p50 "
                    f"{ms(percentile(measured.warm, 50))} ms",
                    flush=True,
                )
        return rounds
    finally:
        store.close()


# --- (b) completion on A -> Predict on B -----------------------------------------------------


@dataclass(frozen=True, slots=True)
class Completion:
    to_predict: float  # completed event's time -> first OK Predict on B returned
    first_call: float  # that Predict's own latency
    not_found: int  # NOT_FOUND answers before it


def completions(replicas: Replicas, plan: Plan) -> list[Completion]:
    count = len(replicas.processes)
    results = []
    for number in range(plan.completions + 1):
        submitted_to = replicas.clients[number % count]
        other = -1
        done: JobCompleted | None = None
        for event in submitted_to.fine_tune(
            BACKBONE, texts(), head_name=f"done-{number}", config=QUICK_JOB
        ):
            if isinstance(event, JobStarted):
                # Off the critical path: who runs it (A), so B is another replica.
                other = (replicas.holding(event.job_id) + 1) % count
            if isinstance(event, JobCompleted):
                done = event
        assert done is not None and other >= 0
        on_b = replicas.clients[other]
        not_found = 0
        while True:
            started = time.perf_counter()
            try:
                on_b.predict(done.head_id, "a short piece of news about the markets")
            except NotFoundError:
                not_found += 1
                continue
            returned = time.time()
            first_call = time.perf_counter() - started
            break
        if number > 0:  # the first warms connections and code paths
            results.append(Completion(returned - done.time.timestamp(), first_call, not_found))
    return results


# --- (c) takeover after SIGKILL --------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Takeover:
    kill_to_restarted: float  # kill -> the `restarted` warning's own time
    lease_left: float  # lease_expires - kill
    received: float  # kill -> the warning received by a watcher on a survivor


def _watch_for_restart(
    address: str,
    job_id: str,
    seen: list[tuple[float, FineTuneEvent]],
    started: threading.Event,
    restarted: threading.Event,
) -> None:
    """Watches the job through `address` until its `restarted` warning, noting receive times."""
    with TransferClient(address, timeout=120) as client:
        try:
            for event in client.watch_job(job_id):
                seen.append((time.time(), event))
                if isinstance(event, JobStarted):
                    started.set()
                if isinstance(event, JobWarning) and event.code == "restarted":
                    return
        finally:
            started.set()
            restarted.set()


def takeovers(replicas: Replicas, plan: Plan) -> list[Takeover]:
    count = len(replicas.processes)
    results = []
    for number in range(plan.takeovers):
        job_id = submit(replicas.clients[number % count], ENDLESS_JOB, f"endless-{number}")
        doomed = replicas.holding(job_id)
        survivor = (doomed + 1) % count
        started = threading.Event()
        restarted = threading.Event()
        seen: list[tuple[float, FineTuneEvent]] = []
        watcher = threading.Thread(
            target=_watch_for_restart,
            args=(replicas.processes[survivor].address, job_id, seen, started, restarted),
            daemon=True,
        )
        watcher.start()
        started.wait(60)
        time.sleep(0.5 + number * 0.37 % 1.0)  # kill at varying points of the renewal cycle
        replicas.processes[doomed].kill()
        killed = time.time()
        row = query_one(
            replicas.url,
            "SELECT extract(epoch FROM lease_expires) FROM jobs WHERE job_id = %s",
            job_id,
        )
        assert row is not None
        expires = float(str(row[0]))
        restarted.wait(120)
        watcher.join(10)
        warning = next(
            (at, e) for at, e in seen if isinstance(e, JobWarning) and e.code == "restarted"
        )
        results.append(
            Takeover(warning[1].time.timestamp() - killed, expires - killed, warning[0] - killed)
        )
        replicas.clients[survivor].cancel_job(job_id)  # endless: stop it
        replicas.restart(doomed).wait_serving()
        last = results[-1]
        print(
            f"  takeover {number + 1}: kill -> restarted {last.kill_to_restarted:.2f} s, lease "
            f"left {last.lease_left:.2f} s",
            flush=True,
        )
    return results


# --- (d) cross-replica event latency ----------------------------------------------------------


def _watch_latencies(address: str, job_id: str, begun: float, out: list[tuple[float, str]]) -> None:
    """Watches the job through `address` to its end: receive time minus each event's own
    time, with the event's kind, for the events stamped after `begun` (not the replayed
    backlog)."""
    with TransferClient(address, timeout=120) as client:
        for event in client.watch_job(job_id):
            received = time.time()
            stamped = event.time.timestamp()
            if stamped > begun + 0.05:
                out.append((received - stamped, type(event).__name__))


@dataclass(slots=True)
class Streamed:
    """One watching path's event latencies, in seconds."""

    per_job: list[tuple[float, float, int]] = field(default_factory=list)  # p50, p99, events
    pooled: list[float] = field(default_factory=list)
    completed: list[float] = field(default_factory=list)  # the terminal event, apart


SAME = "the running replica (memory)"
OTHER = "another replica (database)"


def event_latencies(replicas: Replicas, plan: Plan) -> tuple[dict[str, Streamed], int]:
    """Per path: the latencies of the jobs' events before the terminal one (progress, epoch
    ends, warnings), and of the `completed` event apart: it is stamped before its head is
    written in the same commit, so its latency holds that write. Also the head's bytes."""
    count = len(replicas.processes)
    results = {SAME: Streamed(), OTHER: Streamed()}
    head_bytes = 0
    for number in range(plan.streamed_jobs + 1):
        job_id = submit(replicas.clients[number % count], STREAMED_JOB, f"streamed-{number}")
        runner = replicas.holding(job_id)
        paths = {SAME: runner, OTHER: (runner + 1) % count}
        begun = time.time()
        latencies: dict[str, list[tuple[float, str]]] = {path: [] for path in paths}
        threads = [
            threading.Thread(
                target=_watch_latencies,
                args=(replicas.processes[replica].address, job_id, begun, latencies[path]),
                daemon=True,
            )
            for path, replica in paths.items()
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(300)
        head_id = replicas.clients[runner].get_job(job_id).head_id
        head_bytes = replicas.clients[runner].get_head(head_id).size_bytes
        if number == 0:
            continue  # warms connections and code paths
        line = []
        for path, measured in latencies.items():
            values = [latency for latency, kind in measured if kind != "JobCompleted"]
            completed = [latency for latency, kind in measured if kind == "JobCompleted"]
            result = results[path]
            result.per_job.append((percentile(values, 50), percentile(values, 99), len(values)))
            result.pooled.extend(values)
            result.completed.extend(completed)
            line.append(
                f"{path}: p50 {ms(percentile(values, 50))} ms, max {ms(max(values))} ms, "
                f"completed {ms(completed[0])} ms"
            )
        print(f"  job {number}: " + "; ".join(line), flush=True)
    return results, head_bytes


# --- report ----------------------------------------------------------------------------------


def _postgres_version(server: PostgresServer) -> str:
    result = subprocess.run(
        [str(server.bin_dir / "postgres"), "--version"], capture_output=True, text=True, check=False
    )
    return result.stdout.strip() or "unknown"


@contextlib.contextmanager
def replicas_on_postgres(count: int) -> Iterator[tuple[PostgresServer, Replicas]]:
    postgres = PostgresServer().start()
    try:
        with tempfile.TemporaryDirectory(prefix="bench-scale-out-") as directory:
            replicas = Replicas(postgres.create_database("bench"), Path(directory), count)
            try:
                yield postgres, replicas
            finally:
                replicas.close()
    finally:
        postgres.stop()


def run(plan: Plan, count: int) -> None:
    environment = Environment()
    with replicas_on_postgres(count) as (postgres, replicas):
        print(f"{count} replicas serving; (a) cold head loads ...", flush=True)
        cold = cold_loads(replicas, plan)
        print("(b) completion on A -> Predict on B ...", flush=True)
        done = completions(replicas, plan)
        print("(c) takeover after SIGKILL ...", flush=True)
        taken = takeovers(replicas, plan)
        print("(d) event latency ...", flush=True)
        streamed, head_bytes = event_latencies(replicas, plan)
        environment.note("PostgreSQL", f"{_postgres_version(postgres)}, loopback, fsync off")
    environment.note(
        "replicas",
        f"{count} x `python -m transfer_service`, {BACKBONE} preloaded, TRANSFER_TORCH_THREADS=1, "
        f"lease {LEASE_SECONDS:g} s",
    )
    environment.note(
        "heads", f"(a), (b): linear probes on {BACKBONE}, 5 classes (BBC News snippets)"
    )
    print()
    print(
        f"## (a) Cold head load from the database vs warm, Predict latency, ms ({count} replicas)"
    )
    print()
    rows = []
    for name, pick in (("cold (first Predict)", "cold"), ("warm (second)", "warm")):
        p50s = [percentile(getattr(r, pick), 50) * 1000 for r in cold]
        p99s = [percentile(getattr(r, pick), 99) * 1000 for r in cold]
        rows.append(
            (name, f"**{median(p50s):.1f}**", spread(p50s), f"**{median(p99s):.1f}**", spread(p99s))
        )
    print(
        table(("Predict", "p50 (median of rounds)", "p50 range", "p99 (median)", "p99 range"), rows)
    )
    print(f"\n{len(cold)} rounds of {plan.cold_heads} heads, one replica per round in turn.")
    print()
    print("## (b) FineTune completed on A -> first successful Predict on B, ms")
    print()
    to_predict = [c.to_predict for c in done]
    first_call = [c.first_call for c in done]
    print(
        table(
            ("", "p50", "p99", "min", "max"),
            [
                (
                    name,
                    f"**{ms(percentile(values, 50))}**",
                    ms(percentile(values, 99)),
                    ms(min(values)),
                    ms(max(values)),
                )
                for name, values in (
                    ("completed event time -> Predict on B returned", to_predict),
                    ("that Predict's own latency", first_call),
                )
            ],
        )
    )
    print(
        f"\n{len(done)} jobs; NOT_FOUND before the first success: {sum(c.not_found for c in done)}."
    )
    print()
    print(f"## (c) Takeover after SIGKILL (lease {LEASE_SECONDS:g} s), s")
    print()
    after_expiry = [t.kill_to_restarted - t.lease_left for t in taken]
    print(
        table(
            ("", "median", "min", "max"),
            [
                (name, f"**{median(values):.2f}**", f"{min(values):.2f}", f"{max(values):.2f}")
                for name, values in (
                    (
                        "kill -> `restarted` warning (its time)",
                        [t.kill_to_restarted for t in taken],
                    ),
                    ("lease left at the kill", [t.lease_left for t in taken]),
                    ("lease expiry -> `restarted` warning", after_expiry),
                    ("kill -> warning received through a survivor", [t.received for t in taken]),
                )
            ],
        )
    )
    print(f"\n{len(taken)} kills.")
    print()
    print("## (d) Event latency: event's time on the running replica -> received by a client, ms")
    print()
    latency_rows = []
    for path, result in streamed.items():
        p50s = [r[0] * 1000 for r in result.per_job]
        p99s = [r[1] * 1000 for r in result.per_job]
        latency_rows.append(
            (
                path,
                f"**{median(p50s):.1f}**",
                spread(p50s),
                f"**{median(p99s):.1f}**",
                spread(p99s),
                f"{percentile(result.pooled, 99) * 1000:.1f}",
                f"{median(result.completed) * 1000:.0f}",
            )
        )
    print(
        table(
            (
                "watching through",
                "p50 (median of jobs)",
                "p50 range",
                "p99 (median of jobs)",
                "p99 range",
                "p99 (all jobs' events)",
                "`completed` (median)",
            ),
            latency_rows,
        )
    )
    events = [r[2] for r in streamed[OTHER].per_job]
    print(
        f"\n{len(events)} jobs, {min(events)}-{max(events)} events each before the terminal one "
        f"(progress coalesced to one per 100 ms, epoch ends, warnings). The `completed` event is "
        f"stamped before its head ({head_bytes / 1e6:.1f} MB: {STREAMED_JOB.trainable_blocks} "
        "transformer blocks trained) is written in the same commit: its latency is mostly that "
        "write."
    )
    print()
    print(environment.markdown("cpu"))


def main() -> None:
    arguments = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    arguments.add_argument("--quick", action="store_true", help="smoke-test sizes")
    arguments.add_argument("--replicas", type=int, default=3, choices=(2, 3, 4))
    options = arguments.parse_args()
    run(QUICK if options.quick else FULL, options.replicas)


if __name__ == "__main__":
    main()
