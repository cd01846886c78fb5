"""What the background upgrade (backbones/background_upgrade.py) decides with: each candidate's
figures, the paired timing against the serving path, the winner, and the verdict kept in the
store per machine fingerprint so that a restart builds only the winner (or nothing)."""

from __future__ import annotations

import json
import logging
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from transfer_service.backbones.cache import LoadedBackbone
from transfer_service.backbones.calibration import calibration_inputs
from transfer_service.backbones.measured_precision import CALIBRATION_BATCH, TIMING_BATCH_SIZES
from transfer_service.backbones.precision_choice import batch_rows
from transfer_service.backbones.serving_path import StageRunner
from transfer_service.store.interface import MeasurementStore

log = logging.getLogger(__name__)

# A candidate replaces the serving path only when it is this much faster in the paired
# timing: paired medians on a shared 2-CPU machine still wander by a few percent from run to
# run, and a swap costs something (a compiled path holds its own folded copy of the weights),
# so a gain inside the noise is not worth taking.
REQUIRED_SPEEDUP = 1.05

# Alternating rounds of the paired timing (after one warm-up pass of each side).
TIMING_ROUNDS = 5

# A first-stage batch -> pooled features [B, D] in fp32.
Features = Callable[[Any], torch.Tensor]


@dataclass(frozen=True, slots=True)
class UpgradeFigures:
    """One candidate's outcome on one backbone."""

    candidate: str  # e.g. "compiled-float32", "int8"
    passed: bool  # within the precision chooser's Tolerance of the fp32 eager trunk
    mean_cosine: float = -1.0
    min_cosine: float = -1.0
    inputs_per_second: float = 0.0  # the candidate, paired timing (0: not timed)
    serving_inputs_per_second: float = 0.0  # the serving path in the same rounds
    build_seconds: float = 0.0
    error: str = ""  # why it could not be built or run

    @property
    def speedup(self) -> float:
        if self.inputs_per_second <= 0 or self.serving_inputs_per_second <= 0:
            return 0.0
        return self.inputs_per_second / self.serving_inputs_per_second

    def summary(self) -> str:
        if self.error:
            return f"{self.candidate} failed: {self.error}"
        text = (
            f"{self.candidate} built in {self.build_seconds:.1f}s, cos mean "
            f"{self.mean_cosine:.4f} min {self.min_cosine:.4f}"
        )
        if not self.passed:
            return text + " (failed tolerance)"
        if self.inputs_per_second <= 0:
            return text
        return (
            f"{text}, {self.inputs_per_second:.1f}/s against the serving path's "
            f"{self.serving_inputs_per_second:.1f}/s ({self.speedup:.2f}x)"
        )


@dataclass(frozen=True, slots=True)
class UpgradeVerdict:
    """Which candidate won (None: none did), with every candidate's figures."""

    winner: str | None
    figures: tuple[UpgradeFigures, ...]

    def winner_figures(self) -> UpgradeFigures | None:
        return next((f for f in self.figures if f.candidate == self.winner), None)

    def summary(self) -> str:
        return "; ".join(f.summary() for f in self.figures) or "no candidates"

    def to_json(self) -> str:
        return json.dumps({"winner": self.winner, "figures": [asdict(f) for f in self.figures]})

    @classmethod
    def from_json(cls, text: str) -> UpgradeVerdict:
        data = json.loads(text)
        winner = data["winner"]
        figures = tuple(UpgradeFigures(**row) for row in data["figures"])
        return cls(None if winner is None else str(winner), figures)


def choose_winner(figures: Sequence[UpgradeFigures]) -> str | None:
    """The candidate with the largest paired speedup among those that passed, if it is at
    least REQUIRED_SPEEDUP; None otherwise."""
    timed = [f for f in figures if f.passed and f.speedup >= REQUIRED_SPEEDUP]
    if not timed:
        return None
    return max(timed, key=lambda f: f.speedup).candidate


