"""Where the unit tests' backbones run: the CPU, unless TRANSFER_TEST_DEVICE names another
device (`cuda` on a GPU machine), so the same checks cover the accelerator's paths there
(bf16 autocast, channels-last, cached features on the device). The gRPC tests' servers use
the service's own `auto` device instead."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch


def backbone_device() -> torch.device:
    return torch.device(os.environ.get("TRANSFER_TEST_DEVICE", "cpu"))


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
