"""JSON encoding of records and events for the store (no pickle anywhere)."""

from __future__ import annotations

import dataclasses
import json
from datetime import datetime
from typing import Any

from service.domain import (
    DEFAULT_TENANT,
    CandidateResult,
    EventPayload,
    HeadRecord,
    JobCancelled,
    JobCompleted,
    JobFailed,
    JobStarted,
    JobWarning,
    Modality,
    TrainingConfig,
    TrainingMetrics,
    TrainingPlan,
    TrainingProgress,
)

# Version 1 files written before tenancy have no "tenant" key: they belong to DEFAULT_TENANT.
HEAD_FORMAT_VERSION = 1

_EVENT_KINDS: dict[str, type[Any]] = {
    "started": JobStarted,
    "progress": TrainingProgress,
    "completed": JobCompleted,
    "failed": JobFailed,
    "cancelled": JobCancelled,
    "warning": JobWarning,
    "candidate": CandidateResult,
}


def head_to_json(record: HeadRecord) -> str:
    data = dataclasses.asdict(record)
    data["modality"] = record.modality.value
    data["created_time"] = record.created_time.isoformat()
    data["format_version"] = HEAD_FORMAT_VERSION
    return json.dumps(data, indent=2, sort_keys=True)


def head_from_json(text: str) -> HeadRecord:
    data = json.loads(text)
    if data.pop("format_version", None) != HEAD_FORMAT_VERSION:
        raise ValueError("unsupported head format version")
    return HeadRecord(
        head_id=data["head_id"],
        name=data["name"],
        backbone=data["backbone"],
        modality=Modality(data["modality"]),
        class_names=tuple(data["class_names"]),
        trainable_blocks=int(data["trainable_blocks"]),
        input_size=int(data["input_size"]),
        hidden_dim=int(data["hidden_dim"]),
        metrics=TrainingMetrics(**data["metrics"]),
        config=TrainingConfig(**data["config"]),
        created_time=datetime.fromisoformat(data["created_time"]),
        size_bytes=int(data["size_bytes"]),
        job_id=data["job_id"],
        tenant=data.get("tenant", DEFAULT_TENANT),
        head_type=data.get("head_type", "linear"),
    )


def event_kind(payload: EventPayload) -> str:
    for kind, payload_type in _EVENT_KINDS.items():
        if isinstance(payload, payload_type):
            return kind
    raise TypeError(f"unknown event payload {type(payload).__name__}")


def payload_to_json(payload: EventPayload) -> str:
    return json.dumps(dataclasses.asdict(payload))


def payload_from_json(kind: str, text: str) -> EventPayload:
    data = json.loads(text)
    if kind == "started":
        data["class_names"] = tuple(data["class_names"])
        data["class_counts"] = tuple((label, count) for label, count in data["class_counts"])
        data["plan"] = TrainingPlan(**data["plan"])
    elif kind == "completed":
        data["metrics"] = TrainingMetrics(**data["metrics"])
    payload: EventPayload = _EVENT_KINDS[kind](**data)
    return payload


def progress_from_json(text: str) -> TrainingProgress | None:
    if not text:
        return None
    return TrainingProgress(**json.loads(text))
