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

from service.backbones.cache import LoadedBackbone
from service.domain import LabeledExample
from service.errors import JobCancelledError
from service.heads import TaskHead


@dataclass(slots=True)
class ExtractedData:
    prefix_states: list[Any] | None  # per example, on the device; None when not cached
    raw: list[Any] | None  # per example loaded input (CPU), kept when states are not cached
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
    on an H200 (service.torch_threads.jobs_train_on_fresh_threads), and a dataset of a new
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
) -> ExtractedData:
    """`keep_states(position)` says which examples keep prefix states (the rest keep raw);
    `pad_short_batch`: pads_extraction_batches(backbone.device) unless given."""
    batch_size = extraction_batch_size(backbone.device)
    if pad_short_batch is None:
        pad_short_batch = pads_extraction_batches(backbone.device)
    trunk = backbone.trunk
    preprocessor = backbone.preprocessor
    states: list[Any] = []
    raw: list[Any] = []
    pooled_chunks: list[torch.Tensor] = []
    any_raw = False
    head.eval()
    for start in range(0, len(examples), batch_size):
        if cancelled.is_set():
            raise JobCancelledError("cancelled during feature extraction")
        chunk = examples[start : start + batch_size]
        loaded = [
            preprocessor.load(example.input, f"examples[{start + offset}]")
            for offset, example in enumerate(chunk)
        ]
        padding = batch_size - len(loaded) if pad_short_batch else 0
        batch = backbone.stack(loaded + [loaded[-1]] * padding)
        prefix = backbone.run_prefix(batch, 0, prefix_end)
        with torch.inference_mode():
            pooled_chunks.append(head.features(prefix).float()[: len(chunk)])
        per_example = trunk.split(prefix)[: len(chunk)]
        for offset in range(len(chunk)):
            if keep_states(start + offset):
                states.append(per_example[offset])
                raw.append(None)
            else:
                states.append(None)
                raw.append(loaded[offset])
                any_raw = True
        on_progress(min(start + batch_size, len(examples)))
    return ExtractedData(states, raw if any_raw else None, torch.cat(pooled_chunks))


def estimate_state_bytes(backbone: LoadedBackbone, example: LabeledExample, prefix_end: int) -> int:
    """Bytes one example's prefix state occupies (measured on one real example)."""
    trunk = backbone.trunk
    batch = backbone.stack([backbone.preprocessor.load(example.input, "examples[0]")])
    state = backbone.run_prefix(batch, 0, prefix_end)
    return trunk.example_bytes(trunk.split(state)[0])
