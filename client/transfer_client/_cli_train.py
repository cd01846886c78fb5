"""`transfer finetune` and `transfer watch`: train a head, or follow a job, with progress on
stderr and the head id (or the completed event as JSON) on stdout."""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path
from typing import cast

from transfer_client import _render as render
from transfer_client._cli_commands import AddCommand
from transfer_client._loaders import indexed_sources, load_examples, payload_bytes
from transfer_client._progress import ProgressDisplay
from transfer_client._sync import TransferClient
from transfer_client.errors import TransferError, UnavailableError, from_job_outcome
from transfer_client.types import (
    CandidateResult,
    JobCancelled,
    JobCompleted,
    JobFailed,
    JobProgress,
    JobQueued,
    JobStarted,
    JobWarning,
    TrainingConfig,
)

# Above this much data, examples go up through UploadDataset first rather than inline in
# FineTune, whose single message would otherwise hit the server's message size limit.
INLINE_DATA_LIMIT_BYTES = 8 * 1024 * 1024


def register(add: AddCommand) -> None:
    finetune = add("finetune", _finetune, "train a head and print its id")
    finetune.add_argument("backbone", help="backbone name (see `transfer backbones`)")
    finetune.add_argument(
        "data",
        type=Path,
        metavar="DIR_OR_CSV",
        help="a folder with one sub-folder of images per class, or a CSV with text,label columns",
    )
    finetune.add_argument(
        "--head-name",
        default="",
        help="the head's name (the head id is derived from it); a name used before makes its "
        "next version",
    )
    finetune.add_argument("--epochs", type=int, default=0, help="maximum epochs (server default)")
    finetune.add_argument("--batch-size", type=int, default=0)
    finetune.add_argument("--lr", type=float, default=0.0, help="learning rate of the head")
    finetune.add_argument(
        "--trainable-blocks",
        type=int,
        default=0,
        help="0: linear probe; N: also train the last N backbone blocks; -1: all",
    )
    finetune.add_argument("--validation-fraction", type=float, default=None)
    finetune.add_argument(
        "--patience", type=int, default=None, help="early-stopping patience in epochs; 0: off"
    )
    finetune.add_argument(
        "--augment",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="image augmentation (server default: only when the trunk trains)",
    )
    finetune.add_argument("--seed", type=int, default=0)
    finetune.add_argument(
        "--solver",
        choices=("auto", "lbfgs_cv", "adamw"),
        default="",
        help="lbfgs_cv: logistic regression, its L2 strength C by cross-validation (a linear "
        "probe only); adamw: epochs with early stopping; auto (server default): lbfgs_cv "
        "where it applies and no epoch option is set",
    )
    finetune.add_argument(
        "--cv-folds", type=int, default=0, help="folds of the lbfgs_cv cross-validation"
    )

    watch = add("watch", _watch, "follow a training job until it ends")
    watch.add_argument("job_id", metavar="JOB_ID")
    watch.add_argument(
        "--after-sequence", type=int, default=0, help="skip events up to this sequence number"
    )
    watch.add_argument(
        "--jsonl",
        action="store_true",
        help="print every event as it comes, one JSON object a line (its kind in `event`)",
    )


def _finetune(client: TransferClient, args: argparse.Namespace) -> int:
    examples = load_examples(args.data)
    config = TrainingConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        learning_rate=args.lr,
        trainable_blocks=args.trainable_blocks,
        validation_fraction=args.validation_fraction,
        early_stopping_patience=args.patience,
        augment=args.augment,
        seed=args.seed,
        solver=args.solver,
        cv_folds=args.cv_folds,
    )
    data_bytes = payload_bytes(examples)
    dataset_id: str | None = None
    progress = ProgressDisplay(sys.stderr)
    try:
        if data_bytes > INLINE_DATA_LIMIT_BYTES:
            print(
                f"uploading {len(examples)} examples ({render.size(data_bytes)})...",
                file=sys.stderr,
            )
            dataset_id = client.upload_dataset(examples).dataset_id
        completed = client.train(
            args.backbone,
            None if dataset_id else examples,
            dataset_id=dataset_id,
            head_name=args.head_name,
            config=config,
            on_event=progress,
        )
    except KeyboardInterrupt:
        return _detached(progress)
    except TransferError as err:
        for field, source in indexed_sources(err, "examples", [value for value, _ in examples]):
            err.add_note(f"{field} is {source}")
        raise
    finally:
        progress.finish()
        if dataset_id:
            # The job took its own copy when it was queued; the upload would only hold the
            # tenant's dataset quota from now on.
            with contextlib.suppress(TransferError):
                client.delete_dataset(dataset_id)
    _print_completed(completed, args)
    return 0


def _watch(client: TransferClient, args: argparse.Namespace) -> int:
    if args.jsonl:
        return _watch_jsonl(client, args)
    progress = ProgressDisplay(sys.stderr)
    try:
        for event in client.watch_job(args.job_id, after_sequence=args.after_sequence):
            progress(event)
            if isinstance(event, JobCompleted):
                progress.finish()
                _print_completed(event, args)
                return 0
            if isinstance(event, JobFailed | JobCancelled):
                raise from_job_outcome(event)
    except KeyboardInterrupt:
        return _detached(progress)
    finally:
        progress.finish()
    raise UnavailableError(f"the event stream of job {args.job_id} ended before the job did")


def _watch_jsonl(client: TransferClient, args: argparse.Namespace) -> int:
    """Each event on its own line, flushed, so `transfer watch JOB --jsonl | jq` follows the
    job live; the last line is the job's outcome."""
    for event in client.watch_job(args.job_id, after_sequence=args.after_sequence):
        line: dict[str, object] = {"event": _EVENT_KINDS.get(type(event), type(event).__name__)}
        line.update(cast(dict[str, object], render.jsonable(event)))
        print(render.to_json_line(line), flush=True)
        if isinstance(event, JobCompleted):
            return 0
        if isinstance(event, JobFailed | JobCancelled):
            raise from_job_outcome(event)
    raise UnavailableError(f"the event stream of job {args.job_id} ended before the job did")


_EVENT_KINDS: dict[type, str] = {
    JobQueued: "queued",
    JobStarted: "started",
    JobProgress: "progress",
    JobWarning: "warning",
    CandidateResult: "candidate",
    JobCompleted: "completed",
    JobFailed: "failed",
    JobCancelled: "cancelled",
}


def _detached(progress: ProgressDisplay) -> int:
    progress.finish()
    if progress.job_id:
        print(
            f"detached; job {progress.job_id} keeps running on the server "
            f"(transfer watch {progress.job_id} / transfer cancel {progress.job_id})",
            file=sys.stderr,
        )
    return 130


def _print_completed(completed: JobCompleted, args: argparse.Namespace) -> None:
    print(render.to_json(completed) if args.json else completed.head_id)
