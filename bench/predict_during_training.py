"""Single-image Predict latency while a FineTune runs on the same CPU server, with the CPU's
torch threads split between them (TRANSFER_TRAINING_TORCH_THREADS=1) / without (the default).

Each mode gets a server of its own (one at a time, in this process, on one store; the probe
head Predict serves is trained once). On each: a caller in a child process sends sequential
single-image Predicts for a few seconds (idle), then again for as long as a linear-probe
FineTune it started runs (during), and then the same FineTune runs alone. Modes alternate
over the pairs; the ratios are medians of the per-pair ratios (split / default), so drift
between pairs cancels. Not an issue target: it measures the trade the setting makes
(docs/design.md, "Threads and torch").

    .venv/bin/python -m bench.predict_during_training [--quick] [--pairs 3]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from tempfile import TemporaryDirectory

from transfer_client import AsyncTransferClient, TrainingConfig
from transfer_client.types import InputData

from bench.callers import CallerProcess
from bench.common import (
    IMAGE_BACKBONE,
    Environment,
    bench_server,
    connect,
    fashion_pngs,
    median,
    parser,
    percentile,
    server_overrides,
    single_threaded_torch_here,
    spread,
    table,
    train_probe,
)
from tests.conftest import RunningServer

MODES = {"default": 0, "split": 1}  # mode -> training_torch_threads


@dataclass(frozen=True, slots=True)
class Plan:
    per_class: int  # FineTune images per Fashion-MNIST class (10 classes)
    epochs: int
    idle_seconds: float
    pairs: int


FULL = Plan(per_class=30, epochs=3, idle_seconds=4.0, pairs=3)
QUICK = Plan(per_class=6, epochs=1, idle_seconds=1.0, pairs=1)


@dataclass(slots=True)
class Samples:
    idle: list[float] = field(default_factory=list)  # Predict latencies, s
    during: list[float] = field(default_factory=list)
    fine_tune_with_predicts: list[float] = field(default_factory=list)  # one per pair, s
    fine_tune_alone: list[float] = field(default_factory=list)
    during_p50: list[float] = field(default_factory=list)  # per pair, for the ratios
    during_p90: list[float] = field(default_factory=list)


# --- run in the caller's child process (module-level: pickled by reference) --------------


async def _predicts_for(
    client: AsyncTransferClient, head_id: str, images: list[InputData], seconds: float
) -> list[float]:
    latencies: list[float] = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        started = time.perf_counter()
        await client.predict(head_id, [images[len(latencies) % len(images)]])
        latencies.append(time.perf_counter() - started)
    return latencies


async def _fine_tune(
    client: AsyncTransferClient, examples: list[tuple[InputData, str]], config: TrainingConfig
) -> float:
    started = time.perf_counter()
    await client.train(IMAGE_BACKBONE, examples, head_name="background", config=config)
    return time.perf_counter() - started


async def _predicts_during_fine_tune(
    client: AsyncTransferClient,
    head_id: str,
    images: list[InputData],
    examples: list[tuple[InputData, str]],
    config: TrainingConfig,
) -> tuple[list[float], float]:
    """Predict latencies from the FineTune's start to its end, and its wall seconds."""
    job = asyncio.create_task(_fine_tune(client, examples, config))
    latencies: list[float] = []
    while not job.done():
        started = time.perf_counter()
        await client.predict(head_id, [images[len(latencies) % len(images)]])
        latencies.append(time.perf_counter() - started)
    return latencies, await job


# --- the benchmark -----------------------------------------------------------------------


@contextlib.contextmanager
def _server(overrides: dict[str, object], store: Path) -> Iterator[RunningServer]:
    """A server, and after it stops, none of its torch threads left to slow the next one."""
    with bench_server(overrides, store_dir=store) as running:
        yield running
    deadline = time.monotonic() + 30
    for thread in threading.enumerate():
        if thread.name.startswith(("predict", "job-", "train")):
            thread.join(timeout=max(0.0, deadline - time.monotonic()))
            if thread.is_alive():
                raise RuntimeError(f"thread {thread.name} outlived its server")


