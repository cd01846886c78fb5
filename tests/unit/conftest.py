"""Shared fixtures of the unit tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from transfer_service.backbones.cache import LoadedBackbone
from transfer_service.store.interface import Store

from tests.devices import backbone_cache
from tests.unit.test_store_contract import Backend, _local, _postgres


@pytest.fixture(scope="session")
def lite0() -> LoadedBackbone:
    """The real pretrained EfficientNet-Lite0 at 48 px, on the CPU unless TRANSFER_TEST_DEVICE
    names another device (frozen, eval mode: tests train heads on it, never the trunk)."""
    return backbone_cache(48).get("efficientnet_lite0")


# The store contract's fixtures, shared by every store suite (test_store_contract,
# test_store_head_names, test_store_measurements): each test runs against both backends.
@pytest.fixture(params=["local", "postgres"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    if request.param == "local":
        return _local(tmp_path / "store")
    url: str = request.getfixturevalue("database_url")
    return _postgres(url)


@pytest.fixture()
def store(backend: Backend) -> Iterator[Store]:
    opened = backend.open()
    yield opened
    opened.close()
