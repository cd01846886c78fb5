"""The `transfer` progress display (issue 19, honest progress): every phase of both solvers
rendered from the SDK's event objects at 80 and 120 columns, on a terminal (one line redrawn
in place, fitted to the width, ETA kept) and in a log (one line per finished stage); and a
real FineTune through the CLI whose last line states the result."""

from __future__ import annotations

import io
import os
import re
from datetime import UTC, datetime
from pathlib import Path

import pytest
from transfer_client import (
    JobCancelled,
    JobCompleted,
    JobFailed,
    JobProgress,
    JobQueued,
    JobStarted,
    TrainingConfig,
    TrainingMetrics,
    TrainingPlan,
    TrainingProgress,
    TransferClient,
)
from transfer_client import _progress as progress_module
from transfer_client._cli import main
from transfer_client._progress import ProgressDisplay
from transfer_client._progress_fields import loss

from tests.conftest import RunningServer

NOW = datetime(2026, 12, 7, tzinfo=UTC)
JOB = "job-0123456789abcdef"
WIDTHS = (80, 120)
SOLVERS = ("lbfgs_cv", "adamw")


class Terminal(io.StringIO):
    """What a terminal receives; `isatty` is what ProgressDisplay asks."""

    def isatty(self) -> bool:
        return True

    def screen_lines(self) -> list[str]:
        """Every line as drawn: each `\\r` redraw, padding trimmed."""
        return [
            drawn.rstrip()
            for line in self.getvalue().split("\n")
            for drawn in line.split("\r")
            if drawn.strip()
        ]

    def redraws(self) -> list[str]:
        """Each status line redrawn in place, with the padding that blanks out a longer one."""
        return [part for line in self.getvalue().split("\n") for part in line.split("\r")[1:]]


class Log(io.StringIO):
    def isatty(self) -> bool:
        return False


def plan(solver: str, *, trainable_blocks: int = 0, unfreeze_every: int = 0) -> TrainingPlan:
    return TrainingPlan(
        epochs=1 if solver == "lbfgs_cv" else 10,
        batch_size=32,
        learning_rate=0.001,
        trainable_blocks=trainable_blocks,
        augment=False,
        cached_features=True,
        steps_per_epoch=4,
        device="cpu",
        early_stopping_patience=3,
        unfreeze_every_epochs=unfreeze_every,
        solver=solver,
        cv_folds=5 if solver == "lbfgs_cv" else 0,
    )


def queued() -> JobQueued:
    return JobQueued(JOB, 1, NOW, "efficientnet_lite0", "flowers")


def started(job_plan: TrainingPlan) -> JobStarted:
    return JobStarted(
        JOB, 2, NOW, "efficientnet_lite0", "flowers", ("daisy", "rose", "tulip"),
        120, 0 if job_plan.solver == "lbfgs_cv" else 30, job_plan,
        {"daisy": 50, "rose": 50, "tulip": 50},
    )  # fmt: skip


def progress(sequence: int, **fields: object) -> JobProgress:
    values: dict[str, object] = {
        "epoch": 0, "epochs": 10, "step": 0, "total_steps": 0, "train_loss": 0.0,
        "train_accuracy": 0.0, "validation_loss": None, "validation_accuracy": None,
        "learning_rate": 0.0, "examples_per_second": 0.0, "elapsed_seconds": 0.0,
        "eta_seconds": 0.0, "epoch_end": False,
    }  # fmt: skip
    values.update(fields)
    return JobProgress(JOB, sequence, NOW, TrainingProgress(**values))  # type: ignore[arg-type]


def extraction(sequence: int, done: int, total: int = 150) -> JobProgress:
    # As the trainer reports it: loss and accuracy are zeros that mean nothing here.
    return progress(
        sequence, phase="extracting_features", step=done, total_steps=total,
        examples_per_second=37.25, eta_seconds=(total - done) / 37.25,
        elapsed_seconds=done / 37.25,
    )  # fmt: skip


def cross_validation(
    sequence: int, tried: int, c: float, val_loss: float, acc: float
) -> JobProgress:
    return progress(
        sequence, phase="cross_validation", epoch=1, epochs=1, step=tried, train_loss=0.2,
        train_accuracy=0.97, validation_loss=val_loss, validation_accuracy=acc,
        regularization_c=c, elapsed_seconds=1.5,
    )  # fmt: skip


