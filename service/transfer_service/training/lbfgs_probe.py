"""Solver "lbfgs_cv": the head's linear classifier fitted on the cached pooled features by
regularised_probe (L2-regularised logistic regression, full-batch L-BFGS), its L2 strength C
chosen on the given validation set or by k-fold cross-validation over the training examples.
One pass, no epochs: progress reports one event per C tried, then one for the fit kept."""

from __future__ import annotations

import time

import torch
from torch import nn

from transfer_service.domain import (
    CROSS_VALIDATION_PHASE,
    SOURCE_CROSS_VALIDATION,
    SOURCE_VALIDATION_SPLIT,
    TrainingProgress,
)
from transfer_service.heads import TaskHead
from transfer_service.torch_threads import intra_op_threads_within
from transfer_service.training.features import ExtractedData
from transfer_service.training.regularised_probe import (
    DEFAULT_C,
    Candidate,
    ProbeResult,
    RegularisedProbe,
    fit_cross_validated,
    fit_on_holdout,
)
from transfer_service.training.solver_context import (
    EpochStats,
    HeldOut,
    KeptEpoch,
    SolverContext,
    inverse_frequency,
)
from transfer_service.training.split import Split


def fit_lbfgs_probe(
    context: SolverContext,
    head: TaskHead,
    data: ExtractedData,
    split: Split,
    balance: str,
    folds: int,
) -> tuple[KeptEpoch, float]:
    """Fits the linear classifier by regularised_probe; returns the kept result (validation
    metrics out-of-fold, or on the given validation set) and the C chosen."""
    device = context.device
    classifier = head.classifier
    assert isinstance(classifier, nn.Linear)
    rows = torch.tensor(split.train + split.validation, dtype=torch.long)
    labels = split.labels.index_select(0, rows)
    classes = len(split.class_names)
    weights = None
    if balance != "none":  # oversampling and a weighted loss agree in expectation
        counts = torch.bincount(labels, minlength=classes).double()
        weights = inverse_frequency(counts).index_select(0, labels)
    with torch.no_grad():
        features = head.standardize(data.pooled.index_select(0, rows.to(device)))
    started = time.perf_counter()
    scored: list[Candidate] = []

    def report(candidate: Candidate) -> None:
        scored.append(candidate)
        context.emit(
            TrainingProgress(
                phase=CROSS_VALIDATION_PHASE,
                epoch=1,
                epochs=1,
                step=len(scored),
                total_steps=0,  # unknown: the search stops once held-out loss keeps rising
                train_loss=candidate.train_loss,
                train_accuracy=candidate.train_accuracy,
                validation_loss=candidate.validation_loss,
                validation_accuracy=candidate.validation_accuracy,
                learning_rate=0.0,
                examples_per_second=0.0,
                elapsed_seconds=time.perf_counter() - started,
                eta_seconds=0.0,
                epoch_end=False,
                regularization_c=candidate.c,
            )
        )

    train_count = len(split.train)
    # L-BFGS on [N, D] with N, D in the hundreds is a chain of small products: split over
    # two threads it spent most of its time in hand-offs (one 5-fold search: 39 s on two
    # threads of a busy 2-CPU machine, 5.4 s on one).
    with intra_op_threads_within(1):
        probe = RegularisedProbe(
            features,
            labels,
            classes,
            sample_weights=weights,
            label_smoothing=context.config.label_smoothing,
            should_stop=context.raise_if_cancelled,
        )
        if split.validation:
            result: ProbeResult = fit_on_holdout(
                probe,
                torch.arange(train_count),
                torch.arange(train_count, len(rows)),
                report,
            )
        else:
            result = fit_cross_validated(probe, labels, folds, context.config.seed, report)
    context.on_step(time.perf_counter() - started)
    with torch.no_grad():
        classifier.weight.copy_(result.fit.weight.to(device))
        classifier.bias.copy_(result.fit.bias.to(device))
    stats = EpochStats()
    stats.add(result.train_loss, round(result.train_accuracy * train_count), train_count)
    chosen = result.chosen
    validation = (
        (None, None) if chosen is None else (chosen.validation_loss, chosen.validation_accuracy)
    )
    context.emit(
        context.progress(
            epoch=1,
            epochs=1,
            step=1,
            total_steps=1,
            stats=stats,
            validation=validation,
            learning_rate=0.0,
            train_started=started,
            epoch_end=True,
        )
    )
    c = chosen.c if chosen is not None else DEFAULT_C
    held_out = None
    if result.held_out_logits is not None and result.held_out_rows is not None:
        held_out = HeldOut(
            result.held_out_logits,
            labels.index_select(0, result.held_out_rows).cpu(),
            SOURCE_VALIDATION_SPLIT if split.validation else SOURCE_CROSS_VALIDATION,
        )
    return KeptEpoch(stats, validation[0], validation[1], 1, held_out), c
