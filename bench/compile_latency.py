"""Steady-state trunk latency with TRANSFER_COMPILE on vs off, one batch at a time.

Both backbones are loaded through the real cache (the compiled one compiles and warms up at
load, which is timed). Each round times, for each batch size, `--iterations` calls of the
frozen trunk (all stages + pooling, inference mode, on a preprocessed batch of Fashion-MNIST
images already on the device) per variant, the variants' calls alternating (which goes first
flips every round) so that machine noise hits both alike. Reported: the median over rounds
of each round's median, and eager / compiled (above 1: compiled is faster).

    .venv/bin/python -m bench.compile_latency [--image-size 224] [--rounds 5] [--quick]
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch
from transfer_service.backbones.cache import BackboneCache, LoadedBackbone
from transfer_service.backbones.catalog import PreprocessingOptions, default_catalog
from transfer_service.domain import ModelInput
from transfer_service.settings import Settings

from bench.common import Environment, fashion_pngs, median, parser, spread, table

BACKBONE = "efficientnet_lite0"
BATCH_SIZES = (1, 16)


def load(compile: bool, image_size: int | None) -> tuple[LoadedBackbone, float]:
    settings = Settings()
    cache = BackboneCache(
        default_catalog(),
        weights_dir=settings.weights_dir,
        device=torch.device("cpu"),
        options=PreprocessingOptions(
            image_size, settings.max_text_tokens, settings.max_image_pixels
        ),
        budget_bytes=2**40,
        precision=settings.precision,
        compile=compile,
    )
    started = time.perf_counter()
    backbone = cache.get(BACKBONE)
    return backbone, time.perf_counter() - started


def round_medians(backbones: Sequence[LoadedBackbone], state: Any, iterations: int) -> list[float]:
    """One round: the backbones' calls alternate (a b a b ...), so a burst of noise from other
    processes lands on both; each backbone's median call time."""
    times: list[list[float]] = [[] for _ in backbones]
    with torch.inference_mode():
        for backbone in backbones:  # untimed
            backbone.trunk.pool(backbone.run_prefix(state, 0, backbone.trunk.num_stages))
        for _ in range(iterations):
            for backbone, own in zip(backbones, times, strict=True):
                trunk = backbone.trunk
                started = time.perf_counter()
                trunk.pool(backbone.run_prefix(state, 0, trunk.num_stages))
                own.append(time.perf_counter() - started)
    return [median(own) for own in times]


def main(argv: Sequence[str] | None = None) -> None:
    arguments = parser(__doc__.splitlines()[0] if __doc__ else "")
    arguments.add_argument("--rounds", type=int, default=5)
    arguments.add_argument("--iterations", type=int, default=None)
    options = arguments.parse_args(argv)
    iterations = options.iterations or (3 if options.quick else 10)
    environment = Environment()
    eager, eager_load = load(False, options.image_size)
    compiled, compiled_load = load(True, options.image_size)
    images = [ModelInput(image=png) for png, _ in fashion_pngs(2)]
    loaded = [eager.preprocessor.load(x, "inputs") for x in images]
    states = {size: eager.stack(loaded[:size]) for size in BATCH_SIZES}
    samples: dict[tuple[str, int], list[float]] = {}
    for round_index in range(options.rounds):
        variants = [("eager", eager), ("compiled", compiled)]
        if round_index % 2:
            variants.reverse()
        for size in BATCH_SIZES:
            medians = round_medians([b for _, b in variants], states[size], iterations)
            for (label, _), value in zip(variants, medians, strict=True):
                samples.setdefault((label, size), []).append(value)
    rows = []
    for size in BATCH_SIZES:
        eager_ms = [1000 * v for v in samples[("eager", size)]]
        compiled_ms = [1000 * v for v in samples[("compiled", size)]]
        rows.append(
            (
                size,
                f"{median(eager_ms):.1f} ({spread(eager_ms)})",
                f"{median(compiled_ms):.1f} ({spread(compiled_ms)})",
                f"{median(eager_ms) / median(compiled_ms):.2f}",
            )
        )
    side = eager.preprocessor.input_size
    print(f"## {BACKBONE} trunk latency at {side} px, {eager.compute_dtype}: eager vs compiled\n")
    headers = ("batch", "eager ms, median (round range)", "compiled ms", "eager / compiled")
    print(table(headers, rows))
    print(f"\nload: eager {eager_load:.1f} s, compiled (compile + warm-up) {compiled_load:.1f} s")
    print(f"{options.rounds} rounds x {iterations} calls per variant and batch size\n")
    print(environment.markdown("cpu"))


if __name__ == "__main__":
    main()
