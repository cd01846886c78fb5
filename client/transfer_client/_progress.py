"""A training progress display for a terminal: what each phase of a job is doing, and a last
line that states the result.

Phases, as the server reports them (`TrainingProgress.phase`):
- "extracting_features": inputs done / total, inputs per second, ETA;
- "cross_validation" (solver "lbfgs_cv"): each C tried, with its held-out accuracy, and the
  best so far (lowest held-out loss, as the server picks it), then the fit at the chosen C;
- "training" (solver "adamw"): epoch, step, loss, validation loss and accuracy, ETA; a line
  when progressive unfreezing opens another trunk block.
The completed line gives the validation accuracy against the majority baseline, the C or best
epoch chosen, and the head (with its version when the server sends one).

On a terminal one status line is redrawn in place and fitted to the terminal's width by
dropping its least useful fields first (the bar, throughput, then training accuracy ...), so
the phase and the ETA survive an 80-column terminal; elsewhere (a log file, CI) it writes one
full line per finished stage.

Written by hand rather than with rich or tqdm. The client's core install is grpcio and
protobuf only, so a library would be an optional extra with this renderer kept as the fallback
anyway: two renderers to keep honest. And neither fits this display better: both model one bar
of known length with a fixed set of columns, while a cross-validation has no known length and
the useful fields change per phase; tqdm fits a narrow terminal by shrinking the bar and then
cutting the line's end, whatever is there, and rich by column widths set up front, where this
display drops whole fields by priority. That logic is a few lines (`fit`, in
_progress_fields.py, with the fields of each phase).
"""

from __future__ import annotations

import math
import os
from typing import TextIO

from transfer_client import _render as render
from transfer_client._progress_fields import (
    Field,
    TriedC,
    cross_validation_fields,
    epoch_fields,
    extracted,
    extraction_fields,
    final_fit_fields,
    fit,
)
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
    TrainingMetrics,
    TrainingPlan,
    TrainingProgress,
)

EXTRACTING = "extracting_features"
CROSS_VALIDATION = "cross_validation"
TRAINING = "training"

_FALLBACK_COLUMNS = 80


