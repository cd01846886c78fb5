"""TRANSFER_COMPILE=auto's background upgrade (backbones/background_upgrade.py) on the real
EfficientNet-Lite0 with injected candidates and timings: it installs the fastest candidate
that agrees with fp32 and is REQUIRED_SPEEDUP faster, and nothing else; a failing candidate
leaves Predict's path as it was; the verdict is stored and reused without timing; close()
does not wait for a build. Candidates run the real trunk (eagerly: compiling is
tests/unit/test_compile.py's and tests/grpc/test_compiled_swap.py's cost)."""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from transfer_service.backbones.background_upgrade import UPGRADE_NICENESS, BackgroundUpgrader
from transfer_service.backbones.cache import LoadedBackbone
from transfer_service.backbones.catalog import PreprocessingOptions
from transfer_service.backbones.serving_path import ServingPath, ServingPathSlot, StageRunner
from transfer_service.backbones.upgrade_candidates import UpgradeCandidate
from transfer_service.backbones.upgrade_choice import REQUIRED_SPEEDUP, Features, time_paired
from transfer_service.store.local import LocalStore

from tests.conftest import make_settings

OPTIONS = PreprocessingOptions(48, 64, 10**7)  # the lite0 fixture's
SERVING_RATE = 100.0  # what the injected timer says the serving path does


class EagerRunner:
    """The eager fp32 stages (exact features) or, `broken`, noise of the right shape: a
    runner whose features point elsewhere. `rate`: what the injected timer reports."""

    def __init__(self, loaded: LoadedBackbone, rate: float, ran: list[EagerRunner]) -> None:
        self._trunk = loaded.trunk
        self.rate = rate
        self.broken = False
        self._ran = ran

    def run(self, state: Any, start: int, stop: int) -> Any:
        self._ran.append(self)
        out = self._trunk.run_stages(state, start, stop)
        return torch.randn_like(out) if self.broken else out


class Harness:
    """Candidates built on demand (counted per name) and a timer that reports each runner's
    `rate` against SERVING_RATE, running both sides once so a runner that raises does."""

    def __init__(self) -> None:
        self.ran: list[EagerRunner] = []
        self.builds: list[str] = []
        self.timed = 0

    def candidate(
        self, name: str, rate: float, *, broken: bool = False, build_fails: bool = False
    ) -> UpgradeCandidate:
        def build(
            loaded: LoadedBackbone, calibration: Sequence[Any], cancelled: Callable[[], bool]
        ) -> StageRunner:
            self.builds.append(name)
            if build_fails:
                raise RuntimeError("no C++ compiler (injected)")
            runner = EagerRunner(loaded, rate, self.ran)
            runner.broken = broken
            return runner

        return UpgradeCandidate(name, "float32", True, build)

    def timer(
        self,
        serving: Features,
        candidate: Features,
        batches: Sequence[Any],
        cancelled: Callable[[], bool],
    ) -> tuple[float, float]:
        self.timed += 1
        serving(batches[0])
        candidate(batches[0])
        return SERVING_RATE, self.ran[-1].rate


@pytest.fixture()
def backbone(lite0: LoadedBackbone) -> LoadedBackbone:
    """The session's lite0 with a serving slot of its own (installs do not leak)."""
    return _fresh(lite0)


def upgrade(
    backbone: LoadedBackbone,
    candidates: list[UpgradeCandidate],
    harness: Harness,
    store: LocalStore | None = None,
) -> list[str]:
    """Runs the upgrader on `backbone` to the end; returns its outcomes."""
    outcomes: list[str] = []
    upgrader = BackgroundUpgrader(
        store=store,
        options=OPTIONS,
        predict_threads=1,
        candidates=lambda loaded: candidates,
        timer=harness.timer,
        on_outcome=lambda name, outcome: outcomes.append(outcome),
    )
    upgrader.offer(backbone)
    upgrader.start()
    assert upgrader.wait_idle(120)
    upgrader.close()
    return outcomes


