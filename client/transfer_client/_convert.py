"""Protobuf messages to the SDK's dataclasses (requests are built in _requests.py)."""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import TypeVar

from google.protobuf.timestamp_pb2 import Timestamp

from transfer_client._convert_evaluation import evaluation_from_pb as evaluation_from_pb
from transfer_client._convert_evaluation import optional_evaluation
from transfer_client.errors import InternalError
from transfer_client.proto import transfer_service_pb2 as pb
from transfer_client.types import (
    Backbone,
    BackboneState,
    CandidateResult,
    ClassScore,
    DatasetInfo,
    FineTuneEvent,
    Head,
    Job,
    JobCancelled,
    JobCompleted,
    JobFailed,
    JobProgress,
    JobQueued,
    JobStarted,
    JobState,
    JobWarning,
    Modality,
    Prediction,
    TrainingConfig,
    TrainingMetrics,
    TrainingPlan,
    TrainingProgress,
)

_MODALITIES: Mapping[int, Modality] = {
    pb.MODALITY_IMAGE: Modality.IMAGE,
    pb.MODALITY_TEXT: Modality.TEXT,
}
_BACKBONE_STATES: Mapping[int, BackboneState] = {
    pb.BACKBONE_STATE_AVAILABLE: BackboneState.AVAILABLE,
    pb.BACKBONE_STATE_LOADED: BackboneState.LOADED,
    pb.BACKBONE_STATE_UNAVAILABLE: BackboneState.UNAVAILABLE,
}
_JOB_STATES: Mapping[int, JobState] = {
    pb.JOB_STATE_QUEUED: JobState.QUEUED,
    pb.JOB_STATE_RUNNING: JobState.RUNNING,
    pb.JOB_STATE_SUCCEEDED: JobState.SUCCEEDED,
    pb.JOB_STATE_FAILED: JobState.FAILED,
    pb.JOB_STATE_CANCELLED: JobState.CANCELLED,
}

_EnumT = TypeVar("_EnumT")


def job_state_to_pb(state: JobState) -> pb.JobState.ValueType:
    for wire, value in _JOB_STATES.items():
        if value is state:
            return wire  # type: ignore[return-value]
    raise ValueError(f"not a job state: {state!r}")


def _enum(mapping: Mapping[int, _EnumT], value: int, what: str) -> _EnumT:
    try:
        return mapping[value]
    except KeyError:
        raise InternalError(f"the server sent an unknown {what} value {value}") from None


def _float32(value: float) -> float:
    """The shortest decimal that is the same float32: 0.001, not 0.0010000000474974513."""
    packed = struct.pack("<f", value)
    for digits in range(6, 10):
        shortest = float(f"{value:.{digits}g}")
        if struct.pack("<f", shortest) == packed:
            return shortest
    return value


def _time(timestamp: Timestamp) -> datetime:
    return timestamp.ToDatetime(tzinfo=UTC)


def _class_counts(counts: Iterable[pb.ClassCount]) -> dict[str, int]:
    return {count.label: count.count for count in counts}


# --- responses -----------------------------------------------------------------------------


def backbone_from_pb(message: pb.Backbone) -> Backbone:
    return Backbone(
        name=message.name,
        modality=_enum(_MODALITIES, message.modality, "modality"),
        architecture=message.architecture,
        pretrained_on=message.pretrained_on,
        parameter_count=message.parameter_count,
        feature_dim=message.feature_dim,
        input_size=message.input_size,
        unfreezable_blocks=message.unfreezable_blocks,
        state=_enum(_BACKBONE_STATES, message.state, "backbone state"),
        unavailable_reason=message.unavailable_reason,
        device=message.device,
        resident_bytes=message.resident_bytes,
        precision=message.precision,
        measured_inputs_per_second=_float32(message.measured_inputs_per_second),
        compiled=message.compiled,
    )


def prediction_from_pb(
    message: pb.Prediction, head_id: str = "", head_version: int = 0
) -> Prediction:
    """One input's prediction, with the head that answered (from the enclosing response)."""
    return Prediction(
        label=message.label,
        score=_float32(message.score),
        top_k=tuple(ClassScore(s.label, _float32(s.score)) for s in message.top_k),
        embedding=tuple(message.embedding),
        head_id=head_id,
        head_version=head_version,
    )