class ProgressDisplay:
    """Call it with each event of a job.

    `columns` fixes the width the status line is fitted to (default: the stream's terminal,
    asked on each redraw, or 80). `in_place` forces redrawing one line (True) or writing one
    line per stage (False); default: whether the stream is a terminal.
    """

    def __init__(
        self, stream: TextIO, *, columns: int | None = None, in_place: bool | None = None
    ) -> None:
        self._stream = stream
        self._columns = columns
        self._redraw_in_place = stream.isatty() if in_place is None else in_place
        self._drawn_width = 0  # length of the line currently being redrawn, 0 if none
        self._plan: TrainingPlan | None = None
        self._validation: tuple[float | None, float | None] = (None, None)  # loss, accuracy
        self._tried_c: list[TriedC] = []
        self._unfrozen: int | None = None  # trunk blocks training in the current epoch
        self._last: TrainingProgress | None = None
        self.job_id = ""

    def __call__(self, event: FineTuneEvent) -> None:
        self.job_id = event.job_id
        match event:
            case JobQueued():
                self._write_line(
                    f"job {event.job_id} queued: {event.head_name or 'a head'} on "
                    f"{event.backbone}, waiting for a training slot"
                )
            case JobStarted():
                # Again after a server restart requeued the job: it starts over.
                self._plan, self._last, self._tried_c = event.plan, None, []
                self._validation, self._unfrozen = (None, None), None
                self._write_line(started_line(event))
            case JobProgress(progress=progress):
                self._progress(progress)
            case JobCompleted():
                self._write_line(completed_line(event, self._plan))
            case JobWarning(message=message):
                self._write_line(f"warning: {message}")
            case CandidateResult() as candidate:
                self._write_line(
                    f"candidate {candidate.backbone}: val acc "
                    f"{render.percent(candidate.validation_accuracy)}, "
                    f"{candidate.gflops:.2f} GFLOPs, {candidate.latency_ms:.1f} ms/input"
                    + (" <- selected" if candidate.selected else "")
                )
            # The reason is the error the caller raises and prints; this line says where.
            case JobFailed():
                self._write_line(f"job {event.job_id} failed{self._where()} ({event.code})")
            case JobCancelled():
                self._write_line(f"job {event.job_id} cancelled{self._where()}")

    def finish(self) -> None:
        """Ends a line left open by redrawing, so what follows starts on its own line."""
        if self._drawn_width:
            self._stream.write("\n")
            self._stream.flush()
            self._drawn_width = 0

    # --- phases ------------------------------------------------------------------------------

    def _progress(self, progress: TrainingProgress) -> None:
        last, self._last = self._last, progress
        if progress.phase == EXTRACTING:
            self._show(extraction_fields(progress), stage_done=extracted(progress))
            return
        if last is not None and last.phase == EXTRACTING and not extracted(last):
            # The server coalesces step updates, its last extraction one included: the
            # next phase is what says extraction finished.
            self._show(extraction_fields(last, finished=True), stage_done=True)
        if progress.phase == TRAINING and self._tried_c:
            # Solver "lbfgs_cv" ends with one fit at the chosen C, reported as one epoch.
            self._show(final_fit_fields(progress, self._best_c()), stage_done=True)
        elif progress.phase == CROSS_VALIDATION and progress.regularization_c is not None:
            tried = TriedC(
                progress.regularization_c,
                progress.validation_loss if progress.validation_loss is not None else math.inf,
                progress.validation_accuracy,
            )
            self._tried_c.append(tried)
            fields = cross_validation_fields(progress, len(self._tried_c), self._best_c())
            self._show(fields, stage_done=True)
        else:
            self._unfreezing(progress)
            if progress.validation_accuracy is not None or progress.validation_loss is not None:
                self._validation = (progress.validation_loss, progress.validation_accuracy)
            fields = epoch_fields(progress, self._validation, self._unfrozen_text())
            self._show(fields, stage_done=progress.epoch_end)

    def _best_c(self) -> TriedC:
        """The lowest held-out loss so far, ties to the smaller C: how the server picks."""
        return min(self._tried_c, key=lambda tried: (tried.validation_loss, tried.c))

    def _unfreezing(self, progress: TrainingProgress) -> None:
        """Writes a line when progressive unfreezing changes the trunk blocks that train."""
        plan = self._plan
        if plan is None or plan.trainable_blocks == 0 or plan.unfreeze_every_epochs <= 0:
            return
        unfrozen = (max(progress.epoch, 1) - 1) // plan.unfreeze_every_epochs
        if plan.trainable_blocks > 0:
            unfrozen = min(unfrozen, plan.trainable_blocks)
        if unfrozen != self._unfrozen:
            self._unfrozen = unfrozen
            of = f" of {plan.trainable_blocks}" if plan.trainable_blocks > 0 else ""
            what = (
                "classifier only, trunk frozen"
                if unfrozen == 0
                else f"unfreezing: the last {unfrozen}{of} trunk {_blocks(unfrozen, of)} train"
            )
            self._write_line(f"epoch {progress.epoch}: {what}")

    def _unfrozen_text(self) -> str:
        plan = self._plan
        if plan is None or plan.trainable_blocks == 0:
            return ""
        if plan.unfreeze_every_epochs > 0 and self._unfrozen is not None:
            of = f"/{plan.trainable_blocks}" if plan.trainable_blocks > 0 else ""
            return f"{self._unfrozen}{of} blocks"
        return ""

    def _where(self) -> str:
        progress = self._last
        if progress is None:
            return ""
        if progress.phase == EXTRACTING:
            return f" while extracting features ({progress.step}/{progress.total_steps} inputs)"
        if progress.phase == CROSS_VALIDATION:
            return f" while cross-validating, after {len(self._tried_c)} values of C"
        return f" in epoch {progress.epoch}/{progress.epochs}"

    # --- drawing -----------------------------------------------------------------------------

    def _show(self, fields: list[Field], stage_done: bool) -> None:
        if self._redraw_in_place:
            self._redraw(fit(fields, self._width() - 1))
            if stage_done:
                self.finish()  # keeps each finished stage on screen
        elif stage_done:
            self._write_line(" ".join(f.text for f in fields if not f.text.startswith("[")))

    def _width(self) -> int:
        return self._columns if self._columns is not None else terminal_columns(self._stream)

    def _redraw(self, text: str) -> None:
        padding = " " * max(0, self._drawn_width - len(text))  # blanks out a longer old line
        self._stream.write(f"\r{text}{padding}")
        self._stream.flush()
        self._drawn_width = len(text)

    def _write_line(self, text: str) -> None:
        self.finish()
        self._stream.write(text + "\n")
        self._stream.flush()


