"""Client SDK of the transfer service: `TransferClient`, `AsyncTransferClient` and friends.

from transfer_client import TransferClient, TrainingConfig

with TransferClient("localhost:50051") as transfer:
    done = transfer.train("efficientnet-lite0", examples, config=TrainingConfig(epochs=5))
    predictions = transfer.predict(done.head_id, [Path("cat.jpg")], top_k=3)
"""

from transfer_client._aio import AsyncTransferClient
from transfer_client._channel import tls_credentials
from transfer_client._sync import TransferClient
from transfer_client.errors import (
    AuthenticationError,
    CancelledError,
    DeadlineExceededError,
    FailedPreconditionError,
    InternalError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    ResourceExhaustedError,
    TransferError,
    UnavailableError,
    error_for_code,
    from_job_outcome,
    from_rpc_error,
)
from transfer_client.types import (
    Backbone,
    BackboneState,
    CandidateResult,
    ClassScore,
    DatasetInfo,
    FineTuneEvent,
    Head,
    InputData,
    Job,
    JobCancelled,
    JobCompleted,
    JobFailed,
    JobProgress,
    JobQueued,
    JobStarted,
    JobState,
    JobWarning,
    LabelledExample,
    Modality,
    Prediction,
    TrainingConfig,
    TrainingMetrics,
    TrainingPlan,
    TrainingProgress,
)

__all__ = [
    "AsyncTransferClient",
    "AuthenticationError",
    "Backbone",
    "BackboneState",
    "CancelledError",
    "CandidateResult",
    "ClassScore",
    "DatasetInfo",
    "DeadlineExceededError",
    "FailedPreconditionError",
    "FineTuneEvent",
    "Head",
    "InputData",
    "InternalError",
    "InvalidArgumentError",
    "Job",
    "JobCancelled",
    "JobCompleted",
    "JobFailed",
    "JobProgress",
    "JobQueued",
    "JobStarted",
    "JobState",
    "JobWarning",
    "LabelledExample",
    "Modality",
    "NotFoundError",
    "PermissionDeniedError",
    "Prediction",
    "ResourceExhaustedError",
    "TrainingConfig",
    "TrainingMetrics",
    "TrainingPlan",
    "TrainingProgress",
    "TransferClient",
    "TransferError",
    "UnavailableError",
    "error_for_code",
    "from_job_outcome",
    "from_rpc_error",
    "tls_credentials",
]
