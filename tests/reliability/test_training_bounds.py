"""Issue 15: one FineTune must not take the memory, the compute thread or the job slots of
everyone else. Training keeps only what it needs and counts it against the feature-cache
budget; the L-BFGS probe's memory is bounded whatever N x C and a cancel lands within a
second; labels and classes are bounded; a job whose end cannot be stored still ends."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch
from transfer_client.proto import transfer_service_pb2 as pb
from transfer_client.proto import transfer_service_pb2_grpc as pb_grpc
from transfer_service.backbones.cache import BackboneCache
from transfer_service.domain import (
    MAX_LABEL_CHARS,
    FineTuneSpec,
    JobState,
    LabeledExample,
    Modality,
    ModelInput,
    TrainingConfig,
)
from transfer_service.errors import InvalidArgumentError, JobCancelledError, ResourceExhaustedError
from transfer_service.heads import HeadCache
from transfer_service.store.local import LocalStore
from transfer_service.training import trainer as trainer_module
from transfer_service.training.features import ExtractedData
from transfer_service.training.jobs import JobManager
from transfer_service.training.regularised_probe import (
    HISTORY_BYTES,
    RegularisedProbe,
    history_size,
)
from transfer_service.training.trainer import Trainer
from transfer_service.training.validation import check_examples

from tests.conftest import make_settings, start_server
from tests.datasets import fashion_mnist
from tests.devices import backbone_cache


def image_examples(per_class: int, classes: int = 2, seed: int = 71) -> tuple[LabeledExample, ...]:
    return tuple(
        LabeledExample(ModelInput(image=image), label)
        for image, label in fashion_mnist(per_class, classes=classes, seed=seed)
    )


def run_trainer(
    config: TrainingConfig, examples: tuple[LabeledExample, ...], budget: int
) -> tuple[Trainer, list[ExtractedData]]:
    """Trains on efficientnet_lite0 at 48 px and captures what extraction kept."""
    loaded = backbone_cache(48, device=torch.device("cpu")).get("efficientnet_lite0")
    kept: list[ExtractedData] = []
    original = trainer_module.extract

    def spy(*args: object, **kwargs: object) -> ExtractedData:
        data = original(*args, **kwargs)  # type: ignore[arg-type]
        kept.append(data)
        return data

    trainer = Trainer(
        loaded,
        FineTuneSpec("efficientnet_lite0", "t", examples, config),
        feature_cache_bytes=budget,
        emit=lambda payload: None,
        cancelled=threading.Event(),
    )
    trainer_module.extract = spy  # type: ignore[assignment]
    try:
        trainer.run()
    finally:
        trainer_module.extract = original
    return trainer, kept


@pytest.mark.parametrize("solver", ["lbfgs_cv", "adamw"])
def test_a_linear_probe_keeps_only_pooled_features(solver: str) -> None:
    """8,000 8x8 PNGs OOM-killed the server: the probe kept every example's pre-pool map
    (250,880 bytes each for lite0 at 224 px). It needs only the pooled 1280 floats."""
    examples = image_examples(12)
    # Pooled features of every example and nothing more (1280 float32 each).
    budget = len(examples) * 1280 * 4
    trainer, [data] = run_trainer(TrainingConfig(epochs=2, solver=solver), examples, budget)
    assert data.prefix_states is not None
    assert all(state is None for state in data.prefix_states)
    assert data.raw is None
    assert data.pooled.shape == (len(examples), 1280)
    # The trainer let go of the encoded examples once their features existed.
    assert trainer._spec.examples == ()


def test_a_job_over_the_feature_budget_is_refused_before_extracting() -> None:
    examples = image_examples(6)
    with pytest.raises(ResourceExhaustedError, match="TRANSFER_FEATURE_CACHE_BYTES"):
        run_trainer(TrainingConfig(epochs=1, trainable_blocks=1), examples, budget=1000)


def job_manager(store: LocalStore, backbones: BackboneCache, heads: HeadCache) -> JobManager:
    """One job at a time on a long-lived thread (one torch thread), features never short."""
    return JobManager(
        store,
        backbones,
        heads,
        max_running_jobs=1,
        max_jobs_per_tenant=1,
        feature_cache_bytes=10**9,
        intra_op_threads=1,
        fresh_thread_per_job=False,
    )


def test_a_finished_job_keeps_no_example_bytes(tmp_path: Path) -> None:
    """Up to 256 finished jobs stay live for their streams: 12 FineTunes of 35 MB each kept
    every byte of their examples (RSS 916 -> 1,617 MB)."""
    backbones = backbone_cache(48, device=torch.device("cpu"))
    store = LocalStore(tmp_path)
    heads = HeadCache(backbones, store.get_head, store.load_head_weights, 4)

    async def run() -> JobManager:
        jobs = job_manager(store, backbones, heads)
        jobs.start()
        spec = FineTuneSpec("efficientnet_lite0", "h", image_examples(4), TrainingConfig())
        job_id = (await jobs.submit(spec)).job_id
        async for _ in jobs.watch(job_id):
            pass
        assert jobs.get(job_id).state is JobState.SUCCEEDED
        await jobs.shutdown(grace_seconds=30)
        return jobs

    try:
        jobs = asyncio.run(run())
    finally:
        store.close()
    [live] = jobs._live.values()
    assert live.spec.examples == () and live.spec.validation_examples == ()


def test_a_job_whose_end_cannot_be_stored_still_ends_and_frees_its_slot(tmp_path: Path) -> None:
    """A full disk left a job RUNNING forever: its end could not be written and the error
    was raised inside the error handler; cancel did nothing and the slot stayed taken. Now it
    ends in memory (its stream closes) and frees this server's slot; the stored row stays
    unfinished, so the job runs again once its lease runs out and the disk has room."""
    backbones = backbone_cache(48, device=torch.device("cpu"))
    store = LocalStore(tmp_path)
    heads = HeadCache(backbones, store.get_head, store.load_head_weights, 4)

    async def run() -> tuple[JobState, int, str]:
        jobs = job_manager(_FullAfterQueued(store), backbones, heads)  # type: ignore[arg-type]
        jobs.start()
        spec = FineTuneSpec("efficientnet_lite0", "h", image_examples(4), TrainingConfig())
        job_id = (await jobs.submit(spec)).job_id
        last = ""
        async with asyncio.timeout(120):
            async for event in jobs.watch(job_id):
                last = type(event.payload).__name__
        state = jobs.get(job_id).state
        for _ in range(100):  # the run's thread returns just after its last event
            if not jobs._running:
                break
            await asyncio.sleep(0.05)
        unfinished = jobs._running
        await jobs.shutdown(grace_seconds=30)
        return state, unfinished, last

    try:
        state, unfinished, last = asyncio.run(run())
    finally:
        store.close()
    assert state is JobState.FAILED
    assert unfinished == 0
    assert last == "JobFailed"


class _FullAfterQueued:
    """A store whose disk fills up right after a job is queued and claimed: every later job
    write fails as the real store reports a full disk."""

    def __init__(self, store: LocalStore) -> None:
        self._store = store

    def _full(self, *args: object, **kwargs: object) -> None:
        raise ResourceExhaustedError("the store's disk is full (test)")

    def __getattr__(self, name: str) -> object:
        if name in (
            "save_job",
            "append_event",
            "finish_job",
            "append_progress",
            "save_head",
            "complete_job",
        ):
            return self._full
        return getattr(self._store, name)


def test_the_lbfgs_history_is_bounded_by_bytes() -> None:
    """10,000 classes of one example took 5.4 GB, most of it L-BFGS's 20 [C, D] pairs."""
    assert history_size(10, 384) == 20
    pairs = history_size(10_000, 1280)
    assert 3 <= pairs < 20
    assert pairs * 2 * 8 * 10_000 * 1281 <= max(HISTORY_BYTES, 3 * 2 * 8 * 10_000 * 1281)


