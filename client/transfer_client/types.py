"""What the SDK takes and returns: plain frozen dataclasses, never protobuf messages."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TypeAlias

InputData: TypeAlias = bytes | Path | str
"""One model input: an encoded image file as `bytes`, a `Path` to one, or a text as `str`."""

LabelledExample: TypeAlias = tuple[InputData, str]
"""A training example: `(input, label)`."""


class Modality(enum.StrEnum):
    IMAGE = "image"
    TEXT = "text"


class BackboneState(enum.StrEnum):
    AVAILABLE = "available"
    """Weights are present; loaded on first use."""
    LOADED = "loaded"
    """Resident on the device."""
    UNAVAILABLE = "unavailable"
    """Weights are missing or failed to load; see `Backbone.unavailable_reason`."""


class JobState(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def is_finished(self) -> bool:
        return self in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)


@dataclass(frozen=True, slots=True)
class Backbone:
    name: str
    modality: Modality
    architecture: str
    pretrained_on: str
    parameter_count: int
    feature_dim: int
    input_size: int
    """Image side in pixels, or maximum tokens for a text backbone."""
    unfreezable_blocks: int
    state: BackboneState
    unavailable_reason: str
    device: str
    resident_bytes: int
    precision: str = ""
    """Numeric precision the loaded trunk runs Predict at ("float32", "bfloat16", "float16",
    "int8"); empty when not loaded."""
    measured_inputs_per_second: float = 0.0
    """Inputs per second Predict's current path measured (0: not measured)."""
    compiled: bool = False
    """Whether Predict runs the frozen stages through torch.compile graphs now (compiled at
    load, or swapped in while serving once verified and timed faster)."""


@dataclass(frozen=True, slots=True)
class ClassScore:
    label: str
    score: float


@dataclass(frozen=True, slots=True)
class Prediction:
    label: str
    score: float
    """Softmax probability of `label`."""
    top_k: tuple[ClassScore, ...]
    embedding: tuple[float, ...]
    """The backbone's pooled features; empty unless asked for with `return_embedding`."""
    head_id: str = ""
    """The head that answered: the id a reference (`name`, `name@3`, `name@production`)
    resolved to; empty from servers older than head names."""
    head_version: int = 0
    """That head's version under its name (0: not known)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class TrainingConfig:
    """Training options; a zero means the server's default, `None` leaves an option unset."""

    epochs: int = 0
    batch_size: int = 0
    learning_rate: float = 0.0
    trainable_blocks: int = 0
    """0: linear probe on a frozen trunk; N: the last N blocks train too; -1: all of them."""
    validation_fraction: float | None = None
    early_stopping_patience: int | None = None
    augment: bool | None = None
    seed: int = 0
    progress_every_steps: int = 0
    # "linear" (default), "mlp" or "prototype" (few-shot: class means, no gradient steps).
    head_type: str = ""
    hidden_dim: int = 0
    dropout: float | None = None
    label_smoothing: float | None = None
    weight_decay: float | None = None
    # Progressive unfreezing: one more of `trainable_blocks` every this many epochs.
    unfreeze_every_epochs: int = 0
    layer_lr_decay: float | None = None
    # "auto", "none", "weighted_loss" or "oversample".
    class_balance: str = ""
    prototype_temperature: float = 0.0
    max_grad_norm: float | None = None
    # "auto" (default: "lbfgs_cv" for a linear probe unless gradient options are set),
    # "lbfgs_cv" (L2-regularised logistic regression, C by k-fold cross-validation) or
    # "adamw" (epochs with early stopping).
    solver: str = ""
    cv_folds: int = 0


@dataclass(frozen=True, slots=True)
class TrainingPlan:
    """The configuration the server resolved, defaults filled in."""

    epochs: int
    batch_size: int
    learning_rate: float
    trainable_blocks: int
    augment: bool
    cached_features: bool
    """Trunk features are computed once and reused for every epoch."""
    steps_per_epoch: int
    device: str
    early_stopping_patience: int
    head_type: str = "linear"
    unfreeze_every_epochs: int = 0
    layer_lr_decay: float = 0.0
    label_smoothing: float = 0.0
    solver: str = ""
    cv_folds: int = 0
    """Folds of the "lbfgs_cv" cross-validation (0: a validation set was given, or none)."""


@dataclass(frozen=True, slots=True)
class TrainingProgress:
    epoch: int
    epochs: int
    step: int
    total_steps: int
    train_loss: float
    """Running mean over the current epoch so far."""
    train_accuracy: float
    validation_loss: float | None
    """Set on end-of-epoch events when there is a validation split."""
    validation_accuracy: float | None
    learning_rate: float
    examples_per_second: float
    elapsed_seconds: float
    eta_seconds: float
    epoch_end: bool
    phase: str = ""
    """"extracting_features", "training" or "cross_validation"; empty when the server does
    not say."""
    regularization_c: float | None = None
    """Phase "cross_validation": the inverse L2 strength this event scores."""


@dataclass(frozen=True, slots=True)
class TrainingMetrics:
    train_loss: float
    train_accuracy: float
    validation_loss: float | None
    validation_accuracy: float | None
    best_epoch: int
    """Epoch whose weights were kept, 1-based."""
    epochs_run: int
    stopped_early: bool
    training_seconds: float
    train_validation_gap: float | None = None
    majority_baseline_accuracy: float | None = None
    beats_baseline: bool = True
    regularization_c: float | None = None
    """Solver "lbfgs_cv": the inverse L2 strength chosen."""


