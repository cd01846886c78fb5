"""Jobs outlive the server on the embedded store (issue 17): a job interrupted by a stop
(SIGTERM) or a crash (SIGKILL) is queued again and runs from the start when the server comes
back, and its stream goes on with the same job id: WatchJob from the last sequence seen
gives the rest, without gaps or repeats, and the job ends with exactly one head."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from transfer_client import (
    FineTuneEvent,
    JobCompleted,
    JobProgress,
    JobStarted,
    JobWarning,
    TrainingConfig,
    TransferClient,
    UnavailableError,
)

from tests.datasets import fashion_mnist
from tools.reliability.common import ServerProcess, server_env

# A few seconds on two cores: the whole trunk trained, one example per step.
SLOW = TrainingConfig(
    epochs=12, batch_size=1, early_stopping_patience=0, trainable_blocks=-1, seed=11
)


@pytest.fixture
def store_env(tmp_path: Path) -> dict[str, str]:
    # One port for every start: the client reconnects to the same address.
    return server_env(tmp_path / "store", preload="efficientnet_lite0", grace_seconds=10.0)


def started(env: dict[str, str], log: Path) -> ServerProcess:
    server = ServerProcess(env, log)
    server.wait_serving()
    return server


def follow_until_progress(events: Iterator[FineTuneEvent]) -> list[FineTuneEvent]:
    seen: list[FineTuneEvent] = []
    for event in events:
        seen.append(event)
        if isinstance(event, JobProgress) and event.progress.phase == "training":
            return seen
    raise AssertionError(f"the job ended before training: {seen}")


def assert_one_log(events: list[FineTuneEvent]) -> None:
    assert [e.sequence for e in events] == list(range(1, len(events) + 1)), [
        (e.sequence, type(e).__name__) for e in events
    ]
    assert sum(isinstance(e, JobCompleted) for e in events) == 1
    assert isinstance(events[-1], JobCompleted)


def test_a_job_stopped_or_killed_mid_training_runs_again_when_the_server_returns(
    store_env: dict[str, str], tmp_path: Path
) -> None:
    examples = fashion_mnist(4, classes=2, seed=8)
    server = started(store_env, tmp_path / "server.log")
    try:
        # ---- a stop: the job goes back to the queue, its stream ends UNAVAILABLE ----
        # (reattach_seconds=0: the server's side is checked here, the SDK's re-attaching in
        # tests/client/test_reattach.py)
        with TransferClient(server.address, timeout=300, reattach_seconds=0) as client:
            stream = client.fine_tune(
                "efficientnet_lite0", examples, head_name="stopped", config=SLOW
            )
            seen = follow_until_progress(stream)
            stopping = threading.Thread(target=server.terminate)
            stopping.start()
            with pytest.raises(UnavailableError, match="watch it again"):
                for event in stream:
                    seen.append(event)
            stopping.join()
        assert server.process.returncode == 0, server.log_tail()
        job_id = seen[0].job_id
        warnings = [e.code for e in seen if isinstance(e, JobWarning)]
        assert warnings.count("requeued") == 1 and isinstance(seen[-1], JobWarning), seen

        server = started(store_env, tmp_path / "server.log")
        with TransferClient(server.address, timeout=300) as client:
            rest = list(client.watch_job(job_id, after_sequence=seen[-1].sequence))
            assert_one_log(seen + rest)
            assert isinstance(rest[0], JobStarted)  # from the start, on the new process
            assert client.get_job(job_id).state.value == "succeeded"
            stopped_heads = client.list_heads(name="stopped")
            assert [h.head_id for h in stopped_heads] == [rest[-1].head_id]  # type: ignore[attr-defined]

            # ---- a crash: SIGKILL mid-training; the restart runs it again ----
            stream = client.fine_tune(
                "efficientnet_lite0", examples, head_name="killed", config=SLOW
            )
            seen = follow_until_progress(stream)
            server.kill()
        job_id = seen[0].job_id

        server = started(store_env, tmp_path / "server.log")
        with TransferClient(server.address, timeout=300) as client:
            rest = list(client.watch_job(job_id, after_sequence=seen[-1].sequence))
            everything = seen + rest
            warnings = [e.code for e in rest if isinstance(e, JobWarning)]
            assert "restarted" in warnings, rest
            # The log may hold events the first stream had not read yet; sequences stay one line.
            assert_one_log(list(client.watch_job(job_id)))
            assert isinstance(everything[-1], JobCompleted)
            assert len(client.list_heads(name="killed")) == 1
    finally:
        server.close()
