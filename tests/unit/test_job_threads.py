"""Which thread a training job runs on (service.torch_threads.jobs_train_on_fresh_threads): on
a CPU a fresh one per job, whose OpenMP team ends with it; with an accelerator a long-lived
one, so what torch caches per thread (cuDNN's execution plans) serves the next job too.
Either way the job's thread runs torch on the configured number of CPU threads."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import torch

from service.domain import FineTuneSpec, JobState, LabeledExample, ModelInput, TrainingConfig
from service.heads import HeadCache
from service.store.local import LocalStore
from service.torch_threads import jobs_train_on_fresh_threads
from service.training.jobs import JobHooks, JobManager
from tests.datasets import fashion_mnist
from tests.devices import backbone_cache


def test_only_a_cpu_gives_each_job_a_fresh_thread() -> None:
    assert jobs_train_on_fresh_threads("cpu")
    assert not jobs_train_on_fresh_threads("cuda")
    assert not jobs_train_on_fresh_threads("mps")


def _run_two_jobs(store_dir: Path, fresh_thread_per_job: bool) -> list[tuple[str, str, int]]:
    """(job id, thread name, torch CPU threads) as each of two jobs, one after the other,
    starts running; both must succeed."""
    backbones = backbone_cache(48, device=torch.device("cpu"))
    store = LocalStore(store_dir)
    heads = HeadCache(backbones, store.get_head, store.load_head_weights, 4)
    running: list[tuple[str, int]] = []

    def on_state(new: JobState, old: JobState | None) -> None:
        if new is JobState.RUNNING:
            running.append((threading.current_thread().name, torch.get_num_threads()))

    examples = tuple(
        LabeledExample(ModelInput(image=image), label)
        for image, label in fashion_mnist(3, classes=2, seed=91)
    )

    async def run() -> list[str]:
        jobs = JobManager(
            store,
            backbones,
            heads,
            max_concurrent_jobs=1,
            max_jobs_per_tenant=4,
            feature_cache_bytes=10**9,
            intra_op_threads=2,
            fresh_thread_per_job=fresh_thread_per_job,
            hooks=JobHooks(on_state=on_state),
        )
        jobs.start()
        job_ids = []
        for index in range(2):
            spec = FineTuneSpec("efficientnet_lite0", f"h{index}", examples, TrainingConfig())
            job_id = jobs.submit(spec).job_id
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
    pairs = zip(job_ids, running, strict=True)
    return [(job_id, name, threads) for job_id, (name, threads) in pairs]


def test_on_a_cpu_each_job_trains_on_a_fresh_thread_of_its_own(tmp_path: Path) -> None:
    started = _run_two_jobs(tmp_path, fresh_thread_per_job=True)
    assert [name for _, name, _ in started] == [f"job-{job_id}" for job_id, _, _ in started]
    assert [threads for _, _, threads in started] == [2, 2]


def test_with_an_accelerator_jobs_share_a_long_lived_thread(tmp_path: Path) -> None:
    started = _run_two_jobs(tmp_path, fresh_thread_per_job=False)
    [first, second] = [name for _, name, _ in started]
    assert first == second and first.startswith("train")
    assert [threads for _, _, threads in started] == [2, 2]
