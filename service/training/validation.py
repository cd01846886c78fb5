"""Turns a FineTune request into a resolved, validated spec. Every error names its field."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from service.domain import HEAD_NAME_PATTERN, LabeledExample, Modality, TrainingConfig
from service.errors import InvalidArgumentError, ResourceExhaustedError

DEFAULTS = TrainingConfig()
# A linear probe trains on cached features, so an epoch costs microseconds: it gets many
# more (early stopping ends it); unfrozen blocks cost a trunk pass per epoch.
PROBE_DEFAULT_EPOCHS = 100
PROBE_DEFAULT_PATIENCE = 10
MAX_EPOCHS = 1000
MAX_BATCH_SIZE = 4096


@dataclass(frozen=True, slots=True)
class TrainingConfigRequest:
    """What the caller sent; None or 0 means 'use the default' as the API documents."""

    epochs: int = 0
    batch_size: int = 0
    learning_rate: float = 0.0
    trainable_blocks: int = 0
    validation_fraction: float | None = None
    early_stopping_patience: int | None = None
    augment: bool | None = None
    seed: int = 0
    progress_every_steps: int = 0


def resolve_config(
    request: TrainingConfigRequest, modality: Modality, unfreezable_blocks: int
) -> TrainingConfig:
    if request.epochs > MAX_EPOCHS:
        raise InvalidArgumentError(
            f"config.epochs: {request.epochs} is over the maximum {MAX_EPOCHS}"
        )
    if request.batch_size > MAX_BATCH_SIZE:
        raise InvalidArgumentError(
            f"config.batch_size: {request.batch_size} is over the maximum {MAX_BATCH_SIZE}"
        )
    learning_rate = request.learning_rate
    if math.isnan(learning_rate) or learning_rate < 0 or learning_rate > 1.0:
        raise InvalidArgumentError(
            f"config.learning_rate: {learning_rate} is not in (0, 1] (0 means the default)"
        )
    blocks = request.trainable_blocks
    if blocks < -1 or blocks > unfreezable_blocks:
        raise InvalidArgumentError(
            f"config.trainable_blocks: {blocks} is not in [-1, {unfreezable_blocks}] "
            "(0 = linear probe, N = last N blocks, -1 = all)"
        )
    fraction = (
        DEFAULTS.validation_fraction
        if request.validation_fraction is None
        else request.validation_fraction
    )
    if math.isnan(fraction) or not 0.0 <= fraction < 1.0:
        raise InvalidArgumentError(f"config.validation_fraction: {fraction} is not in [0, 1)")
    augment = bool(request.augment) if request.augment is not None else False
    if augment and modality is Modality.TEXT:
        raise InvalidArgumentError("config.augment: augmentation is for image backbones only")
    probe = blocks == 0
    default_epochs = PROBE_DEFAULT_EPOCHS if probe else DEFAULTS.epochs
    default_patience = PROBE_DEFAULT_PATIENCE if probe else DEFAULTS.early_stopping_patience
    return TrainingConfig(
        epochs=request.epochs or default_epochs,
        batch_size=request.batch_size or DEFAULTS.batch_size,
        learning_rate=learning_rate or DEFAULTS.learning_rate,
        trainable_blocks=blocks,
        validation_fraction=fraction,
        early_stopping_patience=(
            default_patience
            if request.early_stopping_patience is None
            else request.early_stopping_patience
        ),
        augment=augment,
        seed=request.seed,
        progress_every_steps=request.progress_every_steps or DEFAULTS.progress_every_steps,
    )


def check_head_name(head_name: str, backbone: str) -> str:
    name = head_name or f"{backbone.replace('_', '-')}-head"
    if not HEAD_NAME_PATTERN.fullmatch(name):
        raise InvalidArgumentError(
            f"head_name: {head_name!r} must match [a-z0-9][a-z0-9_.-]{{0,47}}"
        )
    return name


def check_examples(
    examples: Sequence[LabeledExample], modality: Modality, max_examples: int, field: str
) -> None:
    """Structure checks that need no decoding: count, labels, modality, empty text."""
    if not examples:
        raise InvalidArgumentError(f"{field}: no examples (send examples or a dataset_id)")
    if len(examples) > max_examples:
        raise ResourceExhaustedError(
            f"{field}: {len(examples)} examples is over the limit of {max_examples}"
        )
    for position, example in enumerate(examples):
        where = f"{field}[{position}]"
        if not example.label.strip():
            raise InvalidArgumentError(f"{where}.label: label is empty")
        if example.input.modality is not modality:
            raise InvalidArgumentError(
                f"{where}: {example.input.modality.value} input for a {modality.value} backbone"
            )
        if example.input.text is not None and not example.input.text.strip():
            raise InvalidArgumentError(f"{where}.text: text is empty")
    counts = Counter(example.label for example in examples)
    if len(counts) < 2:
        raise InvalidArgumentError(
            f"{field}: labels name {len(counts)} class(es); a classifier needs at least 2"
        )