def predictions_from_pb(message: pb.PredictResponse | pb.HeadPredictions) -> list[Prediction]:
    return [
        prediction_from_pb(p, message.head_id, message.head_version) for p in message.predictions
    ]


def training_config_from_pb(message: pb.TrainingConfig) -> TrainingConfig:
    return TrainingConfig(
        epochs=message.epochs,
        batch_size=message.batch_size,
        learning_rate=_float32(message.learning_rate),
        trainable_blocks=message.trainable_blocks,
        validation_fraction=(
            _float32(message.validation_fraction)
            if message.HasField("validation_fraction")
            else None
        ),
        early_stopping_patience=(
            message.early_stopping_patience if message.HasField("early_stopping_patience") else None
        ),
        augment=message.augment if message.HasField("augment") else None,
        seed=message.seed,
        progress_every_steps=message.progress_every_steps,
        head_type=message.head_type,
        hidden_dim=message.hidden_dim,
        dropout=_float32(message.dropout) if message.HasField("dropout") else None,
        label_smoothing=(
            _float32(message.label_smoothing) if message.HasField("label_smoothing") else None
        ),
        weight_decay=_float32(message.weight_decay) if message.HasField("weight_decay") else None,
        unfreeze_every_epochs=message.unfreeze_every_epochs,
        layer_lr_decay=(
            _float32(message.layer_lr_decay) if message.HasField("layer_lr_decay") else None
        ),
        class_balance=message.class_balance,
        prototype_temperature=_float32(message.prototype_temperature),
        max_grad_norm=(
            _float32(message.max_grad_norm) if message.HasField("max_grad_norm") else None
        ),
        solver=message.solver,
        cv_folds=message.cv_folds,
    )


def training_plan_from_pb(message: pb.TrainingPlan) -> TrainingPlan:
    return TrainingPlan(
        epochs=message.epochs,
        batch_size=message.batch_size,
        learning_rate=_float32(message.learning_rate),
        trainable_blocks=message.trainable_blocks,
        augment=message.augment,
        cached_features=message.cached_features,
        steps_per_epoch=message.steps_per_epoch,
        device=message.device,
        early_stopping_patience=message.early_stopping_patience,
        head_type=message.head_type,
        unfreeze_every_epochs=message.unfreeze_every_epochs,
        layer_lr_decay=_float32(message.layer_lr_decay),
        label_smoothing=_float32(message.label_smoothing),
        solver=message.solver,
        cv_folds=message.cv_folds,
    )


def training_progress_from_pb(message: pb.TrainingProgress) -> TrainingProgress:
    return TrainingProgress(
        epoch=message.epoch,
        epochs=message.epochs,
        step=message.step,
        total_steps=message.total_steps,
        train_loss=_float32(message.train_loss),
        train_accuracy=_float32(message.train_accuracy),
        validation_loss=(
            _float32(message.validation_loss) if message.HasField("validation_loss") else None
        ),
        validation_accuracy=(
            _float32(message.validation_accuracy)
            if message.HasField("validation_accuracy")
            else None
        ),
        learning_rate=_float32(message.learning_rate),
        examples_per_second=_float32(message.examples_per_second),
        elapsed_seconds=message.elapsed_seconds,
        eta_seconds=message.eta_seconds,
        epoch_end=message.epoch_end,
        # `phase` came later than the rest; servers built from an older contract lack it.
        phase=str(getattr(message, "phase", "")),
        regularization_c=(
            _float32(message.regularization_c) if message.HasField("regularization_c") else None
        ),
    )


def training_metrics_from_pb(message: pb.TrainingMetrics) -> TrainingMetrics:
    return TrainingMetrics(
        train_loss=_float32(message.train_loss),
        train_accuracy=_float32(message.train_accuracy),
        validation_loss=(
            _float32(message.validation_loss) if message.HasField("validation_loss") else None
        ),
        validation_accuracy=(
            _float32(message.validation_accuracy)
            if message.HasField("validation_accuracy")
            else None
        ),
        best_epoch=message.best_epoch,
        epochs_run=message.epochs_run,
        stopped_early=message.stopped_early,
        training_seconds=message.training_seconds,
        train_validation_gap=(
            _float32(message.train_validation_gap)
            if message.HasField("train_validation_gap")
            else None
        ),
        majority_baseline_accuracy=(
            _float32(message.majority_baseline_accuracy)
            if message.HasField("majority_baseline_accuracy")
            else None
        ),
        beats_baseline=message.beats_baseline,
        regularization_c=(
            _float32(message.regularization_c) if message.HasField("regularization_c") else None
        ),
    )


