"""Many heads on one resident backbone: throughput and memory.

Throughput: 64 distinct linear-probe heads on efficientnet_lite0, each Predict request naming
one at random, over the throughput of the same requests all naming one head, at the same
concurrency (rounds interleaved, median of per-round ratios). Target >= 0.95.

Memory: (sum of the 64 heads' weight bytes + one backbone) / (64 full model copies: 64 x
backbone bytes + the same heads). Sizes are what the server reports (Head.size_bytes,
Backbone.resident_bytes). Target <= 0.03.

    .venv/bin/python -m bench.many_heads [--quick] [--image-size 224]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import random
import time
from dataclasses import dataclass

from transfer_client import AsyncTransferClient
from transfer_client.types import InputData

from bench.callers import add_callers_option, open_callers
from bench.common import (
    Call,
    Environment,
    add_round_options,
    apply_round_options,
    bench_server,
    connect,
    fashion_pngs,
    median,
    parser,
    rounds_inputs,
    server_overrides,
    spread,
    table,
    train_probe,
    verdict,
)

BACKBONE = "efficientnet_lite0"
THROUGHPUT_TARGET = 0.95
MEMORY_TARGET = 0.03
PER_CLASS = 4  # training images per class of each head (two classes per head)


@dataclass(frozen=True, slots=True)
class Plan:
    heads: int
    concurrency: tuple[int, ...]
    repeats: int
    round_seconds: float


FULL = Plan(heads=64, concurrency=(1, 8, 32), repeats=3, round_seconds=1.5)
QUICK = Plan(heads=8, concurrency=(8,), repeats=1, round_seconds=0.4)


async def _train_heads(client: AsyncTransferClient, count: int) -> list[str]:
    """`count` two-class probe heads, each on its own class pair and images."""
    pool = fashion_pngs(12, seed=1)
    by_class: dict[str, list[bytes]] = {}
    for png, label in pool:
        by_class.setdefault(label, []).append(png)
    labels = sorted(by_class)
    heads = []
    for index in range(count):
        first = index % len(labels)
        second = (first + 1 + (index // len(labels)) % (len(labels) - 1)) % len(labels)
        offset = (index * PER_CLASS) % (len(by_class[labels[first]]) - PER_CLASS + 1)
        examples: list[tuple[InputData, str]] = []
        for label in (labels[first], labels[second]):
            examples += [(png, label) for png in by_class[label][offset : offset + PER_CLASS]]
        heads.append(
            await train_probe(client, BACKBONE, examples, f"many-{index}", epochs=10, seed=index)
        )
    return heads


async def run(plan: Plan, overrides: dict[str, object], arguments: argparse.Namespace) -> None:
    environment = Environment()
    with bench_server({"preload_backbones": [BACKBONE], **overrides}) as running:
        app = running.app
        async with connect(running) as client:
            print(f"training {plan.heads} probe heads ...", flush=True)
            started = time.perf_counter()
            heads = await _train_heads(client, plan.heads)
            train_seconds = time.perf_counter() - started
            print(f"  {train_seconds:.1f} s ({train_seconds / plan.heads:.2f} s per head)")

            with open_callers(arguments, running.address, client, environment) as callers:
                images = [png for png, _ in fashion_pngs(10, split="test", seed=2)]
                # Rate of one head at the largest concurrency sizes the rounds.
                probe_calls = [Call(heads[0], [png]) for png in images[:32]]
                await callers.run(probe_calls, 8)
                rate = len(probe_calls) / (await callers.run(probe_calls, 8)).seconds

                rows = []
                chooser = random.Random(0)
                for concurrency in plan.concurrency:
                    inputs = rounds_inputs(rate, plan.round_seconds, concurrency, concurrency * 2)
                    cycle = itertools.cycle(images)
                    pngs = [next(cycle) for _ in range(inputs)]
                    one = [Call(heads[0], [png]) for png in pngs]
                    many = [Call(chooser.choice(heads), [png]) for png in pngs]
                    await callers.run(one[:concurrency], concurrency)
                    await callers.run(many[:concurrency], concurrency)
                    one_rates: list[float] = []
                    many_rates: list[float] = []
                    for repeat in range(plan.repeats):
                        # Alternate which goes first so a drifting machine favours neither.
                        order = [(one, one_rates), (many, many_rates)]
                        for calls, rates in order if repeat % 2 == 0 else order[::-1]:
                            measured = await callers.run(calls, concurrency)
                            rates.append(len(calls) / measured.seconds)
                    ratios = [m / o for m, o in zip(many_rates, one_rates, strict=True)]
                    rows.append((concurrency, inputs, one_rates, many_rates, ratios))
                    print(
                        f"  callers={concurrency}: one head {median(one_rates):.1f}/s, "
                        f"{plan.heads} heads {median(many_rates):.1f}/s",
                        flush=True,
                    )

            records = await client.list_heads(backbone=BACKBONE)
            backbone_bytes = next(
                b.resident_bytes for b in await client.list_backbones() if b.name == BACKBONE
            )
        ours = {record.head_id: record.size_bytes for record in records if record.head_id in heads}
        environment.note("heads", f"{plan.heads} two-class linear probes, {PER_CLASS * 2} images")
        environment.note("head training", f"{train_seconds:.1f} s for all heads via FineTune")
        environment.note(
            "image input",
            "Fashion-MNIST test PNGs -> "
            f"{app.backbones.get(BACKBONE).preprocessor.input_size} px, one per request",
        )
        environment.note("repeats per row", plan.repeats)
        environment.note_server_threads(app)
        report = environment.markdown(app.backbones.device)

    head_bytes = sum(ours.values())
    shared = head_bytes + backbone_bytes
    copies = plan.heads * backbone_bytes + head_bytes
    memory_ratio = shared / copies

    print()
    print(f"## {plan.heads} heads on one backbone vs one head (single-input requests)")
    print()
    print(
        table(
            (
                "callers",
                "inputs/round",
                "one head in/s",
                f"{plan.heads} random heads in/s",
                "many / one",
                "ratio range",
            ),
            [
                (
                    concurrency,
                    inputs,
                    f"{median(one_rates):.1f}",
                    f"{median(many_rates):.1f}",
                    f"**{median(ratios):.3f}**",
                    spread(ratios),
                )
                for concurrency, inputs, one_rates, many_rates, ratios in rows
            ],
        )
    )
    print()
    print(f"## Resident weights: {plan.heads} heads sharing one backbone vs {plan.heads} copies")
    print()
    print(
        table(
            ("quantity", "bytes"),
            [
                (f"{BACKBONE} trunk (resident_bytes)", f"{backbone_bytes:,}"),
                (f"{plan.heads} heads (sum of size_bytes)", f"{head_bytes:,}"),
                ("one head (mean)", f"{head_bytes / max(len(ours), 1):,.0f}"),
                ("shared: heads + one backbone", f"{shared:,}"),
                (f"copies: {plan.heads} x backbone + heads", f"{copies:,}"),
                ("**shared / copies**", f"**{memory_ratio:.4f}**"),
            ],
        )
    )
    print()
    worst = min(median(ratios) for *_, ratios in rows)
    print("Throughput, worst concurrency: " + verdict(worst, THROUGHPUT_TARGET))
    caveat = "" if plan.heads == 64 else f" (the target is for 64 heads; this run has {plan.heads})"
    print("Memory: " + verdict(memory_ratio, MEMORY_TARGET, at_least=False) + caveat)
    print()
    print(report)


def main() -> None:
    options = parser(__doc__.splitlines()[0])
    add_round_options(options)
    add_callers_option(options)
    arguments = options.parse_args()
    plan = apply_round_options(QUICK if arguments.quick else FULL, arguments)
    asyncio.run(run(plan, server_overrides(arguments), arguments))


if __name__ == "__main__":
    main()
