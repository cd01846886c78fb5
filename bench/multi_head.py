"""Ten heads in one Predict against ten Predicts, one per head.

Ten two-class linear-probe heads on efficientnet_lite0 (the moderation case: several
classifiers over every image). For each request size (images per call), one caller times,
in interleaved rounds:
- one head: one Predict naming one head (what a single call costs);
- 10 heads, one call: one Predict naming all ten (`head_ids`);
- 10 calls, concurrent: ten Predicts at once, one per head (the batcher may stack them, but
  each carries its own copy of the rows through the trunk);
- 10 calls, sequential: one after another.
Each figure is the median over rounds of the round's median latency. Then throughput, with
`--callers`-many callers each repeating one multi-head call or ten concurrent calls: heads x
inputs answered per second, median of rounds.

Target: one multi-head call costs little more than one call: latency(10 heads, one call) /
latency(one head) <= 1.5 at one input per call.

    .venv/bin/python -m bench.multi_head [--quick] [--image-size 224]
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from transfer_client import AsyncTransferClient
from transfer_client.types import InputData

from bench.common import (
    Environment,
    add_round_options,
    apply_round_options,
    bench_server,
    connect,
    fashion_pngs,
    median,
    parser,
    server_overrides,
    spread,
    table,
    train_probe,
    verdict,
)

BACKBONE = "efficientnet_lite0"
HEADS = 10
TARGET = 1.5  # latency of the 10-head call over one single-head call, at one input
PER_CLASS = 4

Mode = Callable[[list[InputData]], Awaitable[object]]


@dataclass(frozen=True, slots=True)
class Plan:
    inputs_per_call: tuple[int, ...]
    callers: int
    repeats: int
    round_seconds: float


FULL = Plan(inputs_per_call=(1, 8), callers=4, repeats=5, round_seconds=2.0)
QUICK = Plan(inputs_per_call=(1,), callers=2, repeats=1, round_seconds=0.3)


async def _train_heads(client: AsyncTransferClient) -> list[str]:
    """HEADS two-class probes, each on its own pair of Fashion-MNIST classes."""
    by_class: dict[str, list[bytes]] = {}
    for png, label in fashion_pngs(PER_CLASS, seed=1):
        by_class.setdefault(label, []).append(png)
    labels = sorted(by_class)
    heads = []
    for index in range(HEADS):
        pair = (labels[index % len(labels)], labels[(index + 1 + index // 5) % len(labels)])
        examples: list[tuple[InputData, str]] = [
            (png, label) for label in pair for png in by_class[label]
        ]
        heads.append(
            await train_probe(client, BACKBONE, examples, f"multi-{index}", epochs=10, seed=index)
        )
    return heads


def _modes(client: AsyncTransferClient, heads: list[str]) -> dict[str, tuple[Mode, int]]:
    """name -> (one unit of work, heads it answers)."""

    async def one_head(inputs: list[InputData]) -> object:
        return await client.predict(heads[0], inputs)

    async def multi(inputs: list[InputData]) -> object:
        return await client.predict_heads(heads, inputs)

    async def concurrent(inputs: list[InputData]) -> object:
        return await asyncio.gather(*(client.predict(h, inputs) for h in heads))

    async def sequential(inputs: list[InputData]) -> object:
        return [await client.predict(h, inputs) for h in heads]

    return {
        "one head": (one_head, 1),
        f"{HEADS} heads, one call": (multi, HEADS),
        f"{HEADS} calls, concurrent": (concurrent, HEADS),
        f"{HEADS} calls, sequential": (sequential, HEADS),
    }


async def _latencies(mode: Mode, inputs: list[InputData], count: int) -> float:
    """Median latency of `count` units, one at a time."""
    seconds = []
    for _ in range(count):
        started = time.perf_counter()
        await mode(inputs)
        seconds.append(time.perf_counter() - started)
    return median(seconds)


async def _throughput(mode: Mode, inputs: list[InputData], callers: int, seconds: float) -> float:
    """Units per second with `callers` callers repeating `mode` for about `seconds`."""
    done = 0
    stop = time.perf_counter() + seconds

    async def caller() -> None:
        nonlocal done
        while time.perf_counter() < stop:
            await mode(inputs)
            done += 1

    started = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(callers)))
    return done / (time.perf_counter() - started)


async def run(plan: Plan, overrides: dict[str, object]) -> None:
    environment = Environment()
    with bench_server({"preload_backbones": [BACKBONE], **overrides}) as running:
        app = running.app
        async with connect(running) as client:
            print(f"training {HEADS} probe heads ...", flush=True)
            heads = await _train_heads(client)
            modes = _modes(client, heads)
            multi = f"{HEADS} heads, one call"
            images: list[InputData] = [png for png, _ in fashion_pngs(4, split="test", seed=2)]
            latency_rows = []
            throughput_rows = []
            for size in plan.inputs_per_call:
                inputs = images[:size]
                # Warm every path at this size; each mode's units per round: about
                # round_seconds of it (at least 3).
                counts = {}
                for name, (mode, _) in modes.items():
                    await mode(inputs)
                    started = time.perf_counter()
                    await mode(inputs)
                    elapsed = time.perf_counter() - started
                    counts[name] = max(3, int(plan.round_seconds / elapsed))
                rounds: dict[str, list[float]] = {name: [] for name in modes}
                for repeat in range(plan.repeats):
                    # Alternate the order so a drifting machine favours no mode.
                    names = list(modes) if repeat % 2 == 0 else list(modes)[::-1]
                    for name in names:
                        rounds[name].append(await _latencies(modes[name][0], inputs, counts[name]))
                latency_rows.append((size, counts[multi], rounds))
                print(f"  {size} input(s): latency rounds done", flush=True)

                rates: dict[str, list[float]] = {
                    name: [] for name in (f"{HEADS} heads, one call", f"{HEADS} calls, concurrent")
                }
                for repeat in range(plan.repeats):
                    names = list(rates) if repeat % 2 == 0 else list(rates)[::-1]
                    for name in names:
                        mode, answered = modes[name]
                        units = await _throughput(mode, inputs, plan.callers, plan.round_seconds)
                        rates[name].append(units * answered * size)
                throughput_rows.append((size, rates))
        environment.note("heads", f"{HEADS} two-class linear probes on {BACKBONE}")
        environment.note(
            "image input",
            f"Fashion-MNIST test PNGs -> {app.backbones.get(BACKBONE).preprocessor.input_size} px",
        )
        environment.note("repeats per row", plan.repeats)
        environment.note_server_threads(app)
        report = environment.markdown(app.backbones.device)

    print()
    print(f"## Latency, one caller: {HEADS} heads in one Predict vs one Predict per head")
    print()
    rows = []
    for size, count, rounds in latency_rows:
        ms = {name: median(values) * 1000 for name, values in rounds.items()}
        over_one = [m / o for m, o in zip(rounds[multi], rounds["one head"], strict=True)]
        calls = rounds[f"{HEADS} calls, concurrent"]
        speedup = [c / m for c, m in zip(calls, rounds[multi], strict=True)]
        rows.append(
            (
                size,
                count,
                *(f"{ms[name]:.1f}" for name in rounds),
                f"**{median(over_one):.2f}** ({spread(over_one)})",
                f"**{median(speedup):.2f}** ({spread(speedup)})",
            )
        )
    print(
        table(
            (
                "inputs/call",
                "units/round (10-head call)",
                *(f"{name} ms" for name in latency_rows[0][2]),
                "one call / one head",
                "10 concurrent calls / one call",
            ),
            rows,
        )
    )
    print()
    print(f"## Throughput, {plan.callers} callers: head x input answers per second")
    print()
    rows = []
    for size, rates in throughput_rows:
        calls = rates[f"{HEADS} calls, concurrent"]
        ratio = [m / c for m, c in zip(rates[multi], calls, strict=True)]
        rows.append(
            (
                size,
                f"{median(rates[multi]):.0f}",
                f"{median(calls):.0f}",
                f"**{median(ratio):.2f}** ({spread(ratio)})",
            )
        )
    print(
        table(
            ("inputs/call", "one call of 10 heads", "10 concurrent calls", "one call / 10 calls"),
            rows,
        )
    )
    print()
    first = latency_rows[0]
    over = median([m / o for m, o in zip(first[2][multi], first[2]["one head"], strict=True)])
    print(f"Latency at {first[0]} input(s): " + verdict(over, TARGET, at_least=False))
    print()
    print(report)


def main() -> None:
    options = parser(__doc__.splitlines()[0])
    add_round_options(options)
    arguments = options.parse_args()
    plan = apply_round_options(QUICK if arguments.quick else FULL, arguments)
    asyncio.run(run(plan, server_overrides(arguments)))


if __name__ == "__main__":
    main()
