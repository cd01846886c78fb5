"""User inputs (paths, bytes, texts, dataclasses) to the request messages the clients send."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

from transfer_client.proto import transfer_service_pb2 as pb
from transfer_client.types import InputData, LabelledExample, TrainingConfig

# Keeps each upload message well under gRPC's default 4 MiB receive limit.
MAX_UPLOAD_CHUNK_BYTES = 2 * 1024 * 1024


def training_config_to_pb(config: TrainingConfig) -> pb.TrainingConfig:
    message = pb.TrainingConfig(
        epochs=config.epochs,
        batch_size=config.batch_size,
        learning_rate=config.learning_rate,
        trainable_blocks=config.trainable_blocks,
        seed=config.seed,
        progress_every_steps=config.progress_every_steps,
        head_type=config.head_type,
        hidden_dim=config.hidden_dim,
        unfreeze_every_epochs=config.unfreeze_every_epochs,
        class_balance=config.class_balance,
        prototype_temperature=config.prototype_temperature,
        solver=config.solver,
        cv_folds=config.cv_folds,
    )
    # proto3 `optional`: assigning even the default value marks the field as set.
    for name in ("dropout", "label_smoothing", "weight_decay", "layer_lr_decay", "max_grad_norm"):
        value = getattr(config, name)
        if value is not None:
            setattr(message, name, value)
    if config.validation_fraction is not None:
        message.validation_fraction = config.validation_fraction
    if config.early_stopping_patience is not None:
        message.early_stopping_patience = config.early_stopping_patience
    if config.augment is not None:
        message.augment = config.augment
    return message


def _image_or_text(value: InputData) -> bytes | str:
    # Reading a Path here keeps uploads lazy: a file is read when its chunk is built.
    if isinstance(value, Path):
        return value.read_bytes()
    if isinstance(value, str | bytes):
        return value
    if isinstance(value, bytearray | memoryview):
        return bytes(value)
    raise TypeError(
        f"an input must be bytes (an encoded image), a Path (an image file) or str (a text), "
        f"not {type(value).__name__}"
    )


def input_to_pb(value: InputData) -> pb.Input:
    data = _image_or_text(value)
    return pb.Input(text=data) if isinstance(data, str) else pb.Input(image=data)


def example_to_pb(example: LabelledExample) -> pb.Example:
    value, label = example
    if not isinstance(label, str):
        raise TypeError(f"a label must be a str, not {type(label).__name__}")
    data = _image_or_text(value)
    if isinstance(data, str):
        return pb.Example(text=data, label=label)
    return pb.Example(image=data, label=label)


def evaluate_head_request(
    head_id: str, examples: Iterable[LabelledExample] | None, dataset_id: str | None
) -> pb.EvaluateHeadRequest:
    if (examples is None) == (dataset_id is None):
        raise ValueError("pass either examples or dataset_id (from upload_dataset), not both")
    request = pb.EvaluateHeadRequest(head_id=head_id, dataset_id=dataset_id or "")
    if examples is not None:
        request.examples.extend(example_to_pb(example) for example in examples)
    return request


def fine_tune_request(
    backbone: str,
    examples: Iterable[LabelledExample] | None,
    *,
    dataset_id: str | None,
    head_name: str,
    config: TrainingConfig | None,
    validation_examples: Iterable[LabelledExample] | None = None,
    validation_dataset_id: str | None = None,
    candidate_backbones: Iterable[str] = (),
    request_id: str = "",
) -> pb.FineTuneRequest:
    if (examples is None) == (dataset_id is None):
        raise ValueError("pass either examples or dataset_id (from upload_dataset), not both")
    request = pb.FineTuneRequest(backbone=backbone, head_name=head_name, request_id=request_id)
    if examples is not None:
        request.examples.extend(example_to_pb(example) for example in examples)
    if dataset_id is not None:
        request.dataset_id = dataset_id
    if config is not None:
        request.config.CopyFrom(training_config_to_pb(config))
    if validation_examples is not None:
        request.validation_examples.extend(example_to_pb(e) for e in validation_examples)
    if validation_dataset_id is not None:
        request.validation_dataset_id = validation_dataset_id
    request.candidate_backbones.extend(candidate_backbones)
    return request


def predict_request(
    head_id: str,
    inputs: InputData | Iterable[InputData],
    *,
    top_k: int,
    return_embedding: bool,
) -> pb.PredictRequest:
    # A lone str would otherwise be iterated character by character.
    batch = [inputs] if isinstance(inputs, str | bytes | Path) else inputs
    return pb.PredictRequest(
        head_id=head_id,
        inputs=[input_to_pb(value) for value in batch],
        top_k=top_k,
        return_embedding=return_embedding,
    )


def upload_requests(
    examples: Iterable[LabelledExample], chunk_size: int
) -> Iterator[pb.UploadDatasetRequest]:
    """Chunks of at most `chunk_size` examples, and of about `MAX_UPLOAD_CHUNK_BYTES` bytes."""
    if chunk_size < 1:
        raise ValueError("chunk_size must be at least 1")
    chunk: list[pb.Example] = []
    chunk_bytes = 0
    for example in examples:
        message = example_to_pb(example)
        size = message.ByteSize()
        if chunk and (len(chunk) >= chunk_size or chunk_bytes + size > MAX_UPLOAD_CHUNK_BYTES):
            yield pb.UploadDatasetRequest(examples=chunk)
            chunk, chunk_bytes = [], 0
        chunk.append(message)
        chunk_bytes += size
    if chunk:
        yield pb.UploadDatasetRequest(examples=chunk)
