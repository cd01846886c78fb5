"""The PostgreSQL store against the embedded SQLite one, on the same machine in one run.

Two servers run side by side in this process, identical but for the store: one on a
PostgreSQL this benchmark starts itself (tests/postgres_server.py: Debian's package on a
loopback port, fsync off), one on the embedded store (SQLite + files) in a temp dir. Each
trains the same linear-probe head on efficientnet_lite0.

(a) Warm Predict: throughput of single-input Predicts on the warm head, PostgreSQL / SQLite,
at each concurrency, in interleaved rounds (the order alternates), median of per-round ratios.
Target >= 0.98: a warm Predict never reads the store.

(b) Cold head load: the head is discarded from the server's head cache before every call, so
each Predict loads it from its store (record, weights, checksum) and builds it; p50 and p99 of
that Predict's latency, and of the store's own load (get_head + load_head_weights, called in
this process), per store, the stores alternating call by call.

    .venv/bin/python -m bench.store_backends [--quick] [--image-size 224]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import itertools
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass

from transfer_client.types import InputData

from bench.callers import Callers, add_callers_option, open_callers
from bench.common import (
    IMAGE_BACKBONE,
    Call,
    Environment,
    add_round_options,
    apply_round_options,
    bench_server,
    connect,
    fashion_pngs,
    median,
    parser,
    percentile,
    rounds_inputs,
    server_overrides,
    spread,
    table,
    train_probe,
    verdict,
)
from tests.conftest import RunningServer
from tests.postgres_server import PostgresServer

THROUGHPUT_TARGET = 0.98
STORES = ("postgres", "sqlite")


@dataclass(frozen=True, slots=True)
class Plan:
    concurrency: tuple[int, ...]
    repeats: int
    round_seconds: float
    cold_calls: int


FULL = Plan(concurrency=(1, 8), repeats=5, round_seconds=2.0, cold_calls=200)
QUICK = Plan(concurrency=(4,), repeats=1, round_seconds=0.4, cold_calls=10)


@dataclass(slots=True)
class Side:
    """One server and what the benchmark measures on it."""

    store: str
    running: RunningServer
    callers: Callers
    head_id: str = ""


@contextlib.contextmanager
def postgres_database() -> Iterator[tuple[PostgresServer, str]]:
    """A PostgreSQL of the benchmark's own and an empty database's URL; removed at the end."""
    server = PostgresServer().start()
    try:
        yield server, server.create_database("bench")
    finally:
        server.stop()


def _postgres_version(server: PostgresServer) -> str:
    result = subprocess.run(
        [str(server.bin_dir / "postgres"), "--version"],
        capture_output=True,
        text=True,
        check=False,
    )
    return result.stdout.strip() or "unknown"


async def _warm_throughput(
    sides: list[Side], plan: Plan, images: list[InputData]
) -> list[tuple[int, int, dict[str, list[float]], list[float]]]:
    """Per concurrency: inputs per round, each store's rates, PostgreSQL / SQLite per round."""
    postgres, sqlite = sides
    # The SQLite side's rate at the largest concurrency sizes the rounds (same for both).
    probe = [Call(sqlite.head_id, [png]) for png in images[:32]]
    await sqlite.callers.run(probe, 8)
    rate = len(probe) / (await sqlite.callers.run(probe, 8)).seconds
    rows = []
    for concurrency in plan.concurrency:
        inputs = rounds_inputs(rate, plan.round_seconds, concurrency, concurrency * 2)
        cycle = itertools.cycle(images)
        pngs = [next(cycle) for _ in range(inputs)]
        calls = {side.store: [Call(side.head_id, [png]) for png in pngs] for side in sides}
        for side in sides:  # warm-up at this concurrency
            await side.callers.run(calls[side.store][: concurrency * 2], concurrency)
        rates: dict[str, list[float]] = {side.store: [] for side in sides}
        for repeat in range(plan.repeats):
            # Alternate which goes first so a drifting machine favours neither.
            for side in sides if repeat % 2 == 0 else sides[::-1]:
                measured = await side.callers.run(calls[side.store], concurrency)
                rates[side.store].append(inputs / measured.seconds)
        ratios = [p / s for p, s in zip(rates[postgres.store], rates[sqlite.store], strict=True)]
        rows.append((concurrency, inputs, rates, ratios))
        print(
            f"  callers={concurrency}: postgres {median(rates['postgres']):.1f}/s, "
            f"sqlite {median(rates['sqlite']):.1f}/s",
            flush=True,
        )
    return rows


