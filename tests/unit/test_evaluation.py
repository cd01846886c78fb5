"""evaluation.py's figures against scikit-learn's on the same predictions, the temperature
fit, and ECE."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    f1_score,
    log_loss,
    precision_recall_fscore_support,
    top_k_accuracy_score,
)
from transfer_service.evaluation import (
    MAX_CONFUSION_CLASSES,
    empty_report,
    evaluation_report,
    expected_calibration_error,
    fit_temperature,
    logits_from_probabilities,
)


def _predictions(rows: int, classes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits that are right more often than not, with an overconfident scale."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (rows,), generator=generator)
    logits = torch.randn(rows, classes, generator=generator) * 2.0
    logits[torch.arange(rows), labels] += 2.5
    return logits * 3.0, labels


def assert_matches_sklearn(
    report_logits: torch.Tensor, labels: torch.Tensor, names: list[str], temperature: float
) -> None:
    report = evaluation_report(report_logits, labels, names, "test_set", temperature)
    classes = len(names)
    y_true = labels.numpy()
    scores = torch.softmax(report_logits.double() / temperature, dim=1).numpy()
    y_pred = scores.argmax(axis=1)
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=list(range(classes)), zero_division=0
    )
    for row, p, r, f, s in zip(report.per_class, precision, recall, f1, support, strict=True):
        assert row.precision == pytest.approx(p, abs=1e-9)
        assert row.recall == pytest.approx(r, abs=1e-9)
        assert row.f1 == pytest.approx(f, abs=1e-9)
        assert row.support == s
    assert [row.label for row in report.per_class] == names
    assert report.accuracy == pytest.approx(accuracy_score(y_true, y_pred))
    assert report.macro_f1 == pytest.approx(
        f1_score(y_true, y_pred, average="macro", zero_division=0)
    )
    expected_k = [
        top_k_accuracy_score(y_true, scores, k=k, labels=list(range(classes)))
        for k in range(1, min(5, classes) + 1)
    ]
    assert report.top_k_accuracy == pytest.approx(expected_k)
    assert report.log_loss == pytest.approx(log_loss(y_true, scores, labels=list(range(classes))))
    if classes <= MAX_CONFUSION_CLASSES:
        matrix = confusion_matrix(y_true, y_pred, labels=list(range(classes)))
        assert list(report.confusion_matrix) == matrix.flatten().tolist()
    else:
        assert report.confusion_matrix == ()
    assert report.examples == len(y_true)
    assert report.temperature == temperature


@pytest.mark.parametrize(("rows", "classes", "seed"), [(300, 7, 0), (50, 3, 1), (400, 120, 2)])
def test_report_equals_scikit_learn(rows: int, classes: int, seed: int) -> None:
    logits, labels = _predictions(rows, classes, seed)
    names = [f"class-{i}" for i in range(classes)]
    assert_matches_sklearn(logits, labels, names, 1.0)
    assert_matches_sklearn(logits, labels, names, 2.7)


def test_a_class_absent_from_labels_and_predictions_is_left_out_of_macro_f1() -> None:
    logits = torch.tensor([[3.0, 0.0, -1.0], [0.0, 3.0, -1.0], [0.0, 3.0, -1.0]])
    labels = torch.tensor([0, 1, 0])
    report = evaluation_report(logits, labels, ["a", "b", "c"], "test_set", 1.0)
    assert report.per_class[2].support == 0
    assert report.macro_f1 == pytest.approx(
        f1_score(labels.numpy(), logits.argmax(1).numpy(), average="macro")
    )
    assert_matches_sklearn(logits, labels, ["a", "b", "c"], 1.0)


def test_fitted_temperature_minimises_nll_and_lowers_ece() -> None:
    logits, labels = _predictions(2000, 10, 3)
    temperature = fit_temperature(logits, labels)
    assert temperature > 1.5  # the logits were scaled up 3x: overconfident

    def nll(t: float) -> float:
        return float(torch.nn.functional.cross_entropy(logits / t, labels))

    assert nll(temperature) <= min(nll(temperature * 0.97), nll(temperature * 1.03))
    report = evaluation_report(logits, labels, [str(i) for i in range(10)], "validation_split")
    assert report.temperature == pytest.approx(temperature)
    assert report.ece < report.ece_uncalibrated


def test_few_examples_fit_no_temperature() -> None:
    logits, labels = _predictions(10, 3, 4)
    assert fit_temperature(logits, labels) == 1.0


def test_ece_by_hand() -> None:
    # Two bins used: (0.8, 0.8667] holds 0.85 (right) and 0.82 (wrong); (0.9333, 1] holds 0.95
    probabilities = torch.tensor([[0.85, 0.15], [0.82, 0.18], [0.95, 0.05]])
    labels = torch.tensor([0, 1, 0])
    expected = (2 / 3) * abs(0.5 - (0.85 + 0.82) / 2) + (1 / 3) * abs(1.0 - 0.95)
    assert expected_calibration_error(probabilities, labels) == pytest.approx(expected)


def test_no_held_out_data_is_an_empty_report() -> None:
    report = evaluation_report(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long), "abc", "x")
    assert report == empty_report("x")
    assert report.examples == 0 and report.per_class == () and report.temperature == 1.0


def test_logits_from_calibrated_scores_give_the_same_report() -> None:
    logits, labels = _predictions(200, 6, 5)
    names = [str(i) for i in range(6)]
    temperature = 1.7
    scores = torch.softmax(logits / temperature, dim=1).float()
    recovered = logits_from_probabilities(scores, temperature)
    direct = evaluation_report(logits, labels, names, "test_set", temperature)
    again = evaluation_report(recovered, labels, names, "test_set", temperature)
    assert again.per_class == direct.per_class
    assert again.log_loss == pytest.approx(direct.log_loss, rel=1e-5)
    assert again.ece == pytest.approx(direct.ece, abs=1e-5)
    assert again.ece_uncalibrated == pytest.approx(direct.ece_uncalibrated, abs=1e-5)
    assert not math.isnan(again.log_loss) and np.isfinite(recovered.numpy()).all()
