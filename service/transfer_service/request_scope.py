"""Values that belong to the RPC being handled, set by the request interceptor at the edge.

Context variables rather than arguments for what crosses layers that should not know about
each other: the log formatter reads the request id, the servicer reads the tenant and hands
it to the domain as a plain `tenant: str`. Nothing here imports grpc.
"""

from __future__ import annotations

from contextvars import ContextVar

# Unset outside an RPC (start-up, training threads): log lines then carry no request id.
request_id: ContextVar[str] = ContextVar("request_id")
# Deliberately without a default: a call that reached the servicer without passing the
# interceptor fails (INTERNAL) instead of running as some tenant by accident.
tenant: ContextVar[str] = ContextVar("tenant")


def current_tenant() -> str:
    """The authenticated tenant of the current RPC; LookupError outside one."""
    return tenant.get()


def current_request_id() -> str | None:
    return request_id.get(None)
