"""Plain domain types shared by the server's parts. No torch, no protobuf."""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field, replace
from datetime import datetime

# Ids double as directory names, so they are confined to a safe alphabet.
ID_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")
HEAD_NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,47}$")
# Heads, jobs and datasets belong to a tenant. With authentication off every caller is this
# tenant, and records written before tenancy existed belong to it.
DEFAULT_TENANT = "default"
TENANT_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,127}$")
# A label is a class name: it travels in every event, head record and prediction, so it is
# bounded (a 20 MB label once made a `started` event larger than a gRPC message).
MAX_LABEL_CHARS = 256


class Modality(enum.Enum):
    IMAGE = "image"
    TEXT = "text"


@dataclass(frozen=True, slots=True)
class ModelInput:
    """One input: encoded image bytes or a text. Exactly one is set."""

    image: bytes | None = None
    text: str | None = None

    @property
    def modality(self) -> Modality:
        return Modality.IMAGE if self.image is not None else Modality.TEXT


@dataclass(frozen=True, slots=True)
class LabeledExample:
    input: ModelInput
    label: str


@dataclass(frozen=True, slots=True)
class TrainingConfig:
    """A fully resolved training configuration (defaults applied, validated)."""

    epochs: int = 20
    batch_size: int = 32
    learning_rate: float = 3e-3
    trainable_blocks: int = 0
    validation_fraction: float = 0.2
    early_stopping_patience: int = 5
    augment: bool = False
    seed: int = 0
    progress_every_steps: int = 10
    head_type: str = "linear"  # linear | mlp | prototype
    hidden_dim: int = 256
    dropout: float = 0.2
    label_smoothing: float = 0.0
    weight_decay: float = 1e-4
    unfreeze_every_epochs: int = 0
    layer_lr_decay: float = 0.5
    class_balance: str = "auto"  # auto | none | weighted_loss | oversample
    prototype_temperature: float = 0.1
    max_grad_norm: float = 1.0
    # "adamw" (epochs, early stopping) or "lbfgs_cv" (regularised_probe.py); requests that
    # leave it to "auto" get "lbfgs_cv" where it applies (training/validation.py).
    solver: str = "adamw"
    cv_folds: int = 0  # 0: regularised_probe.default_folds


@dataclass(frozen=True, slots=True)
class FineTuneSpec:
    backbone: str
    head_name: str
    examples: tuple[LabeledExample, ...]
    config: TrainingConfig
    tenant: str = DEFAULT_TENANT
    # Caller-supplied validation set; empty means a stratified split of `examples`.
    validation_examples: tuple[LabeledExample, ...] = ()
    # Backbone auto-selection: probe these, train on the best (empty: `backbone` as given).
    candidate_backbones: tuple[str, ...] = ()

    def without_examples(self) -> FineTuneSpec:
        """The same job without its examples: what is kept once they are no longer needed."""
        return replace(self, examples=(), validation_examples=())


@dataclass(frozen=True, slots=True)
class ClassScore:
    label: str
    score: float


@dataclass(frozen=True, slots=True)
class PredictionResult:
    label: str
    score: float
    top_k: tuple[ClassScore, ...]
    embedding: tuple[float, ...] = ()


@dataclass(frozen=True, slots=True)
class TrainingMetrics:
    train_loss: float
    train_accuracy: float
    validation_loss: float | None
    validation_accuracy: float | None
    best_epoch: int
    epochs_run: int
    stopped_early: bool
    training_seconds: float
    train_validation_gap: float | None = None
    majority_baseline_accuracy: float | None = None
    beats_baseline: bool = True
    regularization_c: float | None = None  # solver "lbfgs_cv": the C chosen


@dataclass(frozen=True, slots=True)
class HeadRecord:
    """A trained head's metadata, stored as JSON beside its safetensors weights."""

    head_id: str
    name: str
    backbone: str
    modality: Modality
    class_names: tuple[str, ...]
    trainable_blocks: int
    input_size: int
    hidden_dim: int
    metrics: TrainingMetrics
    config: TrainingConfig
    created_time: datetime
    size_bytes: int
    job_id: str
    tenant: str = DEFAULT_TENANT
    head_type: str = "linear"
    # Predict's scores are softmax(logits / temperature), fitted on held-out predictions
    # (evaluation.py); heads stored before calibration existed keep 1 (raw softmax).
    temperature: float = 1.0
    # How good the head is on held-out data; None for heads stored before reports existed.
    evaluation: EvaluationReport | None = None
    # Its version under (tenant, name): 1, 2, 3 ... in the order versions were reserved
    # (HeadStore.reserve_head_version); never reused after a delete.
    version: int = 0


# An alias: [a-z][a-z0-9_-]{0,31}. "latest" is reserved (always the newest version); the
# "production" alias, where set, is what a bare name resolves to.
ALIAS_PATTERN = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")
LATEST_ALIAS = "latest"
DEFAULT_ALIAS = "production"


@dataclass(frozen=True, slots=True)
class HeadName:
    """A head name's versions and aliases within a tenant, as one consistent read."""

    tenant: str
    name: str
    # version -> head id, for the versions that exist (deleted ones are absent).
    versions: dict[int, str]
    # alias -> version; every alias points at an existing version.
    aliases: dict[str, int]

    def aliases_of(self, version: int) -> tuple[str, ...]:
        return tuple(sorted(alias for alias, v in self.aliases.items() if v == version))


@dataclass(frozen=True, slots=True)
class ClassMetrics:
    label: str
    precision: float
    recall: float
    f1: float
    support: int


# EvaluationReport.source
SOURCE_VALIDATION_SPLIT = "validation_split"
SOURCE_CROSS_VALIDATION = "cross_validation"
SOURCE_TEST_SET = "test_set"


