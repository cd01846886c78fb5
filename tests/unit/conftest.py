"""Shared fixtures of the unit tests."""

from __future__ import annotations

import pytest
from transfer_service.backbones.cache import LoadedBackbone

from tests.devices import backbone_cache


@pytest.fixture(scope="session")
def lite0() -> LoadedBackbone:
    """The real pretrained EfficientNet-Lite0 at 48 px, on the CPU unless TRANSFER_TEST_DEVICE
    names another device (frozen, eval mode: tests train heads on it, never the trunk)."""
    return backbone_cache(48).get("efficientnet_lite0")
