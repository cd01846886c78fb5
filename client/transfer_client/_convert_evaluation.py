"""A head's evaluation report, from its protobuf message to the SDK's dataclass."""

from __future__ import annotations

from transfer_client.proto import transfer_service_pb2 as pb
from transfer_client.types import ClassMetrics, EvaluationReport


def evaluation_from_pb(message: pb.EvaluationReport) -> EvaluationReport:
    classes = len(message.per_class)
    cells = list(message.confusion_matrix)
    matrix = (
        tuple(tuple(cells[row * classes : (row + 1) * classes]) for row in range(classes))
        if classes and len(cells) == classes * classes
        else ()
    )
    return EvaluationReport(
        source=message.source,
        examples=message.examples,
        accuracy=message.accuracy,
        macro_f1=message.macro_f1,
        top_k_accuracy=tuple(message.top_k_accuracy),
        log_loss=message.log_loss,
        ece_uncalibrated=message.ece_uncalibrated,
        ece=message.ece,
        temperature=message.temperature,
        per_class=tuple(
            ClassMetrics(row.label, row.precision, row.recall, row.f1, row.support)
            for row in message.per_class
        ),
        confusion_matrix=matrix,
    )


def optional_evaluation(message: pb.Head | pb.JobCompleted) -> EvaluationReport | None:
    return evaluation_from_pb(message.evaluation) if message.HasField("evaluation") else None
