"""The torch thread policy (transfer_service.torch_threads): counts set per thread stay set, and a
job's thread is gone when the job returns."""

from __future__ import annotations

import threading

import pytest
import torch
from transfer_service.torch_threads import CpuShare, run_in_fresh_thread, use_intra_op_threads


def test_a_thread_keeps_its_count_when_another_thread_sets_a_different_one_later() -> None:
    # torch initialises a thread's count lazily, at its first parallel op, from the count
    # set last on any thread: here the other thread's 2, which would overwrite this one's 1.
    first_set = threading.Event()
    other_set = threading.Event()
    seen: list[int] = []

    def serving_thread() -> None:
        use_intra_op_threads(1)
        first_set.set()
        other_set.wait(timeout=30)
        torch.ones(1 << 20).add_(1)  # large enough for a parallel op
        seen.append(torch.get_num_threads())

    def compute_thread() -> None:
        first_set.wait(timeout=30)
        use_intra_op_threads(2)
        other_set.set()

    threads = [threading.Thread(target=serving_thread), threading.Thread(target=compute_thread)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert seen == [1]


def test_run_in_fresh_thread_sets_the_count_waits_and_reraises() -> None:
    seen: list[tuple[str, int]] = []

    def job() -> None:
        seen.append((threading.current_thread().name, torch.get_num_threads()))

    run_in_fresh_thread(job, "job-test", 2)
    assert seen == [("job-test", 2)]
    assert not any(t.name == "job-test" for t in threading.enumerate())

    def failing() -> None:
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        run_in_fresh_thread(failing, "job-failing", 1)


def test_a_cpu_share_leaves_predict_the_threads_no_running_job_holds() -> None:
    share = CpuShare(predict_threads=4, training_threads=1)
    assert share.splits
    assert share.predict_threads_now() == 4
    with share.training():
        assert share.predict_threads_now() == 3
        with share.training():
            assert share.predict_threads_now() == 2
        assert share.predict_threads_now() == 3
    assert share.predict_threads_now() == 4
    crowded = CpuShare(predict_threads=2, training_threads=1)
    with crowded.training(), crowded.training(), crowded.training():
        assert crowded.predict_threads_now() == 1  # never none


@pytest.mark.parametrize("training_threads", [0, 2, 3])
def test_by_default_a_cpu_share_does_not_split(training_threads: int) -> None:
    share = CpuShare(predict_threads=2, training_threads=training_threads)
    assert not share.splits
    assert share.training_threads == (training_threads or 2)
    with share.training():
        # The default (0) yields: a running job takes half the cores back from Predict
        # while Predicts arrive (issue 15), so the compute thread runs on what is left.
        # A training count of every core or more neither splits nor yields.
        assert share.predict_threads_now() == (1 if training_threads == 0 else 2)


def test_fit_compute_thread_sets_the_calling_threads_count_while_a_job_runs() -> None:
    share = CpuShare(predict_threads=2, training_threads=1)
    counts: list[int] = []

    def compute_thread() -> None:
        use_intra_op_threads(2)
        with share.training():
            share.fit_compute_thread()
            counts.append(torch.get_num_threads())
        share.fit_compute_thread()
        counts.append(torch.get_num_threads())

    thread = threading.Thread(target=compute_thread)
    thread.start()
    thread.join(timeout=60)
    assert counts == [1, 2]
