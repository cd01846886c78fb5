"""Where the unit tests' backbones run: the CPU, unless TRANSFER_TEST_DEVICE names another
device (`cuda` on a GPU machine), so the same checks cover the accelerator's paths there
(bf16 autocast, channels-last, cached features on the device). The gRPC tests' servers use
the service's own `auto` device instead."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import torch
from transfer_service.backbones.cache import BackboneCache
from transfer_service.backbones.catalog import PreprocessingOptions, default_catalog


def backbone_device() -> torch.device:
    return torch.device(os.environ.get("TRANSFER_TEST_DEVICE", "cpu"))


def backbone_cache(
    image_size: int, *, precision: str = "fp32", device: torch.device | None = None
) -> BackboneCache:
    """A cache of the real pretrained backbones (lite0 and MiniLM weights come from their
    packages) on `device`, backbone_device() unless given, at `image_size` pixels and 64 text
    tokens, with room for every backbone."""
    return BackboneCache(
        default_catalog(),
        weights_dir=Path("/nonexistent"),
        device=device or backbone_device(),
        options=PreprocessingOptions(image_size, 64, 10**7),
        budget_bytes=10**10,
        precision=precision,
    )


@contextlib.contextmanager
def full_precision_cuda() -> Iterator[None]:
    """Inside the block CUDA computes in true fp32 with deterministic cuDNN kernels (no effect
    on a CPU). PyTorch runs fp32 convolutions in TF32 by default, and cuDNN's weight gradients
    may add in any order: two trainings that should agree then drift apart, which is the GPU's
    arithmetic, not what a test that compares two code paths is about."""
    backends = torch.backends
    saved = (
        backends.cudnn.allow_tf32,
        backends.cudnn.deterministic,
        backends.cuda.matmul.allow_tf32,
    )
    backends.cudnn.allow_tf32 = False
    backends.cudnn.deterministic = True
    backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        (
            backends.cudnn.allow_tf32,
            backends.cudnn.deterministic,
            backends.cuda.matmul.allow_tf32,
        ) = saved
