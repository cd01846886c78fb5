"""A serving process follows the torch thread policy (service.torch_threads): only the Predict
compute thread (and a running job's own thread) runs torch on several cores."""

from __future__ import annotations

import threading

import torch

from client import JobCompleted, JobProgress, TransferClient
from service.torch_threads import default_intra_op_threads
from tests.conftest import RunningServer
from tests.datasets import fashion_mnist


def test_only_the_compute_thread_runs_torch_on_several_cores(
    server: RunningServer, client: TransferClient
) -> None:
    job_threads_seen: list[str] = []
    head_id = ""
    for event in client.fine_tune(
        "efficientnet_lite0", fashion_mnist(3, classes=2, seed=81), head_name="t"
    ):
        if isinstance(event, JobProgress) and not job_threads_seen:
            # While it runs, the job has a thread of its own.
            job_threads_seen = [t.name for t in threading.enumerate() if t.name.startswith("job-")]
        if isinstance(event, JobCompleted):
            head_id = event.head_id
    assert job_threads_seen == [f"job-{event.job_id}"]
    client.predict(head_id, [fashion_mnist(1, split="test", classes=2, seed=82)[0][0]])
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
    # The job trained on a thread of its own, which ends with it (and its torch threads); the
    # completed event goes out just before the thread returns, hence the short wait.
    for thread in threading.enumerate():
        if thread.name.startswith("job-"):
            thread.join(timeout=30)
            assert not thread.is_alive()
