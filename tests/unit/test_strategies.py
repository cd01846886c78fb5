"""Each transfer-learning strategy on real backbones and real (tiny) data: what trains, at
which learning rate, which BatchNorm layers move, what early stopping keeps, and that a
prototype head is exactly the class means."""

from __future__ import annotations

import threading

import pytest
import torch
from torch import nn
from transfer_service.backbones.cache import LoadedBackbone
from transfer_service.domain import (
    EventPayload,
    FineTuneSpec,
    JobStarted,
    JobWarning,
    LabeledExample,
    ModelInput,
    TrainingConfig,
    TrainingProgress,
)
from transfer_service.heads import PrototypeClassifier, build_head
from transfer_service.training.fine_tune_loop import (
    BLOCK_LR_FACTOR,
    build_optimizer,
    unfrozen_blocks,
)
from transfer_service.training.selection import CandidateScore, choose, sample_examples
from transfer_service.training.trainer import Trainer, TrainingResult

from tests.datasets import fashion_mnist


@pytest.fixture(scope="module")
def examples() -> tuple[LabeledExample, ...]:
    return tuple(
        LabeledExample(ModelInput(image=x), y) for x, y in fashion_mnist(8, classes=3, seed=61)
    )


def run(
    backbone: LoadedBackbone,
    examples: tuple[LabeledExample, ...],
    config: TrainingConfig,
    events: list[EventPayload] | None = None,
    validation: tuple[LabeledExample, ...] = (),
) -> TrainingResult:
    sink: list[EventPayload] = events if events is not None else []
    trainer = Trainer(
        backbone,
        FineTuneSpec("efficientnet_lite0", "t", examples, config, validation_examples=validation),
        feature_cache_bytes=10**9,
        emit=sink.append,
        cancelled=threading.Event(),
    )
    return trainer.run()


def test_discriminative_learning_rates_per_block(lite0: LoadedBackbone) -> None:
    head = build_head(lite0.trunk, trainable_blocks=3, num_classes=2)
    config = TrainingConfig(learning_rate=1e-2, trainable_blocks=3, layer_lr_decay=0.5)
    optimizer = build_optimizer(head, config)
    rates = [group["lr"] for group in optimizer.param_groups]
    top = 1e-2 * BLOCK_LR_FACTOR
    assert rates == pytest.approx([1e-2, top, top * 0.5, top * 0.25])
    # The groups hold the top block first: the last suffix block's parameters.
    assert optimizer.param_groups[1]["params"][0] is next(head.suffix[-1].parameters())


def test_progressive_unfreezing_opens_one_block_every_k_epochs(lite0: LoadedBackbone) -> None:
    head = build_head(lite0.trunk, trainable_blocks=2, num_classes=2)
    opened = []
    for epoch in range(1, 8):
        head.train()
        head.set_unfrozen_blocks(unfrozen_blocks(head, epoch, unfreeze_every_epochs=2))
        opened.append([all(p.requires_grad for p in block.parameters()) for block in head.suffix])
    assert opened == [
        [False, False], [False, False],  # epochs 1-2: classifier only
        [False, True], [False, True],  # then the top block
        [True, True], [True, True], [True, True],  # then both
    ]  # fmt: skip
    frozen_block = head.suffix[0]
    head.set_unfrozen_blocks(1)
    assert not frozen_block.training  # frozen blocks run in eval mode (no dropout)


def test_batchnorm_statistics_never_move(lite0: LoadedBackbone, examples) -> None:  # type: ignore[no-untyped-def]
    result = run(lite0, examples, TrainingConfig(epochs=2, trainable_blocks=2))
    trained_norms = [
        m for m in result.head.suffix.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
    ]
    pretrained_norms = [
        m
        for stage in lite0.trunk.stages[-2:]
        for m in stage.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
    ]
    assert trained_norms and len(trained_norms) == len(pretrained_norms)
    for trained, pretrained in zip(trained_norms, pretrained_norms, strict=True):
        assert torch.equal(trained.running_mean, pretrained.running_mean)
        assert torch.equal(trained.running_var, pretrained.running_var)


def test_early_stopping_restores_the_best_epoch(lite0: LoadedBackbone, examples) -> None:  # type: ignore[no-untyped-def]
    events: list[EventPayload] = []
    # A learning rate this high overfits within a few epochs; validation loss then rises.
    result = run(
        lite0,
        examples,
        TrainingConfig(epochs=40, learning_rate=0.5, early_stopping_patience=3),
        events,
    )
    epoch_ends = [e for e in events if isinstance(e, TrainingProgress) and e.epoch_end]
    losses = {e.epoch: e.validation_loss for e in epoch_ends}
    best_epoch = min(losses, key=lambda epoch: losses[epoch])  # type: ignore[arg-type,return-value]
    assert result.metrics.best_epoch == best_epoch
    assert result.metrics.stopped_early
    assert result.metrics.epochs_run == best_epoch + 3
    assert result.metrics.validation_loss == pytest.approx(losses[best_epoch])


