"""Which thread a training job runs on (torch_threads.jobs_train_on_fresh_threads): on
a CPU a fresh one per job, whose OpenMP team ends with it; with an accelerator a long-lived
one, so what torch caches per thread (cuDNN's execution plans) serves the next job too.
Either way the job's thread runs torch on the configured number of CPU threads."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import NamedTuple

import torch
from transfer_service.domain import (
    FineTuneSpec,
    JobState,
    LabeledExample,
    ModelInput,
    TrainingConfig,
)
from transfer_service.heads import HeadCache
from transfer_service.store.local import LocalStore
from transfer_service.torch_threads import CpuShare, jobs_train_on_fresh_threads
from transfer_service.training.jobs import JobHooks, JobManager

from tests.datasets import fashion_mnist
from tests.devices import backbone_cache


def test_only_a_cpu_gives_each_job_a_fresh_thread() -> None:
    assert jobs_train_on_fresh_threads("cpu")
    assert not jobs_train_on_fresh_threads("cuda")
    assert not jobs_train_on_fresh_threads("mps")


class Started(NamedTuple):
    job_id: str
    thread: str
    torch_threads: int  # the job thread's
    predict_threads: int  # what the CPU share left the Predict compute thread meanwhile


def _run_two_jobs(
    store_dir: Path, fresh_thread_per_job: bool, share: CpuShare | None = None
) -> list[Started]:
    """How each of two jobs, one after the other, starts running; both must succeed.
    Without `share`: 2 threads for Predict and a job that yields to Predict (the default)."""
    share = share or CpuShare(predict_threads=2, training_threads=0)
    backbones = backbone_cache(48, device=torch.device("cpu"))
    store = LocalStore(store_dir)
    heads = HeadCache(backbones, store.get_head, store.load_head_weights, 4)
    running: list[tuple[str, int, int]] = []

    def on_state(new: JobState, old: JobState | None) -> None:
        if new is JobState.RUNNING:
            thread = threading.current_thread().name
            running.append((thread, torch.get_num_threads(), share.predict_threads_now()))

    examples = tuple(
        LabeledExample(ModelInput(image=image), label)
        for image, label in fashion_mnist(3, classes=2, seed=91)
    )

    async def run() -> list[str]:
        jobs = JobManager(
            store,
            backbones,
            heads,
            max_running_jobs=1,
            max_jobs_per_tenant=4,
            feature_cache_bytes=10**9,
            intra_op_threads=share.training_threads,
            fresh_thread_per_job=fresh_thread_per_job,
            hooks=JobHooks(on_state=on_state),
            while_training=share.training,
        )
        jobs.start()
        job_ids = []
        for index in range(2):
            spec = FineTuneSpec("efficientnet_lite0", f"h{index}", examples, TrainingConfig())
            job_id = (await jobs.submit(spec)).job_id
            async for _ in jobs.watch(job_id):
                pass
            assert jobs.get(job_id).state is JobState.SUCCEEDED, jobs.get(job_id).error
            job_ids.append(job_id)
        await jobs.shutdown(grace_seconds=30)
        return job_ids

    try:
        job_ids = asyncio.run(run())
    finally:
        store.close()
    return [Started(job_id, *seen) for job_id, seen in zip(job_ids, running, strict=True)]


def test_on_a_cpu_each_job_trains_on_a_fresh_thread_of_its_own(tmp_path: Path) -> None:
    started = _run_two_jobs(tmp_path, fresh_thread_per_job=True)
    assert [job.thread for job in started] == [f"job-{job.job_id}" for job in started]
    assert [job.torch_threads for job in started] == [2, 2]
    # A job yields to Predict by default: a batch meanwhile runs on what its half leaves.
    assert [job.predict_threads for job in started] == [1, 1]


def test_with_an_accelerator_jobs_share_a_long_lived_thread(tmp_path: Path) -> None:
    started = _run_two_jobs(tmp_path, fresh_thread_per_job=False)
    [first, second] = [job.thread for job in started]
    assert first == second and first.startswith("train")
    assert [job.torch_threads for job in started] == [2, 2]


def test_with_a_cpu_share_a_job_trains_on_its_threads_and_leaves_predict_the_rest(
    tmp_path: Path,
) -> None:
    share = CpuShare(predict_threads=2, training_threads=1)
    started = _run_two_jobs(tmp_path, fresh_thread_per_job=True, share=share)
    assert [job.torch_threads for job in started] == [1, 1]
    assert [job.predict_threads for job in started] == [1, 1]
    assert share.predict_threads_now() == 2  # both jobs over


def test_a_job_trains_on_every_core_until_predicts_come_then_on_half() -> None:
    now = [100.0]
    share = CpuShare(predict_threads=2, training_threads=0, clock=lambda: now[0])
    assert share.yields and not share.splits
    assert share.job_threads_now() == 2  # no Predict yet
    with share.training():
        share.fit_compute_thread()  # a Predict batch starts: the job's share shrinks
        assert share.job_threads_now() == 1
        assert share.predict_threads_now() == 1
        now[0] += 0.6  # no Predict batch since: the job takes every core again
        assert share.job_threads_now() == 2
    assert share.predict_threads_now() == 2  # no job: Predict has every core


def test_a_yielding_job_sets_its_own_thread_count_between_batches() -> None:
    """pace_training reaches the job's fresh thread through run_in_fresh_thread's context."""
    from transfer_service.torch_threads import pace_training, run_in_fresh_thread

    now = [100.0]
    share = CpuShare(predict_threads=2, training_threads=0, clock=lambda: now[0])
    seen: list[int] = []

    def job() -> None:
        pace_training()
        seen.append(torch.get_num_threads())
        share.note_predict_batch()  # a Predict batch started meanwhile
        pace_training()
        seen.append(torch.get_num_threads())

    with share.training():
        run_in_fresh_thread(job, "job-test", 2)
    assert seen == [2, 1]
    pace_training()  # outside a job: nothing happens