def test_a_cancel_stops_a_long_lbfgs_fit_within_a_second() -> None:
    """CancelJob during the fit returned OK and the job ran 606 s more: the search checked
    for a cancel only between fits."""
    generator = torch.Generator().manual_seed(0)
    rows, dims, classes = 6000, 256, 1500  # one fit runs for minutes on two cores
    features = torch.randn(rows, dims, generator=generator)
    labels = torch.randint(0, classes, (rows,), generator=generator)
    cancelled = threading.Event()

    def should_stop() -> None:
        if cancelled.is_set():
            raise JobCancelledError("cancelled by request")

    probe = RegularisedProbe(features, labels, classes, should_stop=should_stop)
    timer = threading.Timer(1.0, cancelled.set)
    timer.start()
    started = time.monotonic()
    try:
        with pytest.raises(JobCancelledError):
            probe.fit(1.0)
    finally:
        timer.cancel()
    assert time.monotonic() - started < 2.0


def test_labels_and_classes_are_bounded() -> None:
    def examples(labels: list[str]) -> list[LabeledExample]:
        return [LabeledExample(ModelInput(text="some text"), label) for label in labels]

    too_long = "x" * (MAX_LABEL_CHARS + 1)
    with pytest.raises(InvalidArgumentError, match=r"examples\[1\]\.label: .*over the limit"):
        check_examples(examples(["a", too_long]), Modality.TEXT, 100, "examples", 10)
    with pytest.raises(ResourceExhaustedError, match="TRANSFER_MAX_CLASSES"):
        check_examples(examples([f"c{i}" for i in range(11)]), Modality.TEXT, 100, "examples", 10)
    check_examples(examples([f"c{i}" for i in range(10)]), Modality.TEXT, 100, "examples", 10)


