"""A head's evaluation report from held-out logits and labels, and the temperature that
calibrates its scores. Pure torch (no scikit-learn in the server); the figures follow
scikit-learn's definitions (tests/unit/test_evaluation.py compares them).

Temperature scaling (Guo et al., 2017): one scalar T > 0 divides every logit before the
softmax, fitted to minimise the negative log-likelihood of held-out predictions. It leaves
the ranking of classes (so accuracy and every top-k figure) untouched and only makes the
scores honest: heads trained with AdamW, label smoothing or prototypes are over- or
under-confident by a roughly constant factor, which one scalar corrects cheaply (one division
per head in Predict) and robustly on small held-out sets, where per-class calibrators overfit.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from transfer_service.domain import ClassMetrics, EvaluationReport

ECE_BINS = 15
MAX_TOP_K = 5
# Above this many classes the report carries no confusion matrix (10,000 cells already; a
# 10,000-class head would carry 10^8). per_class still has every class.
MAX_CONFUSION_CLASSES = 100
# The temperature search interval: wide enough for any head seen so far (T near 1 for the
# L-BFGS probe, which already minimises log-loss; 0.3-3 for the others), bounded so that a
# held-out set the head separates perfectly (NLL falling forever as T -> 0) stops at a value.
MIN_TEMPERATURE = 0.05
MAX_TEMPERATURE = 20.0
# Fewer held-out examples than this fit no temperature (T = 1): a scalar fitted on a handful
# of predictions mostly follows their noise.
MIN_CALIBRATION_EXAMPLES = 20
_GOLDEN_STEPS = 60  # the bracket shrinks 0.618x a step: 60 steps resolve log T to ~1e-12
# Row chunks of the NLL and report passes stay within this many logits (float64).
_CHUNK_ELEMENTS = 4 * 1024**2


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The T in [MIN_TEMPERATURE, MAX_TEMPERATURE] minimising mean NLL of softmax(logits / T)
    ([N, C] logits, [N] class indices); 1 with fewer than MIN_CALIBRATION_EXAMPLES rows.

    A golden-section search on log T: the NLL is convex in 1/T (log-sum-exp of a linear
    function minus a linear one), so unimodal in log T, and a bounded 1-D search needs no
    optimiser, gradients or step size."""
    if logits.shape[0] < MIN_CALIBRATION_EXAMPLES:
        return 1.0
    logits = logits.detach().to("cpu", torch.float64)
    labels = labels.detach().cpu()
    low, high = math.log(MIN_TEMPERATURE), math.log(MAX_TEMPERATURE)
    ratio = (math.sqrt(5.0) - 1.0) / 2.0
    left, right = high - ratio * (high - low), low + ratio * (high - low)
    f_left, f_right = _nll(logits, labels, left), _nll(logits, labels, right)
    for _ in range(_GOLDEN_STEPS):
        if f_left <= f_right:
            high, right, f_right = right, left, f_left
            left = high - ratio * (high - low)
            f_left = _nll(logits, labels, left)
        else:
            low, left, f_left = left, right, f_right
            right = low + ratio * (high - low)
            f_right = _nll(logits, labels, right)
    best = (left + right) / 2.0
    # T = 1 is kept unless the fit is actually better (ties: no change to the scores).
    return math.exp(best) if _nll(logits, labels, best) < _nll(logits, labels, 0.0) else 1.0


def _nll(logits: torch.Tensor, labels: torch.Tensor, log_temperature: float) -> float:
    scale = math.exp(-log_temperature)
    total = 0.0
    for rows in _row_chunks(logits.shape[0], logits.shape[1]):
        log_probs = torch.log_softmax(logits[rows] * scale, dim=1)
        total -= float(log_probs.gather(1, labels[rows].unsqueeze(1)).sum())
    return total / logits.shape[0]


def expected_calibration_error(probabilities: torch.Tensor, labels: torch.Tensor) -> float:
    """ECE over ECE_BINS equal-width confidence bins (lo, hi]: the examples-weighted mean gap
    between each bin's accuracy and its mean top-1 score."""
    if probabilities.shape[0] == 0:
        return 0.0
    confidence, predicted = probabilities.max(dim=1)
    correct = (predicted == labels).double()
    bins = (torch.ceil(confidence.double() * ECE_BINS).long() - 1).clamp(0, ECE_BINS - 1)
    confidence_sum = torch.bincount(bins, weights=confidence.double(), minlength=ECE_BINS)
    correct_sum = torch.bincount(bins, weights=correct, minlength=ECE_BINS)
    return float((confidence_sum - correct_sum).abs().sum() / probabilities.shape[0])