@dataclass(frozen=True, slots=True)
class JobStarted:
    job_id: str
    sequence: int
    time: datetime
    backbone: str
    head_name: str
    class_names: tuple[str, ...]
    train_examples: int
    validation_examples: int
    plan: TrainingPlan
    class_counts: dict[str, int]
    imbalance_ratio: float = 1.0
    class_balance: str = "none"


@dataclass(frozen=True, slots=True)
class JobProgress:
    job_id: str
    sequence: int
    time: datetime
    progress: TrainingProgress


@dataclass(frozen=True, slots=True)
class JobQueued:
    """A job's first event, as soon as it is accepted: it may wait for a training slot."""

    job_id: str
    sequence: int
    time: datetime
    backbone: str
    head_name: str


@dataclass(frozen=True, slots=True)
class ClassMetrics:
    label: str
    precision: float
    recall: float
    f1: float
    support: int
    """Examples of this class in the evaluated set."""


@dataclass(frozen=True, slots=True)
class EvaluationReport:
    """A head's quality on data it was not trained on: the validation split or out-of-fold
    predictions (from training), or the caller's test set (`evaluate_head`). `examples` 0:
    nothing was held out, and the figures mean nothing."""

    source: str
    """"validation_split", "cross_validation" or "test_set"."""
    examples: int
    accuracy: float
    macro_f1: float
    top_k_accuracy: tuple[float, ...]
    """top_k_accuracy[k-1]: the true class among the k best, for k = 1 .. min(5, classes)."""
    log_loss: float
    """Mean negative log-likelihood of the true class, with the calibrated scores."""
    ece_uncalibrated: float
    """Expected calibration error (15 bins) of the scores before temperature scaling."""
    ece: float
    """... and after: Predict's scores."""
    temperature: float
    """What Predict divides the head's logits by (1: none)."""
    per_class: tuple[ClassMetrics, ...]
    """In the head's class order; empty in a summary (a completed event, a listing)."""
    confusion_matrix: tuple[tuple[int, ...], ...]
    """[true class][predicted class] in the head's class order; empty above 100 classes and
    in a summary."""


@dataclass(frozen=True, slots=True)
class JobCompleted:
    job_id: str
    sequence: int
    time: datetime
    head_id: str
    metrics: TrainingMetrics
    evaluation: EvaluationReport | None = None
    """The head's report without per-class rows and matrix (`get_head` has it whole); None
    from servers older than reports."""
    head_version: int = 0
    """The head's version under its name (1, 2, 3, ...; 0 from servers older than names)."""


@dataclass(frozen=True, slots=True)
class JobFailed:
    job_id: str
    sequence: int
    time: datetime
    reason: str
    code: str
    """The gRPC status name the failure maps to, e.g. "INVALID_ARGUMENT"."""


@dataclass(frozen=True, slots=True)
class JobCancelled:
    job_id: str
    sequence: int
    time: datetime
    reason: str


@dataclass(frozen=True, slots=True)
class JobWarning:
    """Something worth knowing that does not stop the job (e.g. a tiny validation set)."""

    job_id: str
    sequence: int
    time: datetime
    code: str
    message: str


@dataclass(frozen=True, slots=True)
class CandidateResult:
    """Backbone auto-selection: one candidate's quick probe."""

    job_id: str
    sequence: int
    time: datetime
    backbone: str
    validation_accuracy: float
    gflops: float
    accuracy_per_gflop: float
    latency_ms: float
    selected: bool


FineTuneEvent: TypeAlias = (
    JobQueued
    | JobStarted
    | JobProgress
    | JobCompleted
    | JobFailed
    | JobCancelled
    | JobWarning
    | CandidateResult
)
"""One event of a training job; the last one of a job is a completed, failed or cancelled."""


@dataclass(frozen=True, slots=True)
class Job:
    job_id: str
    state: JobState
    backbone: str
    head_name: str
    head_id: str
    """Set once the job succeeded."""
    error: str
    created_time: datetime
    updated_time: datetime
    last_sequence: int
    """Sequence of the newest event: `watch_job(job_id, after_sequence=...)` follows on."""
    progress: TrainingProgress | None


@dataclass(frozen=True, slots=True)
class Head:
    head_id: str
    name: str
    backbone: str
    modality: Modality
    class_names: tuple[str, ...]
    trainable_blocks: int
    input_size: int
    metrics: TrainingMetrics
    config: TrainingConfig
    created_time: datetime
    size_bytes: int
    """Bytes of the head's own weights; the shared backbone is not counted."""
    job_id: str
    head_type: str = "linear"
    evaluation: EvaluationReport | None = None
    """None for heads trained before reports existed (and from servers older than them)."""
    version: int = 0
    """Its version under `name` (1, 2, 3, ... in training order; 0 from older servers)."""
    aliases: tuple[str, ...] = ()
    """The aliases of `name` that point at this version, sorted (e.g. ("production",))."""


@dataclass(frozen=True, slots=True)
class DatasetInfo:
    dataset_id: str
    example_count: int
    class_counts: dict[str, int]
    modality: Modality
