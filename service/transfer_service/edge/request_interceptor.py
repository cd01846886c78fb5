"""The server's edge for every TransferService call: request id, bearer-token auth, and refusal
while the server drains before it stops.

Each call gets a request id (the caller's `x-request-id` when it sent a sane one, else a new
one), sent back as initial metadata `x-request-id` and set in request_scope for the logs. A
unary call sends that metadata while its handler runs, not before it: waiting for the send to
complete first cost ~0.3 ms of every Predict's latency (and ~5% of its throughput at 8 callers)
on the development VM. With tokens configured, `authorization: Bearer <token>` must name a
known token (UNAUTHENTICATED otherwise); the token's tenant is set in request_scope, where the
servicer reads it. Without tokens every caller is DEFAULT_TENANT. Once `begin_draining()` was
called (SIGTERM), a call that starts is refused UNAVAILABLE, so the caller retries on another
replica; calls already running are not touched. Health and reflection pass untouched: probes
and tooling need no token, and a probe must read NOT_SERVING while the server drains.

After auth, the tenant's admission (edge/tenant_admission.py): a call over its tenant's rate
is held here for its token before its request message is even read, or refused
RESOURCE_EXHAUSTED with a `retry-after-ms` trailer, its message dropped unparsed; a unary call
over its tenant's in-flight bound waits for a slot when it starts. A call that ends
INVALID_ARGUMENT costs its tenant more tokens when it ends (TenantAdmission.charge_invalid_call).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import re
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

import grpc

from transfer_service import request_scope
from transfer_service.domain import DEFAULT_TENANT
from transfer_service.edge.tenant_admission import AdmissionLimits, Refusal, TenantAdmission
from transfer_service.edge.tenant_tokens import TenantTokens

log = logging.getLogger(__name__)

REQUEST_ID_KEY = "x-request-id"
EXEMPT_SERVICES = frozenset(
    {
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
        "grpc.reflection.v1.ServerReflection",
    }
)
# What a caller may choose as its request id: it goes into every log line of the call.
_REQUEST_ID_PATTERN = re.compile(r"^[A-Za-z0-9._:/+=-]{1,128}$")
_BEARER_PREFIX = "bearer "
DRAINING_DETAILS = "the server is shutting down; retry on another replica"

Context = grpc.aio.ServicerContext[Any, Any]
Behavior = Callable[..., Any]
if TYPE_CHECKING:  # generic only in the type stubs
    Handler = grpc.RpcMethodHandler[Any, Any]
    InterceptorBase = grpc.aio.ServerInterceptor[Any, Any]
else:
    InterceptorBase = grpc.aio.ServerInterceptor

# (request streaming, response streaming) -> the handler's behaviour and how to rebuild it.
_BEHAVIOR_ATTRIBUTE = {
    (False, False): "unary_unary",
    (False, True): "unary_stream",
    (True, False): "stream_unary",
    (True, True): "stream_stream",
}
_HANDLER_FACTORY: dict[tuple[bool, bool], Callable[..., Handler]] = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


class RequestInterceptor(InterceptorBase):
    def __init__(
        self,
        tokens: TenantTokens,
        on_rejected: Callable[[str, str], None] = lambda method, code: None,
        admission: TenantAdmission | None = None,
        on_throttled: Callable[[str], None] = lambda reason: None,
    ) -> None:
        """`on_rejected(method, code)` observes each call refused here (UNAUTHENTICATED,
        UNAVAILABLE while draining, RESOURCE_EXHAUSTED over its tenant's admission limits);
        `on_throttled(reason)` each admission refusal ('rate' or 'in_flight'). Without
        `admission`, no tenant is limited."""
        self._tokens = tokens
        self._on_rejected = on_rejected
        self._admission = admission or TenantAdmission(AdmissionLimits(0, 0, 0, 0))
        self._on_throttled = on_throttled
        self._draining = False
        # New request ids: 32 hex digits like a uuid4's, a random per-process half and a
        # counter (uuid4 reads the OS's randomness each time: 4% of the loop's Predict work).
        self._id_prefix = secrets.token_hex(8)
        self._id_counter = itertools.count(1)

    def begin_draining(self) -> None:
        """From now on every call that starts is refused UNAVAILABLE."""
        self._draining = True

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler:
        handler = await continuation(handler_call_details)
        method: str = handler_call_details.method
        if handler is None or _service_of(method) in EXEMPT_SERVICES:
            return handler
        metadata = {key: value for key, value in handler_call_details.invocation_metadata or ()}
        request_id = self._request_id(metadata.get(REQUEST_ID_KEY))
        tenant, refusal = self._authenticate(metadata.get("authorization"))
        short_method = method.rsplit("/", 1)[-1]
        if tenant is not None and not self._draining:
            # Before the request is read: a held call costs a timer, a refused one no parsing.
            throttled = await self._admission.take_token(tenant)
            if throttled is not None:
                return self._throttled_handler(handler, throttled, request_id, tenant, method)
        # Unary calls are bounded in flight; streams may run for hours (WatchJob).
        counted = not handler.request_streaming and not handler.response_streaming
        admitted: list[str] = []

        async def enter(context: Context) -> None:
            request_scope.request_id.set(request_id)
            # Checked when the call starts running, not when it was received: a call the
            # core queued before SIGTERM but Python picks up during the drain is refused
            # with a status the client can retry on, rather than cancelled by server.stop().
            if self._draining:
                self._on_rejected(method.rsplit("/", 1)[-1], "UNAVAILABLE")
                # No response headers before this status: gRPC retries (the SDK's retry
                # policy) only a call that received none, so the request id goes in the
                # trailers of this trailers-only answer.
                await context.abort(
                    grpc.StatusCode.UNAVAILABLE, DRAINING_DETAILS, _headers(request_id)
                )
            if refusal is not None:
                log.warning("refused %s from %s: %s", method, context.peer(), refusal)
                self._on_rejected(method.rsplit("/", 1)[-1], "UNAUTHENTICATED")
                await _refuse(context, request_id, grpc.StatusCode.UNAUTHENTICATED, refusal)
            assert tenant is not None
            request_scope.tenant.set(tenant)
            if counted:
                crowded = await self._admission.enter_flight(tenant)
                if crowded is not None:
                    self._count_throttled(short_method, crowded, tenant)
                    await context.abort(
                        grpc.StatusCode.RESOURCE_EXHAUSTED,
                        crowded.details,
                        _headers(request_id) + crowded.trailers(),
                    )
                admitted.append(tenant)

        def leave(context: Context) -> None:
            if admitted:
                self._admission.leave_flight(admitted.pop())
            if tenant is not None and context.code() == grpc.StatusCode.INVALID_ARGUMENT:
                self._admission.charge_invalid_call(tenant)  # garbage costs more tokens

        return _with_entry(handler, enter, request_id, method, leave)

    def _throttled_handler(
        self, handler: Handler, refusal: Refusal, request_id: str, tenant: str, method: str
    ) -> Handler:
        """A handler of the same kind that refuses the call RESOURCE_EXHAUSTED, its request
        message (or messages) dropped unparsed."""
        self._count_throttled(method.rsplit("/", 1)[-1], refusal, tenant)
        kind = (handler.request_streaming, handler.response_streaming)
        trailers = _headers(request_id) + refusal.trailers()

        async def refuse(request: Any, context: Context) -> None:
            request_scope.request_id.set(request_id)
            # No headers first: a trailers-only answer, as the draining refusal's.
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, refusal.details, trailers)

        behavior: Behavior = refuse
        if handler.response_streaming:

            async def refuse_stream(request: Any, context: Context) -> AsyncIterator[Any]:
                await refuse(request, context)
                yield None  # unreachable: abort raises; makes this an async generator

            behavior = refuse_stream
        return _HANDLER_FACTORY[kind](
            behavior,
            request_deserializer=_unparsed,
            response_serializer=handler.response_serializer,
        )

    def _count_throttled(self, method: str, refusal: Refusal, tenant: str) -> None:
        log.warning("refused %s of tenant %r: %s", method, tenant, refusal.details)
        self._on_rejected(method, "RESOURCE_EXHAUSTED")
        self._on_throttled(refusal.reason)

    def _request_id(self, offered: object) -> str:
        if isinstance(offered, str) and _REQUEST_ID_PATTERN.fullmatch(offered):
            return offered
        return f"{self._id_prefix}{next(self._id_counter):016x}"

    def _authenticate(self, authorization: object) -> tuple[str | None, str | None]:
        """(tenant, None) for an accepted call, (None, reason) for a refused one."""
        if not self._tokens.enabled:
            return DEFAULT_TENANT, None
        if not isinstance(authorization, str) or not authorization.strip():
            return None, "missing bearer token (metadata 'authorization: Bearer <token>')"
        if not authorization.lower().startswith(_BEARER_PREFIX):
            return None, "the authorization metadata is not 'Bearer <token>'"
        tenant = self._tokens.tenant_for(authorization[len(_BEARER_PREFIX) :].strip())
        if tenant is None:
            return None, "invalid bearer token"
        return tenant, None


def _unparsed(message: bytes) -> None:
    """A refused call's request deserializer: the bytes are dropped, never parsed."""
    return None


def _service_of(method: str) -> str:
    """'/package.Service/Method' -> 'package.Service'."""
    return method.lstrip("/").split("/", 1)[0]


def _headers(request_id: str) -> tuple[tuple[str, str]]:
    return ((REQUEST_ID_KEY, request_id),)


async def _refuse(context: Context, request_id: str, code: grpc.StatusCode, details: str) -> None:
    await context.send_initial_metadata(_headers(request_id))
    await context.abort(code, details)


class _HeadersFirstContext:
    """A unary call's context while its initial metadata is still on its way: the call's own
    context, except that `abort` waits for that send to complete. grpc adds an (empty)
    initial-metadata op to the status it sends unless the metadata went out already, and the
    core refuses a second one."""

    def __init__(self, context: Context, headers: asyncio.Future[None]) -> None:
        self._context = context
        self._headers = headers

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)

    async def abort(self, code: grpc.StatusCode, details: str = "", *args: Any) -> None:
        with contextlib.suppress(Exception):  # failed only if the call is over: abort anyway
            await self._headers
        await self._context.abort(code, details, *args)


