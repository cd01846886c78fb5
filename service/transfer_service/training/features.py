"""The one frozen pass over a dataset: trunk-prefix states for every example, once.

With a frozen trunk prefix (no augmentation) these states are reused by every epoch: the
expensive part of fine-tuning then runs once instead of once per epoch. The pooled features
of the pretrained model come out of the same pass; they fit the head's standardisation.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from transfer_service.backbones.cache import LoadedBackbone
from transfer_service.domain import LabeledExample, ModelInput
from transfer_service.errors import JobCancelledError, ResourceExhaustedError
from transfer_service.heads import TaskHead
from transfer_service.torch_threads import pace_training


@dataclass(slots=True)
class ExtractedData:
    prefix_states: list[Any] | None  # per example, on the device; None when not cached
    # Per example: its encoded input (ModelInput), kept when its states are not cached, and
    # decoded again for each pass; compressed bytes are a fraction of decoded pixels.
    raw: list[ModelInput | None] | None
    pooled: torch.Tensor  # [N, D] pooled pretrained features, on the device


# Frozen forward passes run in batches of their own, independent of the head's training batch.
# On a CPU a batch's activations should stay in cache: EfficientNet-Lite0 at 224 px extracted
# 60-68 images/s at batch 16 and 42-47 at batch 64 on the 2-CPU development machine (a job
# thread beside the Predict compute thread, as in the server). An accelerator wants wide ones.
CPU_EXTRACTION_BATCH = 16
ACCELERATOR_EXTRACTION_BATCH = 128


def extraction_batch_size(device: torch.device) -> int:
    return CPU_EXTRACTION_BATCH if device.type == "cpu" else ACCELERATOR_EXTRACTION_BATCH


def pads_extraction_batches(device: torch.device) -> bool:
    """Whether a short last batch is filled up to the full batch size (with copies of its
    last example; rows are independent in eval mode). On an accelerator, yes: cuDNN builds an
    execution plan for every convolution at every new batch shape, seconds for a whole trunk
    on an H200 (transfer_service.torch_threads.jobs_train_on_fresh_threads), and a dataset of a new
    size would otherwise bring a new shape; the padded rows cost little there. On a CPU they
    would cost their full compute."""
    return device.type != "cpu"


def extract(
    backbone: LoadedBackbone,
    head: TaskHead,
    examples: Sequence[LabeledExample],
    prefix_end: int,
    keep_states: Callable[[int], bool],
    cancelled: threading.Event,
    on_progress: Callable[[int], None],
    pad_short_batch: bool | None = None,
    keep_raw: Callable[[int], bool] | None = None,
    budget_bytes: int | None = None,
) -> ExtractedData:
    """`keep_states(position)` says which examples keep prefix states; of the rest,
    `keep_raw(position)` says which keep their encoded input (default: all of them), to be
    decoded and run through the trunk in each epoch. `pad_short_batch`:
    pads_extraction_batches(backbone.device) unless given. With `budget_bytes`, what is kept
    (pooled features, states, encoded inputs) is counted as it grows, and past the budget the
    job stops with ResourceExhaustedError: the up-front estimate (plan_feature_memory) saw one
    example, and a text's length varies."""
    batch_size = extraction_batch_size(backbone.device)
    if pad_short_batch is None:
        pad_short_batch = pads_extraction_batches(backbone.device)
    trunk = backbone.trunk
    preprocessor = backbone.preprocessor
    states: list[Any] = []
    raw: list[Any] = []
    pooled_chunks: list[torch.Tensor] = []
    any_raw = False
    kept_bytes = 0
    head.eval()
    for start in range(0, len(examples), batch_size):
        if cancelled.is_set():
            raise JobCancelledError("cancelled during feature extraction")
        pace_training()  # on a CPU: fewer threads while Predicts come (torch_threads.CpuShare)
        chunk = examples[start : start + batch_size]
        loaded = [
            preprocessor.load(example.input, f"examples[{start + offset}]")
            for offset, example in enumerate(chunk)
        ]
        padding = batch_size - len(loaded) if pad_short_batch else 0
        batch = backbone.stack(loaded + [loaded[-1]] * padding)
        prefix = backbone.run_prefix(batch, 0, prefix_end, training=True)
        with torch.inference_mode():
            pooled = head.features(prefix).float()[: len(chunk)]
        pooled_chunks.append(pooled)
        kept_bytes += pooled.numel() * pooled.element_size()
        per_example = trunk.split(prefix)[: len(chunk)]
        for offset in range(len(chunk)):
            position = start + offset
            if keep_states(position):
                states.append(per_example[offset])
                raw.append(None)
                kept_bytes += trunk.example_bytes(per_example[offset])
            elif keep_raw is None or keep_raw(position):
                states.append(None)
                raw.append(chunk[offset].input)
                any_raw = True
                kept_bytes += encoded_bytes(chunk[offset].input)
            else:
                states.append(None)
                raw.append(None)
        del prefix, per_example, loaded, batch
        if budget_bytes is not None and kept_bytes > budget_bytes:
            raise ResourceExhaustedError(
                f"examples: the training features of the first {position + 1} examples take "
                f"{kept_bytes} bytes, over the feature cache budget of {budget_bytes} "
                "(TRANSFER_FEATURE_CACHE_BYTES); send fewer examples, or train a linear probe "
                "(trainable_blocks 0, no augmentation), whose features are smallest"
            )
        on_progress(min(start + batch_size, len(examples)))
    return ExtractedData(states, raw if any_raw else None, torch.cat(pooled_chunks))


