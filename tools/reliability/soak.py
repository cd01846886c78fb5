"""Soak: minutes of mixed, concurrent traffic against a `python -m transfer_service` subprocess.

    python -m tools.reliability.soak --minutes 3 --leak-control     # make soak (not in CI)

Traffic: Predict over many heads (image and text, 1-8 inputs, several threads), FineTune
(small heads; every fifth job is cancelled mid-way), head deletes, and reads (ListHeads,
ListJobs, GetHead, GetJob). Reported: requests served, errors (target 0), Predict p50/p99
latency, and the server's RSS growth over the second half of the run (VmRSS from
/proc/<pid>/status; target < 100 MB).

`--leak-control` (on by default) also runs a deliberately leaking helper process (it appends
to a list at a steady rate) and measures it with the same sampler and the same verdict, to
show the RSS check is able to fail. Exit status 0 when the soak passes and the control was flagged.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
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

from tests.datasets import bbc_news, fashion_mnist
from tools.reliability.common import (
    BIG_MESSAGES,
    ServerProcess,
    percentile,
    rss_bytes,
    server_env,
)

MB = 1024 * 1024
GROWTH_LIMIT_MB = 100.0
LEAKER = """
import sys, time
rate, seconds = int(sys.argv[1]), float(sys.argv[2])
hoard, end = [], time.monotonic() + seconds
while time.monotonic() < end:
    hoard.append(b"\\x01" * (rate // 10))  # touched pages: resident, never freed
    time.sleep(0.1)
"""


@dataclass
class RssSeries:
    """(seconds since start, bytes) samples of one process."""

    samples: list[tuple[float, int]] = field(default_factory=list)

    def growth_second_half_mb(self) -> float:
        """Median of the last five samples minus the median of the five around the
        midpoint: what the process kept gaining once warm."""
        if len(self.samples) < 10:
            return 0.0
        end = self.samples[-1][0]
        middle = min(range(len(self.samples)), key=lambda i: abs(self.samples[i][0] - end / 2))
        around = [rss for _, rss in self.samples[max(0, middle - 2) : middle + 3]]
        last = [rss for _, rss in self.samples[-5:]]
        return (statistics.median(last) - statistics.median(around)) / MB

    def first_mb(self) -> float:
        return self.samples[0][1] / MB if self.samples else 0.0

    def last_mb(self) -> float:
        return self.samples[-1][1] / MB if self.samples else 0.0

    def peak_mb(self) -> float:
        return max((rss for _, rss in self.samples), default=0) / MB


def sample_rss(pid: int, series: RssSeries, stop: threading.Event, interval: float) -> None:
    started = time.monotonic()
    while not stop.is_set():
        try:
            series.samples.append((time.monotonic() - started, rss_bytes(pid)))
        except (OSError, RuntimeError):
            return  # the process is gone
        stop.wait(interval)


@dataclass
class Tally:
    """Thread-safe counters of what the traffic did."""

    served: Counter[str] = field(default_factory=Counter)
    expected: Counter[str] = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)
    predict_seconds: list[float] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def ok(self, method: str, seconds: float | None = None) -> None:
        with self.lock:
            self.served[method] += 1
            if seconds is not None:
                self.predict_seconds.append(seconds)

    def race(self, what: str) -> None:
        with self.lock:
            self.expected[what] += 1

    def error(self, message: str) -> None:
        with self.lock:
            if len(self.errors) < 200:
                self.errors.append(message)
            else:
                self.errors[-1] = f"... and more; last: {message}"


@dataclass
class Heads:
    """Stable heads (never deleted) and churn heads (created and deleted during the run)."""

    stable: list[tuple[str, str]] = field(default_factory=list)  # (head id, modality)
    churn: list[tuple[str, str]] = field(default_factory=list)
    deleted: set[str] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def pick(self, rng: random.Random) -> tuple[str, str]:
        with self.lock:
            pool = self.stable + self.churn
            return rng.choice(pool)


class Soak:
    def __init__(self, address: str, seed: int, predict_threads: int) -> None:
        self.address = address
        self.seed = seed
        self.predict_threads = predict_threads
        self.tally = Tally()
        self.heads = Heads()
        self.jobs: list[str] = []
        self.stop = threading.Event()
        self.images = [x for x, _ in fashion_mnist(20, split="test", classes=10, seed=seed)]
        self.texts = [t[:600] for t, _ in bbc_news(4, seed=seed, skip=10)]
        self.image_sets = [
            fashion_mnist(5, classes=c, seed=seed + c) for c in (2, 3, 4)
        ]  # small training sets of 2-4 classes
        self.text_set = bbc_news(3, seed=seed)

    def channel(self) -> grpc.Channel:
        return grpc.insecure_channel(self.address, options=BIG_MESSAGES)

    # ---- setup ----

    def train(
        self, stub: pb_grpc.TransferServiceStub, modality: str, rng: random.Random, name: str
    ) -> tuple[str, str] | None:
        """Trains one small head; returns (head id, modality) or None if it did not complete."""
        if modality == "text":
            examples = [pb.Example(text=t[:600], label=y) for t, y in self.text_set]
            backbone = "minilm_l6"
        else:
            examples = [pb.Example(image=x, label=y) for x, y in rng.choice(self.image_sets)]
            backbone = "efficientnet_lite0"
        config = pb.TrainingConfig(epochs=rng.randint(2, 5), seed=rng.randrange(1000))
        request = pb.FineTuneRequest(
            backbone=backbone, head_name=name, examples=examples, config=config
        )
        events = list(stub.FineTune(request, timeout=300))
        self.jobs.append(events[0].job_id)
        last = events[-1]
        if last.WhichOneof("event") != "completed":
            self.tally.error(f"FineTune {name}: {last}")
            return None
        self.tally.ok("FineTune", None)
        return last.completed.head_id, modality

    def setup(self, image_heads: int, text_heads: int) -> None:
        rng = random.Random(self.seed)
        with self.channel() as channel:
            stub = pb_grpc.TransferServiceStub(channel)
            for number in range(image_heads + text_heads):
                modality = "image" if number < image_heads else "text"
                made = self.train(stub, modality, rng, f"stable-{number}")
                if made is not None:
                    self.heads.stable.append(made)

    # ---- traffic ----

    def predict_loop(self, number: int) -> None:
        rng = random.Random(self.seed * 100 + number)
        with self.channel() as channel:
            stub = pb_grpc.TransferServiceStub(channel)
            while not self.stop.is_set():
                head_id, modality = self.heads.pick(rng)
                count = rng.randint(1, 8)
                if modality == "image":
                    inputs = [pb.Input(image=rng.choice(self.images)) for _ in range(count)]
                else:
                    inputs = [pb.Input(text=rng.choice(self.texts)) for _ in range(count)]
                request = pb.PredictRequest(head_id=head_id, inputs=inputs, top_k=2)
                started = time.monotonic()
                try:
                    response = stub.Predict(request, timeout=60)
                except grpc.RpcError as error:
                    with self.heads.lock:
                        gone = head_id in self.heads.deleted
                    if gone and error.code() == grpc.StatusCode.NOT_FOUND:  # type: ignore[attr-defined]
                        self.tally.race("Predict on a head deleted meanwhile: NOT_FOUND")
                    else:
                        self.tally.error(f"Predict: {error.code()} {error.details()}")  # type: ignore[attr-defined]
                    continue
                if len(response.predictions) != count:
                    self.tally.error(f"Predict: {len(response.predictions)} for {count} inputs")
                    continue
                self.tally.ok("Predict", time.monotonic() - started)

    def fine_tune_loop(self) -> None:
        rng = random.Random(self.seed + 1)
        number = 0
        with self.channel() as channel:
            stub = pb_grpc.TransferServiceStub(channel)
            while not self.stop.is_set():
                number += 1
                modality = "text" if number % 3 == 0 else "image"
                try:
                    if number % 5 == 0:
                        self.cancel_one(stub, f"cancelled-{number}")
                        continue
                    made = self.train(stub, modality, rng, f"churn-{number}")
                except grpc.RpcError as error:
                    self.tally.error(f"FineTune: {error.code()} {error.details()}")  # type: ignore[attr-defined]
                    continue
                if made is not None:
                    with self.heads.lock:
                        self.heads.churn.append(made)
                self.stop.wait(0.5)  # training shares the CPUs with serving: leave some room

    def cancel_one(self, stub: pb_grpc.TransferServiceStub, name: str) -> None:
        examples = [pb.Example(image=x, label=y) for x, y in self.image_sets[0]]
        config = pb.TrainingConfig(epochs=1000, batch_size=1, early_stopping_patience=0)
        request = pb.FineTuneRequest(
            backbone="efficientnet_lite0", head_name=name, examples=examples, config=config
        )
        events = stub.FineTune(request, timeout=300)
        job_id = ""
        for event in events:
            job_id = event.job_id
            if event.WhichOneof("event") == "progress" and event.progress.phase == "training":
                break
        stub.CancelJob(pb.CancelJobRequest(job_id=job_id), timeout=30)
        rest = list(events)
        self.jobs.append(job_id)
        if not rest or rest[-1].WhichOneof("event") != "cancelled":
            self.tally.error(f"cancelled job {job_id} ended with {rest[-1:]}")
            return
        self.tally.ok("CancelJob")

    def delete_loop(self) -> None:
        with self.channel() as channel:
            stub = pb_grpc.TransferServiceStub(channel)
            while not self.stop.wait(0.5):
                with self.heads.lock:
                    if len(self.heads.churn) <= 4:
                        continue
                    head_id, _ = self.heads.churn.pop(0)
                    self.heads.deleted.add(head_id)
                try:
                    stub.DeleteHead(pb.DeleteHeadRequest(head_id=head_id), timeout=30)
                    self.tally.ok("DeleteHead")
                except grpc.RpcError as error:
                    self.tally.error(f"DeleteHead: {error.code()} {error.details()}")  # type: ignore[attr-defined]

    def read_loop(self) -> None:
        rng = random.Random(self.seed + 2)
        with self.channel() as channel:
            stub = pb_grpc.TransferServiceStub(channel)
            while not self.stop.wait(0.2):
                try:
                    stub.ListHeads(pb.ListHeadsRequest(), timeout=30)
                    self.tally.ok("ListHeads")
                    stub.ListJobs(pb.ListJobsRequest(), timeout=30)
                    self.tally.ok("ListJobs")
                    if self.jobs:
                        stub.GetJob(pb.GetJobRequest(job_id=rng.choice(self.jobs)), timeout=30)
                        self.tally.ok("GetJob")
                    head_id, _ = self.heads.pick(rng)
                    stub.GetHead(pb.GetHeadRequest(head_id=head_id), timeout=30)
                    self.tally.ok("GetHead")
                except grpc.RpcError as error:
                    if error.code() == grpc.StatusCode.NOT_FOUND:  # type: ignore[attr-defined]
                        self.tally.race("GetHead on a head deleted meanwhile: NOT_FOUND")
                    else:
                        self.tally.error(f"read: {error.code()} {error.details()}")  # type: ignore[attr-defined]

    def run(self, seconds: float) -> None:
        loops: list[Callable[[], None]] = [self.fine_tune_loop, self.delete_loop, self.read_loop]
        loops += [lambda n=n: self.predict_loop(n) for n in range(self.predict_threads)]  # type: ignore[misc]
        threads = [threading.Thread(target=loop, daemon=True) for loop in loops]
        for thread in threads:
            thread.start()
        self.stop.wait(seconds)
        self.stop.set()
        for thread in threads:
            thread.join(timeout=300)


@dataclass
class SoakResult:
    minutes: float
    served: dict[str, int]
    expected_races: dict[str, int]
    errors: list[str]
    predict_p50_ms: float
    predict_p99_ms: float
    predicts_per_second: float
    rss_first_mb: float
    rss_last_mb: float
    rss_peak_mb: float
    rss_growth_second_half_mb: float
    rss_samples: int
    exit_code: int
    control_growth_mb: float | None = None
    control_flagged: bool | None = None

    @property
    def passed(self) -> bool:
        control_ok = self.control_flagged is None or self.control_flagged
        return (
            not self.errors
            and self.rss_growth_second_half_mb < GROWTH_LIMIT_MB
            and self.exit_code == 0
            and control_ok
        )

    def summary(self) -> str:
        total = sum(self.served.values())
        lines = [
            f"soak: {self.minutes:.1f} min; requests served: {total} "
            + "("
            + ", ".join(f"{k} {v}" for k, v in sorted(self.served.items()))
            + ")",
            f"errors: {len(self.errors)} (target 0); expected races: "
            + (", ".join(f"{k}: {v}" for k, v in self.expected_races.items()) or "none"),
            f"Predict latency: p50 {self.predict_p50_ms:.1f} ms, p99 {self.predict_p99_ms:.1f} ms"
            f" ({self.predicts_per_second:.1f} Predicts/s)",
            f"server RSS: {self.rss_first_mb:.0f} MB first sample, {self.rss_last_mb:.0f} MB "
            f"last, {self.rss_peak_mb:.0f} MB peak; growth over the second half "
            f"{self.rss_growth_second_half_mb:+.1f} MB (limit {GROWTH_LIMIT_MB:.0f}): "
            + ("PASS" if self.rss_growth_second_half_mb < GROWTH_LIMIT_MB else "FLAGGED"),
            f"server exit code after SIGTERM: {self.exit_code}",
        ]
        if self.control_growth_mb is not None:
            lines.append(
                f"leak control (a helper that hoards memory): growth over the second half "
                f"{self.control_growth_mb:+.1f} MB -> "
                + ("FLAGGED (the check can fail)" if self.control_flagged else "NOT FLAGGED")
            )
        lines += [f"  - {error}" for error in self.errors[:10]]
        lines.append("verdict: " + ("PASS" if self.passed else "FAIL"))
        return "\n".join(lines)


def run_soak(
    minutes: float,
    *,
    leak_control: bool,
    seed: int = 0,
    predict_threads: int = 4,
    image_heads: int = 6,
    text_heads: int = 2,
    work_dir: Path | None = None,
    log: Callable[[str], None] = print,
) -> SoakResult:
    seconds = minutes * 60
    with tempfile.TemporaryDirectory(prefix="soak-") as scratch:
        work = work_dir or Path(scratch)
        env = server_env(work / "store", preload="efficientnet_lite0,minilm_l6", grace_seconds=10)
        with ServerProcess(env, work / "server.log") as server:
            server.wait_serving()
            soak = Soak(server.address, seed, predict_threads)
            log(f"server pid {server.pid} on {server.address}; training the stable heads")
            soak.setup(image_heads, text_heads)
            log(f"{len(soak.heads.stable)} stable heads; traffic for {minutes:.1f} min")
            stop_sampling = threading.Event()
            series = RssSeries()
            sampler = threading.Thread(
                target=sample_rss, args=(server.pid, series, stop_sampling, 1.0), daemon=True
            )
            control = RssSeries()
            leaker: subprocess.Popen[bytes] | None = None
            threads = [sampler]
            if leak_control:
                rate = int(4 * GROWTH_LIMIT_MB * MB / max(seconds, 1))
                leaker = subprocess.Popen([sys.executable, "-c", LEAKER, str(rate), str(seconds)])
                threads.append(
                    threading.Thread(
                        target=sample_rss,
                        args=(leaker.pid, control, stop_sampling, 1.0),
                        daemon=True,
                    )
                )
            for thread in threads:
                thread.start()
            started = time.monotonic()
            soak.run(seconds)
            elapsed = time.monotonic() - started
            stop_sampling.set()
            for thread in threads:
                thread.join(10)
            if leaker is not None:
                leaker.kill()
                leaker.wait(10)
            exit_code = server.terminate(timeout=60)
            if "Traceback" in server.log_tail(10**7):
                soak.tally.error("the server log holds a traceback")
    latencies = soak.tally.predict_seconds
    result = SoakResult(
        minutes=elapsed / 60,
        served=dict(soak.tally.served),
        expected_races=dict(soak.tally.expected),
        errors=soak.tally.errors,
        predict_p50_ms=percentile(latencies, 0.5) * 1000,
        predict_p99_ms=percentile(latencies, 0.99) * 1000,
        predicts_per_second=len(latencies) / elapsed if elapsed else 0.0,
        rss_first_mb=series.first_mb(),
        rss_last_mb=series.last_mb(),
        rss_peak_mb=series.peak_mb(),
        rss_growth_second_half_mb=series.growth_second_half_mb(),
        rss_samples=len(series.samples),
        exit_code=exit_code,
    )
    if leak_control:
        result.control_growth_mb = control.growth_second_half_mb()
        result.control_flagged = result.control_growth_mb >= GROWTH_LIMIT_MB
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=3.0)
    parser.add_argument(
        "--leak-control",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also measure a deliberately leaking helper (default: on)",
    )
    parser.add_argument("--predict-threads", type=int, default=4)
    parser.add_argument("--image-heads", type=int, default=6)
    parser.add_argument("--text-heads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="write the figures here too")
    arguments = parser.parse_args(argv)
    result = run_soak(
        arguments.minutes,
        leak_control=arguments.leak_control,
        seed=arguments.seed,
        predict_threads=arguments.predict_threads,
        image_heads=arguments.image_heads,
        text_heads=arguments.text_heads,
        log=lambda line: print(line, flush=True),
    )
    print(result.summary())
    if arguments.json is not None:
        data = dict(result.__dict__)
        data["passed"] = result.passed
        arguments.json.write_text(json.dumps(data, indent=2), encoding="utf-8")
    return 0 if result.passed else 1


if __name__ == "__main__":
    sys.exit(main())
