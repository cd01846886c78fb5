"""`transfer report HEAD`: a head's evaluation report as text (the per-class table and the
summary) and, with `--plots DIR`, PNGs of its confusion matrix and training curves.

matplotlib comes with the optional `plots` extra (`pip install transfer-client[plots]`) and
is imported only when plots are asked for: the SDK itself needs only grpcio and protobuf."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from transfer_client import _render as render
from transfer_client._history import CROSS_VALIDATION, TrainingHistory
from transfer_client._sync import TransferClient
from transfer_client.types import EvaluationReport, Head


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("head_id", metavar="HEAD")
    parser.add_argument(
        "--plots",
        type=Path,
        metavar="DIR",
        help="also write confusion_matrix.png and training_curves.png there (needs the "
        "`plots` extra: pip install 'transfer-client[plots]')",
    )


def report(client: TransferClient, args: argparse.Namespace) -> int:
    head = client.get_head(args.head_id)
    evaluation = head.evaluation
    if args.json:
        print(render.to_json(evaluation))
    elif evaluation is None:
        print(f"head {head.head_id} has no evaluation report (trained before reports existed)")
    else:
        print(text(head, evaluation))
    if args.plots is not None:
        pyplot = pyplot_module()
        args.plots.mkdir(parents=True, exist_ok=True)
        if evaluation is not None and evaluation.confusion_matrix:
            path = args.plots / "confusion_matrix.png"
            plot_confusion(pyplot, head, evaluation, path)
            print(f"wrote {path}")
        path = args.plots / "training_curves.png"
        try:
            plot_curves(pyplot, client.job_history(head.job_id), path)
        except ValueError as err:  # no epochs or C search recorded
            print(f"no {path.name}: {err}")
        else:
            print(f"wrote {path}")
    return 0


def text(head: Head, evaluation: EvaluationReport) -> str:
    if evaluation.examples == 0:
        return (
            f"head {head.head_id}: nothing was held out ({evaluation.source}); no figures. "
            "Train with more examples per class, or evaluate on a test set."
        )
    rows = [
        (
            row.label,
            f"{row.precision:.3f}",
            f"{row.recall:.3f}",
            f"{row.f1:.3f}",
            str(row.support),
        )
        for row in evaluation.per_class
    ]
    top_k = ", ".join(
        f"top-{k} {render.percent(value)}"
        for k, value in enumerate(evaluation.top_k_accuracy, start=1)
    )
    summary = render.fields(
        [
            ("head", head.head_id),
            ("evaluated on", f"{evaluation.examples} examples ({evaluation.source})"),
            ("accuracy", render.percent(evaluation.accuracy)),
            ("macro F1", f"{evaluation.macro_f1:.3f}"),
            ("top-k", top_k),
            ("log-loss", f"{evaluation.log_loss:.4f}"),
            (
                "ECE",
                f"{evaluation.ece:.4f} calibrated (T = {evaluation.temperature:.3f}), "
                f"{evaluation.ece_uncalibrated:.4f} before",
            ),
        ]
    )
    return render.table(("class", "precision", "recall", "f1", "support"), rows) + "\n\n" + summary


def pyplot_module(command: str = "transfer report --plots") -> Any:
    """matplotlib's pyplot on the file-only Agg backend, or a SystemExit saying how to
    install the `plots` extra."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display needed
        import matplotlib.pyplot as pyplot
    except ImportError:
        raise SystemExit(
            f"{command} needs matplotlib: pip install 'transfer-client[plots]'"
        ) from None
    return pyplot


def plot_confusion(pyplot: Any, head: Head, evaluation: EvaluationReport, path: Path) -> None:
    classes = [row.label for row in evaluation.per_class]
    size = max(4.0, 0.5 * len(classes) + 2)
    figure, axes = pyplot.subplots(figsize=(size, size))
    image = axes.imshow(evaluation.confusion_matrix, cmap="Blues")
    figure.colorbar(image, ax=axes)
    axes.set_xticks(range(len(classes)), classes, rotation=90)
    axes.set_yticks(range(len(classes)), classes)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    if len(classes) <= 20:
        for true, row in enumerate(evaluation.confusion_matrix):
            for predicted, value in enumerate(row):
                axes.text(predicted, true, str(value), ha="center", va="center", fontsize=8)
    axes.set_title(f"{head.head_id}: {evaluation.examples} examples ({evaluation.source})")
    figure.tight_layout()
    figure.savefig(path)
    pyplot.close(figure)


def plot_curves(pyplot: Any, history: TrainingHistory, path: Path) -> None:
    """Loss and accuracy, training and validation, from a job's history: per epoch (gradient
    solvers), or per inverse L2 strength C on a log axis (solver lbfgs_cv)."""
    if not history.rows:
        raise ValueError(f"job {history.job_id} has no epochs or cross-validation results yet")
    by_c = history.kind == CROSS_VALIDATION
    rows = list(history.rows)
    if by_c:
        rows.sort(key=lambda row: row.regularization_c or 0.0)
    xs = [(row.regularization_c or 0.0) if by_c else float(row.epoch) for row in rows]
    best = history.best
    best_label = "kept" if history.completed is not None else "best so far"
    figure, (loss_axes, accuracy_axes) = pyplot.subplots(1, 2, figsize=(10, 4))
    for axes, metric in ((loss_axes, "loss"), (accuracy_axes, "accuracy")):
        axes.plot(xs, [getattr(row, f"train_{metric}") for row in rows], "o-", label="train")
        validated = [
            (x, getattr(row, f"validation_{metric}"))
            for x, row in zip(xs, rows, strict=True)
            if getattr(row, f"validation_{metric}") is not None
        ]
        if validated:
            axes.plot(*zip(*validated, strict=True), "o-", label="validation")
        if best is not None:
            kept = (best.regularization_c or 0.0) if by_c else float(best.epoch)
            axes.axvline(kept, linestyle=":", color="gray", label=best_label)
        if by_c:
            axes.set_xscale("log")
        else:
            axes.xaxis.set_major_locator(pyplot.MaxNLocator(integer=True))
        axes.set_xlabel("C (inverse L2 strength)" if by_c else "epoch")
        axes.set_ylabel(metric)
        axes.legend()
    figure.suptitle(f"job {history.job_id}")
    figure.tight_layout()
    figure.savefig(path)
    pyplot.close(figure)