def training(sequence: int, epoch: int, step: int, *, end: bool = False) -> JobProgress:
    return progress(
        sequence, phase="training", epoch=epoch, epochs=10, step=step, total_steps=40,
        train_loss=0.000412 if epoch > 5 else 0.8123, train_accuracy=0.75,
        validation_loss=0.6543 if end else None, validation_accuracy=0.7 if end else None,
        learning_rate=0.001, examples_per_second=1234.0, elapsed_seconds=step * 0.5,
        eta_seconds=3725.0, epoch_end=end,
    )  # fmt: skip


def completed(solver: str, *, head_version: int = 0) -> JobCompleted:
    metrics = TrainingMetrics(
        train_loss=0.21, train_accuracy=0.95, validation_loss=0.41,
        validation_accuracy=0.8667, best_epoch=1 if solver == "lbfgs_cv" else 6,
        epochs_run=1 if solver == "lbfgs_cv" else 9, stopped_early=solver == "adamw",
        training_seconds=12.4, majority_baseline_accuracy=0.3333,
        regularization_c=0.316 if solver == "lbfgs_cv" else None,
    )  # fmt: skip
    event = JobCompleted(JOB, 99, NOW, "head-42", metrics)
    if head_version and "head_version" in JobCompleted.__dataclass_fields__:
        event = JobCompleted(JOB, 99, NOW, "head-42", metrics, head_version=head_version)  # type: ignore[call-arg]
    return event


def phases(solver: str) -> list[object]:
    """A whole job's events as the server sends them for `solver`."""
    events: list[object] = [queued(), started(plan(solver))]
    # The server coalesces step updates: under lbfgs_cv the last one (150/150) is lost here.
    done = (16, 32) if solver == "lbfgs_cv" else (16, 32, 150)
    events += [extraction(3 + i, count) for i, count in enumerate(done)]
    if solver == "lbfgs_cv":
        tried = [(0.01, 0.9, 0.6), (0.1, 0.5, 0.8), (1.0, 0.45, 0.84), (10.0, 0.7, 0.82)]
        events += [cross_validation(10 + i, i + 1, *t) for i, t in enumerate(tried)]
        # The fit at the chosen C, which the solver reports as one epoch of one step.
        events.append(
            progress(
                20,
                phase="training",
                epoch=1,
                epochs=1,
                step=1,
                total_steps=1,
                train_loss=0.01873,
                train_accuracy=1.0,
                validation_loss=0.45,
                validation_accuracy=0.84,
                examples_per_second=17.0,
                epoch_end=True,
            )
        )
    else:
        events += [training(10, 1, 2), training(11, 1, 4, end=True), training(12, 6, 22)]
    return [*events, completed(solver)]


def shown(events: list[object], stream: io.StringIO, columns: int) -> ProgressDisplay:
    display = ProgressDisplay(stream, columns=columns)
    for event in events:
        display(event)  # type: ignore[arg-type]
    display.finish()
    return display


