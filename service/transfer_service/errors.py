"""Domain errors. No transport types here; each class names its gRPC status as plain text
(`status_name`), and status.py turns that into a grpc.StatusCode at the edge."""

from __future__ import annotations

from typing import ClassVar


class ServiceError(Exception):
    """Base of every error the service reports to a caller on purpose."""

    status_name: ClassVar[str] = "INTERNAL"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class NotFoundError(ServiceError):
    """An unknown backbone, head, job or dataset."""

    status_name = "NOT_FOUND"


class InvalidArgumentError(ServiceError):
    """Malformed input: the message names the offending field. `field`, when given, is that
    field's path in the request (e.g. "examples[17].image"), which the edge also sends as a
    google.rpc.BadRequest field violation, so a client can map it back to its own input (the
    file behind examples[17]) without parsing the message."""

    status_name = "INVALID_ARGUMENT"

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field

    @property
    def field_description(self) -> str:
        """The message without its leading "<field>: ", for the field violation."""
        prefix = f"{self.field}: "
        return self.message.removeprefix(prefix) if self.field else self.message


class FailedPreconditionError(ServiceError):
    """The request is well-formed but the system is not in a state to serve it."""

    status_name = "FAILED_PRECONDITION"


class UnreadableHeadError(FailedPreconditionError):
    """A head whose metadata cannot be read. Get and Predict answer FAILED_PRECONDITION; the
    head can still be deleted, by its owner: `owner` is the tenant from the head's `tenant`
    file, or None when that is missing too (heads saved before the file existed) or damaged.
    The operations layer takes an unknown owner to be DEFAULT_TENANT, as it does for head
    files written before tenancy, so with authentication on no other tenant can delete it
    (the operator can, by removing its directory)."""

    def __init__(self, head_id: str, problem: str, owner: str | None) -> None:
        super().__init__(
            f"head {head_id!r}: {problem}; the head is corrupt: delete it and train again"
        )
        self.owner = owner


class ResourceExhaustedError(ServiceError):
    """Too large, too many, or out of accelerator memory."""

    status_name = "RESOURCE_EXHAUSTED"


class UnavailableError(ServiceError):
    """Starting up or draining."""

    status_name = "UNAVAILABLE"


class JobCancelledError(ServiceError):
    """Raised inside a training job when its cancellation was requested."""

    status_name = "CANCELLED"


class LeaseLostError(ServiceError):
    """A write of a job's run that no longer holds the job: its lease expired (the replica
    stalled or lost the database for longer than a lease) and a later run took the job over.
    The stale run stops without writing anything more."""

    status_name = "ABORTED"


def status_name_of(error: BaseException) -> str:
    """The status a caller sees for `error`; anything unexpected is INTERNAL."""
    if isinstance(error, ServiceError):
        return error.status_name
    return "INTERNAL"


class ConfigurationError(Exception):
    """A setting points at something unusable (a missing certificate, a malformed tokens
    file): the server refuses to start and says which setting. Never sent to a caller."""
