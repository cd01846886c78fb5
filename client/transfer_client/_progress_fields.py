"""The training progress display's status line: its fields for each phase, each with how
much it is worth keeping, and the fitting of them to a terminal's width (`fit`), least worth
keeping dropped first. Pure functions of the events, for `ProgressDisplay` to draw."""

from __future__ import annotations

from dataclasses import dataclass, replace

from transfer_client import _render as render
from transfer_client.types import TrainingProgress

_BAR_WIDTH = 16


@dataclass(frozen=True, slots=True)
class Field:
    text: str
    keep: int
    """Lower is dropped later: 0 is never dropped (the phase), 1 the ETA."""


@dataclass(frozen=True, slots=True)
class TriedC:
    """One value of C the cross-validation tried, with its held-out scores."""

    c: float
    validation_loss: float
    validation_accuracy: float | None


def extracted(progress: TrainingProgress) -> bool:
    """Whether the feature extraction `progress` reports has reached its last input."""
    return progress.total_steps > 0 and progress.step >= progress.total_steps


def extraction_fields(progress: TrainingProgress, *, finished: bool = False) -> list[Field]:
    """`finished`: the phase is over though `progress` (the last update seen) is not at its
    end; its time is then unknown and left out."""
    done = progress.total_steps if finished else progress.step
    fields = [
        Field("extracting features", 0),
        Field(bar(replace(progress, step=done)), 6),
        Field(f"{done}/{progress.total_steps} inputs", 2),
        Field(f"{progress.examples_per_second:.1f} inputs/s", 3),
    ]
    if extracted(progress):
        fields.append(Field(f"in {render.duration(progress.elapsed_seconds)}", 1))
    elif not finished:
        fields.append(Field(f"ETA {render.duration(progress.eta_seconds)}", 1))
    return fields


def final_fit_fields(progress: TrainingProgress, best: TriedC) -> list[Field]:
    return [
        Field(f"final fit at C={best.c:.3g}:", 0),
        Field(f"train loss {loss(progress.train_loss)}", 1),
        Field(f"train acc {render.percent(progress.train_accuracy)}", 2),
    ]


def cross_validation_fields(progress: TrainingProgress, tried: int, best: TriedC) -> list[Field]:
    assert progress.regularization_c is not None
    return [
        Field(f"cross-validating C={progress.regularization_c:.3g}", 0),
        Field(f"({tried} tried)", 5),
        Field(f"val acc {render.percent(progress.validation_accuracy)}", 2),
        Field(f"val loss {loss(progress.validation_loss)}", 3),
        Field(f"best C={best.c:.3g} ({render.percent(best.validation_accuracy)})", 1),
        Field(f"train acc {render.percent(progress.train_accuracy)}", 4),
    ]


def epoch_fields(
    progress: TrainingProgress,
    validation: tuple[float | None, float | None],
    unfrozen: str,
) -> list[Field]:
    validation_loss, validation_accuracy = validation
    fields = [
        Field(f"epoch {progress.epoch}/{progress.epochs}", 0),
        Field(bar(progress), 7),
    ]
    if progress.total_steps:
        fields.append(Field(f"step {progress.step}/{progress.total_steps}", 5))
    fields.append(Field(f"loss {loss(progress.train_loss)}", 2))
    fields.append(Field(f"acc {render.percent(progress.train_accuracy)}", 4))
    if validation_loss is not None:
        fields.append(Field(f"val loss {loss(validation_loss)}", 3))
    if validation_accuracy is not None:
        fields.append(Field(f"val acc {render.percent(validation_accuracy)}", 2))
    if unfrozen:
        fields.append(Field(unfrozen, 5))
    if not progress.epoch_end or progress.step < progress.total_steps:
        fields.append(Field(f"ETA {render.duration(progress.eta_seconds)}", 1))
    if progress.examples_per_second:
        fields.append(Field(f"{progress.examples_per_second:.0f} ex/s", 6))
    return fields


def fit(fields: list[Field], width: int) -> str:
    """The fields in order, joined by spaces, without those (least worth keeping first) that
    would make the line wider than `width`."""
    kept = list(fields)
    while len(line := " ".join(f.text for f in kept)) > width and len(kept) > 1:
        kept.remove(max(reversed(kept), key=lambda f: f.keep))  # the last of the least kept
    return line[:width]


def loss(value: float | None) -> str:
    """4 significant digits, or scientific below 1e-3 (a loss of 0.0004 is not 0.000)."""
    if value is None:
        return "-"
    if value != 0 and abs(value) < 1e-3:
        return f"{value:.3e}"
    return f"{value:#.4g}"


def bar(progress: TrainingProgress) -> str:
    if progress.total_steps:
        fraction = progress.step / progress.total_steps
    elif progress.epochs:
        fraction = progress.epoch / progress.epochs
    else:
        fraction = 0.0
    filled = round(min(max(fraction, 0.0), 1.0) * _BAR_WIDTH)
    return "[" + "#" * filled + "-" * (_BAR_WIDTH - filled) + "]"
