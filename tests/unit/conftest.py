"""Shared fixtures of the unit tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.backbones.cache import BackboneCache, LoadedBackbone
from service.backbones.catalog import PreprocessingOptions, default_catalog
from tests.devices import backbone_device


@pytest.fixture(scope="session")
def lite0() -> LoadedBackbone:
    """The real pretrained EfficientNet-Lite0 at 48 px, on the CPU unless TRANSFER_TEST_DEVICE
    names another device (frozen, eval mode: tests train heads on it, never the trunk)."""
    cache = BackboneCache(
        default_catalog(),
        weights_dir=Path("/nonexistent"),
        device=backbone_device(),
        options=PreprocessingOptions(48, 64, 10**7),
        budget_bytes=10**10,
        precision="fp32",
    )
    return cache.get("efficientnet_lite0")
