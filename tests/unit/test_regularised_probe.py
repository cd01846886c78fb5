"""The cross-validated L-BFGS probe: its optimum is scikit-learn's, its folds are stratified,
its search picks strong L2 for noise and weak L2 for separable classes, and the Trainer
installs the refit on every example."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from transfer_service.backbones.cache import LoadedBackbone
from transfer_service.domain import (
    EventPayload,
    FineTuneSpec,
    JobStarted,
    LabeledExample,
    ModelInput,
    TrainingConfig,
    TrainingProgress,
)
from transfer_service.errors import JobCancelledError
from transfer_service.training.features import extract
from transfer_service.training.regularised_probe import (
    C_DECADES,
    RegularisedProbe,
    default_folds,
    fit_cross_validated,
    stratified_folds,
)
from transfer_service.training.trainer import Trainer

from tests.datasets import fashion_mnist


def blobs(
    rows: int, dims: int, classes: int, spread: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian classes [rows, dims] centred and scaled like TaskHead.standardize does."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(rows) % classes
    centres = torch.randn(classes, dims, generator=generator)
    features = centres[labels] * spread + torch.randn(rows, dims, generator=generator)
    centred = features - features.mean(dim=0)
    return centred / centred.pow(2).mean().sqrt(), labels


def centred_weights(weight: np.ndarray) -> np.ndarray:
    """Softmax logits are unchanged by adding one vector to every class's weights."""
    return weight - weight.mean(axis=0)


@pytest.mark.parametrize(("rows", "dims"), [(40, 300), (300, 40)])
def test_optimum_is_scikit_learns(rows: int, dims: int) -> None:
    """Fewer rows than dimensions takes the row-space path; more rows the direct one."""
    features, labels = blobs(rows, dims, 4, 0.3, seed=rows)
    probe = RegularisedProbe(features, labels, 4)
    ours = probe.to_feature_space(probe.fit(0.1))
    reference = LogisticRegression(C=0.1, tol=1e-10, max_iter=10_000).fit(
        features.numpy(), labels.numpy()
    )
    difference = centred_weights(ours.weight.double().numpy()) - centred_weights(reference.coef_)
    assert np.abs(difference).max() < 1e-4 * np.abs(reference.coef_).max() + 1e-6
    ours_probabilities = torch.softmax(features @ ours.weight.T + ours.bias, dim=1).numpy()
    assert np.abs(ours_probabilities - reference.predict_proba(features.numpy())).max() < 1e-3


def test_folds_hold_every_row_out_once_and_stratify() -> None:
    labels = torch.tensor([0] * 10 + [1] * 5 + [2] * 7)
    folds = stratified_folds(labels, 5, seed=3)
    held = torch.cat(folds).sort().values
    assert held.tolist() == list(range(len(labels)))
    for fold in folds:
        counts = torch.bincount(labels[fold], minlength=3)
        assert counts[0] == 2 and counts[1] == 1  # 10 and 5 examples over 5 folds
        assert counts[2] in (1, 2)
    assert stratified_folds(labels, 5, seed=3)[0].tolist() == folds[0].tolist()  # seeded


def test_default_folds() -> None:
    assert default_folds([5, 5, 5]) == 5
    assert default_folds([3, 9]) == 3  # never more than the smallest class
    assert default_folds([1, 9]) == 0  # a single example cannot be held out
    assert default_folds([300, 300]) == 3  # large sets


def test_search_picks_strong_l2_for_noise_and_weak_for_separable_classes() -> None:
    separable, separable_labels = blobs(60, 200, 3, 1.5, seed=1)
    noise, _ = blobs(60, 200, 3, 0.0, seed=2)
    noise_labels = torch.randperm(60, generator=torch.Generator().manual_seed(0)) % 3
    separable_result = fit_cross_validated(
        RegularisedProbe(separable, separable_labels, 3), separable_labels, 5, seed=0
    )
    noise_result = fit_cross_validated(
        RegularisedProbe(noise, noise_labels, 3), noise_labels, 5, seed=0
    )
    assert separable_result.chosen is not None and noise_result.chosen is not None
    assert noise_result.chosen.c <= 1e-3 < separable_result.chosen.c
    assert separable_result.chosen.validation_accuracy > 0.9
    # The chosen C has the lowest held-out loss of every C scored.
    losses = [candidate.validation_loss for candidate in separable_result.candidates]
    assert separable_result.chosen.validation_loss == min(losses)
    assert all(C_DECADES[0] <= c.c <= C_DECADES[-1] for c in separable_result.candidates)


def test_search_can_be_abandoned() -> None:
    features, labels = blobs(30, 20, 3, 1.0, seed=4)
    calls = []

    def stop() -> None:
        calls.append(1)
        if len(calls) > 3:
            raise JobCancelledError("cancelled by request")

    with pytest.raises(JobCancelledError):
        fit_cross_validated(RegularisedProbe(features, labels, 3, should_stop=stop), labels, 3, 0)


def test_trainer_installs_the_refit_at_the_chosen_c(lite0: LoadedBackbone) -> None:
    """Real trunk, real images: the head's classifier is the full-data optimum at the C that
    cross-validation chose, the events say so, and validation metrics are out-of-fold."""
    examples = tuple(
        LabeledExample(ModelInput(image=x), y) for x, y in fashion_mnist(6, classes=3, seed=7)
    )
    events: list[EventPayload] = []
    config = TrainingConfig(solver="lbfgs_cv", seed=5)
    result = Trainer(
        lite0,
        FineTuneSpec("efficientnet_lite0", "t", examples, config),
        feature_cache_bytes=10**9,
        emit=events.append,
        cancelled=threading.Event(),
    ).run()
    started = next(e for e in events if isinstance(e, JobStarted))
    assert started.plan.solver == "lbfgs_cv" and started.plan.cv_folds == 5
    assert started.train_examples == len(examples) and started.validation_examples == 0
    scored = [
        e for e in events if isinstance(e, TrainingProgress) and e.phase == "cross_validation"
    ]
    assert len(scored) >= 3 and all(e.regularization_c is not None for e in scored)
    metrics = result.metrics
    assert metrics.regularization_c is not None
    best = min(scored, key=lambda e: (e.validation_loss or 0.0, e.regularization_c or 0.0))
    assert metrics.regularization_c == pytest.approx(best.regularization_c)
    assert metrics.validation_accuracy == pytest.approx(best.validation_accuracy)

    head = result.head
    data = extract(
        lite0,
        head,
        examples,
        lite0.trunk.num_stages,
        keep_states=lambda i: False,
        cancelled=threading.Event(),
        on_progress=lambda done: None,
    )
    features = head.standardize(data.pooled).double().numpy()
    labels = np.array([result.class_names.index(e.label) for e in examples])
    reference = LogisticRegression(C=metrics.regularization_c, tol=1e-10, max_iter=10_000).fit(
        features, labels
    )
    ours = head.classifier.weight.detach().double().numpy()
    difference = centred_weights(ours) - centred_weights(reference.coef_)
    assert np.abs(difference).max() < 1e-3 * np.abs(reference.coef_).max() + 1e-6
