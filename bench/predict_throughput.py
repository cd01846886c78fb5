"""Predict throughput over gRPC / raw in-process trunk+head throughput at the same batch size.

N concurrent callers (one AsyncTransferClient channel) each send single-input or small-batch
Predict requests; the server's batcher stacks them. The raw baseline runs the server's own
loaded trunk plus the same head directly at the batch size the server could form
(min(callers x inputs per request, batch_max_size)), two ways:

* raw incl. decode: PNG decode / tokenisation + resize + normalise + collate + trunk + head
  + softmax, one batch after another on this thread (the same work the server does);
* raw model only: trunk + head + softmax on batches already decoded, collated and on the
  device.

Rounds are interleaved (server, raw incl., raw model, repeated) and each ratio is the median
of the per-round ratios. Target: server / raw incl. decode >= 0.90 on CPU.

    .venv/bin/python -m bench.predict_throughput [--quick] [--image-size 224]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import itertools
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from transfer_client.types import InputData
from transfer_service.lifecycle import Application

from bench.callers import Callers, add_callers_option, open_callers
from bench.common import (
    Call,
    CpuMeter,
    Environment,
    RawModel,
    add_images_only_option,
    add_round_options,
    apply_round_options,
    bench_server,
    connect,
    median,
    model_inputs,
    note_probe_inputs,
    on_compute_thread,
    parser,
    probe_backbones,
    probe_workloads,
    raw_model,
    rounds_inputs,
    server_overrides,
    single_threaded_torch_here,
    spread,
    table,
    verdict,
)

TARGET = 0.90
MIN_BATCHES_PER_ROUND = 4


@dataclass(frozen=True, slots=True)
class Plan:
    concurrency: tuple[int, ...]
    request_sizes: tuple[int, ...]
    repeats: int
    round_seconds: float
    only: tuple[tuple[int, int], ...] = ()  # (callers, inputs per request); empty: all rows


# Many short interleaved rounds: on a shared machine the median of per-round ratios is far
# steadier than a few long rounds.
FULL = Plan(concurrency=(1, 8, 32), request_sizes=(1, 4), repeats=5, round_seconds=0.5)
QUICK = Plan(concurrency=(1, 8), request_sizes=(1,), repeats=1, round_seconds=0.4)


@dataclass(slots=True)
class Row:
    backbone: str
    concurrency: int
    request_size: int
    batch: int
    server: list[float]
    raw_full: list[float]
    raw_model: list[float]
    mean_server_batch: float
    foreign_cores: float = 0.0
    mean_padding: float = 0.0  # copies per batch (TRANSFER_PREDICT_BATCH_PADDING)

    def ratios(self, raw: list[float]) -> list[float]:
        return [s / r for s, r in zip(self.server, raw, strict=True)]


def _raw_incl_decode(raw: RawModel, pool: Sequence[Any], batch: int, inputs: int) -> float:
    """Inputs/s of decode + preprocess + model, batch after batch."""
    cycle = itertools.cycle(pool)
    started = time.perf_counter()
    for start in range(0, inputs, batch):
        raw.predict([next(cycle) for _ in range(min(batch, inputs - start))])
    return inputs / (time.perf_counter() - started)


def _raw_model_only(raw: RawModel, ready: Sequence[Any], batch: int, inputs: int) -> float:
    """Inputs/s of trunk + head on batches already on the device."""
    cycle = itertools.cycle(ready)
    started = time.perf_counter()
    for _ in range(0, inputs, batch):
        raw.forward(next(cycle))
    return inputs / (time.perf_counter() - started)


def _batch_stats(app: Application, backbone: str) -> tuple[float, float, float]:
    """The server's inputs, batches and padding copies so far."""
    registry = app.metrics.registry
    labels = {"backbone": backbone}
    total = registry.get_sample_value("transfer_predict_batch_size_sum", labels) or 0.0
    count = registry.get_sample_value("transfer_predict_batch_size_count", labels) or 0.0
    padding = registry.get_sample_value("transfer_predict_padding_inputs_total", labels) or 0.0
    return total, count, padding