def test_a_huge_label_is_refused_over_grpc(stub: pb_grpc.TransferServiceStub) -> None:
    """A 20 MB label made a `started` event larger than a gRPC message: the stream died and
    could never be replayed."""
    images = [image for image, _ in fashion_mnist(2, classes=1, seed=72)]
    request = pb.FineTuneRequest(
        backbone="efficientnet_lite0",
        head_name="huge-label",
        examples=[
            pb.Example(image=images[0], label="a"),
            pb.Example(image=images[1], label="b" * 2_000_000),
        ],
    )
    with pytest.raises(grpc.RpcError) as raised:
        list(stub.FineTune(request, timeout=60))
    assert raised.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "examples[1].label" in (raised.value.details() or "")


@pytest.fixture(scope="module")
def tight(tmp_path_factory: pytest.TempPathFactory) -> Iterator[pb_grpc.TransferServiceStub]:
    """A server whose feature budget holds the pooled features of 10 lite0 examples and
    whose heads may have at most 3 classes."""
    running = start_server(
        make_settings(
            tmp_path_factory.mktemp("tight"),
            preload_backbones=[],
            feature_cache_bytes=10 * 1280 * 4,
            max_classes=3,
        )
    )
    with grpc.insecure_channel(running.address) as channel:
        yield pb_grpc.TransferServiceStub(channel)
    running.stop()


def fine_tune_error(stub: pb_grpc.TransferServiceStub, count: int, classes: int) -> grpc.RpcError:
    images = [image for image, _ in fashion_mnist(count, classes=1, seed=73)]
    request = pb.FineTuneRequest(
        backbone="efficientnet_lite0",
        head_name="bounded",
        examples=[
            pb.Example(image=image, label=f"c{i % classes}") for i, image in enumerate(images)
        ],
    )
    with pytest.raises(grpc.RpcError) as raised:
        list(stub.FineTune(request, timeout=60))
    return raised.value


def test_a_dataset_whose_features_cannot_fit_is_refused_before_it_queues(
    tight: pb_grpc.TransferServiceStub,
) -> None:
    error = fine_tune_error(tight, 11, 2)
    assert error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "TRANSFER_FEATURE_CACHE_BYTES" in (error.details() or "")
    assert "at most 10 examples" in (error.details() or "")


def test_more_classes_than_the_limit_are_refused(tight: pb_grpc.TransferServiceStub) -> None:
    error = fine_tune_error(tight, 8, 4)
    assert error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "TRANSFER_MAX_CLASSES" in (error.details() or "")