@pytest.mark.parametrize("columns", WIDTHS)
@pytest.mark.parametrize("solver", SOLVERS)
def test_each_phase_on_a_terminal_fits_the_width_and_keeps_the_eta(
    solver: str, columns: int
) -> None:
    terminal = Terminal()
    shown(phases(solver), terminal, columns)
    redraws = terminal.redraws()
    assert redraws, "a terminal gets a redrawn status line"
    assert all(len(line.rstrip()) <= columns - 1 for line in redraws), redraws

    extracting = [line for line in redraws if line.startswith("extracting features")]
    assert len(extracting) == 3
    assert "32/150 inputs" in extracting[1] and "ETA 0:03" in extracting[1]
    assert "37.2 inputs/s" in extracting[1]
    assert not any("loss" in line or "acc" in line for line in extracting)
    # Finished, the line stays on screen, with its time if the last update came.
    assert "150/150 inputs" in extracting[2]
    assert extracting[2].rstrip() in terminal.screen_lines()
    assert ("in 0:04" in extracting[2]) == (solver == "adamw")
    assert "ETA" not in extracting[2]

    if solver == "lbfgs_cv":
        cv = [line for line in redraws if line.startswith("cross-validating")]
        assert [re.match(r"cross-validating C=(\S+)", line)[1] for line in cv] == [  # type: ignore[index]
            "0.01", "0.1", "1", "10",
        ]  # fmt: skip
        assert "val acc 80.0%" in cv[1] and "best C=0.1 (80.0%)" in cv[1]
        # The best is the lowest held-out loss (C=1), not the last C tried.
        assert "best C=1 (84.0%)" in cv[3]
        assert not any(line.startswith("epoch") for line in redraws)
        assert "final fit at C=1: train loss 0.01873 train acc 100.0%" in redraws
    else:
        epochs = [line for line in redraws if line.startswith("epoch")]
        assert epochs[0].startswith("epoch 1/10") and "loss 0.8123" in epochs[0]
        assert "ETA 1:02:05" in epochs[0]  # the value, not just the word
        assert "val acc 70.0%" in epochs[1] and "val loss 0.6543" in epochs[1]
        # Epoch 6 shows epoch 1's validation figures until its own arrive; a tiny loss
        # keeps its digits.
        assert "loss 4.120e-04" in epochs[2] and "val acc 70.0%" in epochs[2]
        assert "ETA 1:02:05" in epochs[2]
        if columns >= 120:
            assert "step 22/40" in epochs[2] and "1234 ex/s" in epochs[2]

    last = terminal.screen_lines()[-1]
    assert last.startswith("done in 0:12: val acc 86.7% (majority baseline 33.3%)")
    assert last.endswith("head head-42")
    assert ("C=0.316 by 5-fold cross-validation" in last) == (solver == "lbfgs_cv")
    assert ("best epoch 6 of 9 (stopped early)" in last) == (solver == "adamw")


@pytest.mark.parametrize("solver", SOLVERS)
def test_a_log_gets_one_full_line_per_finished_stage(solver: str) -> None:
    log = Log()
    shown(phases(solver), log, 80)
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue()
    assert (
        lines[0] == f"job {JOB} queued: flowers on efficientnet_lite0, waiting for a training slot"
    )
    assert lines[1].startswith(f"job {JOB}: training flowers on efficientnet_lite0: 3 classes")
    # Extraction: only its finished line, not every batch.
    assert [line for line in lines if line.startswith("extracting")] == [
        "extracting features 150/150 inputs 37.2 inputs/s"
        + (" in 0:04" if solver == "adamw" else "")
    ]
    if solver == "lbfgs_cv":
        assert "C chosen by 5-fold cross-validation, frozen trunk" in lines[1]
        tried = [line for line in lines if line.startswith("cross-validating")]
        assert len(tried) == 4 and "(4 tried)" in tried[-1] and "best C=1 (84.0%)" in tried[-1]
        assert lines[-2] == "final fit at C=1: train loss 0.01873 train acc 100.0%"
        assert not any(line.startswith("epoch") for line in lines)
    else:
        assert "up to 10 epochs of 4 steps" in lines[1] and "frozen trunk" in lines[1]
        epochs = [line for line in lines if line.startswith("epoch")]
        assert epochs == [
            "epoch 1/10 step 4/40 loss 0.8123 acc 75.0% val loss 0.6543 val acc 70.0% "
            "ETA 1:02:05 1234 ex/s"
        ]
    assert lines[-1].startswith("done in 0:12: val acc 86.7% (majority baseline 33.3%)")


@pytest.mark.parametrize("columns", WIDTHS)
def test_unfreezing_names_the_blocks_and_not_a_frozen_trunk(columns: int) -> None:
    job_plan = plan("adamw", trainable_blocks=2, unfreeze_every=2)
    terminal = Terminal()
    events: list[object] = [started(job_plan)]
    events += [training(10 + epoch, epoch, epoch * 4, end=True) for epoch in range(1, 7)]
    shown(events, terminal, columns)
    lines = terminal.screen_lines()
    assert "frozen trunk" not in lines[0]
    assert "the last 2 trunk blocks unfrozen one every 2 epochs" in lines[0]
    notices = [line for line in lines if re.match(r"epoch \d+: ", line)]
    assert notices == [
        "epoch 1: classifier only, trunk frozen",
        "epoch 3: unfreezing: the last 1 of 2 trunk blocks train",
        "epoch 5: unfreezing: the last 2 of 2 trunk blocks train",
    ]
    assert all(len(line) <= columns - 1 for line in terminal.redraws())
    if columns >= 120:
        assert any("2/2 blocks" in line for line in lines if line.startswith("epoch 6/10"))