def _with_entry(
    handler: Handler,
    enter: Callable[[Context], Awaitable[None]],
    request_id: str,
    method: str,
    leave: Callable[[Context], None] = lambda context: None,
) -> Handler:
    """The same handler with `enter(context)` run first inside the call, the request id sent as
    initial metadata, and a debug line with the duration after it. `leave(context)` runs when
    the call ends, whether `enter` let it run or not."""
    # On the aio server these are coroutine functions (unary responses) or async generator
    # functions (streamed responses); the stubs type them as the sync API's callables.
    kind = (handler.request_streaming, handler.response_streaming)
    inner: Behavior = getattr(handler, _BEHAVIOR_ATTRIBUTE[kind])
    make = _HANDLER_FACTORY[kind]

    behavior: Behavior
    if handler.response_streaming:

        async def stream_behavior(request: Any, context: Context) -> AsyncIterator[Any]:
            started = time.perf_counter()
            try:
                await enter(context)
                await context.send_initial_metadata(_headers(request_id))
                result = inner(request, context)
                if hasattr(result, "__aiter__"):
                    async for response in result:
                        yield response
                else:  # a handler that writes with context.write() and returns nothing
                    await result
            finally:
                leave(context)
                _log_finished(method, context, started)

        behavior = stream_behavior
    else:

        async def unary_behavior(request: Any, context: Context) -> Any:
            started = time.perf_counter()
            try:
                await enter(context)
            except BaseException:
                leave(context)
                _log_finished(method, context, started)
                raise
            # Sent while the handler works; it must be out before the response or the status.
            headers = asyncio.ensure_future(context.send_initial_metadata(_headers(request_id)))
            try:
                response = await inner(request, _HeadersFirstContext(context, headers))
            except BaseException:
                with contextlib.suppress(Exception):  # the call's own outcome is what counts
                    await headers
                raise
            else:
                await headers
                return response
            finally:
                leave(context)
                _log_finished(method, context, started)

        behavior = unary_behavior
    return make(
        behavior,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


def _log_finished(method: str, context: Context, started: float) -> None:
    if log.isEnabledFor(logging.DEBUG):
        code = context.code() or grpc.StatusCode.OK
        name = code.name if isinstance(code, grpc.StatusCode) else str(code)
        log.debug("%s %s in %.3fs", method, name, time.perf_counter() - started)
