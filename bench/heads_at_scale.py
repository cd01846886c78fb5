"""10,000 heads on one backbone, on each store: Predict throughput, cold head loads, ListHeads.

Issue 17. For each store (the embedded one, SQLite + a directory, and PostgreSQL) a server runs
in this process on that store with 10,000 linear-probe heads on efficientnet_lite0:

- *Fixture.* ONE head is trained through FineTune (4 Fashion-MNIST classes, 10 images each);
  the other 9,999 are written straight into the server's store (`Store.save_head`) with the
  same weights and record under new ids, names and created times. Training 10,000 heads
  would take hours and add nothing to what is measured: 10,000 distinct head ids with real
  weights, each loaded, cached and listed like any other head.
- *Throughput.* Closed-loop callers (8, in a child process) send single-image Predicts, (a)
  all to one head, (b) each to a head chosen at random from all of them (new choices every
  round); rounds interleaved, the first of each pair alternating, median of the per-round
  ratios random / one with their range. Target >= 0.90. First with a head cache that holds
  every head (head_cache_entries = the head count, head_cache_bytes ample: the Settings
  fields of TRANSFER_HEAD_CACHE_ENTRIES / TRANSFER_HEAD_CACHE_BYTES), warmed by one Predict
  per head; then, informative, a second server on the same store with a cache a tenth of the
  heads (1,000 entries), where most random Predicts load their head from the store.
- *Cold head load.* The warming pass is one caller, one Predict per head (each head's first):
  its p50 / p99 against a second pass over a sample of the same heads (all resident) is the
  cost of loading a head from the store (on PostgreSQL: the "cold head load from the database"
  p50 / p99); the server's own mean load time (`transfer_cache_load_seconds`) beside it.
- *ListHeads at 10,000 heads.* Latency of one page (page_size 100 and 1000) over gRPC from the
  child process, the first page and a middle one (its page_token from paging there), p50 / p99.

The PostgreSQL server is the tests' throwaway one (tests/postgres_server.py: initdb into a
temp dir, fsync off, loopback), on this machine beside the service.

    .venv/bin/python -m bench.heads_at_scale [--quick] [--stores sqlite,postgres] [--heads N]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import itertools
import random
import secrets
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from transfer_client.types import InputData

from bench.callers import CallerProcess
from bench.common import (
    CLIENT_TIMEOUT_S,
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

if TYPE_CHECKING:
    from transfer_client import AsyncTransferClient
    from transfer_service.lifecycle import Application

    from tests.conftest import RunningServer

BACKBONE = "efficientnet_lite0"
THROUGHPUT_TARGET = 0.90
STORES = ("sqlite", "postgres")
FIXTURE_WRITERS = 4  # threads writing the copied heads (the stores overlap their syncs)
PAGE_SIZES = (100, 1000)


@dataclass(frozen=True, slots=True)
class Plan:
    heads: int
    small_cache: int  # head_cache_entries of the informative second row
    concurrency: int
    repeats: int
    round_seconds: float
    warm_sample: int  # heads Predicted again, resident, against their cold first Predict
    list_samples: int  # ListHeads calls per (page size, page) row


FULL = Plan(
    heads=10_000,
    small_cache=1_000,
    concurrency=8,
    repeats=7,
    round_seconds=3.0,
    warm_sample=1_000,
    list_samples=200,
)
QUICK = Plan(
    heads=500,
    small_cache=50,
    concurrency=8,
    repeats=2,
    round_seconds=0.5,
    warm_sample=100,
    list_samples=20,
)


@dataclass(slots=True)
class ThroughputRow:
    cache_entries: int
    inputs: int  # per round
    one_rates: list[float] = field(default_factory=list)
    random_rates: list[float] = field(default_factory=list)
    misses: float = 0.0  # head cache misses during the random rounds
    random_calls: int = 0

    @property
    def ratios(self) -> list[float]:
        return [r / o for r, o in zip(self.random_rates, self.one_rates, strict=True)]


@dataclass(frozen=True, slots=True)
class ListRow:
    page_size: int
    page: str
    heads_in_page: int
    latencies: list[float]


@dataclass(slots=True)
class StoreResult:
    store: str
    train_seconds: float = 0.0
    fixture_seconds: float = 0.0
    cold: list[float] = field(default_factory=list)  # first Predict of each head, 1 caller
    warm: list[float] = field(default_factory=list)  # the same heads again, resident
    load_mean: float = 0.0  # the server's mean head load over the cold pass
    resident_bytes: int = 0  # the head cache's, once every head is in it
    head_bytes: int = 0  # one head's stored weights (size_bytes)
    throughput: list[ThroughputRow] = field(default_factory=list)
    listing: list[ListRow] = field(default_factory=list)
    database: str = ""
    device: str = "cpu"


# --- the store under each server -----------------------------------------------------------


@contextlib.contextmanager
def _store(kind: str) -> Iterator[tuple[dict[str, object], Path, str]]:
    """Settings for a fresh store of `kind`, the store directory, and a description."""
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as directory:
        if kind == "sqlite":
            yield {}, Path(directory), "SQLite index + head files in a temp dir"
            return
        import psycopg

        from tests.postgres_server import PostgresServer

        database = PostgresServer().start()
        try:
            url = database.create_database("bench")
            with psycopg.connect(url) as conn:
                row = conn.execute("SHOW server_version").fetchone()
            version = row[0] if row else "?"
            yield (
                {"database_url": url},
                Path(directory),
                f"PostgreSQL {version}, throwaway local server (tests/postgres_server.py: "
                "fsync off, loopback TCP)",
            )
        finally:
            database.stop()


@contextlib.contextmanager
def _server(overrides: dict[str, object], store_dir: Path) -> Iterator[RunningServer]:
    """A server, and after it stops, none of its torch threads left to slow the next one."""
    with bench_server(overrides, store_dir=store_dir) as running:
        yield running
    deadline = time.monotonic() + 30
    for thread in threading.enumerate():
        if thread.name.startswith(("predict", "job-", "train")):
            thread.join(timeout=max(0.0, deadline - time.monotonic()))


def _cache_settings(entries: int) -> dict[str, object]:
    """head_cache_entries (TRANSFER_HEAD_CACHE_ENTRIES) and a byte budget that never binds
    first (TRANSFER_HEAD_CACHE_BYTES: 256 KiB a head, at least the default 1 GiB; a probe
    head on efficientnet_lite0 is ~30 KB)."""
    return {"head_cache_entries": entries, "head_cache_bytes": max(1024**3, entries * 256 * 1024)}


def _head_metric(app: Application, name: str) -> float:
    value = app.metrics.registry.get_sample_value(name, {"cache": "head"})
    return float(value or 0.0)


# --- fixture -------------------------------------------------------------------------------


def _copy_heads(app: Application, source: str, count: int) -> list[str]:
    """`count` more heads with `source`'s record and weights under new ids, names and created
    times (a millisecond apart, after the source), written with Store.save_head."""
    record = app.store.get_head(source)
    weights = app.store.load_head_weights(source)

    def write(index: int) -> str:
        head_id = f"scale-{index:05d}-{secrets.token_hex(4)}"
        copy = dataclasses.replace(
            record,
            head_id=head_id,
            name=f"scale-{index:05d}",
            created_time=record.created_time + timedelta(milliseconds=index),
        )
        app.store.save_head(copy, weights)
        return head_id

    with ThreadPoolExecutor(FIXTURE_WRITERS, thread_name_prefix="bench-fixture") as pool:
        return list(pool.map(write, range(1, count + 1)))


# --- ListHeads, run in the caller process --------------------------------------------------


async def _list_page_latencies(
    _client: AsyncTransferClient, address: str, page_size: int, skip: int, samples: int
) -> tuple[list[float], int]:
    """Latencies of `samples` sequential ListHeads calls for the page of `page_size` heads
    after the first `skip` (its token got by paging there, `page_size` at a time), and how
    many heads that page holds. A channel of its own: the SDK pages for its caller."""
    import grpc.aio
    from transfer_client.proto import transfer_service_pb2 as pb
    from transfer_client.proto import transfer_service_pb2_grpc as pb_grpc

    options = [("grpc.max_receive_message_length", 64 * 1024**2)]
    async with grpc.aio.insecure_channel(address, options=options) as channel:
        stub = pb_grpc.TransferServiceStub(channel)
        token = ""
        listed = 0
        while listed < skip:
            step = min(page_size, skip - listed)  # lands on `skip` exactly
            response = await stub.ListHeads(
                pb.ListHeadsRequest(page_size=step, page_token=token), timeout=CLIENT_TIMEOUT_S
            )
            listed += len(response.heads)
            token = response.next_page_token
            if not token:
                raise RuntimeError(f"the listing ended at {listed} heads, before {skip}")
        request = pb.ListHeadsRequest(page_size=page_size, page_token=token)
        for _ in range(2):  # warm-up, untimed
            response = await stub.ListHeads(request, timeout=CLIENT_TIMEOUT_S)
        latencies = []
        for _ in range(samples):
            started = time.perf_counter()
            response = await stub.ListHeads(request, timeout=CLIENT_TIMEOUT_S)
            latencies.append(time.perf_counter() - started)
        return latencies, len(response.heads)


# --- throughput ----------------------------------------------------------------------------


async def _throughput(
    callers: CallerProcess,
    app: Application,
    heads: Sequence[str],
    images: Sequence[InputData],
    plan: Plan,
    chooser: random.Random,
    cache_entries: int,
) -> ThroughputRow:
    """Interleaved rounds of one head vs a random head per call, at plan.concurrency."""
    concurrency = plan.concurrency
    probe_calls = [Call(heads[0], [png]) for png in images[:32]]
    await callers.run(probe_calls, concurrency)
    rate = len(probe_calls) / (await callers.run(probe_calls, concurrency)).seconds
    inputs = rounds_inputs(rate, plan.round_seconds, concurrency, concurrency * 2)
    row = ThroughputRow(cache_entries, inputs)
    cycle = itertools.cycle(images)
    for repeat in range(plan.repeats):
        pngs = [next(cycle) for _ in range(inputs)]
        one = [Call(heads[0], [png]) for png in pngs]
        spread_calls = [Call(chooser.choice(heads), [png]) for png in pngs]
        order = [("one", one), ("random", spread_calls)]
        for kind, calls in order if repeat % 2 == 0 else order[::-1]:
            misses = _head_metric(app, "transfer_cache_misses_total")
            measured = await callers.run(calls, concurrency)
            if kind == "one":
                row.one_rates.append(len(calls) / measured.seconds)
            else:
                row.random_rates.append(len(calls) / measured.seconds)
                row.misses += _head_metric(app, "transfer_cache_misses_total") - misses
                row.random_calls += len(calls)
    print(
        f"    cache {cache_entries:,}: one head {median(row.one_rates):.1f}/s, random of "
        f"{len(heads):,} {median(row.random_rates):.1f}/s, ratio {median(row.ratios):.3f} "
        f"({spread(row.ratios)}), misses {row.misses / max(row.random_calls, 1):.1%}",
        flush=True,
    )
    return row


# --- one store -----------------------------------------------------------------------------


async def _measure_store(
    kind: str,
    plan: Plan,
    overrides: dict[str, object],
    images: list[InputData],
    environment: Environment,
) -> StoreResult:
    result = StoreResult(kind)
    chooser = random.Random(17)
    with _store(kind) as (store_settings, store_dir, description):
        result.database = description
        base = {"preload_backbones": [BACKBONE], **overrides, **store_settings}
        print(f"[{kind}] {description}", flush=True)

        # Server 1: a cache that holds every head.
        with _server({**base, **_cache_settings(plan.heads)}, store_dir) as running:
            app = running.app
            result.device = str(app.backbones.device)
            async with connect(running) as client:
                print(f"[{kind}] training the one real head ...", flush=True)
                started = time.perf_counter()
                trained = await train_probe(
                    client, BACKBONE, fashion_pngs(10, seed=1, classes=4), "scale-00000"
                )
                result.train_seconds = time.perf_counter() - started
            result.head_bytes = app.store.get_head(trained).size_bytes
            print(f"[{kind}] writing {plan.heads - 1:,} copies with Store.save_head ...")
            started = time.perf_counter()
            heads = [trained, *await asyncio.to_thread(_copy_heads, app, trained, plan.heads - 1)]
            result.fixture_seconds = time.perf_counter() - started
            print(
                f"    {result.fixture_seconds:.1f} s "
                f"({plan.heads / result.fixture_seconds:,.0f} heads/s)",
                flush=True,
            )

            with CallerProcess(running.address) as callers:
                for pid in callers.pids:
                    environment.meter.include(pid)
                # The trained head is resident already (its job put it in the cache).
                cold_heads = heads[1:]
                print(f"[{kind}] warming: one Predict per head, one caller ...", flush=True)
                loads = _head_metric(app, "transfer_cache_load_seconds_count")
                load_seconds = _head_metric(app, "transfer_cache_load_seconds_sum")
                cold_calls = [Call(h, [images[i % len(images)]]) for i, h in enumerate(cold_heads)]
                result.cold = (await callers.run(cold_calls, 1)).latencies
                loaded = _head_metric(app, "transfer_cache_load_seconds_count") - loads
                result.load_mean = (
                    _head_metric(app, "transfer_cache_load_seconds_sum") - load_seconds
                ) / max(loaded, 1)
                if len(app.heads) < plan.heads or loaded < len(cold_heads):
                    raise RuntimeError(
                        f"the head cache holds {len(app.heads)} heads after warming "
                        f"({loaded:.0f} loads), not all {plan.heads}"
                    )
                result.resident_bytes = app.heads.resident_bytes()
                count = min(plan.warm_sample, len(cold_heads))
                sample = sorted(chooser.sample(range(len(cold_heads)), count))
                result.warm = (await callers.run([cold_calls[i] for i in sample], 1)).latencies
                print(
                    f"    cold Predict p50 {percentile(result.cold, 50) * 1e3:.1f} ms, warm "
                    f"{percentile(result.warm, 50) * 1e3:.1f} ms; server's mean head load "
                    f"{result.load_mean * 1e3:.2f} ms",
                    flush=True,
                )

                print(f"[{kind}] throughput, every head cached ...", flush=True)
                result.throughput.append(
                    await _throughput(callers, app, heads, images, plan, chooser, plan.heads)
                )

                print(f"[{kind}] ListHeads at {plan.heads:,} heads ...", flush=True)
                for page_size in PAGE_SIZES:
                    for page, skip in (("first", 0), ("middle", plan.heads // 2)):
                        latencies, count = await callers.call(
                            _list_page_latencies,
                            running.address,
                            page_size,
                            skip,
                            plan.list_samples,
                        )
                        label = page if skip == 0 else f"middle (after {skip:,})"
                        result.listing.append(ListRow(page_size, label, count, latencies))
                        print(
                            f"    page_size {page_size}, {label}: p50 "
                            f"{percentile(latencies, 50) * 1e3:.1f} ms",
                            flush=True,
                        )

        # Server 2, same store: a cache a tenth the size of the head set.
        small = plan.small_cache
        with _server({**base, **_cache_settings(small)}, store_dir) as running:
            app = running.app
            with CallerProcess(running.address) as callers:
                for pid in callers.pids:
                    environment.meter.include(pid)
                print(f"[{kind}] throughput, head cache of {small:,} ...", flush=True)
                fill = [
                    Call(head, [images[i % len(images)]])
                    for i, head in enumerate(chooser.sample(heads, small))
                ]
                await callers.run(fill, plan.concurrency)  # fills the LRU, untimed
                result.throughput.append(
                    await _throughput(callers, app, heads, images, plan, chooser, small)
                )
    return result


# --- report --------------------------------------------------------------------------------


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f}"


def _report(plan: Plan, results: Sequence[StoreResult]) -> None:
    n = f"{plan.heads:,}"
    print()
    print(f"## {n} heads on one backbone: random head per Predict / one head (1 input each)")
    print()
    rows = []
    for result in results:
        for row in result.throughput:
            full = row.cache_entries >= plan.heads
            ratio = median(row.ratios)
            rows.append(
                (
                    result.store,
                    f"{row.cache_entries:,}" + (" (all)" if full else ""),
                    plan.concurrency,
                    row.inputs,
                    f"{median(row.one_rates):.1f}",
                    f"{median(row.random_rates):.1f}",
                    f"{row.misses / max(row.random_calls, 1):.1%}",
                    f"**{ratio:.3f}**" if full else f"{ratio:.3f}",
                    spread(row.ratios),
                    f">= {THROUGHPUT_TARGET:g}" if full else "- (informative)",
                    verdict(ratio, THROUGHPUT_TARGET).split(" (")[0] if full else "-",
                )
            )
    print(
        table(
            (
                "store",
                "head cache entries",
                "callers",
                "inputs/round",
                "one head in/s",
                f"random of {n} in/s",
                "head cache misses (random rounds)",
                "random / one",
                "ratio range",
                "target",
                "verdict",
            ),
            rows,
        )
    )
    print()
    print(f"## Cold head load: first Predict of {plan.heads - 1:,} heads, one caller")
    print()
    print(
        table(
            (
                "store",
                "cold Predict p50 ms",
                "cold p99 ms",
                "resident Predict p50 ms",
                "resident p99 ms",
                "cold - resident p50 ms",
                "server's mean head load ms",
                "head cache resident bytes (all heads)",
            ),
            [
                (
                    result.store,
                    _ms(percentile(result.cold, 50)),
                    _ms(percentile(result.cold, 99)),
                    _ms(percentile(result.warm, 50)),
                    _ms(percentile(result.warm, 99)),
                    _ms(percentile(result.cold, 50) - percentile(result.warm, 50)),
                    f"{result.load_mean * 1e3:.2f}",
                    f"{result.resident_bytes:,}",
                )
                for result in results
            ],
        )
    )
    print()
    print(f"## ListHeads at {n} heads, one page over gRPC (sequential calls, no filter)")
    print()
    print(
        table(
            ("store", "page_size", "page", "heads in page", "p50 ms", "p99 ms", "calls"),
            [
                (
                    result.store,
                    row.page_size,
                    row.page,
                    row.heads_in_page,
                    f"**{_ms(percentile(row.latencies, 50))}**",
                    _ms(percentile(row.latencies, 99)),
                    len(row.latencies),
                )
                for result in results
                for row in result.listing
            ],
        )
    )
    print()
    for result in results:
        cached = next(r for r in result.throughput if r.cache_entries >= plan.heads)
        line = f"Throughput, {result.store}, every head cached: "
        print(line + verdict(median(cached.ratios), THROUGHPUT_TARGET))
    if plan.heads != FULL.heads:
        print(f"(the target is for {FULL.heads:,} heads; this run has {plan.heads:,})")
    print()


async def run(plan: Plan, stores: Sequence[str], arguments: argparse.Namespace) -> None:
    environment = Environment()
    overrides = server_overrides(arguments)
    images: list[InputData] = [png for png, _ in fashion_pngs(10, split="test", seed=2)]
    results = [await _measure_store(kind, plan, overrides, images, environment) for kind in stores]
    _report(plan, results)
    fixture = "; ".join(
        f"{r.store}: trained in {r.train_seconds:.1f} s, copies written in "
        f"{r.fixture_seconds:.1f} s"
        for r in results
    )
    environment.note(
        "heads (benchmark fixture)",
        f"{plan.heads:,} on {BACKBONE}: 1 linear probe trained via FineTune (4 Fashion-MNIST "
        f"classes x 10 images, {results[0].head_bytes:,} weight bytes), {plan.heads - 1:,} "
        "copies of its record and weights under new ids written with Store.save_head "
        f"({FIXTURE_WRITERS} threads)",
    )
    environment.note("fixture time", fixture)
    for r in results:
        environment.note(f"store: {r.store}", r.database)
    environment.note(
        "head cache",
        f"TRANSFER_HEAD_CACHE_ENTRIES={plan.heads} (all heads; then {plan.small_cache} for the "
        f"informative row), TRANSFER_HEAD_CACHE_BYTES=max(1 GiB, 256 KiB x entries), set as "
        "the server's Settings; warmed by one Predict per head",
    )
    environment.note(
        "image input", "Fashion-MNIST test PNGs (28x28), one per request, native backbone size"
    )
    environment.note("callers", f"{plan.concurrency}, closed loop, in a child process")
    environment.note(
        "rounds", f"{plan.repeats} per row, ~{plan.round_seconds:g} s each, random heads re-drawn"
    )
    print(environment.markdown(results[0].device))


def main() -> None:
    options = parser(__doc__.splitlines()[0])
    add_round_options(options)
    options.add_argument(
        "--stores",
        default=",".join(STORES),
        help="comma-separated stores to measure (default: sqlite,postgres)",
    )
    options.add_argument("--heads", type=int, default=None, help="head count (default: plan)")
    arguments = options.parse_args()
    plan = apply_round_options(QUICK if arguments.quick else FULL, arguments)
    if arguments.heads:
        plan = dataclasses.replace(
            plan, heads=arguments.heads, small_cache=max(1, arguments.heads // 10)
        )
    stores = [s.strip() for s in arguments.stores.split(",") if s.strip()]
    unknown = set(stores) - set(STORES)
    if unknown or not stores:
        options.error(f"--stores: choose from {', '.join(STORES)}")
    asyncio.run(run(plan, stores, arguments))


if __name__ == "__main__":
    main()