def test_trainable_blocks_without_progressive_unfreezing() -> None:
    log = Log()
    shown([started(plan("adamw", trainable_blocks=2))], log, 80)
    assert "the last 2 trunk blocks train, on cpu" in log.getvalue()
    log = Log()
    shown([started(plan("adamw", trainable_blocks=-1))], log, 80)
    assert "all trunk blocks train" in log.getvalue()


@pytest.mark.parametrize("columns", WIDTHS)
def test_queued_failed_and_cancelled(columns: int) -> None:
    terminal = Terminal()
    shown(
        [queued(), started(plan("adamw")), training(3, 2, 6),
         JobFailed(JOB, 4, NOW, "out of accelerator memory", "RESOURCE_EXHAUSTED")],
        terminal, columns,
    )  # fmt: skip
    lines = terminal.getvalue().split("\n")
    assert lines[0].startswith(f"job {JOB} queued")
    # The open status line is ended before the outcome, which says where the job stopped.
    assert lines[-2] == f"job {JOB} failed in epoch 2/10 (RESOURCE_EXHAUSTED)"

    terminal = Terminal()
    shown(
        [started(plan("lbfgs_cv")), extraction(3, 16),
         JobCancelled(JOB, 4, NOW, "cancelled by request")],
        terminal, columns,
    )  # fmt: skip
    assert terminal.getvalue().split("\n")[-2] == (
        f"job {JOB} cancelled while extracting features (16/150 inputs)"
    )
    log = Log()
    shown([queued(), JobCancelled(JOB, 2, NOW, "cancelled by request")], log, columns)
    assert log.getvalue().splitlines()[-1] == f"job {JOB} cancelled"


def test_a_requeued_job_starts_its_display_over() -> None:
    """After a server restart the job runs again from JobStarted: the Cs tried before do
    not count, and the new run's best is its own."""
    log = Log()
    first_run = phases("lbfgs_cv")[1:-2]  # started .. the Cs, not the final fit
    second_run = [started(plan("lbfgs_cv")), cross_validation(30, 1, 100.0, 0.9, 0.5)]
    shown([*first_run, *second_run], log, 80)
    assert (
        log.getvalue()
        .splitlines()[-1]
        .endswith("(1 tried) val acc 50.0% val loss 0.9000 best C=100 (50.0%) train acc 97.0%")
    )


def test_the_width_comes_from_the_terminal_of_the_stream(monkeypatch: pytest.MonkeyPatch) -> None:
    """As the CLI builds it, `ProgressDisplay(sys.stderr)`, the width is the terminal's."""
    asked: list[int] = []

    def terminal_size(fd: int) -> os.terminal_size:
        asked.append(fd)
        return os.terminal_size((80, 24))

    monkeypatch.setattr(f"{progress_module.__name__}.os.get_terminal_size", terminal_size)

    class Stderr(Terminal):
        def fileno(self) -> int:
            return 2

    terminal = Stderr()
    display = ProgressDisplay(terminal)
    display(started(plan("adamw")))
    display(training(3, 6, 22))
    assert asked == [2]
    (line,) = terminal.redraws()
    assert len(line) <= 79 and line.startswith("epoch 6/10") and "ETA 1:02:05" in line


def test_completed_names_the_head_version_when_the_event_has_one() -> None:
    event = completed("lbfgs_cv", head_version=3)
    log = Log()
    shown([started(plan("lbfgs_cv")), event], log, 80)
    version = getattr(event, "head_version", 0)
    assert (
        log.getvalue()
        .splitlines()[-1]
        .endswith("head head-42" + (f" v{version}" if version else ""))
    )


