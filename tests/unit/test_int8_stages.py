"""The int8 frozen stages (backbones/int8_stages.py) on the real EfficientNet-Lite0: pooled
features within the precision chooser's tolerance of fp32 on real images, for the whole trunk
and for ranges that start or stop mid-trunk (heads branch off at any split point), no compile
after the build's warm-up, and a build that stops when cancelled."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import pytest
import torch
from torch import nn
from torch._dynamo.utils import counters
from transfer_service.backbones.cache import LoadedBackbone
from transfer_service.backbones.calibration import calibration_inputs
from transfer_service.backbones.catalog import default_catalog
from transfer_service.backbones.compiled_runner import UpgradeCancelled, prime_inductor_tracing
from transfer_service.backbones.int8_export import ChildExportFailed, export_stages_in_child
from transfer_service.backbones.precision_choice import DEFAULT_TOLERANCE, agreement
from transfer_service.backbones.upgrade_candidates import UpgradeCandidates
from transfer_service.domain import Modality, ModelInput

from tests.conftest import TEST_IMAGE_SIZE
from tests.datasets import fashion_mnist
from tests.devices import backbone_cache

pytest.importorskip("torchao")
int8_stages = pytest.importorskip("transfer_service.backbones.int8_stages")

Built = tuple[LoadedBackbone, Any, list[torch.Tensor], "BuildBeside"]


def batches_of(loaded: LoadedBackbone, inputs: Sequence[ModelInput]) -> list[torch.Tensor]:
    prepared = [loaded.preprocessor.load(x, f"input[{i}]") for i, x in enumerate(inputs)]
    return [loaded.stack(prepared[i : i + 8]) for i in range(0, len(prepared), 8)]


@dataclass
class BuildBeside:
    """What a watcher thread and an eager-forward thread saw during the fixture's build."""

    started: float = 0.0
    quantised: float = 0.0  # when the runner was made: exported and quantised, not compiled
    finished: float = 0.0
    module_patches: list[tuple[float, str]] = field(default_factory=list)  # (when, what)
    forwards: int = 0
    forward_failures: list[str] = field(default_factory=list)


def watch_module_patching(seen: BuildBeside, stop: threading.Event) -> None:
    """Samples nn.Module.__call__ and __getattr__ every 0.5 ms (a tracer replaces them
    process-wide) and notes which tracer's wrapper is in place: fx's wrapper holds it."""
    original = (vars(nn.Module)["__call__"], vars(nn.Module)["__getattr__"])
    while not stop.is_set():
        now = (vars(nn.Module)["__call__"], vars(nn.Module)["__getattr__"])
        if now != original:
            # A tracer sets the two one after the other: name it by whichever is replaced.
            replaced = now[0] if now[0] is not original[0] else now[1]
            seen.module_patches.append((time.monotonic(), tracer_of(replaced)))
        time.sleep(0.0005)


def tracer_of(wrapper: Any) -> str:
    for cell in getattr(wrapper, "__closure__", None) or ():
        with contextlib.suppress(ValueError):  # an empty cell
            if hasattr(cell.cell_contents, "call_module"):
                return type(cell.cell_contents).__qualname__
    return repr(wrapper)


def forward_eagerly(
    loaded: LoadedBackbone, batch: torch.Tensor, seen: BuildBeside, stop: threading.Event
) -> None:
    """An eager Predict's trunk pass on the same trunk, again and again, checked each time."""
    trunk = loaded.trunk
    with torch.no_grad():
        expected = trunk.pool(trunk.run_stages(batch, 0, trunk.num_stages))
    while not stop.is_set():
        try:
            with torch.no_grad():
                got = trunk.pool(trunk.run_stages(batch, 0, trunk.num_stages))
            if not torch.allclose(got, expected, atol=1e-5):
                seen.forward_failures.append("features changed")
        except Exception as exc:
            seen.forward_failures.append(f"{type(exc).__name__}: {exc}")
        seen.forwards += 1
        time.sleep(0.005)


@pytest.fixture(scope="module")
def built() -> Iterator[Built]:
    """The int8 runner, built as the background upgrader builds it (inductor's one fx trace
    primed first) while another thread runs eager forwards of the same trunk throughout."""
    loaded = backbone_cache(TEST_IMAGE_SIZE, device=torch.device("cpu")).get("efficientnet_lite0")
    if int8_stages.int8_unavailable_reason(loaded) is not None:
        pytest.skip(int8_stages.int8_unavailable_reason(loaded))
    calibration = batches_of(loaded, calibration_inputs(Modality.IMAGE))
    prime_inductor_tracing(lambda work: work())
    seen = BuildBeside()
    stop = threading.Event()
    threads = [
        threading.Thread(target=watch_module_patching, args=(seen, stop), daemon=True),
        threading.Thread(
            target=forward_eagerly, args=(loaded, calibration[0][:2], seen, stop), daemon=True
        ),
    ]
    real_runner = int8_stages.Int8Stages

    def runner_made_after_quantising(*args: Any) -> Any:
        seen.quantised = time.monotonic()
        return real_runner(*args)

    int8_stages.Int8Stages = runner_made_after_quantising
    for thread in threads:
        thread.start()
    try:
        seen.started = time.monotonic()
        runner = int8_stages.build_int8_runner(loaded, calibration, lambda: False)
        seen.finished = time.monotonic()
    finally:
        int8_stages.Int8Stages = real_runner
        stop.set()
        for thread in threads:
            thread.join()
    yield loaded, runner, calibration, seen


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
    loaded, runner, calibration, _ = built
    reference = fp32_features(loaded, calibration)
    features = int8_features(runner, loaded, calibration)
    assert features.dtype == torch.float32
    assert_within_tolerance(reference, features)