async def _cold_loads(
    sides: list[Side], plan: Plan, image: InputData
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Per store: latencies of a Predict on a head just discarded from the cache, and of the
    store's own load of that head (record + weights), in seconds."""
    predict: dict[str, list[float]] = {side.store: [] for side in sides}
    load: dict[str, list[float]] = {side.store: [] for side in sides}
    for index in range(plan.cold_calls + 2):
        for side in sides if index % 2 == 0 else sides[::-1]:
            app = side.running.app
            app.heads.discard(side.head_id)
            measured = await side.callers.run([Call(side.head_id, [image])], 1)
            started = time.perf_counter()
            app.store.get_head(side.head_id)
            app.store.load_head_weights(side.head_id)
            took = time.perf_counter() - started
            if index >= 2:  # the first two of each warm up connections and code paths
                predict[side.store].append(measured.latencies[0])
                load[side.store].append(took)
    return predict, load


def _ms(values: list[float], q: float) -> str:
    return f"{percentile(values, q) * 1000:.2f}"


async def run(plan: Plan, overrides: dict[str, object], arguments: argparse.Namespace) -> None:
    environment = Environment()
    settings = {"preload_backbones": [IMAGE_BACKBONE], **overrides}
    async with contextlib.AsyncExitStack() as stack:
        postgres_server, url = stack.enter_context(postgres_database())
        print("starting a server on each store ...", flush=True)
        servers = {
            "postgres": stack.enter_context(bench_server({**settings, "database_url": url})),
            "sqlite": stack.enter_context(bench_server(settings)),
        }
        train = [(png, label) for png, label in fashion_pngs(10, seed=1, classes=4)]
        images: list[InputData] = [png for png, _ in fashion_pngs(10, split="test", seed=2)]
        sides: list[Side] = []
        for store in STORES:
            running = servers[store]
            client = await stack.enter_async_context(connect(running))
            callers = stack.enter_context(
                open_callers(arguments, running.address, client, environment)
            )
            side = Side(store, running, callers)
            side.head_id = await train_probe(client, IMAGE_BACKBONE, train, f"bench-{store}")
            sides.append(side)
        record = servers["postgres"].app.store.get_head(sides[0].head_id)

        print("warm Predict throughput ...", flush=True)
        rows = await _warm_throughput(sides, plan, images)
        print("cold head loads ...", flush=True)
        cold_predict, cold_load = await _cold_loads(sides, plan, images[0])

        app = servers["postgres"].app
        environment.note("PostgreSQL", f"{_postgres_version(postgres_server)}, loopback, fsync off")
        environment.note(
            "head", f"linear probe, 4 classes, {record.backbone}, {record.input_size} px"
        )
        side_px = app.backbones.get(IMAGE_BACKBONE).preprocessor.input_size
        environment.note("image input", f"Fashion-MNIST test PNGs -> {side_px} px, one per request")
        environment.note("repeats per row (warm)", plan.repeats)
        environment.note("cold calls per store", plan.cold_calls)
        environment.note_server_threads(app)
        environment.extra = list(dict.fromkeys(environment.extra))  # "callers", once per side
        report = environment.markdown(app.backbones.device)

    print()
    print("## (a) Warm Predict throughput, PostgreSQL store / SQLite store (single-input calls)")
    print()
    print(
        table(
            ("callers", "inputs/round", "postgres in/s", "sqlite in/s", "pg / sqlite", "range"),
            [
                (
                    concurrency,
                    inputs,
                    f"{median(rates['postgres']):.1f}",
                    f"{median(rates['sqlite']):.1f}",
                    f"**{median(ratios):.3f}**",
                    spread(ratios),
                )
                for concurrency, inputs, rates, ratios in rows
            ],
        )
    )
    print()
    print("## (b) Cold head load (head discarded from the cache before each call), ms")
    print()
    print(
        table(
            ("store", "Predict p50", "Predict p99", "store load p50", "store load p99"),
            [
                (
                    store,
                    _ms(cold_predict[store], 50),
                    _ms(cold_predict[store], 99),
                    _ms(cold_load[store], 50),
                    _ms(cold_load[store], 99),
                )
                for store in STORES
            ],
        )
    )
    print()
    worst = min(median(ratios) for *_, ratios in rows)
    print("Warm throughput, worst concurrency: " + verdict(worst, THROUGHPUT_TARGET))
    print()
    print(report)


def main() -> None:
    options = parser(__doc__.splitlines()[0])
    add_round_options(options)
    add_callers_option(options)
    options.add_argument(
        "--cold-calls", type=int, default=None, help="cold Predicts per store (default: plan)"
    )
    arguments = options.parse_args()
    plan = apply_round_options(QUICK if arguments.quick else FULL, arguments)
    if arguments.cold_calls:
        plan = dataclasses.replace(plan, cold_calls=arguments.cold_calls)
    asyncio.run(run(plan, server_overrides(arguments), arguments))


if __name__ == "__main__":
    main()
