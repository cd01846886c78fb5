"""Where the unit tests' backbones run: the CPU, unless TRANSFER_TEST_DEVICE names another
device (`cuda` on a GPU machine), so the same checks cover the accelerator's paths there
(bf16 autocast, channels-last, cached features on the device). The gRPC tests' servers use
the service's own `auto` device instead."""

from __future__ import annotations

import os

import torch


def backbone_device() -> torch.device:
    return torch.device(os.environ.get("TRANSFER_TEST_DEVICE", "cpu"))
