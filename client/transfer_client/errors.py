"""The SDK's one exception tree, and the one place gRPC failures are translated into it."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import grpc
from google.protobuf.message import DecodeError
from google.rpc import error_details_pb2, status_pb2

from transfer_client.types import JobCancelled, JobFailed


@dataclass(frozen=True, slots=True)
class FieldViolation:
    """One bad field of a request, from the server's google.rpc.BadRequest details: `field`
    is its path in the request message (e.g. "examples[17].image": the 18th example of
    the call), `description` what is wrong with it."""

    field: str
    description: str

    @property
    def index(self) -> int | None:
        """The position in the request's repeated field the path starts with ("examples[17]"
        and "inputs[17].image" give 17), or None when it names no position."""
        head = self.field.split(".", 1)[0]
        if not head.endswith("]") or "[" not in head:
            return None
        position = head[head.index("[") + 1 : -1]
        return int(position) if position.isdigit() else None


class TransferError(Exception):
    """Any failure reported by the service. `code` is the gRPC status name; `request_id` is
    the id the server gave the call (its `x-request-id`, in every log line of the call), or
    None when no answer came (the server was unreachable) or the error is the client's own.
    `field_violations` names the request fields at fault, where the server said (an
    InvalidArgumentError about an example or input; empty otherwise)."""

    default_code = "UNKNOWN"

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        request_id: str | None = None,
        field_violations: Iterable[FieldViolation] = (),
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code or self.default_code
        self.request_id = request_id
        self.field_violations = tuple(field_violations)

    @property
    def details(self) -> str:
        """The server's message, under the name gRPC gives it."""
        return self.message

    def __repr__(self) -> str:
        request_id = f", request_id={self.request_id!r}" if self.request_id else ""
        return f"{type(self).__name__}({self.message!r}, code={self.code!r}{request_id})"


class NotFoundError(TransferError):
    default_code = "NOT_FOUND"


class InvalidArgumentError(TransferError):
    default_code = "INVALID_ARGUMENT"


class FailedPreconditionError(TransferError):
    default_code = "FAILED_PRECONDITION"


class ResourceExhaustedError(TransferError):
    default_code = "RESOURCE_EXHAUSTED"


class UnavailableError(TransferError):
    default_code = "UNAVAILABLE"


class DeadlineExceededError(TransferError):
    default_code = "DEADLINE_EXCEEDED"


class AuthenticationError(TransferError):
    default_code = "UNAUTHENTICATED"


class PermissionDeniedError(TransferError):
    default_code = "PERMISSION_DENIED"


class CancelledError(TransferError):
    default_code = "CANCELLED"


class InternalError(TransferError):
    default_code = "INTERNAL"


_ERROR_BY_CODE: dict[str, type[TransferError]] = {
    cls.default_code: cls
    for cls in (
        NotFoundError,
        InvalidArgumentError,
        FailedPreconditionError,
        ResourceExhaustedError,
        UnavailableError,
        DeadlineExceededError,
        AuthenticationError,
        PermissionDeniedError,
        CancelledError,
        InternalError,
    )
}


def error_for_code(
    code: str,
    message: str,
    *,
    request_id: str | None = None,
    field_violations: Iterable[FieldViolation] = (),
) -> TransferError:
    """The exception for a gRPC status name; codes without a subclass get the base class."""
    code = code.upper() or TransferError.default_code
    return _ERROR_BY_CODE.get(code, TransferError)(
        message, code=code, request_id=request_id, field_violations=field_violations
    )


_REQUEST_ID_KEY = "x-request-id"
# gRPC's rich error model: a serialised google.rpc.Status in the trailers.
_STATUS_DETAILS_KEY = "grpc-status-details-bin"


def _metadata_values(err: grpc.RpcError, key: str, names: tuple[str, ...]) -> list[str | bytes]:
    """The values of `key` in the failed call's metadata (`names`: which of its headers
    and trailers to read, in order)."""
    values: list[str | bytes] = []
    for name in names:
        read = getattr(err, name, None)
        if not callable(read):
            continue
        try:
            metadata = read()
        except Exception:  # a call that never reached a server has none
            continue
        values.extend(value for item_key, value in metadata or () if item_key == key)
    return values


def _request_id(err: grpc.RpcError) -> str | None:
    """The server's id for the failed call: in its response headers, or in the trailers of a
    trailers-only answer (a refusal before the call ran, e.g. while the server drains)."""
    for value in _metadata_values(err, _REQUEST_ID_KEY, ("initial_metadata", "trailing_metadata")):
        return value if isinstance(value, str) else value.decode(errors="replace")
    return None


def _field_violations(err: grpc.RpcError) -> tuple[FieldViolation, ...]:
    """The google.rpc.BadRequest field violations in the call's status details; none when
    the server sent no details or ones this SDK cannot read (the message still says it)."""
    violations: list[FieldViolation] = []
    for value in _metadata_values(err, _STATUS_DETAILS_KEY, ("trailing_metadata",)):
        status = status_pb2.Status()
        try:
            status.ParseFromString(value if isinstance(value, bytes) else value.encode())
        except DecodeError:
            continue
        for detail in status.details:
            bad_request = error_details_pb2.BadRequest()
            if detail.Is(bad_request.DESCRIPTOR) and detail.Unpack(bad_request):
                violations.extend(
                    FieldViolation(v.field, v.description) for v in bad_request.field_violations
                )
    return tuple(violations)


def from_rpc_error(err: grpc.RpcError) -> TransferError:
    """Translates a failed call, sync or async, into the matching `TransferError`."""
    # A bare `grpc.RpcError` (not a failed call) has neither `code()` nor `details()`.
    status = err.code() if callable(getattr(err, "code", None)) else None
    details = err.details() if callable(getattr(err, "details", None)) else None
    code = status.name if isinstance(status, grpc.StatusCode) else TransferError.default_code
    message = details or code.replace("_", " ").lower()
    return error_for_code(
        code, message, request_id=_request_id(err), field_violations=_field_violations(err)
    )


def from_job_outcome(event: JobFailed | JobCancelled) -> TransferError:
    """The exception a job's failed or cancelled event stands for."""
    if isinstance(event, JobCancelled):
        return CancelledError(event.reason or f"job {event.job_id} was cancelled")
    return error_for_code(event.code, event.reason or f"job {event.job_id} failed")