def check_pooled_features_fit(count: int, feature_dim: int, budget_bytes: int, field: str) -> None:
    """Refuses up front (ResourceExhaustedError), before a job queues, a dataset whose pooled
    features alone (float32, the least any job keeps) are over the feature cache budget."""
    needed = pooled_bytes(count, feature_dim)
    if needed > budget_bytes:
        raise ResourceExhaustedError(
            f"{field}: {count} examples need {needed} bytes of pooled features, over the "
            f"feature cache budget of {budget_bytes} (TRANSFER_FEATURE_CACHE_BYTES); "
            f"send at most {budget_bytes // pooled_bytes(1, feature_dim)} examples"
        )


def pooled_bytes(count: int, feature_dim: int) -> int:
    """What `count` examples' pooled features take: float32 [count, feature_dim]."""
    return count * feature_dim * 4


@dataclass(frozen=True, slots=True)
class FeaturePlan:
    """What a job keeps between epochs, decided before extraction."""

    cache_train_states: bool  # training rows keep prefix states (else inputs, or nothing)
    keep_train_inputs: bool  # training rows keep their encoded inputs for a pass per epoch
    estimated_bytes: int


def plan_feature_memory(
    backbone: LoadedBackbone,
    example: LabeledExample,
    prefix_end: int,
    *,
    probe: bool,
    augment: bool,
    train_count: int,
    validation_count: int,
    budget_bytes: int,
) -> FeaturePlan:
    """Sizes what training keeps from one real example, and refuses (ResourceExhaustedError)
    a job that cannot fit in `budget_bytes` at all.

    Every example keeps its pooled features (feature_dim floats). A linear probe needs
    nothing else, unless it augments (then its training rows keep their encoded inputs and
    run the trunk each epoch). A head with trainable blocks keeps the validation rows' prefix
    states, and its training rows' states when they fit, else their encoded inputs (the
    trunk then runs on them in every epoch: slower, in a fraction of the memory)."""
    trunk = backbone.trunk
    input_bytes = encoded_bytes(example.input)
    state_bytes = 0
    if not probe:
        loaded = backbone.preprocessor.load(example.input, "examples[0]")
        state = backbone.run_prefix(backbone.stack([loaded]), 0, prefix_end, training=True)
        state_bytes = trunk.example_bytes(trunk.split(state)[0])
    fixed = pooled_bytes(train_count + validation_count, trunk.feature_dim) + (
        validation_count * state_bytes
    )
    if probe and not augment:
        plan = FeaturePlan(True, False, fixed)
    elif not augment and fixed + train_count * state_bytes <= budget_bytes:
        plan = FeaturePlan(True, False, fixed + train_count * state_bytes)
    else:
        plan = FeaturePlan(False, True, fixed + train_count * input_bytes)
    if plan.estimated_bytes > budget_bytes:
        raise ResourceExhaustedError(
            f"examples: training on {train_count + validation_count} examples would keep about "
            f"{plan.estimated_bytes} bytes of features, over the feature cache budget of "
            f"{budget_bytes} (TRANSFER_FEATURE_CACHE_BYTES); send fewer examples, or train a "
            "linear probe (trainable_blocks 0, no augmentation), whose features are smallest"
        )
    return plan


def encoded_bytes(model_input: ModelInput) -> int:
    """What an encoded input occupies: its image bytes, or its text's UTF-8 length."""
    if model_input.image is not None:
        return len(model_input.image)
    return len((model_input.text or "").encode("utf-8"))
