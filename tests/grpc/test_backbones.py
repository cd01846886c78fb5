"""ListBackbones, weights-directory backbones, the backbone cache, and heads whose backbone
became unavailable."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torchvision
from transfer_client import (
    BackboneState,
    FailedPreconditionError,
    Modality,
    TrainingConfig,
    TransferClient,
)

from tests.conftest import RunningServer, make_settings, start_server
from tests.datasets import fashion_mnist


def test_list_backbones_reports_each_entry(client: TransferClient) -> None:
    backbones = {b.name: b for b in client.list_backbones()}
    assert {"efficientnet_lite0", "efficientnet_lite2", "minilm_l6", "resnet18", "resnet50",
            "mobilenet_v3_large", "efficientnet_b0"} <= set(backbones)  # fmt: skip
    lite0 = backbones["efficientnet_lite0"]
    assert lite0.state is BackboneState.LOADED and lite0.device == "cpu"
    assert lite0.modality is Modality.IMAGE and lite0.pretrained_on == "ImageNet-1k"
    assert lite0.feature_dim == 1280 and lite0.unfreezable_blocks == 9
    assert 3_000_000 < lite0.parameter_count < 4_000_000
    assert lite0.resident_bytes >= lite0.parameter_count * 4
    text = backbones["minilm_l6"]
    assert text.state is BackboneState.LOADED and text.modality is Modality.TEXT
    assert text.feature_dim == 384 and text.unfreezable_blocks == 7
    assert backbones["efficientnet_lite2"].state is BackboneState.AVAILABLE
    resnet = backbones["resnet18"]
    assert resnet.state is BackboneState.UNAVAILABLE
    assert "resnet18-f37072fd.pth" in resnet.unavailable_reason
    assert resnet.resident_bytes == 0 and resnet.parameter_count > 11_000_000


@pytest.fixture(scope="module")
def weights_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A torchvision-layout weights directory. The weights are a fixed random init: no
    pretrained ResNet weights are reachable offline, and this tests the loading path."""
    directory = tmp_path_factory.mktemp("weights")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None)
    url = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url
    torch.save(model.state_dict(), directory / url.rsplit("/", 1)[-1])
    return directory


def test_weights_directory_backbone_trains_and_survives_cache_eviction(
    tmp_path: Path, weights_dir: Path
) -> None:
    # Budget fits one backbone: loading resnet18 evicts efficientnet_lite0 and back.
    settings = make_settings(
        tmp_path,
        weights_dir=weights_dir,
        preload_backbones=["efficientnet_lite0"],
        backbone_cache_bytes=50_000_000,
    )
    running = start_server(settings)
    try:
        with TransferClient(running.address, timeout=60) as client:
            states = {b.name: b.state for b in client.list_backbones()}
            assert states["resnet18"] is BackboneState.AVAILABLE
            assert states["efficientnet_lite0"] is BackboneState.LOADED
            train = fashion_mnist(5, classes=2, seed=9)
            head = client.train("resnet18", train, head_name="rn", config=TrainingConfig(epochs=2))
            states = {b.name: b.state for b in client.list_backbones()}
            assert states["resnet18"] is BackboneState.LOADED
            assert states["efficientnet_lite0"] is BackboneState.AVAILABLE  # evicted
            lite = client.train(
                "efficientnet_lite0", train, head_name="lite", config=TrainingConfig(epochs=2)
            )
            images = [x for x, _ in train[:4]]
            first = client.predict(head.head_id, images)
            client.predict(lite.head_id, images)  # reloads lite0, evicts resnet18
            again = client.predict(head.head_id, images)  # reloads resnet18
            assert [p.label for p in first] == [p.label for p in again]
            assert [p.score for p in first] == pytest.approx([p.score for p in again], abs=1e-5)
            metrics = running.app.metrics.registry
            evictions = metrics.get_sample_value(
                "transfer_cache_evictions_total", {"cache": "backbone"}
            )
            assert evictions is not None and evictions >= 2
    finally:
        running.stop()

    # The weights vanish; the head is still listed but cannot be served.
    for weights_file in weights_dir.iterdir():
        weights_file.unlink()
    running = start_server(settings)
    try:
        with TransferClient(running.address, timeout=60) as client:
            assert head.head_id in {h.head_id for h in client.list_heads()}
            with pytest.raises(FailedPreconditionError, match="resnet18"):
                client.predict(head.head_id, [train[0][0]])
            assert len(client.predict(lite.head_id, [train[0][0]])) == 1
    finally:
        running.stop()


def test_concurrent_first_requests_share_one_load(server: RunningServer) -> None:
    from concurrent.futures import ThreadPoolExecutor

    cache = server.app.backbones
    misses_before = server.app.metrics.registry.get_sample_value(
        "transfer_cache_misses_total", {"cache": "backbone"}
    )
    with ThreadPoolExecutor(4) as pool:
        loaded = list(pool.map(lambda _: cache.get("efficientnet_lite2"), range(4)))
    assert all(b is loaded[0] for b in loaded)
    misses_after = server.app.metrics.registry.get_sample_value(
        "transfer_cache_misses_total", {"cache": "backbone"}
    )
    assert (misses_after or 0) - (misses_before or 0) == 1
