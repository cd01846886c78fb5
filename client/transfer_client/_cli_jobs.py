"""`transfer jobs`, `job` and `cancel`: training jobs on the server."""

from __future__ import annotations

import argparse

from transfer_client import _render as render
from transfer_client._cli_commands import AddCommand
from transfer_client._sync import TransferClient
from transfer_client.types import Job, JobState


def register(add: AddCommand) -> None:
    jobs = add("jobs", _jobs, "list training jobs")
    jobs.add_argument("--state", choices=[state.value for state in JobState], default="")
    jobs.add_argument("--backbone", default="", help="only jobs on this backbone")
    jobs.add_argument("--head-name", default="", help="only jobs training a head of this name")
    add("job", _job, "show a training job").add_argument("job_id", metavar="JOB_ID")
    add("cancel", _cancel, "cancel a training job").add_argument("job_id", metavar="JOB_ID")


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
