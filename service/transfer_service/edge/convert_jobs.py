"""Job conversions, domain to protobuf: a job's record and each event of its stream."""

from __future__ import annotations

from transfer_client.proto import transfer_service_pb2 as pb

from transfer_service.domain import (
    CandidateResult,
    JobCancelled,
    JobCompleted,
    JobEvent,
    JobFailed,
    JobQueued,
    JobRecord,
    JobStarted,
    JobWarning,
    TrainingProgress,
)
from transfer_service.edge.convert import (
    JOB_STATE,
    evaluation_report,
    metrics,
    timestamp,
)


def progress(values: TrainingProgress) -> pb.TrainingProgress:
    message = pb.TrainingProgress(
        phase=values.phase,
        epoch=values.epoch,
        epochs=values.epochs,
        step=values.step,
        total_steps=values.total_steps,
        train_loss=values.train_loss,
        train_accuracy=values.train_accuracy,
        learning_rate=values.learning_rate,
        examples_per_second=values.examples_per_second,
        elapsed_seconds=values.elapsed_seconds,
        eta_seconds=values.eta_seconds,
        epoch_end=values.epoch_end,
    )
    if values.validation_loss is not None:
        message.validation_loss = values.validation_loss
    if values.validation_accuracy is not None:
        message.validation_accuracy = values.validation_accuracy
    if values.regularization_c is not None:
        message.regularization_c = values.regularization_c
    return message


def event(value: JobEvent) -> pb.FineTuneEvent:
    message = pb.FineTuneEvent(
        job_id=value.job_id, sequence=value.sequence, time=timestamp(value.time)
    )
    payload = value.payload
    if isinstance(payload, JobStarted):
        plan = payload.plan
        message.started.CopyFrom(
            pb.JobStarted(
                backbone=payload.backbone,
                head_name=payload.head_name,
                class_names=payload.class_names,
                train_examples=payload.train_examples,
                validation_examples=payload.validation_examples,
                plan=pb.TrainingPlan(
                    epochs=plan.epochs,
                    batch_size=plan.batch_size,
                    learning_rate=plan.learning_rate,
                    trainable_blocks=plan.trainable_blocks,
                    augment=plan.augment,
                    cached_features=plan.cached_features,
                    steps_per_epoch=plan.steps_per_epoch,
                    device=plan.device,
                    early_stopping_patience=plan.early_stopping_patience,
                    head_type=plan.head_type,
                    unfreeze_every_epochs=plan.unfreeze_every_epochs,
                    layer_lr_decay=plan.layer_lr_decay,
                    label_smoothing=plan.label_smoothing,
                    solver=plan.solver,
                    cv_folds=plan.cv_folds,
                ),
                class_counts=[pb.ClassCount(label=k, count=v) for k, v in payload.class_counts],
                imbalance_ratio=payload.imbalance_ratio,
                class_balance=payload.class_balance,
            )
        )
    elif isinstance(payload, TrainingProgress):
        message.progress.CopyFrom(progress(payload))
    elif isinstance(payload, JobCompleted):
        completed = pb.JobCompleted(
            head_id=payload.head_id,
            head_version=payload.head_version,
            metrics=metrics(payload.metrics),
        )
        if payload.evaluation is not None:
            completed.evaluation.CopyFrom(evaluation_report(payload.evaluation.summary()))
        message.completed.CopyFrom(completed)
    elif isinstance(payload, JobFailed):
        message.failed.CopyFrom(pb.JobFailed(reason=payload.reason, code=payload.code))
    elif isinstance(payload, JobCancelled):
        message.cancelled.CopyFrom(pb.JobCancelled(reason=payload.reason))
    elif isinstance(payload, JobQueued):
        message.queued.CopyFrom(
            pb.JobQueued(backbone=payload.backbone, head_name=payload.head_name)
        )
    elif isinstance(payload, JobWarning):
        message.warning.CopyFrom(pb.JobWarning(code=payload.code, message=payload.message))
    elif isinstance(payload, CandidateResult):
        message.candidate.CopyFrom(
            pb.CandidateResult(
                backbone=payload.backbone,
                validation_accuracy=payload.validation_accuracy,
                gflops=payload.gflops,
                accuracy_per_gflop=payload.accuracy_per_gflop,
                latency_ms=payload.latency_ms,
                selected=payload.selected,
            )
        )
    return message


def job(record: JobRecord) -> pb.Job:
    message = pb.Job(
        job_id=record.job_id,
        state=JOB_STATE[record.state],
        backbone=record.backbone,
        head_name=record.head_name,
        head_id=record.head_id,
        error=record.error,
        created_time=timestamp(record.created_time),
        updated_time=timestamp(record.updated_time),
        last_sequence=record.last_sequence,
    )
    if record.progress is not None:
        message.progress.CopyFrom(progress(record.progress))
    return message
