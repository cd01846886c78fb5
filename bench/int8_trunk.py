"""int8 for the frozen image trunk on CPU (issue 20), as the service builds it:
`transfer_service.backbones.int8_stages` (per-stage PT2E with torchao's x86 Inductor quantiser,
static int8 activations and per-channel int8 weights, calibrated on the shipped calibration
set, each stage compiled by inductor with freezing; the stages in FP32_STAGES stay fp32).

Reported: the time to build the runner (quantise + compile + warm up batch sizes 1, 2, 16), the
pooled features' cosine similarity to fp32 on the shipped set and on 100 Fashion-MNIST test
images (the precision chooser's tolerance: >= 0.99 mean, >= 0.98 min), for bf16 autocast and
int8, and alternating rounds of fp32 / bf16 autocast / int8 rates at batch 1 + 8 (medians of
5 per size per round), all on the eager trunk as Predict runs it (channels-last).
`--sensitivity` first quantises each stage alone (eager PT2E, not compiled) and prints what it
costs the pooled features: how FP32_STAGES was chosen.

    .venv/bin/python -m bench.int8_trunk [--image-size 224] [--rounds 3] [--fp32-stages 1,2]
        [--sensitivity] [--threads 1 --cpu-clock]
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from transfer_service.backbones.cache import LoadedBackbone
from transfer_service.backbones.calibration import calibration_inputs
from transfer_service.backbones.int8_export import export_stage
from transfer_service.backbones.int8_stages import (
    FP32_STAGES,
    build_int8_runner,
    quantised_stage,
)
from transfer_service.backbones.precision_choice import agreement
from transfer_service.domain import Modality, ModelInput

from bench.common import Environment, median, parser, table
from tests.datasets import fashion_mnist
from tests.devices import backbone_cache

Features = Callable[[torch.Tensor], torch.Tensor]
BACKBONE = "efficientnet_lite0"


def features(run: Features, batches: Sequence[torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([run(images).float() for images in batches])


def rate(run: Features, timing: Sequence[torch.Tensor], clock: Callable[[], float]) -> float:
    seconds = 0.0
    for images in timing:
        run(images)
        samples = []
        for _ in range(5):
            started = clock()
            run(images)
            samples.append(clock() - started)
        seconds += statistics.median(samples)
    return sum(int(images.shape[0]) for images in timing) / seconds


def sensitivity(loaded: LoadedBackbone, batches: Sequence[torch.Tensor]) -> list[tuple[str, ...]]:
    """Per stage, quantised alone: its own output's cosine to fp32, and the pooled features'."""
    trunk = loaded.trunk
    with torch.no_grad():
        states = [list(batches)]
        for stage in trunk.stages:
            states.append([stage(state) for state in states[-1]])
        reference = torch.cat([trunk.pool(state) for state in states[-1]])
        rows = []
        for index in range(trunk.num_stages):
            started = time.perf_counter()
            exported = export_stage(trunk.stages[index], torch.cat(states[index])).module()
            quantised = quantised_stage(exported, states[index])
            outputs = [quantised(state) for state in states[index]]
            seconds = time.perf_counter() - started
            local = agreement(
                torch.cat([s.flatten(1) for s in states[index + 1]]),
                torch.cat([s.flatten(1) for s in outputs]),
            )
            for stage in trunk.stages[index + 1 :]:
                outputs = [stage(state) for state in outputs]
            mean, worst = agreement(reference, torch.cat([trunk.pool(s) for s in outputs]))
            rows.append(
                (
                    str(index),
                    f"{local[0]:.5f} / {local[1]:.5f}",
                    f"{mean:.5f} / {worst:.5f}",
                    f"{1 - mean:.5f}",
                    f"{seconds:.1f}",
                )
            )
    return rows


def main() -> None:
    arguments = parser(__doc__ or "")
    arguments.add_argument("--rounds", type=int, default=3)
    arguments.add_argument(
        "--fp32-stages",
        default=None,
        help="comma-separated stage indices left in fp32 (default: FP32_STAGES; '' for none)",
    )
    arguments.add_argument("--sensitivity", action="store_true")
    arguments.add_argument("--threads", type=int, default=None, help="torch threads (default: 2)")
    arguments.add_argument(
        "--cpu-clock",
        action="store_true",
        help="rates from this process's CPU time, not wall time: with --threads 1 it measures "
        "the work itself, robust to other load on a shared machine",
    )
    options = arguments.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger(build_int8_runner.__module__).setLevel(logging.INFO)  # build time split
    if options.threads:
        torch.set_num_threads(options.threads)  # before compiling: kernels keep the count
    clock = time.process_time if options.cpu_clock else time.perf_counter
    environment = Environment()
    side = options.image_size or 224
    loaded = backbone_cache(side, precision="fp32").get(BACKBONE)
    trunk = loaded.trunk

    def stack(inputs: Sequence[ModelInput]) -> Any:
        return loaded.stack([loaded.preprocessor.load(x, "input") for x in inputs])

    shipped = calibration_inputs(Modality.IMAGE)
    shipped_batches = [stack(shipped[i : i + 8]) for i in range(0, len(shipped), 8)]
    fashion = [ModelInput(image=png) for png, _ in fashion_mnist(10, split="test", seed=7)]
    fashion_batches = [stack(fashion[i : i + 8]) for i in range(0, len(fashion), 8)]

    if options.sensitivity:
        print(f"## {BACKBONE} at {side} px: each stage quantised alone (shipped set)\n")
        header = ("stage", "stage output cos mean / min", "pooled cos mean / min", "1 - mean", "s")
        print(table(header, sensitivity(loaded, shipped_batches)))
        print()

    if options.fp32_stages is None:
        fp32_stages = FP32_STAGES[BACKBONE]
    else:
        fp32_stages = frozenset(int(i) for i in options.fp32_stages.split(",") if i)
    started = time.perf_counter()
    runner = build_int8_runner(loaded, shipped_batches, lambda: False, fp32_stages=fp32_stages)
    build_seconds = time.perf_counter() - started

    def fp32(images: torch.Tensor) -> torch.Tensor:
        return trunk.pool(trunk.run_stages(images, 0, trunk.num_stages))

    def bf16(images: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return fp32(images)

    def int8(images: torch.Tensor) -> torch.Tensor:
        return trunk.pool(runner.run(images, 0, trunk.num_stages))

    agreement_rows = []
    for name, batches in (
        ("shipped set (30)", shipped_batches),
        ("Fashion-MNIST test (100)", fashion_batches),
    ):
        reference = features(fp32, batches)
        for label, run in (("bf16 autocast", bf16), ("int8", int8)):
            mean, worst = agreement(reference, features(run, batches))
            agreement_rows.append((name, label, f"{mean:.4f}", f"{worst:.4f}"))
    timing = [stack(shipped[:1]), stack(shipped[:8])]
    rates: dict[str, list[float]] = {"fp32": [], "bf16 autocast": [], "int8": []}
    with torch.no_grad():
        for _ in range(options.rounds):
            for label, run in (("fp32", fp32), ("bf16 autocast", bf16), ("int8", int8)):
                rates[label].append(rate(run, timing, clock))
    print(
        f"## {BACKBONE} int8 stages (fp32 stages: {sorted(fp32_stages) or 'none'}) at {side} px: "
        f"built (quantise + compile + warm up 1, 2, 16) in {build_seconds:.1f} s\n"
    )
    print(table(("inputs", "candidate", "cosine mean", "cosine min"), agreement_rows))
    print()
    print(
        table(
            (
                "candidate",
                f"images/s batch 1 + 8 ({'CPU' if options.cpu_clock else 'wall'} time), "
                f"median of rounds",
                "rounds",
            ),
            [
                (label, f"{median(values):.1f}", ", ".join(f"{v:.1f}" for v in values))
                for label, values in rates.items()
            ],
        )
    )
    print()
    print(environment.markdown("cpu"))


if __name__ == "__main__":
    main()
