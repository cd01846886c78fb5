"""UploadDataset's intake: every example checked as it streams in, then written by the store."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from transfer_service.backbones.preprocess import check_image
from transfer_service.domain import DatasetInfo, LabeledExample, Modality
from transfer_service.errors import InvalidArgumentError, ResourceExhaustedError
from transfer_service.store.interface import DatasetWriter
from transfer_service.training.validation import check_label


async def store_upload(
    writer: DatasetWriter,
    chunks: AsyncIterator[list[LabeledExample]],
    *,
    max_examples: int,
    max_pixels: int,
    blocking: Callable[..., Awaitable[Any]],
) -> DatasetInfo:
    """Checks and stores the chunks as they come (`blocking` runs disk and decoder work off
    the event loop); a refused upload (bad example, over the example count or the tenant's
    byte quota, disk full) is removed whole."""
    modality: Modality | None = None
    count = 0
    try:
        async for chunk in chunks:
            for example in chunk:
                where = f"examples[{count}]"
                modality = modality or example.input.modality
                if example.input.modality is not modality:
                    raise InvalidArgumentError(
                        f"{where}: {example.input.modality.value} input in a "
                        f"{modality.value} dataset",
                        field=where,
                    )
                check_label(example.label, where)
                if example.input.text is not None and not example.input.text.strip():
                    raise InvalidArgumentError(
                        f"{where}.text: text is empty", field=f"{where}.text"
                    )
                if example.input.image is not None:
                    await blocking(check_image, example.input.image, f"{where}.image", max_pixels)
                count += 1
            if count > max_examples:
                raise ResourceExhaustedError(
                    f"examples: more than {max_examples} examples in one dataset"
                )
            await blocking(writer.add, chunk)
        info: DatasetInfo = await blocking(writer.commit)
        return info
    except BaseException:
        await asyncio.shield(blocking(writer.abort))
        raise