async def _measure_backbone(
    app: Application,
    callers: Callers,
    head_id: str,
    pool: Sequence[InputData],
    plan: Plan,
) -> list[Row]:
    raw = raw_model(app, head_id)
    backbone = raw.backbone.name
    decoded_pool = model_inputs(pool)
    rows = []
    for concurrency, request_size in itertools.product(plan.concurrency, plan.request_sizes):
        if plan.only and (concurrency, request_size) not in plan.only:
            continue
        batch = min(concurrency * request_size, app.settings.batch_max_size)
        # Warm-up at this batch size on both sides (first shapes are slow), and the rate
        # that sizes the rounds.
        on_compute_thread(app, _raw_incl_decode, raw, decoded_pool, batch, batch)
        rate = on_compute_thread(app, _raw_incl_decode, raw, decoded_pool, batch, batch * 2)
        # At least MIN_BATCHES_PER_ROUND full batches: a round starts from idle callers,
        # and its first batch is formed from whichever requests reach the server first.
        inputs = rounds_inputs(
            rate,
            plan.round_seconds,
            concurrency * request_size,
            max(concurrency * request_size, MIN_BATCHES_PER_ROUND * batch),
        )
        cycle = itertools.cycle(pool)
        calls = [
            Call(head_id, [next(cycle) for _ in range(request_size)])
            for _ in range(inputs // request_size)
        ]
        await callers.run(calls[:concurrency], concurrency)
        decoded = itertools.cycle(decoded_pool)
        ready = [
            raw.collate(raw.prepare([next(decoded) for _ in range(batch)]))
            for _ in range(min(inputs // batch, 8))
        ]
        row = Row(backbone, concurrency, request_size, batch, [], [], [], 0.0)
        total_before, count_before, padding_before = _batch_stats(app, backbone)
        meter = CpuMeter(callers.pids)
        for _ in range(plan.repeats):
            measured = await callers.run(calls, concurrency)
            row.server.append(inputs / measured.seconds)
            row.raw_full.append(
                on_compute_thread(app, _raw_incl_decode, raw, decoded_pool, batch, inputs)
            )
            row.raw_model.append(on_compute_thread(app, _raw_model_only, raw, ready, batch, inputs))
        total_after, count_after, padding_after = _batch_stats(app, backbone)
        batches = max(count_after - count_before, 1)
        row.mean_server_batch = (total_after - total_before) / batches
        row.mean_padding = (padding_after - padding_before) / batches
        row.foreign_cores = meter.foreign_cores()
        rows.append(row)
        print(
            f"  {backbone} callers={concurrency} inputs/request={request_size}: "
            f"server {median(row.server):.1f}/s, raw incl. decode {median(row.raw_full):.1f}/s, "
            f"raw model {median(row.raw_model):.1f}/s",
            flush=True,
        )
    return rows


async def run(plan: Plan, overrides: dict[str, object], arguments: argparse.Namespace) -> None:
    environment = Environment()
    single_threaded_torch_here()
    with_text = not arguments.images_only
    with bench_server({"preload_backbones": probe_backbones(with_text), **overrides}) as running:
        app = running.app
        async with connect(running) as client:
            workloads = await probe_workloads(client, with_text)
            with open_callers(arguments, running.address, client, environment) as callers:
                rows = []
                for workload in workloads:
                    rows += await _measure_backbone(
                        app, callers, workload.head_id, workload.inputs, plan
                    )
        note_probe_inputs(environment, app, with_text)
        environment.note(
            "server batching",
            f"batch_max_size {app.settings.batch_max_size}, "
            f"batch_max_wait_ms {app.settings.batch_max_wait_ms}, "
            f"predict_batch_padding {app.settings.predict_batch_padding} "
            f"({'on' if app.predictor.pads_batches else 'off'})",
        )
        environment.note("repeats per row", plan.repeats)
        environment.note_server_threads(app)
        report = environment.markdown(app.backbones.device)

    headers = (
        "backbone",
        "callers",
        "inputs/req",
        "raw batch",
        "server in/s",
        "raw incl. decode in/s",
        "raw model-only in/s",
        "mean server batch",
        "server / raw incl. decode",
        "server / raw model only",
        "ratio range (incl. decode)",
        "other processes' CPU (cores)",
    )
    table_rows = []
    for row in rows:
        full = row.ratios(row.raw_full)
        table_rows.append(
            (
                row.backbone,
                row.concurrency,
                row.request_size,
                row.batch,
                f"{median(row.server):.1f}",
                f"{median(row.raw_full):.1f}",
                f"{median(row.raw_model):.1f}",
                f"{row.mean_server_batch:.1f}"
                + (f" (+{row.mean_padding:.1f} copies)" if row.mean_padding else ""),
                f"**{median(full):.3f}**",
                f"{median(row.ratios(row.raw_model)):.3f}",
                spread(full),
                f"{row.foreign_cores:.2f}",
            )
        )
    print()
    print("## Predict throughput: server over gRPC / raw in-process (same batch size)")
    print()
    print(table(headers, table_rows))
    print()
    worst = min(rows, key=lambda r: median(r.ratios(r.raw_full)))
    print(
        f"Against raw incl. decode, worst row ({worst.backbone}, {worst.concurrency} callers, "
        f"{worst.request_size}/request): " + verdict(median(worst.ratios(worst.raw_full)), TARGET)
    )
    print()
    print(report)


def main() -> None:
    options = parser(__doc__.splitlines()[0])
    add_round_options(options)
    add_callers_option(options)
    add_images_only_option(options)
    options.add_argument(
        "--only", default=None, help="rows to run, as CALLERSxINPUTS[,...] (default: all)"
    )
    arguments = options.parse_args()
    plan = apply_round_options(QUICK if arguments.quick else FULL, arguments)
    if arguments.only:
        plan = dataclasses.replace(plan, only=_parse_rows(arguments.only))
    asyncio.run(run(plan, server_overrides(arguments), arguments))


def _parse_rows(text: str) -> tuple[tuple[int, int], ...]:
    rows = []
    for part in text.split(","):
        callers, _, inputs = part.strip().partition("x")
        rows.append((int(callers), int(inputs)))
    return tuple(rows)


if __name__ == "__main__":
    main()
