"""Crash consistency: SIGKILL a `python -m transfer_service` at random points, restart it on
the same store, and check that nothing was lost or half-written.

    python -m tools.reliability.chaos --kills 100            # make chaos
    python -m tools.reliability.chaos --kills 20 --minutes 10 --modes saving,delete

Each round restarts the server on the same store, verifies it, then starts some work and
kills the process (SIGKILL: no handler runs) at a point chosen by the round's mode:

  training  a job of a few seconds (one example a step), after a random number of its
            progress events
  saving    a short job, the moment its head's `.partial-*` directory appears on disk
  commit    a short job, between its head directory being renamed into place and its job
            row reading SUCCEEDED (found by freezing the process with SIGSTOP when the head
            directory appears and reading the job row; missed windows just continue)
  random    a short job, at a random time between the FineTune call and well after it ends
  delete    a DeleteHead, a random few milliseconds after it was sent
  startup   the server itself, at a random time before it reports SERVING

After every restart (the check a round begins with), the queue first settles: jobs a kill cut
off run again (docs/design.md, "Jobs as a queue"), and the check waits until no job is queued
or running. Then (chaos_checks.py):
  * the server came back to SERVING on the same store without anyone touching the files
    (the store never needs manual repair); no `.partial-*`/`.deleted-*` directory remains;
    SQLite's integrity_check reads ok;
  * every head the client saw completed is listed, loads, and predicts exactly what it
    predicted before (labels equal, scores within 1e-5); a deleted head stays deleted;
  * every job ended: SUCCEEDED, or FAILED for a legitimate reason (the attempts limit,
    counted); no job the client saw is lost; a job seen finished keeps its state; its event
    log replays with contiguous sequences to one terminal event;
  * a job cut off by a kill ran again (a `restarted` warning, sequences continuing) and
    ended: WatchJob after the last event its client saw continues the stream to the end;
  * heads: at most one per job; a SUCCEEDED job has exactly its head, listed; no head whose
    job is not SUCCEEDED with that head id (a half-committed save, or a second head).
With `--replicas N` it runs replica_chaos.py instead: N servers on one PostgreSQL.
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
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import grpc
from transfer_client.proto import transfer_service_pb2 as pb
from transfer_client.proto import transfer_service_pb2_grpc as pb_grpc

from tools.reliability import chaos_checks as checks
from tools.reliability.chaos_checks import ReplicaReport
from tools.reliability.chaos_verify import ChaosReport, ChaosState
from tools.reliability.common import BIG_MESSAGES
from tools.reliability.replica_chaos import run_replica_chaos

MODES = ("training", "saving", "commit", "random", "delete", "startup")
COMMIT_ATTEMPTS = 10
MAX_LIVE_HEADS = 10


class Chaos(ChaosState):
    """The rounds: work started, then a kill at the round's point."""

    # ---- the work that gets killed ----

    def _fine_tune(self, *, long: bool) -> checks.StreamReader:
        assert self.server is not None
        self._jobs_started += 1
        if long:  # ~100 epochs a second here; runs again in full after the kill
            config = pb.TrainingConfig(
                epochs=self.rng.randint(100, 300),
                batch_size=1,
                early_stopping_patience=0,
                progress_every_steps=1,
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
        stream = checks.StreamReader(self.server.address, request)
        stream.start()
        return stream

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
        while time.monotonic() < deadline and not stream.done.is_set():
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
                self.truth[head_id] = checks.predict(stub, head_id, self.probe)
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
                self._kill("idle")  # the running server goes first (also a kill)
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


def _listdir(path: Path) -> list[str]:
    try:
        return [entry.name for entry in os.scandir(path)]
    except FileNotFoundError:
        return []


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
    parser.add_argument("--replicas", type=int, default=1, help=">1: replicas on PostgreSQL")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--work-dir", type=Path, default=None, help="kept for inspection")
    parser.add_argument("--json", type=Path, default=None, help="write the report here too")
    arguments = parser.parse_args(argv)
    modes = [m.strip() for m in arguments.modes.split(",") if m.strip()]
    unknown = set(modes) - set(MODES)
    if unknown:
        parser.error(f"unknown modes: {sorted(unknown)}")
    seed = arguments.seed if arguments.seed is not None else random.randrange(2**31)
    report: ChaosReport | ReplicaReport
    if arguments.replicas > 1:
        print(f"chaos: {arguments.replicas} replicas, {arguments.kills} kills, seed {seed}")
        report = run_replica_chaos(
            arguments.kills,
            replicas=arguments.replicas,
            seed=seed,
            work_dir=arguments.work_dir,
            time_limit_s=arguments.minutes * 60,
            log=lambda line: print(line, flush=True),
        )
    else:
        print(f"chaos: {arguments.kills} kills, modes {modes}, seed {seed}", flush=True)
        report = run_chaos(
            arguments.kills,
            modes=modes,
            seed=seed,
            work_dir=arguments.work_dir,
            time_limit_s=arguments.minutes * 60,
            log=lambda line: print(line, flush=True),
        )
    print(report.summary(), flush=True)
    if arguments.json is not None:
        data = {"seed": seed, **report.as_dict()}
        arguments.json.write_text(json.dumps(data, indent=2), encoding="utf-8")
    return 1 if report.violations else 0


if __name__ == "__main__":
    sys.exit(main())
