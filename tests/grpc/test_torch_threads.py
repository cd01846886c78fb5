"""A serving process follows the torch thread policy (torch_threads): only the Predict
compute thread (and a running job's own thread) runs torch on several cores."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch
from transfer_client import JobCancelled, JobProgress, TrainingConfig, TransferClient
from transfer_service.torch_threads import default_intra_op_threads

from tests.conftest import RunningServer, make_settings, start_server
from tests.datasets import fashion_mnist


def test_only_the_compute_thread_runs_torch_on_several_cores(
    server: RunningServer, client: TransferClient
) -> None:
    head = client.train("efficientnet_lite0", fashion_mnist(3, classes=2, seed=81), head_name="t")
    client.predict(head.head_id, [fashion_mnist(1, split="test", classes=2, seed=82)[0][0]])
    app = server.app
    expected = app.settings.torch_threads or default_intra_op_threads()
    assert app.compute_pool.submit(torch.get_num_threads).result() == expected
    # Several submissions at once reach several of the preprocessing pool's threads.
    gate = threading.Barrier(3)

    def blocking_count() -> int:
        gate.wait(timeout=30)
        return torch.get_num_threads()

    counts = [app.pools[0].submit(blocking_count) for _ in range(3)]
    assert [future.result() for future in counts] == [1, 1, 1]

    async def loop_count() -> int:
        return torch.get_num_threads()

    assert server.call(loop_count()) == 1


def test_a_job_runs_on_a_thread_of_its_own_that_ends_with_it(
    server: RunningServer, client: TransferClient
) -> None:
    if server.app.backbones.device.type != "cpu":
        pytest.skip("with an accelerator jobs share long-lived threads (test_job_threads.py)")
    # Long enough to be seen running (it is cancelled once seen).
    config = TrainingConfig(epochs=500, trainable_blocks=1, early_stopping_patience=0)
    seen: list[str] = []
    job_id = ""
    ended = None
    for event in client.fine_tune(
        "efficientnet_lite0", fashion_mnist(3, classes=2, seed=83), head_name="long", config=config
    ):
        job_id = event.job_id
        if isinstance(event, JobProgress) and not seen:
            seen = [t.name for t in threading.enumerate() if t.name.startswith("job-")]
            client.cancel_job(job_id)
        ended = event
    assert seen == [f"job-{job_id}"]
    assert isinstance(ended, JobCancelled)
    # The thread (and its torch threads) ends with the job; the cancelled event goes out
    # just before the thread returns, hence the join.
    for thread in threading.enumerate():
        if thread.name == f"job-{job_id}":
            thread.join(timeout=30)
            assert not thread.is_alive()


def test_with_training_torch_threads_predict_runs_on_the_rest_while_a_job_runs(
    tmp_path: Path,
) -> None:
    running = start_server(make_settings(tmp_path, torch_threads=2, training_torch_threads=1))
    try:
        if running.app.backbones.device.type != "cpu":
            pytest.skip("the split is of CPU threads; with an accelerator jobs train on the device")
        compute = running.app.compute_pool
        with TransferClient(running.address, timeout=120) as client:
            train = fashion_mnist(3, classes=2, seed=84)
            image = fashion_mnist(1, split="test", classes=2, seed=85)[0][0]
            head = client.train("efficientnet_lite0", train, head_name="served")
            # The job's share of the cores comes back when its thread ends, just after its
            # last event went out: a Predict right then may still see it.
            deadline = time.monotonic() + 10
            while True:
                client.predict(head.head_id, [image])
                threads = compute.submit(torch.get_num_threads).result()
                if threads == 2 or time.monotonic() > deadline:
                    break
                time.sleep(0.05)
            assert threads == 2
            config = TrainingConfig(epochs=500, trainable_blocks=1, early_stopping_patience=0)
            during: list[int] = []
            ended = None
            for event in client.fine_tune(
                "efficientnet_lite0", train, head_name="long", config=config
            ):
                if isinstance(event, JobProgress) and not during:
                    client.predict(head.head_id, [image])  # a batch while the job runs
                    during.append(compute.submit(torch.get_num_threads).result())
                    client.cancel_job(event.job_id)
                ended = event
            assert during == [1]
            assert isinstance(ended, JobCancelled)
            # The share counts the job until the thread that waits for the job's own thread
            # moves on, a moment after JobCancelled went out: poll for it.
            deadline = time.monotonic() + 30
            while True:
                client.predict(head.head_id, [image])
                after = compute.submit(torch.get_num_threads).result()
                if after == 2 or time.monotonic() > deadline:
                    break
                time.sleep(0.05)
            assert after == 2
    finally:
        running.stop()
