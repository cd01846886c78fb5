"""The fast paths change speed, not answers: reduced-precision trunks agree with fp32, and
training on cached trunk outputs gives the head that recomputing them every epoch gives."""

from __future__ import annotations

import threading

import pytest
import torch
from transfer_service.backbones.cache import LoadedBackbone, forced_compute_dtype
from transfer_service.domain import FineTuneSpec, LabeledExample, ModelInput, TrainingConfig
from transfer_service.heads import TaskHead, build_head
from transfer_service.training.features import (
    ExtractedData,
    extract,
    extraction_batch_size,
    plan_feature_memory,
)
from transfer_service.training.trainer import Trainer

from tests.datasets import bbc_news, fashion_mnist
from tests.devices import backbone_cache, full_precision_cuda


def backbone(precision: str) -> LoadedBackbone:
    return backbone_cache(64, precision=precision).get("efficientnet_lite0")


def training_examples() -> tuple[LabeledExample, ...]:
    return tuple(
        LabeledExample(ModelInput(image=x), y) for x, y in fashion_mnist(6, classes=3, seed=51)
    )


def train(loaded: LoadedBackbone, config: TrainingConfig, cache_bytes: int) -> TaskHead:
    examples = training_examples()
    trainer = Trainer(
        loaded,
        FineTuneSpec("efficientnet_lite0", "t", examples, config),
        feature_cache_bytes=cache_bytes,
        emit=lambda payload: None,
        cancelled=threading.Event(),
    )
    return trainer.run().head


def logits(loaded: LoadedBackbone, head: TaskHead, images: list[bytes]) -> torch.Tensor:
    pre = loaded.preprocessor
    state = loaded.stack([pre.load(ModelInput(image=x), "x") for x in images])
    prefix = loaded.run_prefix(state, 0, loaded.trunk.prefix_end(len(head.suffix)))
    with torch.inference_mode():
        return head(prefix)


def test_an_explicit_precision_forces_it_and_auto_is_measured() -> None:
    assert forced_compute_dtype("auto") is None  # tests/unit/test_precision_choice.py
    assert forced_compute_dtype("bf16") == torch.bfloat16
    assert forced_compute_dtype("fp32") == torch.float32


def test_bf16_trunk_agrees_with_fp32_on_real_images() -> None:
    full = backbone("fp32")
    reduced = backbone("bf16")
    head = train(full, TrainingConfig(epochs=30, seed=1), 10**9)
    images = [x for x, _ in fashion_mnist(40, split="test", classes=3, seed=52)]
    reference = logits(full, head, images)
    fast = logits(reduced, head, images)
    assert fast.dtype == torch.float32  # heads run in fp32 whatever the trunk precision
    agreement = (reference.argmax(1) == fast.argmax(1)).float().mean().item()
    # Documented tolerance (docs/design.md): top-1 agrees on >= 95% of inputs; class
    # probabilities differ by < 0.02 on average and < 0.2 at worst.
    assert agreement >= 0.95
    difference = (reference.softmax(1) - fast.softmax(1)).abs()
    assert difference.mean().item() < 0.02
    assert difference.max().item() < 0.2


def all_states_bytes(loaded: LoadedBackbone, config: TrainingConfig) -> int:
    """What the job would keep with every example's prefix states cached."""
    examples = training_examples()
    plan = plan_feature_memory(
        loaded,
        examples[0],
        loaded.trunk.prefix_end(config.trainable_blocks),
        probe=False,
        augment=False,
        train_count=len(examples),
        validation_count=0,
        budget_bytes=10**12,
    )
    assert plan.cache_train_states
    return plan.estimated_bytes


# A linear probe keeps only pooled features either way; these heads have trunk blocks.
@pytest.mark.parametrize("trainable_blocks", [1, 2])
def test_cached_features_train_the_same_head_as_recomputing(trainable_blocks: int) -> None:
    loaded = backbone("fp32")
    config = TrainingConfig(epochs=4, seed=5, trainable_blocks=trainable_blocks)
    images = [x for x, _ in fashion_mnist(8, split="test", classes=3, seed=53)]
    # On an H200 with TF32 and cuDNN's unordered weight gradients the two heads' logits came
    # out up to 0.11 apart after 4 epochs through one unfrozen block; on a CPU, < 1e-3.
    with full_precision_cuda():
        cached = train(loaded, config, cache_bytes=10**9)
        # Just short of every state: the training rows keep their encoded images instead,
        # and the trunk runs on them in every epoch.
        recomputed = train(loaded, config, cache_bytes=all_states_bytes(loaded, config) - 1)
        torch.testing.assert_close(
            logits(loaded, cached, images),
            logits(loaded, recomputed, images),
            atol=1e-3,
            rtol=1e-3,
        )


@pytest.mark.parametrize("name", ["efficientnet_lite0", "minilm_l6"])
def test_padding_the_short_extraction_batch_changes_no_example(name: str) -> None:
    """On an accelerator the last extraction batch is filled up to full size (no new cuDNN
    shapes); the examples' states and features must be what an unpadded pass gives."""
    loaded = backbone_cache(64).get(name)
    inputs = (
        [ModelInput(image=x) for x, _ in fashion_mnist(7, classes=3, seed=54)]
        if name == "efficientnet_lite0"
        else [ModelInput(text=text) for text, _ in bbc_news(4)]
    )
    examples = [LabeledExample(x, "y") for x in inputs]
    batch = extraction_batch_size(loaded.device)
    assert len(examples) % batch != 0  # a short last batch to pad
    torch.manual_seed(0)
    head = build_head(loaded.trunk, 1, num_classes=3)
    prefix_end = loaded.trunk.prefix_end(1)

    def run(pad: bool) -> ExtractedData:
        return extract(
            loaded,
            head,
            examples,
            prefix_end,
            keep_states=lambda i: True,
            cancelled=threading.Event(),
            on_progress=lambda done: None,
            pad_short_batch=pad,
        )

    plain, padded = run(False), run(True)
    assert padded.pooled.shape == plain.pooled.shape == (len(examples), loaded.trunk.feature_dim)
    # fp32 kernels pick their blocking per batch shape, so the last bits may move (a fresh
    # CI machine: 2e-5 on a value near 0.8); a wrong or shifted row would be off by O(1).
    torch.testing.assert_close(padded.pooled, plain.pooled, atol=1e-4, rtol=1e-4)
    assert plain.prefix_states is not None and padded.prefix_states is not None
    assert len(padded.prefix_states) == len(examples)
    for mine, theirs in zip(padded.prefix_states, plain.prefix_states, strict=True):
        torch.testing.assert_close(mine, theirs, atol=1e-4, rtol=1e-4)
