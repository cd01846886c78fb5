"""Single-input Predict latency over gRPC minus raw single-input forward latency.

Sequential calls, one input each, after a warm-up. Each iteration runs, back to back, one
Predict over gRPC, the raw baseline including decode + preprocess (PNG decode / tokenise,
resize, normalise, collate, trunk, head, softmax) and the raw model only (trunk + head on an
input already on the device), so machine noise hits all three alike. The order within an
iteration rotates. Reported: p50/p90/p99 of each, the server's overhead in ms over each raw
variant (difference of the percentiles) and the ratio.

    .venv/bin/python -m bench.latency [--quick] [--image-size 224] [--batch-wait-ms 0]
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from transfer_client.types import InputData
from transfer_service.lifecycle import Application

from bench.callers import Callers, add_callers_option, open_callers
from bench.common import (
    IMAGE_BACKBONE,
    Call,
    Environment,
    add_images_only_option,
    bench_server,
    connect,
    model_inputs,
    note_probe_inputs,
    on_compute_thread,
    parser,
    percentile,
    probe_backbones,
    probe_workloads,
    raw_model,
    server_overrides,
    single_threaded_torch_here,
    table,
    trunk_precision,
)

PERCENTILES = (50.0, 90.0, 99.0)


@dataclass(frozen=True, slots=True)
class Plan:
    warmup: int
    calls: int


FULL = Plan(warmup=20, calls=200)
QUICK = Plan(warmup=5, calls=30)


@dataclass(slots=True)
class Samples:
    backbone: str
    server: list[float]
    raw_full: list[float]
    raw_model: list[float]


async def _measure(
    app: Application,
    callers: Callers,
    head_id: str,
    pool: Sequence[InputData],
    plan: Plan,
) -> Samples:
    raw = raw_model(app, head_id)
    decoded = model_inputs(pool)
    ready = [raw.collate(raw.prepare([item])) for item in decoded[:16]]
    samples = Samples(raw.backbone.name, [], [], [])

    async def server(i: int) -> float:
        # Timed by the caller itself (in its own process by default): the call alone.
        run = await callers.run([Call(head_id, [pool[i % len(pool)]])], 1)
        return run.latencies[0]

    def timed(work: Callable[[], object]) -> float:
        started = time.perf_counter()
        work()
        return time.perf_counter() - started

    # Timed on the compute thread itself: the thread hop is not part of the raw forward.
    async def raw_full(i: int) -> float:
        return on_compute_thread(
            app, lambda: timed(lambda: raw.predict([decoded[i % len(decoded)]]))
        )

    async def raw_only(i: int) -> float:
        return on_compute_thread(app, lambda: timed(lambda: raw.forward(ready[i % len(ready)])))

    measured: list[tuple[Callable[[int], Awaitable[float]], list[float]]] = [
        (server, samples.server),
        (raw_full, samples.raw_full),
        (raw_only, samples.raw_model),
    ]
    for i in range(plan.warmup + plan.calls):
        rotation = i % len(measured)
        for call, into in measured[rotation:] + measured[:rotation]:
            elapsed = await call(i)
            if i >= plan.warmup:
                into.append(elapsed)
    return samples


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f}"


def _rows(samples: Samples) -> list[tuple[str, ...]]:
    rows: list[tuple[str, ...]] = []
    for q in PERCENTILES:
        server = percentile(samples.server, q)
        full = percentile(samples.raw_full, q)
        model = percentile(samples.raw_model, q)
        rows.append(
            (
                samples.backbone,
                f"p{q:g}",
                _ms(server),
                _ms(full),
                _ms(model),
                f"**{_ms(server - full)}**",
                _ms(server - model),
                f"{server / full:.3f}",
                f"{server / model:.3f}",
            )
        )
    return rows


async def run(quick: bool, overrides: dict[str, object], arguments: argparse.Namespace) -> None:
    plan = QUICK if quick else FULL
    environment = Environment()
    single_threaded_torch_here()
    with_text = not arguments.images_only
    with bench_server({"preload_backbones": probe_backbones(with_text), **overrides}) as running:
        app = running.app
        async with connect(running) as client:
            workloads = await probe_workloads(client, with_text)
            with open_callers(arguments, running.address, client, environment) as callers:
                results = [
                    await _measure(app, callers, workload.head_id, workload.inputs, plan)
                    for workload in workloads
                ]
        note_probe_inputs(environment, app, with_text)
        environment.note(
            "calls", f"{plan.calls} measured per variant after {plan.warmup} warm-up, sequential"
        )
        environment.note("server batch_max_wait_ms", app.settings.batch_max_wait_ms)
        environment.note("trunk precision", trunk_precision(app, IMAGE_BACKBONE))
        environment.note_server_threads(app)
        report = environment.markdown(app.backbones.device)

    print()
    print("## Single-input latency: Predict over gRPC vs raw in-process forward (ms)")
    print()
    print(
        table(
            (
                "backbone",
                "pct",
                "server",
                "raw incl. decode",
                "raw model only",
                "overhead vs incl. decode",
                "overhead vs model only",
                "server / incl. decode",
                "server / model only",
            ),
            [row for samples in results for row in _rows(samples)],
        )
    )
    print()
    for samples in results:
        p50 = percentile(samples.server, 50) - percentile(samples.raw_full, 50)
        p99 = percentile(samples.server, 99) - percentile(samples.raw_full, 99)
        print(
            f"{samples.backbone}: server overhead over raw incl. decode "
            f"{p50 * 1000:.1f} ms at p50, {p99 * 1000:.1f} ms at p99"
        )
    print()
    print(report)


def main() -> None:
    options = parser(__doc__.splitlines()[0])
    add_callers_option(options)
    add_images_only_option(options)
    arguments = options.parse_args()
    asyncio.run(run(arguments.quick, server_overrides(arguments), arguments))


if __name__ == "__main__":
    main()