def predict_features(backbone: LoadedBackbone, batch: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return backbone.trunk.pool(backbone.run_prefix(batch, 0, backbone.trunk.num_stages))


@pytest.fixture()
def batch() -> torch.Tensor:
    return torch.rand(3, 3, 48, 48).contiguous(memory_format=torch.channels_last)


def test_the_fastest_passing_candidate_is_installed(backbone: LoadedBackbone) -> None:
    harness = Harness()
    candidates = [
        harness.candidate("barely-faster", SERVING_RATE * 1.02),
        harness.candidate("faster", SERVING_RATE * 1.5),
        harness.candidate("broken-but-fastest", SERVING_RATE * 5, broken=True),
    ]
    assert upgrade(backbone, candidates, harness) == ["installed"]
    assert backbone.serving is not None
    current = backbone.serving.current
    assert current.description == "faster"
    assert current.compiled and current.inputs_per_second == pytest.approx(SERVING_RATE * 1.5)
    assert backbone.serving_inputs_per_second == pytest.approx(SERVING_RATE * 1.5)
    # The broken one was checked, failed the tolerance and was never timed.
    assert harness.builds == ["barely-faster", "faster", "broken-but-fastest"]
    assert harness.timed == 2


def test_slower_or_broken_candidates_leave_the_serving_path(
    backbone: LoadedBackbone, batch: torch.Tensor
) -> None:
    before = predict_features(backbone, batch)
    harness = Harness()
    candidates = [
        harness.candidate("slower", SERVING_RATE * 0.9),
        harness.candidate("within-noise", SERVING_RATE * (REQUIRED_SPEEDUP - 0.01)),
        harness.candidate("wrong-features", SERVING_RATE * 3, broken=True),
    ]
    assert upgrade(backbone, candidates, harness) == ["none_faster"]
    assert backbone.serving is not None
    assert len(backbone.serving.history()) == 1
    assert torch.equal(predict_features(backbone, batch), before)


def test_a_raising_candidate_costs_a_log_line_and_nothing_else(
    backbone: LoadedBackbone, batch: torch.Tensor, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="transfer_service.backbones.background_upgrade")
    before = predict_features(backbone, batch)
    harness = Harness()
    candidates = [harness.candidate("no-compiler", SERVING_RATE * 2, build_fails=True)]
    assert upgrade(backbone, candidates, harness) == ["none_faster"]
    assert backbone.serving is not None and len(backbone.serving.history()) == 1
    assert torch.equal(predict_features(backbone, batch), before)
    reason = "no-compiler failed (serving as before): RuntimeError: no C++ compiler (injected)"
    assert reason in caplog.text


def test_the_stored_verdict_is_reused_without_timing(lite0: LoadedBackbone, tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    try:
        first = Harness()
        candidates = [
            first.candidate("a", SERVING_RATE * 1.3),
            first.candidate("b", SERVING_RATE * 1.6),
        ]
        assert upgrade(_fresh(lite0), candidates, first, store) == ["installed"]
        # A restart: the same machine and candidates; only the winner is built and checked.
        again = Harness()
        candidates = [again.candidate("a", 0.0), again.candidate("b", 0.0)]
        restarted = _fresh(lite0)
        assert upgrade(restarted, candidates, again, store) == ["installed"]
        assert again.builds == ["b"] and again.timed == 0
        assert restarted.serving is not None
        assert restarted.serving.current.description == "b"
        assert restarted.serving_inputs_per_second == pytest.approx(SERVING_RATE * 1.6)
        # Another candidate set is another verdict; one where none won builds nothing later.
        slow = Harness()
        assert upgrade(_fresh(lite0), [slow.candidate("c", 1.0)], slow, store) == ["none_faster"]
        later = Harness()
        assert upgrade(_fresh(lite0), [later.candidate("c", 1e6)], later, store) == ["stored_none"]
        assert later.builds == []
    finally:
        store.close()


def test_close_does_not_wait_for_a_build_and_nothing_is_installed(
    backbone: LoadedBackbone,
) -> None:
    entered = threading.Event()
    release = threading.Event()
    seen: dict[str, int | None] = {}

    def slow_build(
        loaded: LoadedBackbone, calibration: Sequence[Any], cancelled: Callable[[], bool]
    ) -> StageRunner:
        import torch._inductor.config as inductor

        seen["compile_threads"] = inductor.compile_threads
        if sys.platform.startswith("linux"):
            seen["nice"] = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        entered.set()
        release.wait(60)  # a compile that does not look at `cancelled`
        return EagerRunner(loaded, 1e6, [])

    outcomes: list[str] = []
    upgrader = BackgroundUpgrader(
        store=None,
        options=OPTIONS,
        predict_threads=1,
        candidates=lambda loaded: [UpgradeCandidate("slow", "float32", True, slow_build)],
        timer=Harness().timer,
        on_outcome=lambda name, outcome: outcomes.append(outcome),
    )
    upgrader.offer(backbone)
    upgrader.start()
    assert entered.wait(60)
    started = time.perf_counter()
    upgrader.close()
    assert time.perf_counter() - started < 0.5
    release.set()
    assert upgrader.wait_idle(60)
    assert outcomes == ["cancelled"]
    assert backbone.serving is not None and len(backbone.serving.history()) == 1
    # Polite: one in-process compile thread, and the build ran at the lowered priority.
    assert seen["compile_threads"] == 1
    if sys.platform.startswith("linux") and os.getpriority(os.PRIO_PROCESS, 0) == 0:
        assert seen["nice"] == UPGRADE_NICENESS


def test_paired_timing_ranks_the_faster_side_first() -> None:
    batches = [torch.zeros(1, 3), torch.zeros(8, 3)]

    def sleeper(seconds: float) -> Features:
        def run(batch: torch.Tensor) -> torch.Tensor:
            time.sleep(seconds)
            return batch

        return run

    serving, candidate = time_paired(sleeper(0.006), sleeper(0.002), batches, lambda: False)
    assert candidate > 1.5 * serving
    assert time_paired(sleeper(0.0), sleeper(0.0), batches, lambda: True) == (0.0, 0.0)


@pytest.mark.parametrize(
    ("spelling", "meaning"),
    [("auto", "auto"), ("true", "true"), ("1", "true"), ("False", "false"), ("0", "false")],
)
def test_compile_setting_keeps_the_old_bool_spellings(
    tmp_path: Path, spelling: str, meaning: str
) -> None:
    assert make_settings(tmp_path, compile=spelling).compile == meaning
    as_bool = make_settings(tmp_path, compile=meaning == "true").compile
    assert as_bool == ("true" if meaning == "true" else "false")


def _fresh(lite0: LoadedBackbone) -> LoadedBackbone:
    return replace(lite0, serving=ServingPathSlot(ServingPath("float32", 0.0)))


@pytest.fixture(autouse=True)
def _no_leftover_threads() -> Iterator[None]:
    yield
    # Every upgrader above was closed; its daemon thread ends at the next queue item.
    deadline = time.monotonic() + 10
    while any(t.name == "backbone-upgrade" for t in threading.enumerate()):
        assert time.monotonic() < deadline, "an upgrade thread outlived its test"
        time.sleep(0.05)