@dataclass(frozen=True, slots=True)
class EvaluationReport:
    """A head's quality on data it was not trained on (evaluation.py computes it). With
    `examples` 0 there was no held-out data: every figure is then 0 and means nothing."""

    source: str
    examples: int
    accuracy: float
    macro_f1: float
    log_loss: float  # with the calibrated scores
    ece_uncalibrated: float
    ece: float
    temperature: float
    # top_k_accuracy[k-1]: top-k accuracy, k = 1 .. min(5, classes)
    top_k_accuracy: tuple[float, ...] = ()
    per_class: tuple[ClassMetrics, ...] = ()
    # row-major [true][predicted], in the head's class order; () above 100 classes
    confusion_matrix: tuple[int, ...] = ()

    def summary(self) -> EvaluationReport:
        """The report without its per-class rows and confusion matrix (what a `completed`
        event carries: GetHead has the whole report)."""
        return replace(self, per_class=(), confusion_matrix=())


@dataclass(frozen=True, slots=True)
class DatasetInfo:
    dataset_id: str
    example_count: int
    class_counts: tuple[tuple[str, int], ...]
    modality: Modality
    tenant: str = DEFAULT_TENANT


class JobState(enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)


# ---- job events: the payloads of FineTuneEvent ----


@dataclass(frozen=True, slots=True)
class TrainingPlan:
    epochs: int
    batch_size: int
    learning_rate: float
    trainable_blocks: int
    augment: bool
    cached_features: bool
    steps_per_epoch: int
    device: str
    early_stopping_patience: int
    head_type: str = "linear"
    unfreeze_every_epochs: int = 0
    layer_lr_decay: float = 0.5
    label_smoothing: float = 0.0
    solver: str = "adamw"
    cv_folds: int = 0


@dataclass(frozen=True, slots=True)
class JobStarted:
    backbone: str
    head_name: str
    class_names: tuple[str, ...]
    train_examples: int
    validation_examples: int
    plan: TrainingPlan
    class_counts: tuple[tuple[str, int], ...]
    imbalance_ratio: float = 1.0
    class_balance: str = "none"


# TrainingProgress.phase of the events that score one L2 strength each (solver lbfgs_cv).
CROSS_VALIDATION_PHASE = "cross_validation"


@dataclass(frozen=True, slots=True)
class TrainingProgress:
    phase: str
    epoch: int
    epochs: int
    step: int
    total_steps: int
    train_loss: float
    train_accuracy: float
    validation_loss: float | None
    validation_accuracy: float | None
    learning_rate: float
    examples_per_second: float
    elapsed_seconds: float
    eta_seconds: float
    epoch_end: bool
    # phase "cross_validation": the inverse L2 strength this event scores
    regularization_c: float | None = None

    @property
    def supersedes_previous(self) -> bool:
        """A mid-epoch step update, made stale by the next one, so it may be coalesced. An
        epoch's end closes the epoch, and a cross-validation event scores its own C (one
        event per C is the API's contract): those always go out."""
        return not self.epoch_end and self.phase != CROSS_VALIDATION_PHASE


@dataclass(frozen=True, slots=True)
class JobQueued:
    """A job's first event, stored and sent as it is accepted (before a slot is free)."""

    backbone: str
    head_name: str


@dataclass(frozen=True, slots=True)
class JobCompleted:
    head_id: str
    metrics: TrainingMetrics
    # The head's report without per-class rows (EvaluationReport.summary); None from
    # events stored before reports existed.
    evaluation: EvaluationReport | None = None
    # The head's version under its name; 0 in events stored before versions existed.
    head_version: int = 0


@dataclass(frozen=True, slots=True)
class JobFailed:
    reason: str
    code: str


@dataclass(frozen=True, slots=True)
class JobCancelled:
    reason: str


@dataclass(frozen=True, slots=True)
class JobWarning:
    code: str
    message: str


@dataclass(frozen=True, slots=True)
class CandidateResult:
    backbone: str
    validation_accuracy: float
    gflops: float
    accuracy_per_gflop: float
    latency_ms: float
    selected: bool


EventPayload = (
    JobQueued
    | JobStarted
    | TrainingProgress
    | JobCompleted
    | JobFailed
    | JobCancelled
    | JobWarning
    | CandidateResult
)


@dataclass(frozen=True, slots=True)
class JobEvent:
    job_id: str
    sequence: int
    time: datetime
    payload: EventPayload

    @property
    def terminal(self) -> bool:
        return isinstance(self.payload, JobCompleted | JobFailed | JobCancelled)


@dataclass(slots=True)
class JobRecord:
    job_id: str
    state: JobState
    backbone: str
    head_name: str
    created_time: datetime
    updated_time: datetime
    head_id: str = ""
    error: str = ""
    last_sequence: int = 0
    progress: TrainingProgress | None = field(default=None)
    tenant: str = DEFAULT_TENANT
    # Which run of the job this is: 0 until a replica claims it from the queue, 1 for the
    # first run, more after a run was cut off (its replica stopped) and another took over.
    # A record carrying an attempt is the fencing token of that run's writes: the store
    # refuses them (LeaseLostError) once a later run holds the job.
    attempt: int = 0


@dataclass(frozen=True, slots=True)
class ClaimedJob:
    """A job a replica took from the queue (Store.claim_job). `record` is its row as stored
    (QUEUED, or RUNNING when a previous run was cut off) with `attempt` set to this run's
    number and `last_sequence` to its newest logged event's (this run's events follow it).
    `spec` carries the examples; None for a job stored by older code without them."""

    record: JobRecord
    spec: FineTuneSpec | None