def test_prototype_head_is_the_class_means(lite0: LoadedBackbone, examples) -> None:  # type: ignore[no-untyped-def]
    events: list[EventPayload] = []
    result = run(lite0, examples, TrainingConfig(head_type="prototype"), events)
    training = [e for e in events if isinstance(e, TrainingProgress) and e.phase == "training"]
    assert [(e.step, e.epoch_end) for e in training] == [(0, True)]  # no gradient step
    head = result.head
    classifier = head.classifier
    assert isinstance(classifier, PrototypeClassifier)
    started = next(e for e in events if isinstance(e, JobStarted))
    assert started.plan.steps_per_epoch == 0
    # Recompute the means from scratch on the training split.
    trunk = lite0.trunk
    pre = lite0.preprocessor
    train_examples = [examples[i] for i in range(len(examples))]
    from transfer_service.training.split import stratified_split

    split = stratified_split([e.label for e in train_examples], 0.2, 0)
    inputs = pre.finish([pre.load(train_examples[i].input, "x") for i in split.train], None)
    with torch.inference_mode():
        pooled = trunk.pool(trunk.run_stages(trunk.collate(inputs), 0, trunk.num_stages))
        embeddings = nn.functional.normalize(head.standardize(pooled), dim=1)
    labels = split.labels[list(split.train)]
    for class_index in range(len(result.class_names)):
        mean = nn.functional.normalize(embeddings[labels == class_index].mean(0), dim=0)
        torch.testing.assert_close(classifier.prototypes[class_index], mean, atol=1e-5, rtol=1e-4)
    assert result.metrics.epochs_run == 1 and result.metrics.validation_accuracy is not None


def test_mlp_head_has_a_hidden_layer_with_dropout(lite0: LoadedBackbone, examples) -> None:  # type: ignore[no-untyped-def]
    result = run(lite0, examples, TrainingConfig(epochs=3, head_type="mlp", hidden_dim=32))
    layers = list(result.head.classifier.children())
    assert isinstance(layers[0], nn.Linear) and layers[0].out_features == 32
    assert any(isinstance(layer, nn.Dropout) and layer.p == pytest.approx(0.2) for layer in layers)


def test_imbalance_is_reported_and_balanced(lite0: LoadedBackbone) -> None:
    data = fashion_mnist(12, classes=2, seed=62)
    labels = sorted({y for _, y in data})
    # Keep all of class 0 and a quarter of class 1.
    kept = [(x, y) for x, y in data if y == labels[0]] + [
        (x, y) for x, y in data if y == labels[1]
    ][:3]
    examples = tuple(LabeledExample(ModelInput(image=x), y) for x, y in kept)
    for mode, expected in (
        ("auto", "weighted_loss"),
        ("oversample", "oversample"),
        ("none", "none"),
    ):
        events: list[EventPayload] = []
        run(
            lite0,
            examples,
            TrainingConfig(epochs=2, class_balance=mode, validation_fraction=0.0),
            events,
        )
        started = next(e for e in events if isinstance(e, JobStarted))
        assert started.class_balance == expected
        assert started.imbalance_ratio == pytest.approx(12 / 3)


def test_caller_validation_set_and_small_set_warning(lite0: LoadedBackbone, examples) -> None:  # type: ignore[no-untyped-def]
    validation = tuple(
        LabeledExample(ModelInput(image=x), y)
        for x, y in fashion_mnist(2, split="test", classes=3, seed=63)
    )
    events: list[EventPayload] = []
    result = run(lite0, examples, TrainingConfig(epochs=3), events, validation)
    started = next(e for e in events if isinstance(e, JobStarted))
    assert started.train_examples == len(examples)  # nothing held out of training
    assert started.validation_examples == len(validation)
    warnings = [e for e in events if isinstance(e, JobWarning)]
    assert [w.code for w in warnings][:1] == ["small_validation_set"]
    metrics = result.metrics
    assert metrics.majority_baseline_accuracy == pytest.approx(1 / 3)
    assert metrics.train_validation_gap == pytest.approx(
        metrics.train_accuracy - (metrics.validation_accuracy or 0.0)
    )


def test_label_smoothing_and_weight_decay_reach_the_optimiser(
    lite0: LoadedBackbone, examples
) -> None:  # type: ignore[no-untyped-def]
    smooth = run(lite0, examples, TrainingConfig(epochs=3, label_smoothing=0.3, seed=4))
    sharp = run(lite0, examples, TrainingConfig(epochs=3, seed=4))
    # Label smoothing bounds how confident the head gets: its training loss cannot go as low.
    assert smooth.metrics.train_loss > sharp.metrics.train_loss


def test_auto_selection_breaks_accuracy_ties_by_cost() -> None:
    cheap = CandidateScore("a", 0.90, gflops=0.4, latency_ms=1.0)
    dear = CandidateScore("b", 0.905, gflops=4.0, latency_ms=9.0)
    better = CandidateScore("c", 0.95, gflops=4.0, latency_ms=9.0)
    assert choose([cheap, dear]).backbone == "a"
    assert choose([cheap, dear, better]).backbone == "c"
    data = [LabeledExample(ModelInput(text=str(i)), "x" if i % 4 else "y") for i in range(200)]
    sample = sample_examples(data, seed=1, per_class=10)
    assert sorted(e.label for e in sample) == ["x"] * 10 + ["y"] * 10