def evaluation_report(
    logits: torch.Tensor,
    labels: torch.Tensor,
    class_names: Sequence[str],
    source: str,
    temperature: float | None = None,
) -> EvaluationReport:
    """The report of held-out `logits` [N, C] (uncalibrated) against `labels` [N]. With
    `temperature` None one is fitted on these very predictions (a head's own held-out
    data, at training); given, it is the head's (EvaluateHead on a test set)."""
    classes = len(class_names)
    count = logits.shape[0]
    if count == 0:
        return empty_report(source)
    logits = logits.detach().to("cpu", torch.float64)
    labels = labels.detach().cpu().long()
    if temperature is None:
        temperature = fit_temperature(logits, labels)
    raw = torch.softmax(logits, dim=1)
    calibrated = torch.softmax(logits / temperature, dim=1)
    log_loss = -float(
        torch.log_softmax(logits / temperature, dim=1).gather(1, labels.unsqueeze(1)).mean()
    )
    predicted = logits.argmax(dim=1)
    # confusion[t, p]: examples of true class t predicted as p
    confusion = torch.bincount(labels * classes + predicted, minlength=classes * classes)
    confusion = confusion.reshape(classes, classes)
    true_positive = confusion.diagonal().double()
    support = confusion.sum(dim=1).double()
    predicted_count = confusion.sum(dim=0).double()
    # scikit-learn's zero_division: a ratio over nothing is 0
    precision = torch.where(predicted_count > 0, true_positive / predicted_count.clamp(min=1), 0)
    recall = torch.where(support > 0, true_positive / support.clamp(min=1), 0)
    f1_denominator = (
        2 * true_positive + (predicted_count - true_positive) + (support - true_positive)
    )
    f1 = torch.where(f1_denominator > 0, 2 * true_positive / f1_denominator.clamp(min=1), 0)
    # Macro-F1 over the classes present in the labels or the predictions (scikit-learn's
    # f1_score(average="macro") without `labels`): a test set that holds no example of a class
    # the head never predicts either says nothing about that class.
    present = (support > 0) | (predicted_count > 0)
    macro_f1 = float(f1[present].mean())
    ranked = logits.topk(min(MAX_TOP_K, classes), dim=1).indices  # [N, k], best first
    hits = (ranked == labels.unsqueeze(1)).double().cumsum(dim=1)  # [N, k]: in the top k
    return EvaluationReport(
        source=source,
        examples=count,
        accuracy=float((predicted == labels).double().mean()),
        macro_f1=macro_f1,
        log_loss=log_loss,
        ece_uncalibrated=expected_calibration_error(raw, labels),
        ece=expected_calibration_error(calibrated, labels),
        temperature=float(temperature),
        top_k_accuracy=tuple(float(value) for value in hits.mean(dim=0).tolist()),
        per_class=tuple(
            ClassMetrics(name, float(p), float(r), float(f), int(s))
            for name, p, r, f, s in zip(
                class_names,
                precision.tolist(),
                recall.tolist(),
                f1.tolist(),
                support.tolist(),
                strict=True,
            )
        ),
        confusion_matrix=(
            tuple(int(value) for value in confusion.flatten().tolist())
            if classes <= MAX_CONFUSION_CLASSES
            else ()
        ),
    )


def empty_report(source: str) -> EvaluationReport:
    """No held-out data at all (a tiny training set): examples 0, and no figures pretending
    otherwise; the head's temperature stays 1."""
    return EvaluationReport(
        source=source,
        examples=0,
        accuracy=0.0,
        macro_f1=0.0,
        log_loss=0.0,
        ece_uncalibrated=0.0,
        ece=0.0,
        temperature=1.0,
    )


def logits_from_probabilities(probabilities: torch.Tensor, temperature: float) -> torch.Tensor:
    """Uncalibrated logits (up to a per-row constant, which no softmax sees) from calibrated
    scores softmax(z / T): T * log p. Scores that underflowed to 0 become a very small
    logit instead of -inf."""
    tiny = torch.finfo(probabilities.dtype).tiny
    return temperature * probabilities.clamp(min=tiny).log()


def _row_chunks(rows: int, classes: int) -> list[slice]:
    step = max(1, _CHUNK_ELEMENTS // max(classes, 1))
    return [slice(start, min(start + step, rows)) for start in range(0, rows, step)]
