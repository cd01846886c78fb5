"""Turns a FineTune request into a resolved, validated spec. Every error names its field."""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from transfer_service.domain import (
    HEAD_NAME_PATTERN,
    MAX_LABEL_CHARS,
    LabeledExample,
    Modality,
    TrainingConfig,
)
from transfer_service.errors import InvalidArgumentError, ResourceExhaustedError
from transfer_service.heads import HEAD_TYPES

DEFAULTS = TrainingConfig()
CLASS_BALANCE_MODES = ("auto", "none", "weighted_loss", "oversample")
# A linear probe trains on cached features, so an epoch costs microseconds: it gets many
# more (early stopping ends it); unfrozen blocks cost a trunk pass per epoch.
PROBE_DEFAULT_EPOCHS = 100
PROBE_DEFAULT_PATIENCE = 10
MAX_EPOCHS = 1000
MAX_BATCH_SIZE = 4096
SOLVERS = ("auto", "lbfgs_cv", "adamw")
MAX_CV_FOLDS = 20


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
    head_type: str = ""
    hidden_dim: int = 0
    dropout: float | None = None
    label_smoothing: float | None = None
    weight_decay: float | None = None
    unfreeze_every_epochs: int = 0
    layer_lr_decay: float | None = None
    class_balance: str = ""
    prototype_temperature: float = 0.0
    max_grad_norm: float | None = None
    solver: str = ""
    cv_folds: int = 0


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
    head_type = request.head_type or DEFAULTS.head_type
    if head_type not in HEAD_TYPES:
        raise InvalidArgumentError(
            f"config.head_type: {request.head_type!r} is not one of {', '.join(HEAD_TYPES)}"
        )
    if head_type == "prototype" and (blocks != 0 or augment):
        raise InvalidArgumentError(
            "config.head_type: a prototype head is built from frozen features in one pass; "
            "it takes neither trainable_blocks nor augment"
        )
    if request.hidden_dim > 8192:
        raise InvalidArgumentError(f"config.hidden_dim: {request.hidden_dim} is over 8192")
    dropout = _fraction("config.dropout", request.dropout, DEFAULTS.dropout)
    label_smoothing = _fraction(
        "config.label_smoothing", request.label_smoothing, DEFAULTS.label_smoothing
    )
    weight_decay = _bounded(
        "config.weight_decay", request.weight_decay, DEFAULTS.weight_decay, 0.0, 1.0
    )
    layer_lr_decay = _bounded(
        "config.layer_lr_decay", request.layer_lr_decay, DEFAULTS.layer_lr_decay, 0.0, 1.0
    )
    max_grad_norm = _bounded(
        "config.max_grad_norm", request.max_grad_norm, DEFAULTS.max_grad_norm, 0.0, 1e6
    )
    temperature = request.prototype_temperature or DEFAULTS.prototype_temperature
    if math.isnan(temperature) or not 0.0 < temperature <= 100.0:
        raise InvalidArgumentError(
            f"config.prototype_temperature: {temperature} is not in (0, 100]"
        )
    if request.unfreeze_every_epochs and blocks == 0:
        raise InvalidArgumentError(
            "config.unfreeze_every_epochs: progressive unfreezing needs trainable_blocks != 0"
        )
    if request.unfreeze_every_epochs > MAX_EPOCHS:
        raise InvalidArgumentError(
            f"config.unfreeze_every_epochs: {request.unfreeze_every_epochs} is over {MAX_EPOCHS}"
        )
    class_balance = request.class_balance or DEFAULTS.class_balance
    if class_balance not in CLASS_BALANCE_MODES:
        raise InvalidArgumentError(
            f"config.class_balance: {request.class_balance!r} is not one of "
            f"{', '.join(CLASS_BALANCE_MODES)}"
        )
    probe = blocks == 0
    solver = _resolve_solver(request, head_type, probe, augment)
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
        head_type=head_type,
        hidden_dim=request.hidden_dim or DEFAULTS.hidden_dim,
        dropout=dropout,
        label_smoothing=label_smoothing,
        weight_decay=weight_decay,
        unfreeze_every_epochs=request.unfreeze_every_epochs,
        layer_lr_decay=layer_lr_decay,
        class_balance=class_balance,
        prototype_temperature=temperature,
        max_grad_norm=max_grad_norm,
        solver=solver,
        cv_folds=request.cv_folds,
    )


def _gradient_fields_set(request: TrainingConfigRequest) -> list[str]:
    """The fields only the "adamw" solver uses that the caller set."""
    given = {
        "epochs": request.epochs != 0,
        "batch_size": request.batch_size != 0,
        "learning_rate": request.learning_rate != 0.0,
        "validation_fraction": request.validation_fraction is not None,
        "early_stopping_patience": request.early_stopping_patience is not None,
        "weight_decay": request.weight_decay is not None,
        "max_grad_norm": request.max_grad_norm is not None,
    }
    return [name for name, is_set in given.items() if is_set]