def test_whole_trunk_agrees_with_fp32_on_fashion_mnist(built: Built) -> None:
    loaded, runner, _, _ = built
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
    loaded, runner, calibration, _ = built
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
    _, runner, calibration, _ = built
    out = runner.run(calibration[0], 4, 4)
    assert torch.equal(out, calibration[0])


def test_no_batch_size_or_split_point_compiles_after_the_build(built: Built) -> None:
    loaded, runner, calibration, _ = built
    images = torch.cat(calibration)  # 30 rows
    graphs_after_build = counters["stats"]["unique_graphs"]
    for rows in (1, 3, 8, 17, 30):
        for start, stop in ((0, loaded.trunk.num_stages), (2, 7), (6, 9)):
            with torch.no_grad():
                state = loaded.trunk.run_stages(images[:rows], 0, start)
            with torch.inference_mode():
                runner.run(state, start, stop)
    assert counters["stats"]["unique_graphs"] == graphs_after_build


def test_the_build_never_patches_nn_module_here_and_eager_forwards_beside_it_never_fail(
    built: Built,
) -> None:
    """The export (torch.export patches nn.Module.__call__/__getattr__ process-wide, and an
    eager forward meanwhile is routed into its tracer) runs in a child process: from the
    build's start until its stages are quantised, nn.Module stayed untouched here. The compile
    after it patches them only with make_fx's tracer (PythonKeyTracer), whose wrappers pass
    every call through unchanged (inductor's one plain fx trace is primed first, as the
    upgrader does). Eager forwards of the same trunk on another thread ran throughout and none
    failed or changed its result."""
    _, _, _, seen = built
    assert seen.started < seen.quantised < seen.finished
    assert [p for p in seen.module_patches if p[0] <= seen.quantised] == []
    assert {tracer for _, tracer in seen.module_patches} <= {"PythonKeyTracer"}
    assert seen.forward_failures == []
    assert seen.forwards >= 10  # the forwards really ran beside the build


def test_int8_is_a_background_candidate_under_auto_precision_only(built: Built) -> None:
    loaded, _, _, _ = built
    assert [c.name for c in UpgradeCandidates("auto")(loaded)] == ["compiled-float32", "int8"]
    assert [c.name for c in UpgradeCandidates("fp32")(loaded)] == ["compiled-float32"]


def test_no_export_runs_here_and_cancel_stops_the_build(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch.export never runs in this process (the child exports); `cancelled()` is asked
    between steps: here after the first stage is quantised."""
    loaded = backbone_cache(TEST_IMAGE_SIZE, device=torch.device("cpu")).get("efficientnet_lite0")
    calibration = batches_of(loaded, calibration_inputs(Modality.IMAGE)[:8])

    def no_export_here(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("torch.export.export ran in the serving process")

    monkeypatch.setattr(torch.export, "export", no_export_here)
    real_quantised_stage = int8_stages.quantised_stage
    quantised = []

    def counted(*args: Any) -> Any:
        quantised.append(True)
        return real_quantised_stage(*args)

    monkeypatch.setattr(int8_stages, "quantised_stage", counted)
    with pytest.raises(int8_stages.Int8BuildCancelled, match="before quantising") as raised:
        int8_stages.build_int8_runner(loaded, calibration, lambda: len(quantised) >= 1)
    assert isinstance(raised.value, UpgradeCancelled)  # the upgrader counts it as cancelled
    assert len(quantised) == 1


def test_cancel_while_the_child_exports_kills_it() -> None:
    loaded = backbone_cache(TEST_IMAGE_SIZE, device=torch.device("cpu")).get("efficientnet_lite0")
    calibration = batches_of(loaded, calibration_inputs(Modality.IMAGE)[:8])
    asked = []

    def cancelled() -> bool:
        asked.append(time.monotonic())
        return len(asked) >= 2  # 1: before exporting; 2: the first poll of the child

    started = time.monotonic()
    with pytest.raises(int8_stages.Int8BuildCancelled, match="while exporting"):
        int8_stages.build_int8_runner(loaded, calibration, cancelled)
    assert time.monotonic() - started < 5  # killed, not waited for


def test_a_failed_or_slow_child_is_a_clean_failure() -> None:
    loaded = backbone_cache(TEST_IMAGE_SIZE, device=torch.device("cpu")).get("efficientnet_lite0")
    example = {3: torch.zeros(2, 24, 16, 16)}
    never = lambda: False  # noqa: E731
    with pytest.raises(ChildExportFailed, match=r"exited with 1: .*unknown backbone 'no_such'"):
        export_stages_in_child("no_such", loaded.trunk, example, never, RuntimeError)
    with pytest.raises(ChildExportFailed, match="took over 0s"):
        export_stages_in_child(
            "efficientnet_lite0", loaded.trunk, example, never, RuntimeError, timeout_seconds=0.1
        )


def test_unavailable_reason_says_why(built: Built) -> None:
    loaded, _, _, _ = built
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
