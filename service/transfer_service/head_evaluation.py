"""EvaluateHead: a head scored on the caller's own labelled test set (inline examples or an
uploaded dataset), returning the same report a head carries from training (evaluation.py).
The head is not changed: its temperature is the one it was trained with.

The examples run through Predict's own path (Predictor.predict: decoding off the event loop,
the backbone's batcher, fair queueing between tenants, slices for large requests), a bounded
number of inputs per call, one call at a time, so an evaluation of thousands of examples
shares the compute thread with Predict callers the way one large Predict does. A caller that
leaves (deadline, cancel) cancels the call in flight, which drops its queued work.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from typing import Any, TypeVar

import torch

from transfer_service.backbones.preprocess import check_image
from transfer_service.domain import (
    SOURCE_TEST_SET,
    DatasetInfo,
    EvaluationReport,
    LabeledExample,
    Modality,
)
from transfer_service.errors import InvalidArgumentError, NotFoundError, ResourceExhaustedError
from transfer_service.evaluation import evaluation_report, logits_from_probabilities
from transfer_service.head_catalog import ResolveHead
from transfer_service.predict.predictor import Predictor
from transfer_service.store.ids import check_id
from transfer_service.store.interface import Store
from transfer_service.training.validation import check_label, check_validation_examples

T = TypeVar("T")
# Unknown labels named in an error, at most (a test set of another task has hundreds).
NAMED_LABELS = 10


class HeadEvaluation:
    def __init__(
        self,
        *,
        resolve_head: ResolveHead,
        store: Store,
        predictor: Predictor,
        blocking_pool: Executor,
        max_examples: int,
        max_inputs_per_call: int,
        max_image_pixels: int,
    ) -> None:
        """`max_examples`: FineTune's limit (TRANSFER_MAX_DATASET_EXAMPLES);
        `max_inputs_per_call`: Predict's (the chunk each predictor call takes)."""
        self._resolve_head = resolve_head
        self._store = store
        self._predictor = predictor
        self._pool = blocking_pool
        self._max_examples = max_examples
        self._chunk = max_inputs_per_call
        self._max_pixels = max_image_pixels

    async def _blocking(self, function: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, function, *args)

    async def evaluate(
        self,
        tenant: str,
        head_id: str,
        examples: Sequence[LabeledExample],
        dataset_id: str = "",
    ) -> EvaluationReport:
        # The head as Predict resolves it (owner checked before its weights are read: another
        # tenant's head is NOT_FOUND), before any example is looked at.
        head = await self._resolve_head(tenant, head_id, "head_id")
        record = head.record
        examples, field = await self._examples(tenant, examples, dataset_id)
        if not examples:
            raise InvalidArgumentError(f"{field}: no examples (send examples or a dataset_id)")
        if len(examples) > self._max_examples:
            raise ResourceExhaustedError(
                f"{field}: {len(examples)} examples is over the limit of {self._max_examples}"
            )
        classes = record.class_names
        for position, example in enumerate(examples):
            check_label(example.label, f"{field}[{position}]")
        known = set(classes)
        unknown = sorted({example.label for example in examples} - known)
        if unknown:
            named = ", ".join(repr(label) for label in unknown[:NAMED_LABELS])
            more = f" and {len(unknown) - NAMED_LABELS} more" if len(unknown) > NAMED_LABELS else ""
            raise InvalidArgumentError(
                f"{field}: labels {named}{more} are not classes of head {head_id!r} "
                f"(its classes: {len(classes)})"
            )
        check_validation_examples(examples, known, record.modality, field)
        if record.modality is Modality.IMAGE and not dataset_id:
            # Uploaded datasets were checked at upload; inline images are checked here.
            await self._blocking(self._check_images, examples, field)
        index = {name: position for position, name in enumerate(classes)}
        probabilities = torch.zeros(len(examples), len(classes), dtype=torch.float64)
        for start in range(0, len(examples), self._chunk):
            chunk = examples[start : start + self._chunk]
            # Every class's score, so the report sees whole distributions (log-loss, top-k).
            results = await self._predictor.predict(
                head, [example.input for example in chunk], top_k=len(classes)
            )
            for row, result in enumerate(results, start):
                for scored in result.top_k:
                    probabilities[row, index[scored.label]] = scored.score
        labels = torch.tensor([index[example.label] for example in examples])
        # Predict's scores are calibrated; the report wants the logits behind them too
        # (ECE before calibration), recovered exactly up to a per-row constant.
        logits = logits_from_probabilities(probabilities, record.temperature)
        return evaluation_report(
            logits, labels, classes, SOURCE_TEST_SET, temperature=record.temperature
        )

    async def _examples(
        self, tenant: str, inline: Sequence[LabeledExample], dataset_id: str
    ) -> tuple[Sequence[LabeledExample], str]:
        """Inline examples or a stored dataset's (never both), and the field to blame; the
        dataset's owner checked before its examples are read, as FineTune does."""
        if inline and dataset_id:
            raise InvalidArgumentError("dataset_id: send either examples or a dataset_id, not both")
        if not dataset_id:
            return inline, "examples"
        check_id("dataset_id", dataset_id)
        info: DatasetInfo = await self._blocking(self._store.dataset_info, dataset_id)
        if info.tenant != tenant:
            raise NotFoundError(f"dataset_id: no dataset {dataset_id!r}")
        if info.example_count > self._max_examples:
            raise ResourceExhaustedError(
                f"dataset {dataset_id}: {info.example_count} examples is over the limit of "
                f"{self._max_examples}"
            )
        loaded: list[LabeledExample] = await self._blocking(self._store.dataset_examples, info)
        return loaded, f"dataset {dataset_id}"

    def _check_images(self, examples: Sequence[LabeledExample], field: str) -> None:
        for position, example in enumerate(examples):
            assert example.input.image is not None
            check_image(example.input.image, f"{field}[{position}].image", self._max_pixels)