def _resolve_solver(
    request: TrainingConfigRequest, head_type: str, probe: bool, augment: bool
) -> str:
    """ "auto" is the cross-validated L-BFGS probe where it applies (a linear head on frozen,
    unaugmented features) unless the caller configured gradient training; asking for it
    explicitly where it does not apply, or together with gradient fields, is an error
    rather than a silent switch."""
    requested = request.solver or "auto"
    if requested not in SOLVERS:
        raise InvalidArgumentError(
            f"config.solver: {request.solver!r} is not one of {', '.join(SOLVERS)}"
        )
    if request.cv_folds == 1 or request.cv_folds > MAX_CV_FOLDS:
        raise InvalidArgumentError(
            f"config.cv_folds: {request.cv_folds} is not in [2, {MAX_CV_FOLDS}] (0 = default)"
        )
    applies = head_type == "linear" and probe and not augment
    gradient_fields = _gradient_fields_set(request)
    if requested == "auto":
        resolved = "lbfgs_cv" if applies and not gradient_fields else "adamw"
    elif requested == "lbfgs_cv" and not applies:
        raise InvalidArgumentError(
            "config.solver: lbfgs_cv fits a linear head on frozen features; it takes neither "
            "trainable_blocks, augment nor head_type other than linear"
        )
    elif requested == "lbfgs_cv" and gradient_fields:
        raise InvalidArgumentError(
            f"config.{gradient_fields[0]}: not used by solver lbfgs_cv (it picks the L2 "
            "strength by cross-validation); use solver adamw to train by epochs"
        )
    else:
        resolved = requested
    if request.cv_folds and resolved != "lbfgs_cv":
        raise InvalidArgumentError(
            f"config.cv_folds: only solver lbfgs_cv cross-validates (solver is {resolved})"
        )
    return resolved


def _fraction(field: str, value: float | None, default: float) -> float:
    """A value in [0, 1); None means the default."""
    if value is None:
        return default
    if math.isnan(value) or not 0.0 <= value < 1.0:
        raise InvalidArgumentError(f"{field}: {value} is not in [0, 1)")
    return value


def _bounded(field: str, value: float | None, default: float, low: float, high: float) -> float:
    if value is None:
        return default
    if math.isnan(value) or not low <= value <= high:
        raise InvalidArgumentError(f"{field}: {value} is not in [{low:g}, {high:g}]")
    return value


def check_head_name(head_name: str, backbone: str) -> str:
    name = head_name or f"{backbone.replace('_', '-')}-head"
    if not HEAD_NAME_PATTERN.fullmatch(name):
        raise InvalidArgumentError(
            f"head_name: {head_name!r} must match [a-z0-9][a-z0-9_.-]{{0,47}}"
        )
    return name


def check_label(label: str, where: str) -> None:
    """A label is not empty and at most MAX_LABEL_CHARS characters."""
    if not label.strip():
        raise InvalidArgumentError(f"{where}.label: label is empty", field=f"{where}.label")
    if len(label) > MAX_LABEL_CHARS:
        raise InvalidArgumentError(
            f"{where}.label: {len(label)} characters is over the limit of {MAX_LABEL_CHARS}",
            field=f"{where}.label",
        )


def check_examples(
    examples: Sequence[LabeledExample],
    modality: Modality,
    max_examples: int,
    field: str,
    max_classes: int,
) -> None:
    """Structure checks that need no decoding: count, labels, classes, modality, empty text."""
    if not examples:
        raise InvalidArgumentError(f"{field}: no examples (send examples or a dataset_id)")
    if len(examples) > max_examples:
        raise ResourceExhaustedError(
            f"{field}: {len(examples)} examples is over the limit of {max_examples}"
        )
    for position, example in enumerate(examples):
        where = f"{field}[{position}]"
        check_label(example.label, where)
        if example.input.modality is not modality:
            raise InvalidArgumentError(
                f"{where}: {example.input.modality.value} input for "
                f"{_with_article(modality.value)} backbone",
                field=where,
            )
        if example.input.text is not None and not example.input.text.strip():
            raise InvalidArgumentError(f"{where}.text: text is empty", field=f"{where}.text")
    counts = Counter(example.label for example in examples)
    if len(counts) < 2:
        raise InvalidArgumentError(
            f"{field}: labels name {len(counts)} class(es); a classifier needs at least 2"
        )
    if len(counts) > max_classes:
        raise ResourceExhaustedError(
            f"{field}: labels name {len(counts)} classes, over the limit of {max_classes} "
            "per head (TRANSFER_MAX_CLASSES)"
        )


def check_validation_examples(
    examples: Sequence[LabeledExample],
    training_labels: set[str],
    modality: Modality,
    field: str,
) -> None:
    """A caller-supplied validation set: same modality, labels among the training classes."""
    for position, example in enumerate(examples):
        where = f"{field}[{position}]"
        if example.input.modality is not modality:
            raise InvalidArgumentError(
                f"{where}: {example.input.modality.value} input for "
                f"{_with_article(modality.value)} backbone",
                field=where,
            )
        if example.label not in training_labels:
            raise InvalidArgumentError(
                f"{where}.label: {example.label!r} is not one of the training classes",
                field=f"{where}.label",
            )
        if example.input.text is not None and not example.input.text.strip():
            raise InvalidArgumentError(f"{where}.text: text is empty", field=f"{where}.text")


def _with_article(noun: str) -> str:
    """ "an image", "a text"."""
    return f"an {noun}" if noun[:1] in "aeiou" else f"a {noun}"


_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,100}")


def check_request_id(request_id: str) -> None:
    """An idempotency key is stored with the job and compared: bounded and plain."""
    if request_id and _REQUEST_ID.fullmatch(request_id) is None:
        raise InvalidArgumentError(
            "request_id: at most 100 characters of letters, digits and . _ : - "
            "(a UUID is a good choice)"
        )
