"""Shared fixtures of the unit tests."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from service.backbones.cache import BackboneCache, LoadedBackbone
from service.backbones.catalog import PreprocessingOptions, default_catalog


@pytest.fixture(scope="session")
def lite0() -> LoadedBackbone:
    """The real pretrained EfficientNet-Lite0 on the CPU at 48 px (frozen, eval mode: tests
    train heads on it, never the trunk itself)."""
    cache = BackboneCache(
        default_catalog(),
        weights_dir=Path("/nonexistent"),
        device=torch.device("cpu"),
        options=PreprocessingOptions(48, 64, 10**7),
        budget_bytes=10**10,
        precision="fp32",
    )
    return cache.get("efficientnet_lite0")
