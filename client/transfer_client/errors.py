"""The SDK's one exception tree, and the one place gRPC failures are translated into it."""

from __future__ import annotations

import grpc

from transfer_client.types import JobCancelled, JobFailed


class TransferError(Exception):
    """Any failure reported by the service. `code` is the gRPC status name; `request_id` is
    the id the server gave the call (its `x-request-id`, in every log line of the call), or
    None when no answer came (the server was unreachable) or the error is the client's own."""

    default_code = "UNKNOWN"

    def __init__(
        self, message: str, *, code: str | None = None, request_id: str | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code or self.default_code
        self.request_id = request_id

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


def error_for_code(code: str, message: str, *, request_id: str | None = None) -> TransferError:
    """The exception for a gRPC status name; codes without a subclass get the base class."""
    code = code.upper() or TransferError.default_code
    return _ERROR_BY_CODE.get(code, TransferError)(message, code=code, request_id=request_id)


_REQUEST_ID_KEY = "x-request-id"


def _request_id(err: grpc.RpcError) -> str | None:
    """The server's id for the failed call: in its response headers, or in the trailers of a
    trailers-only answer (a refusal before the call ran, e.g. while the server drains)."""
    for name in ("initial_metadata", "trailing_metadata"):
        read = getattr(err, name, None)
        if not callable(read):
            continue
        try:
            metadata = read()
        except Exception:  # a call that never reached a server has none
            continue
        for key, value in metadata or ():
            if key == _REQUEST_ID_KEY:
                return value if isinstance(value, str) else value.decode(errors="replace")
    return None


def from_rpc_error(err: grpc.RpcError) -> TransferError:
    """Translates a failed call, sync or async, into the matching `TransferError`."""
    # A bare `grpc.RpcError` (not a failed call) has neither `code()` nor `details()`.
    status = err.code() if callable(getattr(err, "code", None)) else None
    details = err.details() if callable(getattr(err, "details", None)) else None
    code = status.name if isinstance(status, grpc.StatusCode) else TransferError.default_code
    message = details or code.replace("_", " ").lower()
    return error_for_code(code, message, request_id=_request_id(err))


def from_job_outcome(event: JobFailed | JobCancelled) -> TransferError:
    """The exception a job's failed or cancelled event stands for."""
    if isinstance(event, JobCancelled):
        return CancelledError(event.reason or f"job {event.job_id} was cancelled")
    return error_for_code(event.code, event.reason or f"job {event.job_id} failed")
