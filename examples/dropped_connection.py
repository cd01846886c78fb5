"""React to a dropped connection: the SDK's options, and what to do when it gives up.

A training job runs on the server, not in the client: a dropped connection or a restarted
server loses no work. `train`, `fine_tune` and `watch_job` re-attach to the job by
themselves, through `WatchJob(after_sequence=last seen)`, for up to `reattach_seconds`,
and never hand over an event twice. When the server stays away longer, they raise
`UnavailableError`; the job id and the last sequence seen are all it takes to follow on
later (`--resume`).

    TRANSFER_TARGET=localhost:50051 python examples/dropped_connection.py flowers/
    TRANSFER_TARGET=localhost:50051 python examples/dropped_connection.py --resume JOB --after 7
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from transfer_client import (
    FineTuneEvent,
    JobCompleted,
    JobProgress,
    JobWarning,
    TrainingConfig,
    TransferClient,
    TransferError,
    UnavailableError,
)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"}


def connect(target: str, timeout: float, reattach_seconds: float) -> TransferClient:
    return TransferClient(
        target,
        timeout=timeout,  # each unary call's deadline, in seconds
        max_attempts=5,  # reads, Predict and WatchJob retried on UNAVAILABLE, with backoff
        # True: unary calls wait for a server coming up (within their deadline). Left off
        # here: a FineTune stream has no deadline, and would then wait for a server that
        # never comes instead of giving up after reattach_seconds.
        wait_for_ready=False,
        reattach_seconds=reattach_seconds,  # how long a broken job stream keeps re-attaching
        keepalive=True,  # pings notice a silently dead connection within about 40 s
        stream_idle_seconds=None,  # or N: a stream silent for N s counts as broken too
    )


class Follower:
    """Prints each event with its sequence and remembers the last one seen."""

    def __init__(self) -> None:
        self.job_id = ""
        self.sequences: list[int] = []

    def __call__(self, event: FineTuneEvent) -> None:
        self.job_id = event.job_id
        self.sequences.append(event.sequence)
        match event:
            case JobProgress(progress=p) if p.epoch_end or p.phase != "training":
                print(f"#{event.sequence} {p.phase} epoch {p.epoch}/{p.epochs}", flush=True)
            case JobProgress():
                pass  # mid-epoch steps: too many to print
            case JobWarning():
                # "requeued": the server stopped; the job runs again when one is back.
                print(f"#{event.sequence} warning {event.code}: {event.message}", flush=True)
            case _:
                print(f"#{event.sequence} {type(event).__name__}", flush=True)

    @property
    def last(self) -> int:
        return self.sequences[-1] if self.sequences else 0

    def report(self, completed: JobCompleted, after: int) -> None:
        expected = list(range(after + 1, after + len(self.sequences) + 1))
        once = "each event once, in order" if self.sequences == expected else "GAPS OR REPEATS"
        print(
            f"completed: head {completed.head_id}, val acc "
            f"{completed.metrics.validation_accuracy or 0:.1%}; events "
            f"#{self.sequences[0]}..#{self.last}, {once}"
        )


def gave_up(error: UnavailableError, follower: Follower) -> int:
    print(f"server unavailable: {error.message}", file=sys.stderr)
    if follower.job_id:
        print(
            f"the job goes on without us; follow it on with: python {sys.argv[0]} "
            f"--resume {follower.job_id} --after {follower.last}",
            file=sys.stderr,
        )
    return 2


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path, nargs="?", help="one sub-folder of images per class")
    parser.add_argument("--resume", metavar="JOB", help="follow this job instead of training")
    parser.add_argument("--after", type=int, default=0, help="the last event seen (--resume)")
    parser.add_argument("--timeout", type=float, default=30.0)
    parser.add_argument("--reattach-seconds", type=float, default=120.0)
    parser.add_argument("--epochs", type=int, default=12)
    args = parser.parse_args()

    target = os.environ.get("TRANSFER_TARGET", "localhost:50051")
    follower = Follower()
    try:
        with connect(target, args.timeout, args.reattach_seconds) as client:
            if args.resume:
                for event in client.watch_job(args.resume, after_sequence=args.after):
                    follower(event)
                    if isinstance(event, JobCompleted):
                        follower.report(event, args.after)
                return 0
            folder: Path = args.folder
            examples = [
                (image, image.parent.name)
                for image in sorted(folder.glob("*/*"))
                if image.suffix.lower() in IMAGE_SUFFIXES
            ]
            # The whole trunk trains, one example a step: slow enough to pull the plug on.
            config = TrainingConfig(
                epochs=args.epochs,
                batch_size=1,
                trainable_blocks=-1,
                early_stopping_patience=0,  # run every epoch
                seed=1,
            )
            completed = client.train(
                "efficientnet_lite0", examples, head_name="resilient", config=config,
                on_event=follower,
            )  # fmt: skip
            follower.report(completed, 0)
            return 0
    except UnavailableError as error:
        return gave_up(error, follower)
    except TransferError as error:  # the job failed or was cancelled, or a bad request
        print(f"error {error.code}: {error.message} (request id {error.request_id})")
        return 1


if __name__ == "__main__":
    sys.exit(main())
