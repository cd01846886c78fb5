"""TRANSFER_PRECISION=auto: the frozen trunk's precision, chosen by measuring the candidates.

Whether reduced precision pays is a fact of the machine, not of its CPU flags: on one 2-core
AVX-512-BF16 EPYC (no AMX) bf16 autocast ran EfficientNet-Lite0 2.2x faster than fp32 at
batch 8, on another of the same pool slower (issue 20). So each candidate is first checked
against fp32 on the shipped calibration set (backbones/calibration.py), then the ones that
pass are timed on warm batches at the batcher's typical sizes, and the fastest is kept.

Agreement is measured on the pooled features, the trunk's only output: the trunk has no
classifier, and heads are trained later, so no label agreement exists at load time. The
tolerance (Tolerance below) is the cosine similarity of each input's reduced-precision
feature vector to its fp32 one. bf16 keeps 8 bits of mantissa, a relative error near 0.4% per
op; through Lite0's 16 blocks it measured a mean cosine of 0.998-0.999 here. A candidate
whose features point elsewhere by more than a few degrees (cosine < 0.98: about 11 degrees)
would move a linear head's logits by a visible fraction of their spread; on real heads the
same bf16 trunk kept top-1 on >= 95% of Fashion-MNIST inputs (tests/unit/test_fast_paths.py).
"""

from __future__ import annotations

import json
import logging
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

log = logging.getLogger(__name__)

REFERENCE_PRECISION = "float32"


@dataclass(frozen=True, slots=True)
class Tolerance:
    """A candidate passes when its pooled features' cosine similarity to fp32's is at least
    `mean_cosine` on average over the calibration set and `min_cosine` for every input."""

    mean_cosine: float = 0.99
    min_cosine: float = 0.98


DEFAULT_TOLERANCE = Tolerance()


@dataclass(frozen=True, slots=True)
class Candidate:
    """One way to run the whole frozen trunk. `features`: a first-stage batch -> its pooled
    features [B, D] in fp32."""

    precision: str  # "float32", "bfloat16", "float16", "int8"
    features: Callable[[Any], torch.Tensor]


@dataclass(frozen=True, slots=True)
class CandidateFigures:
    precision: str
    inputs_per_second: float  # 0 when not timed (it failed the tolerance)
    mean_cosine: float
    min_cosine: float
    passed: bool


@dataclass(frozen=True, slots=True)
class PrecisionChoice:
    precision: str
    inputs_per_second: float
    figures: tuple[CandidateFigures, ...]

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> PrecisionChoice:
        data = json.loads(text)
        figures = tuple(CandidateFigures(**row) for row in data["figures"])
        return cls(str(data["precision"]), float(data["inputs_per_second"]), figures)

    def summary(self) -> str:
        """One line per log: each candidate's rate and agreement."""
        rows = [
            f"{f.precision} {f.inputs_per_second:.1f}/s cos mean {f.mean_cosine:.4f} "
            f"min {f.min_cosine:.4f}{'' if f.passed else ' (failed tolerance)'}"
            for f in self.figures
        ]
        return "; ".join(rows)


# A candidate and the timing batches -> its inputs per second.
Timer = Callable[[Candidate, Sequence[Any]], float]


def batch_rows(batch: Any) -> int:
    """Inputs in a first-stage batch: image tensors [B, C, H, W], or a TextState."""
    values = batch if isinstance(batch, torch.Tensor) else batch.values
    return int(values.shape[0])


def time_candidate(candidate: Candidate, batches: Sequence[Any], repeats: int = 3) -> float:
    """Inputs per second over one batch of each timing size: each batch runs once to warm
    up (oneDNN builds its kernels for the shape), then `repeats` times; the median of each
    size counts, so one preempted run (the machine may be shared) does not decide."""
    total_inputs = 0
    total_seconds = 0.0
    for batch in batches:
        _finished(candidate.features(batch))
        seconds = []
        for _ in range(repeats):
            started = time.perf_counter()
            _finished(candidate.features(batch))
            seconds.append(time.perf_counter() - started)
        total_inputs += batch_rows(batch)
        total_seconds += statistics.median(seconds)
    return total_inputs / max(total_seconds, 1e-9)


def _finished(output: torch.Tensor) -> None:
    """Waits for an accelerator's queued kernels, so the time taken is the work's."""
    if output.device.type == "cuda":
        torch.cuda.synchronize(output.device)


def agreement(reference: torch.Tensor, features: torch.Tensor) -> tuple[float, float]:
    """(mean, min) cosine similarity of each row of `features` [N, D] to `reference`'s."""
    cosine = torch.nn.functional.cosine_similarity(features.float(), reference.float(), dim=1)
    return float(cosine.mean()), float(cosine.min())


def _agreement_of(
    candidate: Candidate, calibration_batches: Sequence[Any], reference: torch.Tensor
) -> tuple[float, float]:
    """(mean, min) cosine to the reference; a candidate this device cannot run (an op without
    a kernel in that dtype, say) does not pass, rather than failing the load."""
    try:
        features = torch.cat([candidate.features(b) for b in calibration_batches])
    except Exception:
        log.warning("precision candidate %s failed to run", candidate.precision, exc_info=True)
        return -1.0, -1.0
    return agreement(reference, features)


def choose_precision(
    candidates: Sequence[Candidate],
    calibration_batches: Sequence[Any],
    timing_batches: Sequence[Any],
    tolerance: Tolerance = DEFAULT_TOLERANCE,
    timer: Timer = time_candidate,
) -> PrecisionChoice:
    """The fastest candidate within `tolerance` of the first one (the fp32 reference, which
    always passes). Only candidates that pass are timed."""
    if not candidates or candidates[0].precision != REFERENCE_PRECISION:
        raise ValueError("the first candidate must be the fp32 reference")
    with torch.inference_mode():
        reference = torch.cat([candidates[0].features(b) for b in calibration_batches])
        figures = []
        for candidate in candidates:
            if candidate is candidates[0]:
                mean, worst = 1.0, 1.0
            else:
                mean, worst = _agreement_of(candidate, calibration_batches, reference)
            passed = mean >= tolerance.mean_cosine and worst >= tolerance.min_cosine
            rate = timer(candidate, timing_batches) if passed else 0.0
            figures.append(CandidateFigures(candidate.precision, rate, mean, worst, passed))
    best = max((f for f in figures if f.passed), key=lambda f: f.inputs_per_second)
    return PrecisionChoice(best.precision, best.inputs_per_second, tuple(figures))
