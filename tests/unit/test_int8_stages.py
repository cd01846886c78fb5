"""The int8 frozen stages (backbones/int8_stages.py) on the real EfficientNet-Lite0: pooled
features within the precision chooser's tolerance of fp32 on real images, for the whole trunk
and for ranges that start or stop mid-trunk (heads branch off at any split point), no compile
after the build's warm-up, and a build that stops when cancelled."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import replace
from typing import Any

import pytest
import torch
from torch._dynamo.utils import counters
from transfer_service.backbones.cache import LoadedBackbone
from transfer_service.backbones.calibration import calibration_inputs
from transfer_service.backbones.catalog import default_catalog
from transfer_service.backbones.compiled_runner import UpgradeCancelled
from transfer_service.backbones.precision_choice import DEFAULT_TOLERANCE, agreement
from transfer_service.domain import Modality, ModelInput

from tests.conftest import TEST_IMAGE_SIZE
from tests.datasets import fashion_mnist
from tests.devices import backbone_cache

pytest.importorskip("torchao")
int8_stages = pytest.importorskip("transfer_service.backbones.int8_stages")

Built = tuple[LoadedBackbone, Any, list[torch.Tensor]]


def batches_of(loaded: LoadedBackbone, inputs: Sequence[ModelInput]) -> list[torch.Tensor]:
    prepared = [loaded.preprocessor.load(x, f"input[{i}]") for i, x in enumerate(inputs)]
    return [loaded.stack(prepared[i : i + 8]) for i in range(0, len(prepared), 8)]


@pytest.fixture(scope="module")
def built() -> Iterator[Built]:
    loaded = backbone_cache(TEST_IMAGE_SIZE, device=torch.device("cpu")).get("efficientnet_lite0")
    if int8_stages.int8_unavailable_reason(loaded) is not None:
        pytest.skip(int8_stages.int8_unavailable_reason(loaded))
    calibration = batches_of(loaded, calibration_inputs(Modality.IMAGE))
    runner = int8_stages.build_int8_runner(loaded, calibration, lambda: False)
    yield loaded, runner, calibration


def fp32_features(loaded: LoadedBackbone, batches: Sequence[torch.Tensor]) -> torch.Tensor:
    trunk = loaded.trunk
    with torch.no_grad():
        return torch.cat([trunk.pool(trunk.run_stages(b, 0, trunk.num_stages)) for b in batches])


def int8_features(runner: Any, loaded: LoadedBackbone, batches: Sequence[torch.Tensor]) -> Any:
    trunk = loaded.trunk
    with torch.inference_mode():  # as Predict calls it
        return torch.cat([trunk.pool(runner.run(b, 0, trunk.num_stages)) for b in batches])


def assert_within_tolerance(reference: torch.Tensor, features: torch.Tensor) -> None:
    mean, worst = agreement(reference, features)
    assert mean >= DEFAULT_TOLERANCE.mean_cosine, (mean, worst)
    assert worst >= DEFAULT_TOLERANCE.min_cosine, (mean, worst)
    # int8 is not fp32 computed again: the stages quantised really changed the features.
    assert mean < 0.99999, mean


def test_whole_trunk_agrees_with_fp32_on_the_shipped_set(built: Built) -> None:
    loaded, runner, calibration = built
    reference = fp32_features(loaded, calibration)
    features = int8_features(runner, loaded, calibration)
    assert features.dtype == torch.float32
    assert_within_tolerance(reference, features)


def test_whole_trunk_agrees_with_fp32_on_fashion_mnist(built: Built) -> None:
    loaded, runner, _ = built
    images = [ModelInput(image=png) for png, _ in fashion_mnist(10, split="test", seed=7)]
    batches = batches_of(loaded, images)
    assert sum(int(b.shape[0]) for b in batches) == 100
    assert_within_tolerance(fp32_features(loaded, batches), int8_features(runner, loaded, batches))


@pytest.mark.parametrize(("start", "stop"), [(3, None), (0, 4), (5, 6)])
def test_a_range_mid_trunk_matches_the_eager_fp32_stages(
    built: Built, start: int, stop: int | None
) -> None:
    """The runner's [start, stop) against the eager stages [start, stop), both fed the same
    fp32 state and both finished by the eager fp32 stages after `stop`, pooled."""
    loaded, runner, calibration = built
    trunk = loaded.trunk
    stop = trunk.num_stages if stop is None else stop
    reference, features = [], []
    with torch.no_grad():
        for batch in calibration:
            state = trunk.run_stages(batch, 0, start)
            eager = trunk.run_stages(state, start, stop)
            with torch.inference_mode():
                reduced = runner.run(state, start, stop)
            assert reduced.dtype == torch.float32
            assert reduced.shape == eager.shape
            assert reduced.is_contiguous(memory_format=torch.channels_last)
            finish = trunk.num_stages
            reference.append(trunk.pool(trunk.run_stages(eager, stop, finish)))
            features.append(trunk.pool(trunk.run_stages(reduced.clone(), stop, finish)))
    mean, worst = agreement(torch.cat(reference), torch.cat(features))
    assert mean >= DEFAULT_TOLERANCE.mean_cosine, (mean, worst)
    assert worst >= DEFAULT_TOLERANCE.min_cosine, (mean, worst)


def test_an_empty_range_returns_the_state(built: Built) -> None:
    _, runner, calibration = built
    out = runner.run(calibration[0], 4, 4)
    assert torch.equal(out, calibration[0])


def test_no_batch_size_or_split_point_compiles_after_the_build(built: Built) -> None:
    loaded, runner, calibration = built
    images = torch.cat(calibration)  # 30 rows
    graphs_after_build = counters["stats"]["unique_graphs"]
    for rows in (1, 3, 8, 17, 30):
        for start, stop in ((0, loaded.trunk.num_stages), (2, 7), (6, 9)):
            with torch.no_grad():
                state = loaded.trunk.run_stages(images[:rows], 0, start)
            with torch.inference_mode():
                runner.run(state, start, stop)
    assert counters["stats"]["unique_graphs"] == graphs_after_build


def test_exports_run_in_the_tracing_window_and_cancel_stops_the_build(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """torch.export patches nn.Module process-wide, so every export runs inside the one window
    a serving caller can make exclusive; `cancelled()` is asked between steps."""
    loaded = backbone_cache(TEST_IMAGE_SIZE, device=torch.device("cpu")).get("efficientnet_lite0")
    calibration = batches_of(loaded, calibration_inputs(Modality.IMAGE)[:8])
    inside = []
    windows = []
    exports_outside = []
    real_export = torch.export.export

    def spied_export(*args: Any, **kwargs: Any) -> Any:
        if not inside:
            exports_outside.append(args)
        windows[-1] += 1
        return real_export(*args, **kwargs)

    @contextlib.contextmanager
    def window() -> Iterator[None]:
        windows.append(0)
        inside.append(True)
        try:
            yield
        finally:
            inside.pop()

    monkeypatch.setattr(torch.export, "export", spied_export)
    asked = []

    def cancelled() -> bool:
        asked.append(True)
        return len(asked) >= 3  # after quantising the first stage

    with pytest.raises(int8_stages.Int8BuildCancelled, match="before quantising") as raised:
        int8_stages.build_int8_runner(loaded, calibration, cancelled, tracing_window=window)
    assert isinstance(raised.value, UpgradeCancelled)  # the upgrader counts it as cancelled
    assert len(asked) == 3
    quantised = loaded.trunk.num_stages - len(int8_stages.FP32_STAGES["efficientnet_lite0"])
    assert windows == [quantised]  # one window, every stage's export in it
    assert exports_outside == []


def test_unavailable_reason_says_why(built: Built) -> None:
    loaded, _, _ = built
    assert int8_stages.int8_unavailable_reason(loaded) is None
    specs = {spec.name: spec for spec in default_catalog()}
    text = replace(loaded, spec=specs["minilm_l6"])
    assert "image backbones only" in int8_stages.int8_unavailable_reason(text)
    on_gpu = replace(loaded, device=torch.device("cuda"))
    assert "CPU only" in int8_stages.int8_unavailable_reason(on_gpu)
    unmeasured = replace(loaded, spec=specs["efficientnet_lite2"])
    assert "efficientnet_lite2" in int8_stages.int8_unavailable_reason(unmeasured)
    with pytest.raises(ValueError, match="image backbones only"):
        int8_stages.build_int8_runner(text, [], lambda: False)
