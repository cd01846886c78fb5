"""JSON encoding of records, events and queued jobs' specs for the store, and the columns an
example is stored in (no pickle anywhere)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import types
import typing
from datetime import UTC, datetime
from typing import Any, TypeVar

import torch
from safetensors import SafetensorError
from safetensors.torch import load as safetensors_load

from transfer_service.domain import (
    DEFAULT_TENANT,
    CandidateResult,
    ClassMetrics,
    EvaluationReport,
    EventPayload,
    FineTuneSpec,
    HeadRecord,
    JobCancelled,
    JobCompleted,
    JobFailed,
    JobQueued,
    JobStarted,
    JobWarning,
    LabeledExample,
    Modality,
    ModelInput,
    TrainingConfig,
    TrainingMetrics,
    TrainingPlan,
    TrainingProgress,
)
from transfer_service.errors import FailedPreconditionError

# Version 1 files written before tenancy have no "tenant" key: they belong to DEFAULT_TENANT.
HEAD_FORMAT_VERSION = 1
# An optional key of version 1 (absent from files written before it): see head_to_json.
_WEIGHTS_SHA256 = "weights_sha256"
_SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
_MISSING = object()
_T = TypeVar("_T")

_EVENT_KINDS: dict[str, type[Any]] = {
    "queued": JobQueued,
    "started": JobStarted,
    "progress": TrainingProgress,
    "completed": JobCompleted,
    "failed": JobFailed,
    "cancelled": JobCancelled,
    "warning": JobWarning,
    "candidate": CandidateResult,
}


class HeadFormatError(ValueError):
    """A head.json that is not a head record this code can read: not JSON, not an object, a
    missing or mistyped field, a bad date. Whatever damaged the file, this is the one error."""


def head_to_json(record: HeadRecord, weights_sha256: str | None = None) -> str:
    """`weights_sha256`: the hex SHA-256 of the weights file's bytes, stored so a load can
    tell damaged weights from good ones (the key is optional: files written before it have
    none, and readers ignore keys they do not know)."""
    data = dataclasses.asdict(record)
    data["modality"] = record.modality.value
    data["created_time"] = record.created_time.isoformat()
    data["format_version"] = HEAD_FORMAT_VERSION
    if weights_sha256 is not None:
        data[_WEIGHTS_SHA256] = weights_sha256
    return json.dumps(data, indent=2, sort_keys=True)


def decode_head(text: str | bytes) -> tuple[HeadRecord, str | None]:
    """The record and its weights' SHA-256 (None for a file written before checksums).

    Every field is type-checked here, not just parsed: a record with a number for a name or
    a string for a metric would pass construction and then fail far away (a listing that
    serialises every head fails for every caller). Raises HeadFormatError, only."""
    try:
        data = json.loads(text)
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError are both ValueErrors
        raise HeadFormatError(f"not JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise HeadFormatError(f"JSON {json.dumps(data)[:20]}, not an object")
    version = data.get("format_version")
    if type(version) is not int or version != HEAD_FORMAT_VERSION:
        raise HeadFormatError(f"unsupported head format version {version!r}")
    checksum = data.get(_WEIGHTS_SHA256)
    if checksum is not None and not (isinstance(checksum, str) and _SHA256_HEX.fullmatch(checksum)):
        raise HeadFormatError(f"{_WEIGHTS_SHA256} is not a hex SHA-256")
    class_names = _field(data, "class_names", list)
    if not class_names or not all(isinstance(name, str) for name in class_names):
        raise HeadFormatError("class_names is not a non-empty list of strings")
    try:
        modality = Modality(_field(data, "modality", str))
        created_time = datetime.fromisoformat(_field(data, "created_time", str))
    except ValueError as exc:
        raise HeadFormatError(str(exc)) from exc
    if created_time.tzinfo is None:
        # Listings sort by this; one naive time among aware ones would make that raise.
        created_time = created_time.replace(tzinfo=UTC)
    record = HeadRecord(
        head_id=_field(data, "head_id", str),
        name=_field(data, "name", str),
        backbone=_field(data, "backbone", str),
        modality=modality,
        class_names=tuple(class_names),
        # -1: every block trained (TrainingConfig.trainable_blocks), a valid head.
        trainable_blocks=_count(data, "trainable_blocks", minimum=-1),
        input_size=_count(data, "input_size"),
        hidden_dim=_count(data, "hidden_dim"),
        metrics=_dataclass_from(TrainingMetrics, _field(data, "metrics", dict), "metrics"),
        config=_dataclass_from(TrainingConfig, _field(data, "config", dict), "config"),
        created_time=created_time,
        size_bytes=_count(data, "size_bytes"),
        job_id=_field(data, "job_id", str),
        tenant=_field(data, "tenant", str, DEFAULT_TENANT),
        head_type=_field(data, "head_type", str, "linear"),
        # Both optional: heads stored before calibration and reports have neither.
        temperature=_temperature(data),
        evaluation=_optional_report(data.get("evaluation"), "evaluation"),
        # 0: a head stored before versions existed (the store assigns it one at start-up).
        version=_count(data, "version") if "version" in data else 0,
    )
    return record, checksum


def _temperature(data: dict[str, Any]) -> float:
    value = data.get("temperature", 1.0)
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise HeadFormatError("temperature is not a positive number")
    return float(value)


def _optional_report(data: object, where: str) -> EvaluationReport | None:
    """An EvaluationReport from its `dataclasses.asdict` JSON (None stays None), every value
    type-checked like the rest of a head record."""
    if data is None:
        return None
    if not isinstance(data, dict):
        raise HeadFormatError(f"{where} is not an object")
    per_class = _field(data, "per_class", list, [])
    if not all(isinstance(row, dict) for row in per_class):
        raise HeadFormatError(f"{where}.per_class is not a list of objects")
    fields = {key: value for key, value in data.items() if key not in _REPORT_SEQUENCES}
    report = _dataclass_from(EvaluationReport, fields, where)
    top_k = _field(data, "top_k_accuracy", list, [])
    confusion = _field(data, "confusion_matrix", list, [])
    if not all(_conforms(value, float) for value in top_k):
        raise HeadFormatError(f"{where}.top_k_accuracy is not a list of numbers")
    if not all(_conforms(value, int) for value in confusion):
        raise HeadFormatError(f"{where}.confusion_matrix is not a list of integers")
    return dataclasses.replace(
        report,
        top_k_accuracy=tuple(float(value) for value in top_k),
        per_class=tuple(
            _dataclass_from(ClassMetrics, row, f"{where}.per_class") for row in per_class
        ),
        confusion_matrix=tuple(confusion),
    )


# EvaluationReport's tuple fields, decoded apart from its scalars.
_REPORT_SEQUENCES = ("top_k_accuracy", "per_class", "confusion_matrix")


def _field(data: dict[str, Any], name: str, kind: type[_T], default: Any = _MISSING) -> _T:
    value = data.get(name, default)
    if value is _MISSING:
        raise HeadFormatError(f"{name} is missing")
    # bool is an int to isinstance; a true/false where a number belongs is damage too.
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise HeadFormatError(f"{name} is not a {kind.__name__}")
    return value


def _count(data: dict[str, Any], name: str, *, minimum: int = 0) -> int:
    value = _field(data, name, int)
    if value < minimum:
        raise HeadFormatError(f"{name} is negative" if minimum == 0 else f"{name} < {minimum}")
    return value


def _dataclass_from(cls: type[_T], data: dict[str, Any], where: str) -> _T:
    """`cls(**data)` once every value has its field's type (bool is not taken for a number,
    an int is taken for a float)."""
    hints = _FIELD_TYPES[cls]
    for name, value in data.items():
        if name not in hints:
            raise HeadFormatError(f"{where}.{name} is not a field this server knows")
        if not _conforms(value, hints[name]):
            raise HeadFormatError(f"{where}.{name} has the wrong type")
    try:
        return cls(**data)
    except TypeError as exc:  # a required field is missing
        raise HeadFormatError(f"{where}: {exc}") from exc


# Resolved once: the records' annotations are strings (postponed evaluation).
_FIELD_TYPES: dict[type[Any], dict[str, Any]] = {
    cls: typing.get_type_hints(cls)
    for cls in (TrainingMetrics, TrainingConfig, ClassMetrics, EvaluationReport)
}


def _conforms(value: object, hint: Any) -> bool:
    if isinstance(hint, types.UnionType):
        return any(_conforms(value, option) for option in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if isinstance(value, bool):
        return False
    if hint is float:
        return isinstance(value, int | float)
    if hint in (int, str):
        return isinstance(value, hint)
    return False  # no other field types in these records: refuse rather than guess


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
        # Events stored before reports existed have no "evaluation".
        data["evaluation"] = _optional_report(data.get("evaluation"), "evaluation")
        # Events stored before versions existed have no "head_version": 0.
        data.setdefault("head_version", 0)
    payload: EventPayload = _EVENT_KINDS[kind](**data)
    return payload


def progress_from_json(text: str) -> TrainingProgress | None:
    if not text:
        return None
    return TrainingProgress(**json.loads(text))


def decode_weights(head_id: str, data: bytes, checksum: str | None) -> dict[str, torch.Tensor]:
    """A head's stored safetensors bytes as tensors, checked against their SHA-256
    (`checksum`; None for heads saved before checksums): damaged bytes fail loudly here,
    FAILED_PRECONDITION, rather than predict wrongly."""
    try:
        # safetensors parses a header and raw buffers; it never unpickles.
        weights = safetensors_load(data)
    except (SafetensorError, ValueError) as exc:
        raise FailedPreconditionError(
            f"head {head_id!r}: stored weights are not a valid safetensors file; the head "
            "is corrupt: delete it and train again"
        ) from exc
    if checksum is not None and hashlib.sha256(data).hexdigest() != checksum:
        raise FailedPreconditionError(
            f"head {head_id!r}: stored weights fail their checksum; the head is corrupt: "
            "delete it and train again"
        )
    return weights


# ---- examples and queued jobs' specs ----

# job_examples.split of a spec's examples and of its caller-supplied validation examples.
TRAIN_SPLIT = "train"
VALIDATION_SPLIT = "validation"

ExampleColumns = tuple[str | bytes, bytes | None, str | bytes | None]


def example_columns(example: LabeledExample, *, text_as_bytes: bool) -> ExampleColumns:
    """(label, image, text) as an example is stored. `text_as_bytes`: label and text as UTF-8
    bytes (PostgreSQL, whose text cannot hold the NUL a label or text may contain)."""
    label: str | bytes = example.label
    text: str | bytes | None = example.input.text
    if text_as_bytes:
        label = example.label.encode()
        text = text.encode() if isinstance(text, str) else None
    return label, example.input.image, text


def example_from_columns(
    label: str | bytes, image: bytes | None, text: str | bytes | None
) -> LabeledExample:
    """An example read back from `example_columns`' columns, in either encoding."""
    return LabeledExample(
        ModelInput(
            image=bytes(image) if image is not None else None,
            text=_as_text(text) if text is not None else None,
        ),
        _as_text(label),
    )


