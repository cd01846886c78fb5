"""RPCs over a head's whole model, beside operations.py: Predict with several heads on one
backbone, and ExportHead (the head with its backbone as one ONNX file).

Heads are resolved as a single-head Predict resolves them (HeadCatalog.resolve_head):
another tenant's head is NOT_FOUND, exactly like a missing one, and is refused before
anything about it (its backbone) shows in an answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import IO, Any, TypeVar

from transfer_service.backbones.cache import BackboneCache, LoadedBackbone
from transfer_service.domain import ModelInput, PredictionResult
from transfer_service.errors import InvalidArgumentError, ResourceExhaustedError
from transfer_service.head_catalog import ResolveHead
from transfer_service.heads import LoadedHead
from transfer_service.onnx_export import export_onnx
from transfer_service.predict.predictor import Predictor

T = TypeVar("T")

# At most this many heads in one Predict (the proto says so too): each adds a head pass over
# every input, and the answer grows with heads x inputs.
MAX_HEADS_PER_PREDICT = 32
# ExportHead's stream: pieces of the file this large (a model is 10-100 MB; gRPC's default
# message limit is 4 MB).
EXPORT_CHUNK_BYTES = 1 << 20
# Exports waiting for the export thread, besides the one running: past it, RESOURCE_EXHAUSTED
# (each costs seconds of CPU; a burst should not queue minutes of them).
MAX_WAITING_EXPORTS = 4


@dataclass(frozen=True, slots=True)
class HeadPredictions:
    """One head's answer in a multi-head Predict: a result per input, in input order."""

    head_id: str
    predictions: list[PredictionResult]
    head_version: int = 0


@dataclass(frozen=True, slots=True)
class ExportChunk:
    data: bytes
    total_bytes: int  # the file's size, in the first chunk; 0 in the others


class HeadOperations:
    def __init__(
        self,
        *,
        resolve_head: ResolveHead,
        backbones: BackboneCache,
        predictor: Predictor,
        blocking_pool: Executor,
        export_pool: Executor,
        on_predicted: Callable[[str, float], None] = lambda backbone, seconds: None,
    ) -> None:
        """`export_pool`: the thread exports run on (one thread: one export at a time, so
        an export never holds a thread of `blocking_pool`, which serves every call's store
        reads). `on_predicted(backbone, seconds)` observes each successful Predict."""
        self._resolve_head = resolve_head
        self._backbones = backbones
        self._predictor = predictor
        self._pool = blocking_pool
        self._export_pool = export_pool
        self._on_predicted = on_predicted
        self._exports = 0  # running or waiting

    async def _blocking(self, function: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, function, *args)

    async def predict_heads(
        self,
        tenant: str,
        head_id: str,
        head_ids: Sequence[str],
        inputs: Sequence[ModelInput],
        top_k: int,
        return_embedding: bool,
    ) -> list[HeadPredictions]:
        """`head_id` (if any) and then `head_ids`, each answered for every input, from one
        decoding of the inputs and one trunk pass. A head named twice is INVALID_ARGUMENT
        (an answer per name would be the same computation twice, and a repeated id is more
        likely a caller's bug than a wish)."""
        started = time.perf_counter()
        named = [("head_id", head_id)] if head_id else []
        named += [(f"head_ids[{i}]", value) for i, value in enumerate(head_ids)]
        if not named:
            raise InvalidArgumentError("head_id: no head named (set head_id or head_ids)")
        if len(named) > MAX_HEADS_PER_PREDICT:
            raise InvalidArgumentError(
                f"head_ids: {len(named)} heads is over the limit of {MAX_HEADS_PER_PREDICT} "
                "per Predict"
            )
        first_field: dict[str, str] = {}
        for field, value in named:
            if value in first_field:
                raise InvalidArgumentError(
                    f"{field}: head {value!r} is named twice (also as {first_field[value]}); "
                    "name each head once"
                )
            first_field[value] = field
        heads = await self._resolve_all(tenant, named)
        answered_by: dict[str, str] = {}
        for (field, value), head in zip(named, heads, strict=True):
            # Two references to one version (`cats` and `cats@production`, say).
            head_id = head.record.head_id
            if head_id in answered_by:
                raise InvalidArgumentError(
                    f"{field}: {value!r} is head {head_id!r}, which {answered_by[head_id]} "
                    "names too; name each head once"
                )
            answered_by[head_id] = field
        first = heads[0].record
        for (field, _), head in zip(named[1:], heads[1:], strict=True):
            record = head.record
            if record.backbone != first.backbone:
                raise InvalidArgumentError(
                    f"{field}: head {record.head_id!r} is on backbone {record.backbone}, but "
                    f"{named[0][0]} {first.head_id!r} is on {first.backbone}; one Predict runs "
                    "one backbone: call once per backbone"
                )
            if record.input_size != first.input_size:
                raise InvalidArgumentError(
                    f"{field}: head {record.head_id!r} takes inputs of size "
                    f"{record.input_size}, but {named[0][0]} {first.head_id!r} takes "
                    f"{first.input_size}; one Predict preprocesses its inputs once"
                )
        answers = await self._predictor.predict_heads(
            heads, inputs, top_k=top_k, return_embedding=return_embedding
        )
        self._on_predicted(first.backbone, time.perf_counter() - started)
        return [
            HeadPredictions(head.record.head_id, results, head.record.version)
            for head, results in zip(heads, answers, strict=True)
        ]

    async def _resolve_all(self, tenant: str, named: list[tuple[str, str]]) -> list[LoadedHead]:
        """Every head, loaded concurrently (cold heads load in parallel in the blocking pool);
        the first failure by position is the one reported."""
        outcomes = await asyncio.gather(
            *(self._resolve_head(tenant, value, field) for field, value in named),
            return_exceptions=True,
        )
        heads: list[LoadedHead] = []
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome
            heads.append(outcome)
        return heads

    async def export_head(self, tenant: str, head_id: str) -> AsyncIterator[ExportChunk]:
        """The head with its backbone as an ONNX file (onnx_export), in EXPORT_CHUNK_BYTES
        pieces. Built on the export thread into an anonymous temporary file (gone once
        closed), so a slow reader holds no model in memory and no export slot."""
        head = await self._resolve_head(tenant, head_id, "head_id")
        if self._exports > MAX_WAITING_EXPORTS:
            raise ResourceExhaustedError(
                f"head_id: {self._exports} exports are running or waiting on this server; "
                "try again later"
            )
        self._exports += 1
        try:
            backbone = self._backbones.peek(head.record.backbone)
            if backbone is None:
                backbone = await self._blocking(self._backbones.get, head.record.backbone)
            # A caller that leaves while its export waits drops it from the pool's queue.
            exported = await asyncio.get_running_loop().run_in_executor(
                self._export_pool, _export_to_file, backbone, head
            )
        finally:
            self._exports -= 1
        with contextlib.closing(exported):
            total = exported.seek(0, 2)
            exported.seek(0)
            offset = 0
            while offset < total:
                data = await self._blocking(exported.read, EXPORT_CHUNK_BYTES)
                if not data:
                    break
                yield ExportChunk(data, total if offset == 0 else 0)
                offset += len(data)


def _export_to_file(backbone: LoadedBackbone, head: LoadedHead) -> IO[bytes]:
    # Handed to the caller open (it streams the file, then closes it): no `with` here.
    exported = tempfile.TemporaryFile()  # noqa: SIM115
    try:
        export_onnx(backbone, head, exported)
        exported.flush()
    except BaseException:
        exported.close()
        raise
    return exported
