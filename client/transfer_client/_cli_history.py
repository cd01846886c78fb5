"""`transfer history JOB` (the per-epoch or per-C table, as text, CSV or JSON Lines) and
`transfer plot JOB OUT.png` (its loss and accuracy curves; matplotlib comes with the SDK's
optional `plots` extra and is imported only then)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from transfer_client import _render as render
from transfer_client._cli_commands import AddCommand
from transfer_client._history import CROSS_VALIDATION, HistoryRow, TrainingHistory
from transfer_client._report import plot_curves, pyplot_module
from transfer_client._sync import TransferClient


def register(add: AddCommand) -> None:
    history = add("history", _history, "a job's per-epoch (or per-C) training table")
    history.add_argument("job_id", metavar="JOB_ID")
    output = history.add_mutually_exclusive_group()
    output.add_argument("--csv", action="store_true", help="CSV with a header row")
    output.add_argument("--jsonl", action="store_true", help="one JSON object per row")
    _follow_argument(history)

    plot = add("plot", _plot, "draw a job's loss and accuracy curves into a PNG")
    plot.add_argument("job_id", metavar="JOB_ID")
    plot.add_argument("path", type=Path, metavar="OUT.png")
    _follow_argument(plot)


def _follow_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--follow",
        action="store_true",
        help="for a running job, wait for it to end (default: the rows so far)",
    )


def _history(client: TransferClient, args: argparse.Namespace) -> int:
    history = client.job_history(args.job_id, follow=args.follow)
    if args.csv:
        history.to_csv(sys.stdout)
    elif args.jsonl:
        history.to_jsonl(sys.stdout)
    elif args.json:
        print(
            render.to_json(
                {
                    "job_id": history.job_id,
                    "kind": history.kind,
                    "rows": history.rows,
                    "best": history.best,
                }
            )
        )
    else:
        print(text(history))
    return 0


def text(history: TrainingHistory) -> str:
    """The table, the kept row marked `*`, and a last line saying what was kept."""
    if not history.rows:
        return f"job {history.job_id}: no epochs yet"
    by_c = history.kind == CROSS_VALIDATION
    best = history.best
    headers = (
        "",
        "C TRIED" if by_c else "EPOCH",
        *(("C",) if by_c else ()),
        "TRAIN LOSS",
        "TRAIN ACC",
        "VAL LOSS",
        "VAL ACC",
        *(() if by_c else ("LR",)),
        "ELAPSED",
    )
    rows = [
        (
            "*" if row == best else "",
            str(row.epoch),
            *((f"{row.regularization_c:.4g}",) if by_c else ()),
            _loss(row.train_loss),
            render.percent(row.train_accuracy),
            _loss(row.validation_loss),
            render.percent(row.validation_accuracy),
            *(() if by_c else (f"{row.learning_rate:.2g}",)),
            render.duration(row.elapsed_seconds),
        )
        for row in history.rows
    ]
    return render.table(headers, rows) + "\n" + _summary(history, best)


def _summary(history: TrainingHistory, best: HistoryRow | None) -> str:
    if history.outcome is None:
        state = "running: the rows so far (--follow waits for the end)"
    elif history.completed is not None:
        state = f"completed, head {history.completed.head_id}"
    else:
        state = type(history.outcome).__name__.removeprefix("Job").lower()
    if best is None:
        return f"job {history.job_id}: {state}"
    kept = (
        f"C {best.regularization_c:.4g}"
        if history.kind == CROSS_VALIDATION
        else f"epoch {best.epoch}"
    )
    word = "kept" if history.completed is not None else "best so far"
    return (
        f"job {history.job_id}: {state}; {word}: {kept} "
        f"(val acc {render.percent(best.validation_accuracy)})"
    )


def _loss(value: float | None) -> str:
    """Four decimals; a loss under 0.001 in scientific notation rather than `0.0000`."""
    if value is None:
        return "-"
    return f"{value:.4f}" if value == 0 or abs(value) >= 1e-3 else f"{value:.2e}"


def _plot(client: TransferClient, args: argparse.Namespace) -> int:
    pyplot = pyplot_module("transfer plot")
    plot_curves(pyplot, client.job_history(args.job_id, follow=args.follow), args.path)
    if args.json:
        print(render.to_json({"path": str(args.path)}))
    else:
        print(f"wrote {args.path}")
    return 0
