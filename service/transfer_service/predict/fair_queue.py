"""The queue of requests waiting for a Predict batch: whole requests before chunks of large
ones, and tenants served round-robin, so no caller can starve another."""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from transfer_service.domain import PredictionResult
from transfer_service.heads import LoadedHead


@dataclass(slots=True)
class PendingRequest:
    head: LoadedHead
    examples: list[Any]  # first-stage inputs, CPU
    top_k: int
    return_embedding: bool
    future: asyncio.Future[list[PredictionResult]]
    input_bytes: int
    enqueued: float = field(default_factory=time.perf_counter)
    # A chunk of a large request: the id shared by its chunks (None for a whole request).
    chunk_of: int | None = None
    # More heads on the same backbone, answered from the same rows (a multi-head Predict):
    # the future's results are then head by head, `len(examples)` per head, `head` first.
    extra_heads: tuple[LoadedHead, ...] = ()

    @property
    def tenant(self) -> str:
        return self.head.record.tenant


class FairQueue:
    """Requests waiting for a batch, served round-robin by tenant, whole requests before
    chunks of large ones (which give way at most batcher.MAX_CHUNK_SKIPS batches in a row). One
    tenant's hundred queued requests therefore wait behind another tenant's one, not in
    front of it."""

    def __init__(self) -> None:
        self._whole: OrderedDict[str, deque[PendingRequest]] = OrderedDict()
        self._chunks: OrderedDict[str, deque[PendingRequest]] = OrderedDict()
        self._size = 0
        self._changed = asyncio.Event()

    def put(self, item: PendingRequest) -> None:
        queues = self._whole if item.chunk_of is None else self._chunks
        queues.setdefault(item.tenant, deque()).append(item)
        self._size += 1
        self._changed.set()

    def empty(self) -> bool:
        return self._size == 0

    def has_chunks(self) -> bool:
        return bool(self._chunks)

    def take(
        self,
        chunk_allowed: Callable[[PendingRequest], bool],
        whole_allowed: Callable[[PendingRequest], bool] = lambda item: True,
    ) -> PendingRequest | None:
        """The next allowed whole request by tenant rotation, else the next allowed chunk."""
        item = _rotate(self._whole, whole_allowed) or _rotate(self._chunks, chunk_allowed)
        if item is not None:
            self._size -= 1
        return item

    async def changed(self, timeout: float | None) -> bool:
        """Waits for the next put, up to `timeout` seconds (None: no limit); False on time."""
        self._changed.clear()
        try:
            await asyncio.wait_for(self._changed.wait(), timeout)
        except TimeoutError:
            return False
        return True

    def drain(self) -> list[PendingRequest]:
        items = [
            item for queues in (self._whole, self._chunks) for q in queues.values() for item in q
        ]
        self._whole.clear()
        self._chunks.clear()
        self._size = 0
        return items


def _rotate(
    queues: OrderedDict[str, deque[PendingRequest]], allowed: Callable[[PendingRequest], bool]
) -> PendingRequest | None:
    """Pops the head of the first tenant's queue that `allowed` accepts, and moves that tenant
    to the back of the rotation."""
    for tenant, queue in queues.items():
        if allowed(queue[0]):
            item = queue.popleft()
            if queue:
                queues.move_to_end(tenant)
            else:
                del queues[tenant]
            return item
    return None
