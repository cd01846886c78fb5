"""Pure protobuf <-> domain conversions. No validation beyond what the wire format implies."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime

from google.protobuf.timestamp_pb2 import Timestamp
from transfer_client.proto import transfer_service_pb2 as pb

from transfer_service.backbones.cache import BackboneStatus
from transfer_service.domain import (
    DatasetInfo,
    EvaluationReport,
    HeadRecord,
    JobState,
    LabeledExample,
    Modality,
    ModelInput,
    PredictionResult,
    TrainingConfig,
    TrainingMetrics,
)
from transfer_service.errors import InvalidArgumentError
from transfer_service.head_operations import HeadPredictions
from transfer_service.operations import FineTuneCall
from transfer_service.training.validation import TrainingConfigRequest

_MODALITY = {Modality.IMAGE: pb.MODALITY_IMAGE, Modality.TEXT: pb.MODALITY_TEXT}
JOB_STATE = {
    JobState.QUEUED: pb.JOB_STATE_QUEUED,
    JobState.RUNNING: pb.JOB_STATE_RUNNING,
    JobState.SUCCEEDED: pb.JOB_STATE_SUCCEEDED,
    JobState.FAILED: pb.JOB_STATE_FAILED,
    JobState.CANCELLED: pb.JOB_STATE_CANCELLED,
}


def job_state_filter(state: pb.JobState.ValueType) -> JobState | None:
    """ListJobs' state filter: UNSPECIFIED is any state; a number outside the enum (open
    enums carry them) is INVALID_ARGUMENT."""
    if state == pb.JOB_STATE_UNSPECIFIED:
        return None
    for domain_state, wire_state in JOB_STATE.items():
        if wire_state == state:
            return domain_state
    raise InvalidArgumentError(f"state: {state} is not a job state")


def timestamp(moment: datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(moment)
    return stamp


def model_input(message: pb.Input | pb.Example, field: str) -> ModelInput:
    kind = message.WhichOneof("input")
    if kind == "image":
        return ModelInput(image=message.image)
    if kind == "text":
        return ModelInput(text=message.text)
    raise InvalidArgumentError(f"{field}: neither image nor text is set", field=field)


def model_inputs(messages: Iterable[pb.Input]) -> list[ModelInput]:
    return [model_input(message, f"inputs[{i}]") for i, message in enumerate(messages)]


def labeled_examples(
    messages: Iterable[pb.Example], field: str = "examples"
) -> list[LabeledExample]:
    return [
        LabeledExample(model_input(message, f"{field}[{i}]"), message.label)
        for i, message in enumerate(messages)
    ]


def training_config_request(config: pb.TrainingConfig) -> TrainingConfigRequest:
    return TrainingConfigRequest(
        epochs=config.epochs,
        batch_size=config.batch_size,
        learning_rate=config.learning_rate,
        trainable_blocks=config.trainable_blocks,
        validation_fraction=(
            config.validation_fraction if config.HasField("validation_fraction") else None
        ),
        early_stopping_patience=(
            config.early_stopping_patience if config.HasField("early_stopping_patience") else None
        ),
        augment=config.augment if config.HasField("augment") else None,
        seed=config.seed,
        progress_every_steps=config.progress_every_steps,
        head_type=config.head_type,
        hidden_dim=config.hidden_dim,
        dropout=config.dropout if config.HasField("dropout") else None,
        label_smoothing=config.label_smoothing if config.HasField("label_smoothing") else None,
        weight_decay=config.weight_decay if config.HasField("weight_decay") else None,
        unfreeze_every_epochs=config.unfreeze_every_epochs,
        layer_lr_decay=config.layer_lr_decay if config.HasField("layer_lr_decay") else None,
        class_balance=config.class_balance,
        prototype_temperature=config.prototype_temperature,
        max_grad_norm=config.max_grad_norm if config.HasField("max_grad_norm") else None,
        solver=config.solver,
        cv_folds=config.cv_folds,
    )


def training_config(config: TrainingConfig) -> pb.TrainingConfig:
    return pb.TrainingConfig(
        epochs=config.epochs,
        batch_size=config.batch_size,
        learning_rate=config.learning_rate,
        trainable_blocks=config.trainable_blocks,
        validation_fraction=config.validation_fraction,
        early_stopping_patience=config.early_stopping_patience,
        augment=config.augment,
        seed=config.seed,
        progress_every_steps=config.progress_every_steps,
        head_type=config.head_type,
        hidden_dim=config.hidden_dim,
        dropout=config.dropout,
        label_smoothing=config.label_smoothing,
        weight_decay=config.weight_decay,
        unfreeze_every_epochs=config.unfreeze_every_epochs,
        layer_lr_decay=config.layer_lr_decay,
        class_balance=config.class_balance,
        prototype_temperature=config.prototype_temperature,
        max_grad_norm=config.max_grad_norm,
        solver=config.solver,
        cv_folds=config.cv_folds,
    )


def backbone(status: BackboneStatus) -> pb.Backbone:
    spec = status.spec
    message = pb.Backbone(
        name=spec.name,
        modality=_MODALITY[spec.modality],
        architecture=spec.architecture,
        pretrained_on=spec.pretrained_on,
        parameter_count=status.parameter_count,
        feature_dim=spec.feature_dim,
        input_size=status.input_size,
        unfreezable_blocks=status.unfreezable_blocks,
        unavailable_reason=status.unavailable_reason,
    )
    if status.loaded is not None:
        message.state = pb.BACKBONE_STATE_LOADED
        message.device = str(status.loaded.device)
        message.resident_bytes = status.loaded.resident_bytes
        message.precision = status.loaded.precision
        message.measured_inputs_per_second = status.loaded.serving_inputs_per_second
        serving = status.loaded.serving
        message.compiled = (
            serving.current.compiled if serving is not None else status.loaded.compiled is not None
        )
    elif status.available:
        message.state = pb.BACKBONE_STATE_AVAILABLE
    else:
        message.state = pb.BACKBONE_STATE_UNAVAILABLE
    return message


def prediction(result: PredictionResult) -> pb.Prediction:
    return pb.Prediction(
        label=result.label,
        score=result.score,
        top_k=[pb.ClassScore(label=s.label, score=s.score) for s in result.top_k],
        embedding=result.embedding,
    )


def multi_head_response(answers: list[HeadPredictions]) -> pb.PredictResponse:
    """Every head's predictions in `heads`; the first head's also where a single-head
    Predict puts them (`head_id`, `predictions`)."""
    heads = [
        pb.HeadPredictions(
            head_id=a.head_id,
            head_version=a.head_version,
            predictions=[prediction(r) for r in a.predictions],
        )
        for a in answers
    ]
    return pb.PredictResponse(
        head_id=heads[0].head_id,
        head_version=heads[0].head_version,
        predictions=heads[0].predictions,
        heads=heads,
    )


def predict_response(head: HeadRecord, results: list[PredictionResult]) -> pb.PredictResponse:
    return pb.PredictResponse(
        head_id=head.head_id,
        head_version=head.version,
        predictions=[prediction(r) for r in results],
    )


def metrics(values: TrainingMetrics) -> pb.TrainingMetrics:
    message = pb.TrainingMetrics(
        train_loss=values.train_loss,
        train_accuracy=values.train_accuracy,
        best_epoch=values.best_epoch,
        epochs_run=values.epochs_run,
        stopped_early=values.stopped_early,
        training_seconds=values.training_seconds,
    )
    if values.validation_loss is not None:
        message.validation_loss = values.validation_loss
    if values.validation_accuracy is not None:
        message.validation_accuracy = values.validation_accuracy
    if values.train_validation_gap is not None:
        message.train_validation_gap = values.train_validation_gap
    if values.majority_baseline_accuracy is not None:
        message.majority_baseline_accuracy = values.majority_baseline_accuracy
    message.beats_baseline = values.beats_baseline
    if values.regularization_c is not None:
        message.regularization_c = values.regularization_c
    return message


def head(record: HeadRecord, aliases: tuple[str, ...] = (), *, summary: bool = False) -> pb.Head:
    """`aliases`: those of its name pointing at it. `summary`: the evaluation without
    per-class rows and confusion matrix (listings: a page of 100-class heads would otherwise
    carry a million matrix cells)."""
    message = pb.Head(
        head_id=record.head_id,
        name=record.name,
        backbone=record.backbone,
        modality=_MODALITY[record.modality],
        class_names=record.class_names,
        trainable_blocks=record.trainable_blocks,
        input_size=record.input_size,
        metrics=metrics(record.metrics),
        config=training_config(record.config),
        created_time=timestamp(record.created_time),
        size_bytes=record.size_bytes,
        job_id=record.job_id,
        head_type=record.head_type,
        version=record.version,
        aliases=aliases,
    )
    if record.evaluation is not None:
        report = record.evaluation.summary() if summary else record.evaluation
        message.evaluation.CopyFrom(evaluation_report(report))
    return message


def evaluation_report(report: EvaluationReport) -> pb.EvaluationReport:
    return pb.EvaluationReport(
        source=report.source,
        examples=report.examples,
        accuracy=report.accuracy,
        macro_f1=report.macro_f1,
        top_k_accuracy=report.top_k_accuracy,
        log_loss=report.log_loss,
        ece_uncalibrated=report.ece_uncalibrated,
        ece=report.ece,
        temperature=report.temperature,
        per_class=[
            pb.ClassMetrics(
                label=row.label,
                precision=row.precision,
                recall=row.recall,
                f1=row.f1,
                support=row.support,
            )
            for row in report.per_class
        ],
        confusion_matrix=report.confusion_matrix,
    )


def dataset_info(info: DatasetInfo) -> pb.UploadDatasetResponse:
    return pb.UploadDatasetResponse(
        dataset_id=info.dataset_id,
        example_count=info.example_count,
        class_counts=[pb.ClassCount(label=k, count=v) for k, v in info.class_counts],
        modality=_MODALITY[info.modality],
    )


def fine_tune_call(request: pb.FineTuneRequest) -> FineTuneCall:
    return FineTuneCall(
        backbone=request.backbone,
        head_name=request.head_name,
        examples=labeled_examples(request.examples),
        dataset_id=request.dataset_id,
        config=training_config_request(request.config),
        validation_examples=labeled_examples(request.validation_examples, "validation_examples"),
        validation_dataset_id=request.validation_dataset_id,
        candidate_backbones=tuple(request.candidate_backbones),
        request_id=request.request_id,
    )
