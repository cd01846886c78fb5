"""Head type "prototype": no gradient steps; the classifier's prototypes are the class means
of the L2-normalised, standardised pooled training features, fitted in one pass."""

from __future__ import annotations

import torch

from transfer_service.heads import PrototypeClassifier, TaskHead
from transfer_service.training.features import ExtractedData
from transfer_service.training.solver_context import (
    EpochStats,
    KeptEpoch,
    SolverContext,
    evaluate,
)
from transfer_service.training.split import Split


def fit_prototypes(
    context: SolverContext,
    head: TaskHead,
    data: ExtractedData,
    split: Split,
    labels: torch.Tensor,
) -> KeptEpoch:
    """Fits the prototypes; `labels` [N] on the device, for every extracted example."""
    classifier = head.classifier
    assert isinstance(classifier, PrototypeClassifier)
    classifier.temperature.fill_(context.config.prototype_temperature)
    rows = torch.tensor(split.train, dtype=torch.long, device=context.device)
    with torch.no_grad():
        embeddings = head.standardize(data.pooled.index_select(0, rows))
        classifier.fit(embeddings, labels.index_select(0, rows))
    train_loss, train_accuracy = evaluate(context, head, data, split.train, labels, True, 0)
    assert train_loss is not None and train_accuracy is not None
    stats = EpochStats()
    stats.add(train_loss, round(train_accuracy * len(rows)), len(rows))
    val_loss, val_accuracy = evaluate(context, head, data, split.validation, labels, True, 0)
    context.emit(
        context.progress(
            epoch=1,
            epochs=1,
            step=0,
            total_steps=0,
            stats=stats,
            validation=(val_loss, val_accuracy),
            learning_rate=0.0,
            train_started=0.0,
            epoch_end=True,
        )
    )
    return KeptEpoch(stats, val_loss, val_accuracy, 1)