async def _measure_mode(
    mode: str,
    overrides: dict[str, object],
    store: Path,
    head_id: str | None,
    plan: Plan,
    into: Samples,
    environment: Environment,
) -> str:
    """One server's round; returns the head id (trained here on the first round)."""
    examples: list[tuple[InputData, str]] = list(fashion_pngs(plan.per_class, seed=5))
    images: list[InputData] = [png for png, _ in fashion_pngs(10, split="test", seed=2)]
    config = TrainingConfig(epochs=plan.epochs, seed=7, early_stopping_patience=0)
    settings = {
        "device": "cpu",  # what is split is CPU threads
        "preload_backbones": [IMAGE_BACKBONE],
        "training_torch_threads": MODES[mode],
        **overrides,
    }
    with _server(settings, store) as running:
        async with connect(running) as client:
            if head_id is None:
                print("training the served probe head ...", flush=True)
                probe = fashion_pngs(10, seed=1, classes=4)
                head_id = await train_probe(client, IMAGE_BACKBONE, probe, "served")
        with CallerProcess(running.address) as caller:
            for pid in caller.pids:
                environment.meter.include(pid)
            await caller.call(_predicts_for, head_id, images, 1.0)  # warm-up, untimed
            into.idle += await caller.call(_predicts_for, head_id, images, plan.idle_seconds)
            during, with_predicts = await caller.call(
                _predicts_during_fine_tune, head_id, images, examples, config
            )
            alone = await caller.call(_fine_tune, examples, config)
    into.during += during
    into.during_p50.append(percentile(during, 50))
    into.during_p90.append(percentile(during, 90))
    into.fine_tune_with_predicts.append(with_predicts)
    into.fine_tune_alone.append(alone)
    print(
        f"  {mode}: during p50 "
        f"{percentile(during, 50) * 1e3:.1f} ms ({len(during)} calls), FineTune "
        f"{with_predicts:.1f} s with Predicts, {alone:.1f} s alone",
        flush=True,
    )
    return head_id


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f}"


def _report(samples: dict[str, Samples]) -> str:
    rows = []
    for mode, s in samples.items():
        rows.append(
            (
                f"{mode} (training_torch_threads={MODES[mode]})",
                f"{_ms(percentile(s.idle, 50))} / {_ms(percentile(s.idle, 90))}",
                f"{_ms(percentile(s.during, 50))} / {_ms(percentile(s.during, 90))} / "
                f"{_ms(percentile(s.during, 99))}",
                len(s.during),
                f"{median(s.fine_tune_with_predicts):.1f}",
                f"{median(s.fine_tune_alone):.1f}",
            )
        )
    modes = table(
        (
            "mode",
            "Predict idle p50 / p90 ms",
            "during FineTune p50 / p90 / p99 ms",
            "calls during",
            "FineTune with Predicts s",
            "FineTune alone s",
        ),
        rows,
    )
    split, default = samples["split"], samples["default"]
    ratio_rows = []
    for name, a, b in (
        ("Predict p50 during FineTune", split.during_p50, default.during_p50),
        ("Predict p90 during FineTune", split.during_p90, default.during_p90),
        ("FineTune with Predicts", split.fine_tune_with_predicts, default.fine_tune_with_predicts),
        ("FineTune alone", split.fine_tune_alone, default.fine_tune_alone),
    ):
        ratios = [x / y for x, y in zip(a, b, strict=True)]
        ratio_rows.append((name, f"**{median(ratios):.3f}**", spread(ratios)))
    ratios_table = table(("split / default", "ratio (median of pairs)", "range"), ratio_rows)
    return modes + "\n\n" + ratios_table


async def run(plan: Plan, overrides: dict[str, object]) -> None:
    environment = Environment()
    single_threaded_torch_here()
    samples = {mode: Samples() for mode in MODES}
    head_id: str | None = None
    with TemporaryDirectory(prefix="bench-during-") as store:
        for pair in range(plan.pairs):
            order = list(MODES) if pair % 2 == 0 else list(MODES)[::-1]
            for mode in order:
                head_id = await _measure_mode(
                    mode, overrides, Path(store), head_id, plan, samples[mode], environment
                )
    environment.note(
        "FineTune",
        f"linear probe on efficientnet_lite0, Fashion-MNIST {10 * plan.per_class} images, "
        f"{plan.epochs} epochs",
    )
    environment.note("pairs", plan.pairs)
    environment.note("callers", "one, sequential, in a child process (also runs the FineTunes)")
    print()
    print("## Single-image Predict during a FineTune on a CPU: split threads / default")
    print()
    print(_report(samples))
    print()
    print(environment.markdown("cpu"))


def main() -> None:
    options = parser(__doc__.splitlines()[0])
    options.add_argument("--pairs", type=int, default=None, help="default/split server pairs")
    arguments: argparse.Namespace = options.parse_args()
    plan = QUICK if arguments.quick else FULL
    if arguments.pairs:
        plan = Plan(plan.per_class, plan.epochs, plan.idle_seconds, arguments.pairs)
    asyncio.run(run(plan, server_overrides(arguments)))


if __name__ == "__main__":
    main()
