"""ResNet-50 inference images/s: bf16 + channels-last at its best batch size, and the ratio
over fp32 (NCHW) at the same batch size, measured side by side. torchvision resnet50 with
random weights (throughput does not depend on them), inputs already on the device (model
only: no decode, no transfer). Meant for a GPU; runs anywhere.

    .venv/bin/python -m bench.resnet50 [--quick] [--device cuda]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from functools import partial

import torch
import torchvision

from bench.common import Environment, median, table

FULL_BATCHES = (32, 64, 128, 256, 512)
QUICK_BATCHES = (1, 4)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _images_per_second(
    run: Callable[[], object], batch: int, device: torch.device, seconds: float, repeats: int
) -> list[float]:
    """Per repeat: as many forwards as fit in `seconds`, images/s."""
    for _ in range(3):
        run()
    _sync(device)
    rates = []
    for _ in range(repeats):
        count = 0
        started = time.perf_counter()
        while True:
            run()
            count += 1
            if count % 4 == 0:
                _sync(device)
                if time.perf_counter() - started >= seconds:
                    break
        rates.append(count * batch / (time.perf_counter() - started))
    return rates


def main() -> None:
    arguments = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    arguments.add_argument("--quick", action="store_true")
    arguments.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda or cpu"
    )
    options = arguments.parse_args()
    device = torch.device(options.device)
    environment = Environment()
    batches = QUICK_BATCHES if options.quick else FULL_BATCHES
    seconds, repeats = (0.5, 1) if options.quick else (1.0, 3)
    torch.backends.cudnn.benchmark = True

    model = torchvision.models.resnet50(weights=None).eval().to(device)
    fast = torchvision.models.resnet50(weights=None).eval()
    fast = fast.to(device=device, dtype=torch.bfloat16, memory_format=torch.channels_last)
    rows = []
    best: tuple[float, int] = (0.0, 0)
    for batch in batches:
        try:
            x32 = torch.randn(batch, 3, 224, 224, device=device)
            x16 = x32.to(dtype=torch.bfloat16, memory_format=torch.channels_last)
            with torch.inference_mode():
                bf16 = _images_per_second(partial(fast, x16), batch, device, seconds, repeats)
                fp32 = _images_per_second(partial(model, x32), batch, device, seconds, repeats)
        except torch.OutOfMemoryError:
            rows.append((batch, "out of memory", "", ""))
            break
        ratio = median([b / f for b, f in zip(bf16, fp32, strict=True)])
        rows.append((batch, f"{median(bf16):.0f}", f"{median(fp32):.0f}", f"{ratio:.2f}"))
        best = max(best, (median(bf16), batch))
        print(f"  batch {batch}: bf16 channels-last {median(bf16):.0f}/s", flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()

    print()
    print("## ResNet-50 inference, images/s (model only, inputs on the device)")
    print()
    print(
        table(
            ("batch", "bf16 channels-last", "fp32 NCHW", "bf16 CL / fp32"),
            rows,
        )
    )
    print()
    print(f"Best: {best[0]:.0f} images/s at batch {best[1]} (bf16, channels-last)")
    print()
    environment.note("repeats per batch", repeats)
    print(environment.markdown(device))


if __name__ == "__main__":
    main()