def _as_text(value: str | bytes) -> str:
    return value if isinstance(value, str) else bytes(value).decode()


def spec_example_rows(
    job_id: str, spec: FineTuneSpec, *, text_as_bytes: bool
) -> list[tuple[object, ...]]:
    """The job_examples rows of `spec`: (job_id, split, idx, label, image, text)."""
    rows: list[tuple[object, ...]] = []
    for split, examples in (
        (TRAIN_SPLIT, spec.examples),
        (VALIDATION_SPLIT, spec.validation_examples),
    ):
        for idx, example in enumerate(examples):
            rows.append(
                (job_id, split, idx, *example_columns(example, text_as_bytes=text_as_bytes))
            )
    return rows


def spec_to_json(spec: FineTuneSpec) -> str:
    """A queued job's spec without its examples (those are rows of their own)."""
    return json.dumps(
        {
            "backbone": spec.backbone,
            "head_name": spec.head_name,
            "config": dataclasses.asdict(spec.config),
            "tenant": spec.tenant,
            "candidate_backbones": list(spec.candidate_backbones),
        }
    )


def spec_from_json(
    text: str, rows: typing.Iterable[tuple[str, str | bytes, bytes | None, str | bytes | None]]
) -> FineTuneSpec:
    """The spec `spec_to_json` stored, with its examples from `rows` (split, label, image,
    text), in index order. The config is type-checked as a head's is (HeadFormatError)."""
    data = json.loads(text)
    examples: dict[str, list[LabeledExample]] = {TRAIN_SPLIT: [], VALIDATION_SPLIT: []}
    for split, label, image, example_text in rows:
        examples[split].append(example_from_columns(label, image, example_text))
    return FineTuneSpec(
        backbone=str(data["backbone"]),
        head_name=str(data["head_name"]),
        examples=tuple(examples[TRAIN_SPLIT]),
        config=_dataclass_from(TrainingConfig, data["config"], "config"),
        tenant=str(data.get("tenant", DEFAULT_TENANT)),
        validation_examples=tuple(examples[VALIDATION_SPLIT]),
        candidate_backbones=tuple(str(name) for name in data.get("candidate_backbones", ())),
    )
