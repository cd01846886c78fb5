"""TRANSFER_PRECISION=auto's measurement at load (issue 20), repeated: what it chooses, each
candidate's rate and agreement with fp32, and how long the measurement takes.

Each run is the load's own measurement (backbones/measured_precision.py) with no store, so
it times again: the shipped calibration set preprocessed, every candidate checked against
fp32, the passing ones timed at batch 1 and 8 on a fresh thread with the server's Predict
thread count. Reported per backbone: the choice of each run, and medians over runs.

    .venv/bin/python -m bench.measured_precision [--image-size 224] [--runs 5]
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from transfer_service.backbones.cache import BackboneCache
from transfer_service.backbones.calibration import calibration_inputs
from transfer_service.backbones.catalog import PreprocessingOptions, default_catalog
from transfer_service.backbones.measured_precision import PrecisionMeasurer
from transfer_service.backbones.precision_choice import PrecisionChoice
from transfer_service.settings import Settings
from transfer_service.torch_threads import default_intra_op_threads

from bench.common import Environment, median, parser, table

BACKBONES = ("efficientnet_lite0", "minilm_l6")


def measure_once(
    cache: BackboneCache, name: str, options: PreprocessingOptions, threads: int
) -> tuple[PrecisionChoice, float]:
    loaded = cache.get(name)
    started = time.perf_counter()
    calibration = [
        loaded.preprocessor.load(x, "calibration") for x in calibration_inputs(loaded.spec.modality)
    ]
    choice = PrecisionMeasurer(None, loaded.device, threads).choose(
        name, loaded.spec.input_size(options), loaded.at_precision, loaded.stack, calibration
    )
    return choice, time.perf_counter() - started


def main() -> None:
    arguments = parser(__doc__ or "")
    arguments.add_argument("--runs", type=int, default=5)
    options_in = arguments.parse_args()
    runs = 2 if options_in.quick else options_in.runs
    environment = Environment()
    settings = Settings()
    options = PreprocessingOptions(
        options_in.image_size, settings.max_text_tokens, settings.max_image_pixels
    )
    threads = settings.torch_threads or default_intra_op_threads()
    cache = BackboneCache(
        default_catalog(),
        weights_dir=Path(settings.weights_dir),
        device=torch.device("cpu"),
        options=options,
        budget_bytes=2**40,
        precision="fp32",  # the measurement below is auto's; the cache only loads
    )
    summary = []
    for name in BACKBONES:
        results = [measure_once(cache, name, options, threads) for _ in range(runs)]
        rows = []
        for index, (choice, seconds) in enumerate(results, 1):
            rows.append((index, choice.precision, f"{seconds:.2f}", choice.summary()))
        print(f"## {name}, {runs} runs, {threads} Predict threads\n")
        print(table(("run", "chosen", "seconds", "candidates"), rows))
        print()
        precisions = [f.precision for f in results[0][0].figures]
        for precision in precisions:
            figures = [
                next(f for f in choice.figures if f.precision == precision) for choice, _ in results
            ]
            summary.append(
                (
                    name,
                    precision,
                    f"{median([f.inputs_per_second for f in figures]):.1f}",
                    f"{median([f.mean_cosine for f in figures]):.4f}",
                    f"{min(f.min_cosine for f in figures):.4f}",
                    sum(choice.precision == precision for choice, _ in results),
                    f"{median([s for _, s in results]):.2f}",
                )
            )
    print("## Medians over runs\n")
    print(
        table(
            (
                "backbone",
                "candidate",
                "inputs/s (batch 1 + 8)",
                "cosine mean",
                "cosine min (all runs)",
                "times chosen",
                "measurement s",
            ),
            summary,
        )
    )
    print()
    print(environment.markdown("cpu"))


if __name__ == "__main__":
    main()
