"""How a training job went, as a table: one row per epoch, or per regularisation strength C
tried by the cross-validated solver, built from the job's events (`job_history`)."""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from transfer_client.types import (
    FineTuneEvent,
    JobCancelled,
    JobCompleted,
    JobFailed,
    JobProgress,
    JobStarted,
    TrainingProgress,
)

CROSS_VALIDATION = "cross_validation"
EPOCHS = "epochs"

# The columns of `to_csv`, in order (`to_jsonl` writes the same keys).
COLUMNS = (
    "epoch",
    "regularization_c",
    "train_loss",
    "train_accuracy",
    "validation_loss",
    "validation_accuracy",
    "learning_rate",
    "elapsed_seconds",
)


@dataclass(frozen=True, slots=True)
class HistoryRow:
    """One epoch (the end-of-epoch event's figures: train loss and accuracy are the epoch's
    means), or one C of the cross-validated solver (train figures on the folds' training
    rows, validation figures out-of-fold; `epoch` then counts the Cs tried, from 1)."""

    epoch: int
    regularization_c: float | None
    train_loss: float
    train_accuracy: float
    validation_loss: float | None
    validation_accuracy: float | None
    learning_rate: float
    elapsed_seconds: float

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True, slots=True)
class TrainingHistory:
    """A job's training table. `kind` says what its rows are: "epochs" (gradient solvers, the
    prototype head's single pass), "cross_validation" (solver "lbfgs_cv": one row per C, in
    the order tried), or "" while no row has come. `outcome` is the job's last event when it
    has ended (completed, failed or cancelled), else None: the rows are then those so far.
    A job run again after a server restart starts its table again: the rows are its last
    run's."""

    job_id: str
    kind: str
    rows: tuple[HistoryRow, ...]
    started: JobStarted | None = None
    outcome: JobCompleted | JobFailed | JobCancelled | None = None

    @classmethod
    def from_events(cls, events: Iterable[FineTuneEvent], job_id: str = "") -> TrainingHistory:
        builder = HistoryBuilder(job_id)
        for event in events:
            builder.add(event)
        return builder.history()

    @property
    def completed(self) -> JobCompleted | None:
        return self.outcome if isinstance(self.outcome, JobCompleted) else None

    @property
    def best(self) -> HistoryRow | None:
        """The row the job kept: for a completed job, its best epoch or the C it chose (as
        its metrics say); before that, the best so far: the lowest validation loss for Cs
        (how the solver chooses), the highest validation accuracy for epochs (lowest
        validation loss on ties), the lowest train loss without validation figures."""
        if not self.rows:
            return None
        completed = self.completed
        if completed is not None:
            metrics = completed.metrics
            for row in self.rows:
                if self.kind == CROSS_VALIDATION and row.regularization_c is not None:
                    if _same_float(row.regularization_c, metrics.regularization_c):
                        return row
                elif self.kind == EPOCHS and row.epoch == metrics.best_epoch:
                    return row
        validated = [row for row in self.rows if row.validation_loss is not None]
        if not validated:
            return min(self.rows, key=lambda row: row.train_loss)
        if self.kind == CROSS_VALIDATION:
            return min(validated, key=lambda row: (row.validation_loss, row.regularization_c))
        return min(
            validated, key=lambda row: (-(row.validation_accuracy or 0.0), row.validation_loss)
        )

    def to_csv(self, file: str | os.PathLike[str] | IO[str]) -> None:
        """Writes the rows as CSV with a header row (COLUMNS); an absent figure is empty."""
        with _opened(file) as out:
            writer = csv.writer(out, lineterminator="\n")
            writer.writerow(COLUMNS)
            for row in self.rows:
                values = row.to_dict()
                writer.writerow(["" if values[c] is None else values[c] for c in COLUMNS])

    def to_jsonl(self, file: str | os.PathLike[str] | IO[str]) -> None:
        """Writes one JSON object per row (keys: COLUMNS; an absent figure is null)."""
        with _opened(file) as out:
            for row in self.rows:
                out.write(json.dumps(row.to_dict()) + "\n")


class HistoryBuilder:
    """Reads a job's events in order into a `TrainingHistory`. `add` returns True once the
    history is whole: the job ended, or the event at `until_sequence` (the job's last event
    when it was read, for a running job's history so far) has come."""

    def __init__(self, job_id: str, until_sequence: int | None = None) -> None:
        self.job_id = job_id
        self._until = until_sequence
        self._epochs: dict[int, HistoryRow] = {}
        self._cs: list[HistoryRow] = []
        self._started: JobStarted | None = None
        self._outcome: JobCompleted | JobFailed | JobCancelled | None = None

    @property
    def done(self) -> bool:
        return self._outcome is not None or self._until == 0

    def add(self, event: FineTuneEvent) -> bool:
        self.job_id = self.job_id or event.job_id
        if isinstance(event, JobStarted):  # a (re)run: the table starts again
            self._started, self._epochs, self._cs = event, {}, []
        elif isinstance(event, JobProgress):
            self._add_progress(event.progress)
        elif isinstance(event, JobCompleted | JobFailed | JobCancelled):
            self._outcome = event
        reached = self._until is not None and event.sequence >= self._until
        return self.done or reached

    def _add_progress(self, progress: TrainingProgress) -> None:
        if progress.phase == CROSS_VALIDATION and progress.regularization_c is not None:
            self._cs.append(_row(progress, len(self._cs) + 1))
        elif progress.epoch_end:
            self._epochs[progress.epoch] = _row(progress, progress.epoch)  # a later one wins

    def history(self) -> TrainingHistory:
        # A cross-validated job also sends one end-of-epoch event (the refit at the chosen C):
        # its table is the Cs, and that refit is the row `best` points at.
        if self._cs:
            kind, rows = CROSS_VALIDATION, tuple(self._cs)
        elif self._epochs:
            kind, rows = EPOCHS, tuple(self._epochs[epoch] for epoch in sorted(self._epochs))
        else:
            kind, rows = "", ()
        return TrainingHistory(self.job_id, kind, rows, self._started, self._outcome)


def _row(progress: TrainingProgress, epoch: int) -> HistoryRow:
    return HistoryRow(
        epoch=epoch,
        regularization_c=progress.regularization_c,
        train_loss=progress.train_loss,
        train_accuracy=progress.train_accuracy,
        validation_loss=progress.validation_loss,
        validation_accuracy=progress.validation_accuracy,
        learning_rate=progress.learning_rate,
        elapsed_seconds=progress.elapsed_seconds,
    )


def _same_float(a: float | None, b: float | None) -> bool:
    """Equal as the float32 values they were on the wire."""
    return a is not None and b is not None and abs(a - b) <= 1e-6 * max(abs(a), abs(b))


@contextlib.contextmanager
def _opened(file: str | os.PathLike[str] | IO[str]) -> Iterator[IO[str]]:
    """A path opened for writing text (closed after), or a stream the caller owns."""
    if isinstance(file, str | os.PathLike):
        with Path(file).open("w", encoding="utf-8", newline="") as owned:
            yield owned
    else:
        yield file