# --- lines and fields (pure functions of the events) ------------------------------------------


def started_line(event: JobStarted) -> str:
    plan = event.plan
    head = f"job {event.job_id}: training {event.head_name or 'a head'} on {event.backbone}: "
    classes = f"{len(event.class_names)} classes"
    if plan.solver == "lbfgs_cv":
        validation = (
            f"{plan.cv_folds}-fold cross-validation"
            if plan.cv_folds
            else f"{event.validation_examples} validation examples"
        )
        return (
            f"{head}{classes}, {event.train_examples + event.validation_examples} examples; "
            f"L2-regularised logistic regression (L-BFGS), C chosen by {validation}, "
            f"frozen trunk, on {plan.device}"
        )
    if plan.head_type == "prototype":
        return (
            f"{head}{classes}, {event.train_examples} train / {event.validation_examples} "
            f"validation examples; prototype head (class means), frozen trunk, on {plan.device}"
        )
    head_kind = "" if plan.head_type in ("", "linear") else f"{plan.head_type} head, "
    return (
        f"{head}{classes}, {event.train_examples} train / {event.validation_examples} "
        f"validation examples; {head_kind}up to {plan.epochs} epochs of "
        f"{plan.steps_per_epoch} steps, batch {plan.batch_size}, lr {plan.learning_rate:g}, "
        f"{trunk_text(plan)}, on {plan.device}"
    )


def trunk_text(plan: TrainingPlan) -> str:
    if plan.trainable_blocks == 0:
        return "frozen trunk" + (", cached features" if plan.cached_features else "")
    blocks = (
        "all trunk blocks"
        if plan.trainable_blocks < 0
        else f"the last {plan.trainable_blocks} trunk {_blocks(plan.trainable_blocks)}"
    )
    if plan.unfreeze_every_epochs > 0:
        return f"{blocks} unfrozen one every {plan.unfreeze_every_epochs} epochs"
    return f"{blocks} train"


def _blocks(count: int, of: str = "") -> str:
    return "block" if count == 1 and not of else "blocks"


def completed_line(event: JobCompleted, plan: TrainingPlan | None) -> str:
    metrics = event.metrics
    parts = [f"done in {render.duration(metrics.training_seconds)}: {_result(metrics)}"]
    if metrics.regularization_c is not None:
        folds = f" by {plan.cv_folds}-fold cross-validation" if plan and plan.cv_folds else ""
        parts.append(f"C={metrics.regularization_c:.3g}{folds}")
    elif plan is not None and plan.head_type == "prototype":
        parts.append("prototype head")
    else:
        parts.append(
            f"best epoch {metrics.best_epoch} of {metrics.epochs_run}"
            + (" (stopped early)" if metrics.stopped_early else "")
        )
    version = getattr(event, "head_version", 0)
    parts.append(f"head {event.head_id}" + (f" v{version}" if version else ""))
    return ", ".join(parts)


def _result(metrics: TrainingMetrics) -> str:
    if metrics.validation_accuracy is None:
        return f"train acc {render.percent(metrics.train_accuracy)} (nothing held out)"
    text = f"val acc {render.percent(metrics.validation_accuracy)}"
    if metrics.majority_baseline_accuracy is not None:
        text += f" (majority baseline {render.percent(metrics.majority_baseline_accuracy)}"
        text += ")" if metrics.beats_baseline else ", NOT beaten)"
    return text


def terminal_columns(stream: TextIO) -> int:
    # Asks about the stream drawn on: stdout is often redirected (`transfer finetune > id`).
    try:
        return os.get_terminal_size(stream.fileno()).columns or _FALLBACK_COLUMNS
    except (OSError, ValueError, AttributeError):
        return _FALLBACK_COLUMNS
