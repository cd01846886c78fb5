"""Head metadata round trip (store/codec.py): a head trained with every block unfrozen
(trainable_blocks -1) reads back; it was once taken for a corrupt head, left out of listings
and unloadable from the store (found by the replica chaos run)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from transfer_service.domain import HeadRecord, Modality, TrainingConfig, TrainingMetrics
from transfer_service.store.codec import HeadFormatError, decode_head, head_to_json


def record(trainable_blocks: int) -> HeadRecord:
    return HeadRecord(
        head_id="h-1",
        name="h",
        backbone="efficientnet_lite0",
        modality=Modality.IMAGE,
        class_names=("a", "b"),
        trainable_blocks=trainable_blocks,
        input_size=64,
        hidden_dim=0,
        metrics=TrainingMetrics(0.1, 1.0, None, None, 1, 1, False, 0.5),
        config=TrainingConfig(trainable_blocks=trainable_blocks),
        created_time=datetime(2026, 1, 1, tzinfo=UTC),
        size_bytes=10,
        job_id="job-1",
    )


@pytest.mark.parametrize("blocks", [-1, 0, 2])
def test_trainable_blocks_read_back(blocks: int) -> None:
    decoded, _ = decode_head(head_to_json(record(blocks), "0" * 64))
    assert decoded == record(blocks)


def test_below_minus_one_is_damage() -> None:
    with pytest.raises(HeadFormatError):
        decode_head(head_to_json(record(-2), "0" * 64))