def upgrade_key(
    backbone: str, input_size: int, device: torch.device, fingerprint: str, candidates: list[str]
) -> str:
    """The store key of one backbone's verdict (same fingerprint as the precision choice);
    another candidate set is another key."""
    return f"upgrade/v1/{backbone}/input{input_size}/{device.type}/{fingerprint}/" + ",".join(
        candidates
    )


# (serving path, candidate, timing batches, cancelled) -> (serving, candidate) inputs/s.
PairedTimer = Callable[[Features, Features, Sequence[Any], Callable[[], bool]], tuple[float, float]]


def time_paired(
    serving: Features,
    candidate: Features,
    batches: Sequence[Any],
    cancelled: Callable[[], bool],
) -> tuple[float, float]:
    """Inputs per second of the serving path and the candidate, timed in alternating rounds
    (which goes first alternates too) on the same batches, so a neighbour's burst on a shared
    machine slows both alike; the median of each batch size counts. Returns (0, 0) if
    `cancelled` turns true between rounds."""
    sides = (serving, candidate)
    seconds: list[list[list[float]]] = [[[] for _ in batches] for _ in sides]
    for side in sides:  # warm-up: oneDNN builds its kernels for each shape
        for batch in batches:
            _finished(side(batch))
    for round_index in range(TIMING_ROUNDS):
        if cancelled():
            return 0.0, 0.0
        order = (0, 1) if round_index % 2 == 0 else (1, 0)
        for which in order:
            for batch_index, batch in enumerate(batches):
                started = time.perf_counter()
                _finished(sides[which](batch))
                seconds[which][batch_index].append(time.perf_counter() - started)
    rows = sum(batch_rows(batch) for batch in batches)
    serving_rate, candidate_rate = (
        rows / max(sum(statistics.median(s) for s in side_seconds), 1e-9)
        for side_seconds in seconds
    )
    return serving_rate, candidate_rate


def shipped_batches(loaded: LoadedBackbone) -> tuple[list[Any], list[Any]]:
    """(calibration batches, timing batches at TIMING_BATCH_SIZES) of the shipped set."""
    calibration = [
        loaded.preprocessor.load(x, f"calibration[{i}]")
        for i, x in enumerate(calibration_inputs(loaded.spec.modality))
    ]
    calibration_batches = [
        loaded.stack(calibration[start : start + CALIBRATION_BATCH])
        for start in range(0, len(calibration), CALIBRATION_BATCH)
    ]
    return calibration_batches, [loaded.stack(calibration[:size]) for size in TIMING_BATCH_SIZES]


def pooled_features(loaded: LoadedBackbone, runner: StageRunner | None) -> Features:
    """Pooled features [B, D] through `runner`, or (None) through Predict's current path."""
    trunk = loaded.trunk

    def features(state: Any) -> torch.Tensor:
        if runner is None:
            return trunk.pool(loaded.run_prefix(state, 0, trunk.num_stages))
        return trunk.pool(runner.run(state, 0, trunk.num_stages))

    return features


def read_verdict(store: MeasurementStore | None, key: str) -> UpgradeVerdict | None:
    if store is None:
        return None
    try:
        text = store.read_measurement(key)
        return None if text is None else UpgradeVerdict.from_json(text)
    except Exception:  # unreadable or from older code: measure again
        log.warning("ignoring an unreadable stored upgrade verdict (%s)", key)
        return None


def write_verdict(store: MeasurementStore | None, key: str, verdict: UpgradeVerdict) -> None:
    if store is None:
        return
    try:
        store.write_measurement(key, verdict.to_json())
    except Exception:  # a store fault costs a measurement at the next start, no more
        log.warning("could not store the upgrade verdict (%s)", key)


def failure_reason(exc: BaseException) -> str:
    """The first line only: torch appends pages of debugging hints."""
    return f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0]}"


def _finished(output: torch.Tensor) -> None:
    if output.device.type == "cuda":
        torch.cuda.synchronize(output.device)