def event_from_pb(message: pb.FineTuneEvent) -> FineTuneEvent | None:
    """The event, or None for a kind this SDK does not know yet (a newer server's)."""
    job_id, sequence, time = message.job_id, message.sequence, _time(message.time)
    match message.WhichOneof("event"):
        case "started":
            started = message.started
            return JobStarted(
                job_id=job_id,
                sequence=sequence,
                time=time,
                backbone=started.backbone,
                head_name=started.head_name,
                class_names=tuple(started.class_names),
                train_examples=started.train_examples,
                validation_examples=started.validation_examples,
                plan=training_plan_from_pb(started.plan),
                class_counts=_class_counts(started.class_counts),
                imbalance_ratio=_float32(started.imbalance_ratio),
                class_balance=started.class_balance,
            )
        case "progress":
            return JobProgress(
                job_id=job_id,
                sequence=sequence,
                time=time,
                progress=training_progress_from_pb(message.progress),
            )
        case "completed":
            return JobCompleted(
                job_id=job_id,
                sequence=sequence,
                time=time,
                head_id=message.completed.head_id,
                metrics=training_metrics_from_pb(message.completed.metrics),
                evaluation=optional_evaluation(message.completed),
                head_version=message.completed.head_version,
            )
        case "failed":
            return JobFailed(
                job_id=job_id,
                sequence=sequence,
                time=time,
                reason=message.failed.reason,
                code=message.failed.code,
            )
        case "queued":
            return JobQueued(
                job_id=job_id,
                sequence=sequence,
                time=time,
                backbone=message.queued.backbone,
                head_name=message.queued.head_name,
            )
        case "cancelled":
            return JobCancelled(
                job_id=job_id, sequence=sequence, time=time, reason=message.cancelled.reason
            )
        case "warning":
            return JobWarning(
                job_id=job_id,
                sequence=sequence,
                time=time,
                code=message.warning.code,
                message=message.warning.message,
            )
        case "candidate":
            candidate = message.candidate
            return CandidateResult(
                job_id=job_id,
                sequence=sequence,
                time=time,
                backbone=candidate.backbone,
                validation_accuracy=_float32(candidate.validation_accuracy),
                gflops=candidate.gflops,
                accuracy_per_gflop=_float32(candidate.accuracy_per_gflop),
                latency_ms=candidate.latency_ms,
                selected=candidate.selected,
            )
        case _:
            return None


def job_from_pb(message: pb.Job) -> Job:
    return Job(
        job_id=message.job_id,
        state=_enum(_JOB_STATES, message.state, "job state"),
        backbone=message.backbone,
        head_name=message.head_name,
        head_id=message.head_id,
        error=message.error,
        created_time=_time(message.created_time),
        updated_time=_time(message.updated_time),
        last_sequence=message.last_sequence,
        progress=(
            training_progress_from_pb(message.progress) if message.HasField("progress") else None
        ),
    )


def head_from_pb(message: pb.Head) -> Head:
    return Head(
        head_id=message.head_id,
        name=message.name,
        backbone=message.backbone,
        modality=_enum(_MODALITIES, message.modality, "modality"),
        class_names=tuple(message.class_names),
        trainable_blocks=message.trainable_blocks,
        input_size=message.input_size,
        metrics=training_metrics_from_pb(message.metrics),
        config=training_config_from_pb(message.config),
        created_time=_time(message.created_time),
        size_bytes=message.size_bytes,
        job_id=message.job_id,
        head_type=message.head_type,
        evaluation=optional_evaluation(message),
        version=message.version,
        aliases=tuple(message.aliases),
    )


def dataset_info_from_pb(message: pb.UploadDatasetResponse) -> DatasetInfo:
    return DatasetInfo(
        dataset_id=message.dataset_id,
        example_count=message.example_count,
        class_counts=_class_counts(message.class_counts),
        modality=_enum(_MODALITIES, message.modality, "modality"),
    )
