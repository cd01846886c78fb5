"""Backbone auto-selection: a quick frozen-feature probe of each candidate on a sample of
the data, scored by validation accuracy, with cost (GFLOPs, latency) to break ties."""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch
from torch.utils.flop_counter import FlopCounterMode

from transfer_service.backbones.cache import BackboneStatus, LoadedBackbone
from transfer_service.backbones.catalog import BackboneSpec
from transfer_service.domain import (
    CandidateResult,
    EventPayload,
    FineTuneSpec,
    LabeledExample,
    Modality,
    TrainingConfig,
    TrainingProgress,
)
from transfer_service.errors import FailedPreconditionError, InvalidArgumentError
from transfer_service.training.trainer import Trainer

# Per class, at most this many examples go into a candidate's probe.
SAMPLE_PER_CLASS = 40
# Accuracies closer than this count as a tie, settled by cost.
TIE_ACCURACY = 0.01


@dataclass(frozen=True, slots=True)
class CandidateScore:
    backbone: str
    validation_accuracy: float
    gflops: float
    latency_ms: float

    @property
    def accuracy_per_gflop(self) -> float:
        return self.validation_accuracy / max(self.gflops, 1e-9)

    def event(self, selected: bool) -> CandidateResult:
        return CandidateResult(
            backbone=self.backbone,
            validation_accuracy=self.validation_accuracy,
            gflops=self.gflops,
            accuracy_per_gflop=self.accuracy_per_gflop,
            latency_ms=self.latency_ms,
            selected=selected,
        )


def sample_examples(
    examples: Sequence[LabeledExample], seed: int, per_class: int = SAMPLE_PER_CLASS
) -> tuple[LabeledExample, ...]:
    """Up to `per_class` random examples of each class (all of a smaller class)."""
    by_label: dict[str, list[LabeledExample]] = defaultdict(list)
    for example in examples:
        by_label[example.label].append(example)
    generator = torch.Generator().manual_seed(seed)
    sample: list[LabeledExample] = []
    for label in sorted(by_label):
        members = by_label[label]
        order = torch.randperm(len(members), generator=generator).tolist()[:per_class]
        sample += [members[i] for i in order]
    return tuple(sample)


def forward_gflops(backbone: LoadedBackbone, example: LabeledExample) -> float:
    """GFLOPs of one frozen-trunk forward pass at the configured input size."""
    trunk = backbone.trunk
    state = backbone.stack([backbone.preprocessor.load(example.input, "examples[0]")])
    counter = FlopCounterMode(display=False)
    with counter, torch.inference_mode():
        trunk.pool(trunk.run_stages(state, 0, trunk.num_stages))
    return counter.get_total_flops() / 1e9


def score_candidate(
    backbone: LoadedBackbone,
    spec: FineTuneSpec,
    sample: tuple[LabeledExample, ...],
    cancelled: threading.Event,
    feature_cache_bytes: int,
) -> CandidateScore:
    """Linear probe with default settings on the sample; accuracy on its validation split."""
    extraction_rates: list[float] = []

    def observe(payload: EventPayload) -> None:
        if isinstance(payload, TrainingProgress) and payload.phase == "extracting_features":
            extraction_rates.append(payload.examples_per_second)

    probe_config = TrainingConfig(
        epochs=100,
        early_stopping_patience=10,
        validation_fraction=max(spec.config.validation_fraction, 0.25),
        seed=spec.config.seed,
        progress_every_steps=10**6,
    )
    trainer = Trainer(
        backbone,
        replace(spec, backbone=backbone.name, examples=sample, config=probe_config),
        feature_cache_bytes=feature_cache_bytes,
        emit=observe,
        cancelled=cancelled,
    )
    result = trainer.run()
    rate = extraction_rates[-1] if extraction_rates else 0.0
    return CandidateScore(
        backbone=backbone.name,
        validation_accuracy=result.metrics.validation_accuracy or 0.0,
        gflops=forward_gflops(backbone, sample[0]),
        latency_ms=1000.0 / rate if rate > 0 else 0.0,
    )


def choose(scores: Sequence[CandidateScore]) -> CandidateScore:
    """Best validation accuracy; within TIE_ACCURACY of the best, the cheapest wins."""
    best = max(score.validation_accuracy for score in scores)
    contenders = [s for s in scores if s.validation_accuracy >= best - TIE_ACCURACY]
    return min(contenders, key=lambda s: (s.gflops, -s.validation_accuracy))


def select_backbone(
    candidates: Sequence[str],
    load: Callable[[str], LoadedBackbone],
    spec: FineTuneSpec,
    emit: Callable[[EventPayload], None],
    cancelled: threading.Event,
    feature_cache_bytes: int,
) -> str:
    """Scores every candidate (one event each), announces the winner, returns its name."""
    sample = sample_examples(spec.examples, spec.config.seed)
    scores = []
    for name in candidates:
        score = score_candidate(load(name), spec, sample, cancelled, feature_cache_bytes)
        emit(score.event(selected=False))
        scores.append(score)
    winner = choose(scores)
    emit(winner.event(selected=True))
    return winner.backbone


def candidate_names(
    requested: Sequence[str],
    modality: Modality,
    statuses: list[BackboneStatus],
    check_available: Callable[[str], BackboneSpec],
) -> list[str]:
    """Backbone auto-selection candidates: the requested ones (each must exist, be available
    (`check_available` raises otherwise) and take this modality), or every available backbone
    of the modality."""
    if requested:
        for position, name in enumerate(requested):
            spec = check_available(name)
            if spec.modality is not modality:
                raise InvalidArgumentError(
                    f"candidate_backbones[{position}]: {name} takes "
                    f"{spec.modality.value}, the examples are {modality.value}"
                )
        return list(dict.fromkeys(requested))
    names = [s.spec.name for s in statuses if s.available and s.spec.modality is modality]
    if not names:
        raise FailedPreconditionError(f"backbone: no {modality.value} backbone is available")
    return names
