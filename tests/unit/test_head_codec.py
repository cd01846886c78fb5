"""Head metadata round trip (store/codec.py): a head trained with every block unfrozen
(trainable_blocks -1) reads back; it was once taken for a corrupt head, left out of listings
and unloadable from the store (found by the replica chaos run)."""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from datetime import UTC, datetime

import pytest
from transfer_service.domain import (
    ClassMetrics,
    EvaluationReport,
    HeadRecord,
    JobCompleted,
    Modality,
    TrainingConfig,
    TrainingMetrics,
)
from transfer_service.store.codec import (
    HeadFormatError,
    decode_head,
    head_to_json,
    payload_from_json,
    payload_to_json,
)


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


def _report() -> EvaluationReport:
    return EvaluationReport(
        source="cross_validation",
        examples=4,
        accuracy=0.75,
        macro_f1=0.7,
        log_loss=0.5,
        ece_uncalibrated=0.2,
        ece=0.1,
        temperature=1.5,
        top_k_accuracy=(0.75, 1.0),
        per_class=(ClassMetrics("a", 1.0, 0.5, 0.667, 2), ClassMetrics("b", 0.667, 1.0, 0.8, 2)),
        confusion_matrix=(1, 1, 0, 2),
    )


def test_evaluation_and_temperature_read_back() -> None:
    head = replace(record(0), temperature=1.5, evaluation=_report())
    decoded, _ = decode_head(head_to_json(head, "0" * 64))
    assert decoded == head


def test_a_head_stored_before_reports_reads_with_temperature_one_and_no_report() -> None:
    data = json.loads(head_to_json(record(0), "0" * 64))
    del data["temperature"], data["evaluation"]  # as code before issue 18 wrote it
    decoded, _ = decode_head(json.dumps(data))
    assert decoded.temperature == 1.0 and decoded.evaluation is None
    assert decoded == record(0)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("temperature", 0),
        ("temperature", "1"),
        ("evaluation", []),
        ("evaluation", {"source": "x"}),
        ("evaluation", {**asdict(_report()), "confusion_matrix": [1.5]}),
        ("evaluation", {**asdict(_report()), "per_class": [{"label": 3}]}),
    ],
)
def test_damaged_evaluation_fields_are_damage(key: str, value: object) -> None:
    data = json.loads(head_to_json(record(0), "0" * 64))
    data[key] = value
    with pytest.raises(HeadFormatError):
        decode_head(json.dumps(data))


def test_completed_events_with_and_without_a_summary_read_back() -> None:
    metrics = record(0).metrics
    for payload in (
        JobCompleted("h-1", metrics, _report().summary()),
        JobCompleted("h-1", metrics),
    ):
        assert payload_from_json("completed", payload_to_json(payload)) == payload
    old = json.dumps({"head_id": "h-1", "metrics": asdict(metrics)})  # before reports
    assert payload_from_json("completed", old) == JobCompleted("h-1", metrics)