def test_completed_without_a_beaten_baseline_says_so() -> None:
    metrics = TrainingMetrics(
        train_loss=1.0, train_accuracy=0.4, validation_loss=1.1, validation_accuracy=0.3,
        best_epoch=1, epochs_run=1, stopped_early=False, training_seconds=3.0,
        majority_baseline_accuracy=0.4, beats_baseline=False, regularization_c=1e-4,
    )  # fmt: skip
    log = Log()
    shown([JobCompleted(JOB, 9, NOW, "head-7", metrics)], log, 80)
    assert log.getvalue() == (
        "done in 0:03: val acc 30.0% (majority baseline 40.0%, NOT beaten), C=0.0001, head head-7\n"
    )


def test_loss_keeps_four_significant_digits() -> None:
    assert [loss(v) for v in (2.302585, 0.5, 0.01234, 0.000412, 0.0, None)] == [
        "2.303", "0.5000", "0.01234", "4.120e-04", "0.000", "-",
    ]  # fmt: skip


# --- end to end: a real server, the CLI, a log for stderr ------------------------------------


def test_finetune_through_the_cli_ends_with_the_result(
    server: RunningServer,
    tmp_path: Path,
    fashion_small: tuple[list[tuple[bytes, str]], list[tuple[bytes, str]]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    root = tmp_path / "images"
    for index, (image, label) in enumerate(fashion_small[0][:32]):
        (root / label).mkdir(parents=True, exist_ok=True)
        (root / label / f"{index:02d}.png").write_bytes(image)
    capsys.readouterr()
    code = main(["--target", server.address, "finetune", "efficientnet_lite0", str(root)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    head_id = captured.out.strip()
    lines = captured.err.splitlines()  # capsys's stderr is not a terminal: one line a stage
    assert "\r" not in captured.err
    assert any(re.fullmatch(r"extracting features 32/32 inputs \S+ inputs/s( in \d+:\d\d)?", line)
               for line in lines), captured.err  # fmt: skip
    assert any(line.startswith("cross-validating C=") for line in lines), captured.err
    assert not any(line.startswith("epoch") for line in lines), captured.err
    assert re.fullmatch(r"final fit at C=\S+: train loss \S+ train acc \S+%", lines[-2])
    final = re.fullmatch(
        r"done in \d+:\d\d: val acc (\d+\.\d)% \(majority baseline (\d+\.\d)%\), "
        r"C=(\S+) by (\d+)-fold cross-validation, head (\S+)( v\d+)?",
        lines[-1],
    )
    assert final, lines[-1]
    with TransferClient(server.address) as client:
        head = client.get_head(head_id)
    assert final[5] == head_id
    assert head.metrics.validation_accuracy is not None
    assert float(final[1]) == pytest.approx(100 * head.metrics.validation_accuracy, abs=0.05)
    assert head.metrics.majority_baseline_accuracy is not None
    assert head.metrics.regularization_c is not None
    assert float(final[2]) == pytest.approx(100 * head.metrics.majority_baseline_accuracy, abs=0.05)
    assert float(final[3]) == pytest.approx(head.metrics.regularization_c, rel=1e-2)


def test_an_adamw_job_on_an_80_column_terminal(
    server: RunningServer,
    fashion_small: tuple[list[tuple[bytes, str]], list[tuple[bytes, str]]],
) -> None:
    terminal = Terminal()
    display = ProgressDisplay(terminal, columns=80)
    with TransferClient(server.address, timeout=120) as client:
        done = client.train(
            "efficientnet_lite0",
            fashion_small[0][:32],
            config=TrainingConfig(epochs=3, batch_size=8, solver="adamw", seed=1),
            on_event=display,
        )
    display.finish()
    assert all(len(line.rstrip()) <= 79 for line in terminal.redraws())
    epochs = [line for line in terminal.redraws() if line.startswith("epoch")]
    assert epochs and all(re.search(r"loss \d\S*", line) for line in epochs)
    assert all("ETA" in line for line in epochs if not line.startswith("epoch 3/3"))
    assert "extracting features" in terminal.getvalue()
    last = terminal.screen_lines()[-1]
    assert re.fullmatch(
        rf"done in \d+:\d\d: val acc \d+\.\d% \(majority baseline \d+\.\d%(, NOT beaten)?\), "
        rf"best epoch \d of 3( \(stopped early\))?, head {done.head_id}( v\d+)?",
        last,
    ), last
