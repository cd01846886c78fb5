"""The `transfer` command: the SDK from a shell."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Callable
from pathlib import Path

import grpc

from transfer_client import _render as render
from transfer_client._channel import DEFAULT_TARGET, tls_credentials
from transfer_client._loaders import load_examples, payload_bytes
from transfer_client._progress import ProgressDisplay
from transfer_client._report import add_arguments as add_report_arguments
from transfer_client._report import report as report_command
from transfer_client._sync import TransferClient
from transfer_client.errors import TransferError, UnavailableError, from_job_outcome
from transfer_client.types import (
    Backbone,
    ClassScore,
    Head,
    InputData,
    Job,
    JobCancelled,
    JobCompleted,
    JobFailed,
    JobState,
    TrainingConfig,
)

# Above this much data, examples go up through UploadDataset first rather than inline in
# FineTune, whose single message would otherwise hit the server's message size limit.
INLINE_DATA_LIMIT_BYTES = 8 * 1024 * 1024

_Command = Callable[[TransferClient, argparse.Namespace], int]


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    command: _Command = args.command
    try:
        with TransferClient(
            args.target,
            credentials=_credentials(args),
            token=args.token or None,
            timeout=args.timeout,
        ) as client:
            return command(client, args)
    except TransferError as err:
        print(f"error: {err.message} ({err.code})", file=sys.stderr)
        return 1
    except (OSError, ValueError) as err:  # unreadable files, malformed data sets
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130  # the shell's convention for "interrupted by SIGINT"


def _credentials(args: argparse.Namespace) -> grpc.ChannelCredentials | None:
    if (args.client_cert is None) != (args.client_key is None):
        raise ValueError("--client-cert and --client-key go together")
    if args.tls or args.ca_cert is not None or args.client_cert is not None:
        return tls_credentials(
            args.ca_cert, client_cert=args.client_cert, client_key=args.client_key
        )
    return None


# --- commands ----------------------------------------------------------------------------


def _backbones(client: TransferClient, args: argparse.Namespace) -> int:
    backbones = client.list_backbones()
    if args.json:
        print(render.to_json(backbones))
        return 0
    print(
        render.table(
            ("NAME", "MODALITY", "STATE", "PARAMS", "FEATURES", "INPUT", "DEVICE", "NOTE"),
            (_backbone_row(backbone) for backbone in backbones),
        )
    )
    return 0


def _backbone_row(backbone: Backbone) -> tuple[str, ...]:
    return (
        backbone.name,
        backbone.modality,
        backbone.state,
        render.count(backbone.parameter_count),
        str(backbone.feature_dim),
        str(backbone.input_size),
        backbone.device or "-",
        backbone.unavailable_reason,
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
    )
    data_bytes = payload_bytes(examples)
    dataset_id: str | None = None
    if data_bytes > INLINE_DATA_LIMIT_BYTES:
        print(
            f"uploading {len(examples)} examples ({render.size(data_bytes)})...",
            file=sys.stderr,
        )
        dataset_id = client.upload_dataset(examples).dataset_id
    progress = ProgressDisplay(sys.stderr)
    try:
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


def _predict(client: TransferClient, args: argparse.Namespace) -> int:
    inputs: list[InputData] = list(args.inputs) if args.text else [Path(i) for i in args.inputs]
    predictions = client.predict(args.head_id, inputs, top_k=args.top_k)
    if args.json:
        print(
            render.to_json(
                [
                    {"input": name, "prediction": prediction}
                    for name, prediction in zip(args.inputs, predictions, strict=True)
                ]
            )
        )
        return 0
    for name, prediction in zip(args.inputs, predictions, strict=True):
        scores = prediction.top_k or (ClassScore(prediction.label, prediction.score),)
        ranked = ", ".join(f"{score.label} {render.percent(score.score)}" for score in scores)
        print(f"{_shorten(name)}\t{ranked}")
    return 0


def _shorten(text: str, limit: int = 60) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def _jobs(client: TransferClient, args: argparse.Namespace) -> int:
    state = JobState(args.state) if args.state else None
    jobs = client.list_jobs(state=state, backbone=args.backbone, head_name=args.head_name)
    if args.json:
        print(render.to_json(jobs))
        return 0
    print(
        render.table(
            ("JOB", "STATE", "BACKBONE", "HEAD NAME", "PROGRESS", "HEAD", "UPDATED"),
            (_job_row(job) for job in jobs),
        )
    )
    return 0


def _job_row(job: Job) -> tuple[str, ...]:
    return (
        job.job_id,
        job.state,
        job.backbone,
        job.head_name or "-",
        _job_progress(job),
        job.head_id or "-",
        render.local_time(job.updated_time),
    )


def _job_progress(job: Job) -> str:
    if job.progress is None:
        return "-"
    return f"epoch {job.progress.epoch}/{job.progress.epochs}"


def _job(client: TransferClient, args: argparse.Namespace) -> int:
    _print_job(client.get_job(args.job_id), args)
    return 0


def _cancel(client: TransferClient, args: argparse.Namespace) -> int:
    _print_job(client.cancel_job(args.job_id), args)
    return 0


def _print_job(job: Job, args: argparse.Namespace) -> None:
    if args.json:
        print(render.to_json(job))
        return
    pairs = [
        ("job", job.job_id),
        ("state", str(job.state)),
        ("backbone", job.backbone),
        ("head name", job.head_name or "-"),
        ("head", job.head_id or "-"),
        ("progress", _job_progress(job)),
        ("created", render.local_time(job.created_time)),
        ("updated", render.local_time(job.updated_time)),
        ("last event", str(job.last_sequence)),
    ]
    if job.progress is not None:
        pairs.append(("train acc", render.percent(job.progress.train_accuracy)))
        pairs.append(("val acc", render.percent(job.progress.validation_accuracy)))
    if job.error:
        pairs.append(("error", job.error))
    print(render.fields(pairs))


def _heads(client: TransferClient, args: argparse.Namespace) -> int:
    heads = client.list_heads(backbone=args.backbone, name=args.name)
    if args.json:
        print(render.to_json(heads))
        return 0
    print(
        render.table(
            ("HEAD", "BACKBONE", "CLASSES", "VAL ACC", "SIZE", "CREATED"),
            (_head_row(head) for head in heads),
        )
    )
    return 0


def _head_row(head: Head) -> tuple[str, ...]:
    return (
        head.head_id,
        head.backbone,
        str(len(head.class_names)),
        render.percent(head.metrics.validation_accuracy),
        render.size(head.size_bytes),
        render.local_time(head.created_time),
    )


def _head(client: TransferClient, args: argparse.Namespace) -> int:
    head = client.get_head(args.head_id)
    if args.json:
        print(render.to_json(head))
        return 0
    metrics = head.metrics
    print(
        render.fields(
            [
                ("head", head.head_id),
                ("name", head.name),
                ("backbone", f"{head.backbone} ({head.modality}, input {head.input_size})"),
                ("classes", ", ".join(head.class_names)),
                ("trainable blocks", str(head.trainable_blocks)),
                ("train acc", render.percent(metrics.train_accuracy)),
                ("val acc", render.percent(metrics.validation_accuracy)),
                ("epochs", f"{metrics.epochs_run} (best {metrics.best_epoch})"),
                ("trained in", render.duration(metrics.training_seconds)),
                ("size", render.size(head.size_bytes)),
                ("created", render.local_time(head.created_time)),
                ("job", head.job_id or "-"),
            ]
        )
    )
    return 0


def _export(client: TransferClient, args: argparse.Namespace) -> int:
    size = client.export_head(args.head_id, args.path)
    if args.json:
        print(render.to_json({"path": str(args.path), "size_bytes": size}))
    else:
        print(f"wrote {args.path} ({render.size(size)}, ONNX)")
    return 0


def _delete_head(client: TransferClient, args: argparse.Namespace) -> int:
    client.delete_head(args.head_id)
    if not args.json:
        print(f"deleted {args.head_id}")
    return 0


def _delete_dataset(client: TransferClient, args: argparse.Namespace) -> int:
    client.delete_dataset(args.dataset_id)
    if not args.json:
        print(f"deleted {args.dataset_id}")
    return 0


# --- arguments ---------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="transfer",
        description="Fine-tune and use task heads on the transfer service.",
        parents=[_global_options(with_defaults=True)],
    )
    # The same options on each subcommand, without defaults so they do not overwrite what
    # came before the subcommand: `transfer --json jobs` and `transfer jobs --json` both work.
    common = [_global_options(with_defaults=False)]
    commands = parser.add_subparsers(title="commands", required=True, metavar="COMMAND")

    def add(name: str, command: _Command, help_text: str) -> argparse.ArgumentParser:
        subparser = commands.add_parser(name, parents=common, help=help_text)
        subparser.set_defaults(command=command)
        return subparser

    add("backbones", _backbones, "list the backbones and their state")

    finetune = add("finetune", _finetune, "train a head and print its id")
    finetune.add_argument("backbone", help="backbone name (see `transfer backbones`)")
    finetune.add_argument(
        "data",
        type=Path,
        metavar="DIR_OR_CSV",
        help="a folder with one sub-folder of images per class, or a CSV with text,label columns",
    )
    finetune.add_argument("--head-name", default="", help="name the head id is derived from")
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

    predict = add("predict", _predict, "classify images (or texts, with --text)")
    predict.add_argument("head_id", metavar="HEAD")
    predict.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, or texts")
    predict.add_argument("--top-k", type=int, default=1, help="classes to show per input")
    predict.add_argument("--text", action="store_true", help="the inputs are texts, not files")

    jobs = add("jobs", _jobs, "list training jobs")
    jobs.add_argument("--state", choices=[state.value for state in JobState], default="")
    jobs.add_argument("--backbone", default="", help="only jobs on this backbone")
    jobs.add_argument("--head-name", default="", help="only jobs training a head of this name")
    add("job", _job, "show a training job").add_argument("job_id", metavar="JOB_ID")
    add("cancel", _cancel, "cancel a training job").add_argument("job_id", metavar="JOB_ID")
    watch = add("watch", _watch, "follow a training job until it ends")
    watch.add_argument("job_id", metavar="JOB_ID")
    watch.add_argument(
        "--after-sequence", type=int, default=0, help="skip events up to this sequence number"
    )

    heads = add("heads", _heads, "list trained heads")
    heads.add_argument("--backbone", default="", help="only heads on this backbone")
    heads.add_argument("--name", default="", help="only heads of this name")
    add("head", _head, "show a trained head").add_argument("head_id", metavar="HEAD_ID")
    add_report_arguments(
        add("report", report_command, "a head's evaluation report (--plots DIR: PNGs too)")
    )
    export = add("export", _export, "write a head with its backbone as an ONNX model")
    export.add_argument("head_id", metavar="HEAD")
    export.add_argument("path", type=Path, metavar="OUT.onnx")
    add("delete-head", _delete_head, "delete a trained head").add_argument(
        "head_id", metavar="HEAD_ID"
    )
    add("delete-dataset", _delete_dataset, "delete an uploaded dataset (frees quota)").add_argument(
        "dataset_id", metavar="DATASET_ID"
    )
    return parser


def _global_options(*, with_defaults: bool) -> argparse.ArgumentParser:
    options = argparse.ArgumentParser(add_help=False)

    def default(value: object) -> object:
        return value if with_defaults else argparse.SUPPRESS

    options.add_argument(
        "--target",
        default=default(os.environ.get("TRANSFER_TARGET", DEFAULT_TARGET)),
        help=f"server address (env TRANSFER_TARGET, else {DEFAULT_TARGET})",
    )
    options.add_argument(
        "--token",
        default=default(os.environ.get("TRANSFER_TOKEN", "")),
        help="bearer token (env TRANSFER_TOKEN)",
    )
    options.add_argument("--tls", action="store_true", default=default(False), help="use TLS")
    options.add_argument(
        "--ca-cert",
        type=Path,
        default=default(None),
        metavar="PEM",
        help="trust this CA certificate (implies --tls)",
    )
    options.add_argument(
        "--client-cert",
        type=Path,
        default=default(None),
        metavar="PEM",
        help="client certificate chain for a server requiring mutual TLS (implies --tls)",
    )
    options.add_argument(
        "--client-key",
        type=Path,
        default=default(None),
        metavar="PEM",
        help="private key of --client-cert",
    )
    options.add_argument(
        "--timeout",
        type=float,
        default=default(30.0),
        help="deadline of each non-streaming call in seconds",
    )
    options.add_argument(
        "--json", action="store_true", default=default(False), help="print JSON, not tables"
    )
    return options


if __name__ == "__main__":
    sys.exit(main())
