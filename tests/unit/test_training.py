"""Split, freezing and the training loop on real backbones (tiny real data)."""

from __future__ import annotations

import itertools
import threading
from collections import Counter

import pytest
import torch
from torch import nn
from transfer_service.backbones.catalog import EfficientNetLiteSpec
from transfer_service.heads import build_head
from transfer_service.training.fine_tune_loop import warmup_cosine
from transfer_service.training.split import stratified_split


def test_split_is_stratified_and_seeded() -> None:
    labels = ["a"] * 10 + ["b"] * 5 + ["c"] * 1
    split = stratified_split(labels, 0.2, seed=7)
    held_out = Counter(labels[i] for i in split.validation)
    assert held_out == {"a": 2, "b": 1}  # c's only example stays in training
    assert sorted(split.train + split.validation) == list(range(len(labels)))
    assert stratified_split(labels, 0.2, seed=7).validation == split.validation
    assert stratified_split(labels, 0.2, seed=8).validation != split.validation
    assert split.class_names == ("a", "b", "c")


def test_head_owns_copies_of_the_unfrozen_blocks_with_bn_frozen() -> None:
    trunk = EfficientNetLiteSpec(0, 224).build_trunk(None)
    trunk.requires_grad_(False)
    head = build_head(trunk, trainable_blocks=2, num_classes=3)
    assert len(head.suffix) == 2
    assert all(p.requires_grad for p in head.parameters())
    assert not any(p.requires_grad for p in trunk.parameters())
    # Copies, not shared modules: training the head never touches the resident trunk.
    trunk_ids = {id(p) for p in trunk.parameters()}
    assert not trunk_ids & {id(p) for p in head.parameters()}
    head.train()
    norms = [m for m in head.suffix.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert norms and not any(m.training for m in norms)
    assert head.classifier.training


def test_probe_head_has_no_blocks() -> None:
    trunk = EfficientNetLiteSpec(0, 224).build_trunk(None)
    head = build_head(trunk, trainable_blocks=0, num_classes=5)
    assert len(head.suffix) == 0
    assert sum(p.numel() for p in head.parameters()) == 1280 * 5 + 5


def test_warmup_then_cosine() -> None:
    values = [warmup_cosine(step, 10, 100) for step in range(100)]
    assert values[0] == pytest.approx(0.1) and values[9] == pytest.approx(1.0)
    assert values[10] == pytest.approx(1.0)
    assert all(a >= b for a, b in itertools.pairwise(values[10:]))
    assert values[-1] < 0.01


def test_cancel_event_is_honoured_at_the_next_step() -> None:
    from transfer_service.backbones.cache import BackboneCache
    from transfer_service.backbones.catalog import PreprocessingOptions, default_catalog
    from transfer_service.domain import FineTuneSpec, LabeledExample, ModelInput, TrainingConfig
    from transfer_service.errors import JobCancelledError
    from transfer_service.training.trainer import Trainer

    from tests.datasets import fashion_mnist

    cache = BackboneCache(
        default_catalog(),
        weights_dir=__import__("pathlib").Path("/nonexistent"),
        device=torch.device("cpu"),
        options=PreprocessingOptions(32, 64, 10**7),
        budget_bytes=10**10,
    )
    examples = tuple(LabeledExample(ModelInput(image=x), y) for x, y in fashion_mnist(4, classes=2))
    cancelled = threading.Event()
    steps: list[float] = []

    def on_step(seconds: float) -> None:
        steps.append(seconds)
        if len(steps) == 3:
            cancelled.set()

    trainer = Trainer(
        cache.get("efficientnet_lite0"),
        FineTuneSpec("efficientnet_lite0", "x", examples, TrainingConfig(epochs=50, batch_size=1)),
        feature_cache_bytes=10**9,
        emit=lambda payload: None,
        cancelled=cancelled,
        on_step=on_step,
    )
    with pytest.raises(JobCancelledError):
        trainer.run()
    assert len(steps) == 3
