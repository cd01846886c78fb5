"""A training progress display for a terminal, written by hand to stay dependency-free."""

from __future__ import annotations

import os
from typing import TextIO

from transfer_client import _render as render
from transfer_client.types import (
    CandidateResult,
    FineTuneEvent,
    JobCancelled,
    JobCompleted,
    JobFailed,
    JobProgress,
    JobQueued,
    JobStarted,
    JobWarning,
    TrainingProgress,
)

_BAR_WIDTH = 16
_FALLBACK_COLUMNS = 80


class ProgressDisplay:
    """Call it with each event of a job.

    On a terminal one status line is redrawn in place; elsewhere (a log file, CI) it writes
    one line per epoch so the output stays readable.
    """

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._redraw_in_place = stream.isatty()
        self._drawn_width = 0  # length of the line currently being redrawn, 0 if none
        self._validation_accuracy: float | None = None  # the latest epoch's, on every line
        self.job_id = ""

    def __call__(self, event: FineTuneEvent) -> None:
        self.job_id = event.job_id
        match event:
            case JobQueued():
                self._write_line(
                    f"job {event.job_id} queued: {event.head_name} on {event.backbone}"
                )
            case JobStarted():
                self._write_line(_started_line(event))
            case JobProgress(progress=progress):
                if progress.validation_accuracy is not None:
                    self._validation_accuracy = progress.validation_accuracy
                if self._redraw_in_place:
                    self._redraw(_status_line(progress, self._validation_accuracy, with_bar=True))
                    if progress.epoch_end:
                        self.finish()  # keeps each finished epoch on screen
                elif progress.epoch_end:
                    self._write_line(
                        _status_line(progress, self._validation_accuracy, with_bar=False)
                    )
            case JobCompleted(metrics=metrics):
                self._write_line(
                    f"trained in {render.duration(metrics.training_seconds)}: "
                    f"acc {render.percent(metrics.train_accuracy)}, "
                    f"val acc {render.percent(metrics.validation_accuracy)}, "
                    f"best epoch {metrics.best_epoch} of {metrics.epochs_run}"
                    + (" (stopped early)" if metrics.stopped_early else "")
                )
            case JobWarning(message=message):
                self._write_line(f"warning: {message}")
            case CandidateResult() as candidate:
                self._write_line(
                    f"candidate {candidate.backbone}: val acc "
                    f"{render.percent(candidate.validation_accuracy)}, "
                    f"{candidate.gflops:.2f} GFLOPs, {candidate.latency_ms:.1f} ms/input"
                    + (" <- selected" if candidate.selected else "")
                )
            case JobFailed() | JobCancelled():
                self.finish()

    def finish(self) -> None:
        """Ends a line left open by redrawing, so what follows starts on its own line."""
        if self._drawn_width:
            self._stream.write("\n")
            self._stream.flush()
            self._drawn_width = 0

    def _redraw(self, text: str) -> None:
        # A line wider than the terminal wraps, and `\r` would then only rewind its tail.
        limit = _terminal_columns(self._stream) - 1
        if len(text) > limit:
            text = text[: limit + 1].rsplit(" ", 1)[0]  # drops the parts that do not fit whole
        padding = " " * max(0, self._drawn_width - len(text))  # blanks out a longer old line
        self._stream.write(f"\r{text}{padding}")
        self._stream.flush()
        self._drawn_width = len(text)

    def _write_line(self, text: str) -> None:
        self.finish()
        self._stream.write(text + "\n")
        self._stream.flush()


def _started_line(event: JobStarted) -> str:
    plan = event.plan
    trunk = "frozen trunk, cached features" if plan.cached_features else "trainable trunk"
    head = f"job {event.job_id}: training {event.head_name or 'a head'} on {event.backbone}: "
    if plan.solver == "lbfgs_cv":
        validation = (
            f"{plan.cv_folds}-fold cross-validation"
            if plan.cv_folds
            else f"{event.validation_examples} validation examples"
        )
        return (
            f"{head}{len(event.class_names)} classes, {event.train_examples} examples; "
            f"L2-regularised logistic regression (L-BFGS), C chosen by {validation}, "
            f"{trunk}, on {plan.device}"
        )
    return (
        f"{head}{len(event.class_names)} classes, {event.train_examples} train / "
        f"{event.validation_examples} validation examples; up to {plan.epochs} epochs of "
        f"{plan.steps_per_epoch} steps, batch {plan.batch_size}, lr {plan.learning_rate:g}, "
        f"{trunk}, on {plan.device}"
    )


def _status_line(
    progress: TrainingProgress, validation_accuracy: float | None, *, with_bar: bool
) -> str:
    if progress.phase == "extracting_features":
        stage = "extracting features"
    elif progress.phase == "cross_validation" and progress.regularization_c is not None:
        stage = f"cross-validating C={progress.regularization_c:.3g}"
    else:
        stage = f"epoch {progress.epoch}/{progress.epochs}"
    parts = [stage]
    if with_bar:
        parts.append(_bar(progress))
        if progress.total_steps:
            parts.append(f"{progress.step}/{progress.total_steps}")
    parts.append(f"loss {progress.train_loss:.3f}")
    parts.append(f"acc {render.percent(progress.train_accuracy)}")
    if validation_accuracy is not None:
        parts.append(f"val acc {render.percent(validation_accuracy)}")
    parts.append(f"ETA {render.duration(progress.eta_seconds)}")
    # Last, so it is what a narrow terminal cuts off.
    if progress.examples_per_second:
        parts.append(f"{progress.examples_per_second:.0f} ex/s")
    return " ".join(parts)


def _bar(progress: TrainingProgress) -> str:
    if progress.total_steps:
        fraction = progress.step / progress.total_steps
    elif progress.epochs:
        fraction = progress.epoch / progress.epochs
    else:
        fraction = 0.0
    filled = round(min(max(fraction, 0.0), 1.0) * _BAR_WIDTH)
    return "[" + "#" * filled + "-" * (_BAR_WIDTH - filled) + "]"


def _terminal_columns(stream: TextIO) -> int:
    # Asks about the stream drawn on: stdout is often redirected (`transfer finetune > id`).
    try:
        return os.get_terminal_size(stream.fileno()).columns or _FALLBACK_COLUMNS
    except (OSError, ValueError):
        return _FALLBACK_COLUMNS
