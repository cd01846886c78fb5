"""Per-tenant admission: a token bucket on calls and a bound on a tenant's unary calls in
flight, so that one tenant's flood cannot take the CPU from the others.

Why calls over the limit are *held* before they are refused: what a flood costs the other
tenants is CPU (grpc's and our Python work for every call, and the flooding client's own,
often on the same cores). A refusal answered at once lets a caller that loops on errors spin
exactly as fast as before: the EPS spam of bench/noisy_neighbour.py made ~500
INVALID_ARGUMENT calls a second, and a RESOURCE_EXHAUSTED at the same speed would cost the
same. So a call over its tenant's rate waits (an asyncio sleep: a timer, no CPU) for its
tenant's next token, and runs then; only when that token is further away than the hold bound
(`hold_seconds`) is it refused, RESOURCE_EXHAUSTED, after waiting out the bound, with a
`retry-after-ms` trailer saying when a token is due. A sequential caller is so slowed down to
the rate, never refused; a concurrent flood is held and refused at the rate too. A unary call
over the in-flight bound waits the same way for one of its tenant's calls to end.

A call that ends INVALID_ARGUMENT costs its tenant `invalid_call_tokens` more tokens (4: five
in all): its caller sent something that cannot work and will not work on a retry, such as
the EPS of bench/noisy_neighbour.py, so a tenant looping on garbage is slowed to a fifth of
the rate that its good calls get, and its neighbours pay for a fifth of the refusals. The debt
this runs up is bounded by the hold bound's worth of tokens, so a tenant that stops sending
garbage is served again within about `hold_seconds`.

Held calls are themselves bounded (`max_held`, per tenant): past it a call is refused at once,
so a flood of thousands of concurrent calls cannot park thousands of timers.

All of this runs in the interceptor before the request message is read and parsed: a refused
call's message is dropped unparsed. Streaming calls (FineTune, WatchJob, uploads) take a token
but are not counted in flight: a tenant may watch many jobs for hours.

Tenants are only those of configured bearer tokens (or the one default tenant without auth),
so the per-tenant state is bounded by the token list.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

RETRY_AFTER_KEY = "retry-after-ms"


@dataclass(frozen=True, slots=True)
class AdmissionLimits:
    """`requests_per_second` 0: no rate limit; `max_in_flight` 0: no in-flight bound."""

    requests_per_second: float
    burst: int
    max_in_flight: int
    hold_seconds: float
    max_held: int = 256
    invalid_call_tokens: float = 4.0

    @property
    def enabled(self) -> bool:
        return self.requests_per_second > 0 or self.max_in_flight > 0


@dataclass(frozen=True, slots=True)
class Refusal:
    """A call not admitted: why ('rate' or 'in_flight'), the message, and when to retry."""

    reason: str
    details: str
    retry_after_seconds: float

    def trailers(self) -> tuple[tuple[str, str]]:
        return ((RETRY_AFTER_KEY, str(max(1, math.ceil(self.retry_after_seconds * 1000)))),)


@dataclass(slots=True)
class _Tenant:
    tokens: float
    stamp: float
    in_flight: int = 0
    held: int = 0
    freed: asyncio.Event = field(default_factory=asyncio.Event)


class TenantAdmission:
    def __init__(
        self,
        limits: AdmissionLimits,
        on_held: Callable[[str], None] = lambda reason: None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """`on_held(reason)` observes each call that had to wait ('rate' or 'in_flight'),
        whether it then ran or not."""
        self._limits = limits
        self._on_held = on_held
        self._clock = clock
        self._tenants: dict[str, _Tenant] = {}

    @property
    def enabled(self) -> bool:
        return self._limits.enabled

    async def take_token(self, tenant: str) -> Refusal | None:
        """None once the call may start: at once with a token in hand, else after waiting for
        the token reserved for it. A Refusal when that token is further away than the hold
        bound (after waiting out the bound), or at once when `max_held` calls of the tenant
        wait already."""
        limits = self._limits
        if limits.requests_per_second <= 0:
            return None
        state = self._tenant(tenant)
        wait = self._reserve_token(state)
        if wait == 0:
            return None
        self._on_held("rate")
        if state.held >= limits.max_held:
            if wait is not None:
                state.tokens += 1  # the reserved token goes back
            return self._refusal(
                "rate", f"tenant {tenant!r} has {state.held} calls held already", 0.0, state
            )
        state.held += 1
        try:
            if wait is not None:
                await asyncio.sleep(wait)
                return None
            await asyncio.sleep(limits.hold_seconds)
            return self._refusal(
                "rate",
                f"tenant {tenant!r} is over its rate of {limits.requests_per_second:g} calls a "
                f"second (burst {limits.burst}; TRANSFER_TENANT_REQUESTS_PER_SECOND)",
                limits.hold_seconds,
                state,
            )
        finally:
            state.held -= 1

    async def enter_flight(self, tenant: str) -> Refusal | None:
        """None once one of the tenant's max_in_flight slots is this call's (give it back with
        `leave_flight`); a Refusal when none frees within the hold bound, or at once when
        `max_held` calls of the tenant wait already."""
        limits = self._limits
        if limits.max_in_flight <= 0:
            return None
        state = self._tenant(tenant)
        if state.in_flight < limits.max_in_flight:
            state.in_flight += 1
            return None
        self._on_held("in_flight")
        details = (
            f"tenant {tenant!r} has {state.in_flight} calls running, its limit "
            f"(TRANSFER_TENANT_MAX_IN_FLIGHT)"
        )
        if state.held >= limits.max_held:
            return self._refusal("in_flight", details, limits.hold_seconds, None)
        deadline = self._clock() + limits.hold_seconds
        state.held += 1
        try:
            while state.in_flight >= limits.max_in_flight:
                remaining = deadline - self._clock()
                if remaining <= 0:
                    return self._refusal("in_flight", details, limits.hold_seconds, None)
                state.freed.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(state.freed.wait(), remaining)
            state.in_flight += 1
            return None
        finally:
            state.held -= 1

    def charge_invalid_call(self, tenant: str) -> None:
        """A call of `tenant` that took a token ended INVALID_ARGUMENT: it costs
        `invalid_call_tokens` more, down to at most a hold bound's worth of debt."""
        limits = self._limits
        if limits.requests_per_second <= 0 or limits.invalid_call_tokens <= 0:
            return
        state = self._tenant(tenant)
        self._refill(state)
        floor = -limits.requests_per_second * limits.hold_seconds
        state.tokens = max(state.tokens - limits.invalid_call_tokens, min(state.tokens, floor))

    def leave_flight(self, tenant: str) -> None:
        """A call that `enter_flight` admitted ended."""
        state = self._tenants[tenant]
        state.in_flight -= 1
        state.freed.set()

    def _tenant(self, tenant: str) -> _Tenant:
        state = self._tenants.get(tenant)
        if state is None:
            state = _Tenant(tokens=float(max(1, self._limits.burst)), stamp=self._clock())
            self._tenants[tenant] = state
        return state

    def _refill(self, state: _Tenant) -> None:
        now = self._clock()
        rate = self._limits.requests_per_second
        state.tokens = min(
            float(max(1, self._limits.burst)), state.tokens + (now - state.stamp) * rate
        )
        state.stamp = now

    def _reserve_token(self, state: _Tenant) -> float | None:
        """Takes the tenant's next token: 0 when one is here, else the seconds until the one
        reserved now is due (tokens go below zero while reserved), or None (nothing taken)
        when it is due after the hold bound."""
        self._refill(state)
        wait = max(0.0, (1 - state.tokens) / self._limits.requests_per_second)
        if wait > self._limits.hold_seconds:
            return None
        state.tokens -= 1
        return wait

    def _refusal(
        self, reason: str, details: str, retry_after: float, state: _Tenant | None
    ) -> Refusal:
        if state is not None:  # a rate refusal: when its tenant's next unreserved token is due
            self._refill(state)
            retry_after = max(0.0, (1 - state.tokens) / self._limits.requests_per_second)
        return Refusal(reason, f"{details}; retry in {retry_after:.2f} s", retry_after)
