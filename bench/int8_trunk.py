"""int8 for the frozen image trunk on CPU (issue 20): PyTorch's maintained path, PT2E with the
x86 Inductor quantiser (torchao; torch 2.14 no longer ships torch.ao's PT2E), static int8
activations and per-channel int8 weights, calibrated on the shipped calibration set, then
compiled by inductor (which is what turns the quantise/dequantise pairs into int8 kernels).

Reported: the time to quantise and to compile, the pooled features' cosine similarity to
fp32 on the shipped set and on 100 Fashion-MNIST test images (the precision chooser's
tolerance: >= 0.99 mean, >= 0.98 min), and alternating rounds of fp32 / bf16 autocast /
int8 rates at batch 1 + 8 (medians of 5 per size per round).

torchao is not a dependency of the service; install it beside this run, e.g.
    pip install --target /tmp/ao --no-deps torchao==0.18.0
    PYTHONPATH=/tmp/ao:. .venv/bin/python -m bench.int8_trunk [--rounds 3] [--fp32-stages 0,1,7,8]
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from transfer_service.backbones.cache import LoadedBackbone
from transfer_service.backbones.calibration import calibration_inputs
from transfer_service.domain import Modality, ModelInput

from bench.common import Environment, median, parser, table
from tests.datasets import fashion_mnist
from tests.devices import backbone_cache

Features = Callable[[torch.Tensor], torch.Tensor]


class WholeTrunk(nn.Module):
    """Every frozen stage and the pooling, as one module to export: [B, 3, H, W] -> [B, D]."""

    def __init__(self, loaded: LoadedBackbone) -> None:
        super().__init__()
        self.stages = loaded.trunk.stages

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        for stage in self.stages:
            images = stage(images)
        return images.mean(dim=(2, 3))


def quantised(
    model: nn.Module, calibration: Sequence[torch.Tensor], fp32_stages: Sequence[int]
) -> nn.Module:
    import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as x86
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    batch = torch.export.Dim("batch", min=1, max=64)
    exported = torch.export.export(model, (calibration[0],), dynamic_shapes=({0: batch},)).module()
    quantizer = x86.X86InductorQuantizer()
    quantizer.set_global(x86.get_default_x86_inductor_quantization_config())
    for index in fp32_stages:  # left unquantised
        quantizer.set_module_name_qconfig(f"stages.{index}", None)
    prepared = prepare_pt2e(exported, quantizer)  # type: ignore[arg-type]
    for images in calibration:
        prepared(images)
    return convert_pt2e(prepared)  # type: ignore[no-any-return]


def features(run: Features, batches: Sequence[torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([run(images).float() for images in batches])


def rate(run: Features, timing: Sequence[torch.Tensor]) -> float:
    seconds = 0.0
    for images in timing:
        run(images)
        samples = []
        for _ in range(5):
            started = time.perf_counter()
            run(images)
            samples.append(time.perf_counter() - started)
        seconds += statistics.median(samples)
    return sum(int(images.shape[0]) for images in timing) / seconds


def main() -> None:
    arguments = parser(__doc__ or "")
    arguments.add_argument("--rounds", type=int, default=3)
    arguments.add_argument(
        "--fp32-stages",
        default="",
        help="comma-separated stage indices left in fp32 (e.g. 0,1,7,8); default: none",
    )
    options = arguments.parse_args()
    environment = Environment()
    side = options.image_size or 224
    loaded = backbone_cache(side, precision="fp32").get("efficientnet_lite0")
    model = WholeTrunk(loaded).eval()

    def stack(inputs: Sequence[ModelInput]) -> Any:
        return loaded.stack([loaded.preprocessor.load(x, "input") for x in inputs])

    shipped = calibration_inputs(Modality.IMAGE)
    shipped_batches = [stack(shipped[i : i + 8]) for i in range(0, len(shipped), 8)]
    fashion = [ModelInput(image=png) for png, _ in fashion_mnist(10, split="test", seed=7)]
    fashion_batches = [stack(fashion[i : i + 8]) for i in range(0, len(fashion), 8)]

    started = time.perf_counter()
    with torch.no_grad():
        fp32_stages = [int(i) for i in options.fp32_stages.split(",") if i]
        converted = quantised(model, shipped_batches[:3], fp32_stages)
    quantise_seconds = time.perf_counter() - started
    import torch._inductor.config as inductor

    inductor.freezing = True  # the frozen weights as constants: int8 weight pre-packing
    int8 = torch.compile(converted)
    timing = [stack(shipped[:1]), stack(shipped[:8])]
    started = time.perf_counter()
    with torch.no_grad():
        for images in timing:
            int8(images)
    compile_seconds = time.perf_counter() - started

    def bf16(images: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return model(images)  # type: ignore[no-any-return]

    agreement_rows = []
    for name, batches in (
        ("shipped set (30)", shipped_batches),
        ("Fashion-MNIST test (100)", fashion_batches),
    ):
        reference = features(model, batches)
        for label, run in (("bf16 autocast", bf16), ("int8 PT2E", int8)):
            cosine = torch.nn.functional.cosine_similarity(features(run, batches), reference, dim=1)
            agreement_rows.append((name, label, f"{cosine.mean():.4f}", f"{cosine.min():.4f}"))
    rates: dict[str, list[float]] = {"fp32": [], "bf16 autocast": [], "int8 PT2E": []}
    with torch.no_grad():
        for _ in range(options.rounds):
            for label, run in (("fp32", model), ("bf16 autocast", bf16), ("int8 PT2E", int8)):
                rates[label].append(rate(run, timing))
    print(
        f"## efficientnet_lite0 int8 (fp32 stages: {options.fp32_stages or 'none'}) at "
        f"{side} px: quantise {quantise_seconds:.1f} s, "
        f"compile {compile_seconds:.1f} s\n"
    )
    print(table(("inputs", "candidate", "cosine mean", "cosine min"), agreement_rows))
    print()
    print(
        table(
            ("candidate", "images/s batch 1 + 8, median of rounds", "rounds"),
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
