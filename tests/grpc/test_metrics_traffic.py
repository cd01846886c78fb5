"""/metrics scraped before, during and after real Predict and FineTune traffic: the counters,
histograms and gauges an operator charts move the way the traffic says they should."""

from __future__ import annotations

import importlib.metadata
import platform
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families
from transfer_client import (
    JobCancelled,
    JobCompleted,
    JobStarted,
    NotFoundError,
    TrainingConfig,
    TransferClient,
)

from tests.conftest import RunningServer, make_settings, start_server
from tests.datasets import fashion_mnist

BACKBONE = "efficientnet_lite0"

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


class Scrape:
    """One read of /metrics: `scrape.value(name, label=value, ...)`, 0.0 when absent."""

    def __init__(self, server: RunningServer) -> None:
        url = f"http://127.0.0.1:{server.app.metrics_port}/metrics"
        body = urllib.request.urlopen(url, timeout=10).read().decode()
        self.samples: Samples = {
            (sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(body)
            for sample in family.samples
        }

    def value(self, name: str, **labels: str) -> float:
        return self.samples.get((name, frozenset(labels.items())), 0.0)

    def has(self, name: str) -> bool:
        return any(sample_name == name for sample_name, _ in self.samples)


def scrape_until(
    server: RunningServer, condition: Callable[[Scrape], bool], timeout: float = 60
) -> Scrape:
    deadline = time.monotonic() + timeout
    while True:
        scrape = Scrape(server)
        if condition(scrape):
            return scrape
        assert time.monotonic() < deadline, "the metrics never reached the expected state"
        time.sleep(0.1)


@pytest.fixture(scope="module")
def stored_head(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A store holding one trained head, written by a server that is gone again."""
    store = tmp_path_factory.mktemp("metrics-store")
    first = start_server(make_settings(store, preload_backbones=[]))
    try:
        with TransferClient(first.address, timeout=120) as client:
            done = client.train(
                BACKBONE,
                fashion_mnist(6, classes=3, seed=21),
                head_name="metered",
                config=TrainingConfig(epochs=5),
            )
    finally:
        first.stop()
    return store, done.head_id


@pytest.fixture()
def cold_server(stored_head: tuple[Path, str]) -> Iterator[RunningServer]:
    """A fresh process's state: nothing loaded, the head only on disk."""
    running = start_server(make_settings(stored_head[0], preload_backbones=[]))
    yield running
    running.stop()


def test_predict_traffic_moves_rpc_inference_and_cache_metrics(
    cold_server: RunningServer, stored_head: tuple[Path, str]
) -> None:
    head_id = stored_head[1]
    images = [image for image, _ in fashion_mnist(2, split="test", classes=3, seed=22)]
    before = Scrape(cold_server)
    assert before.value("transfer_cache_entries", cache="backbone") == 0
    assert before.value("transfer_cache_entries", cache="head") == 0
    assert before.value("transfer_head_cache_resident_bytes") == 0

    with TransferClient(cold_server.address, timeout=120) as client:
        assert len(client.predict(head_id, images)) == len(images)  # loads head and backbone
        cold = Scrape(cold_server)
        assert len(client.predict(head_id, images[:2])) == 2  # both resident now
        with pytest.raises(NotFoundError):
            client.predict("no-such-head", images[:1])
    after = Scrape(cold_server)

    def moved(name: str, **labels: str) -> float:
        return after.value(name, **labels) - before.value(name, **labels)

    # One load of each cache on the first call, none on the second.
    for cache in ("backbone", "head"):
        assert cold.value("transfer_cache_load_seconds_count", cache=cache) == 1, cache
        assert cold.value("transfer_cache_load_seconds_sum", cache=cache) > 0, cache
        assert moved("transfer_cache_load_seconds_count", cache=cache) == 1, cache
        assert after.value("transfer_cache_entries", cache=cache) == 1, cache
    # Every head resolution counts once: the cold Predict a miss, the warm one a hit (the
    # warm path resolves on the event loop, apart from the cache's loading `get`). An
    # unknown head is neither.
    assert moved("transfer_cache_misses_total", cache="head") == 1
    assert cold.value("transfer_cache_hits_total", cache="head") == 0
    assert moved("transfer_cache_hits_total", cache="head") == 1
    # A head's load includes its backbone's when that was cold too, as here.
    backbone_load = cold.value("transfer_cache_load_seconds_sum", cache="backbone")
    assert cold.value("transfer_cache_load_seconds_sum", cache="head") >= backbone_load
    assert after.value("transfer_backbone_resident_bytes", backbone=BACKBONE) > 1_000_000
    # The head's classifier (1280 x 3 weights, its biases) and its standardisation buffers.
    assert after.value("transfer_head_cache_resident_bytes") >= (1280 * 3 + 3 + 2 * 1280) * 4

    assert moved("transfer_rpc_requests_total", method="Predict", code="OK") == 2
    assert moved("transfer_rpc_requests_total", method="Predict", code="NOT_FOUND") == 1
    assert moved("transfer_rpc_duration_seconds_count", method="Predict") == 3
    assert moved("transfer_predict_duration_seconds_count", backbone=BACKBONE) == 2
    assert moved("transfer_predict_inputs_total", backbone=BACKBONE) == len(images) + 2
    assert moved("transfer_predict_batch_size_sum", backbone=BACKBONE) == len(images) + 2
    assert moved("transfer_predict_compute_seconds_count", backbone=BACKBONE) >= 1

    # Device memory is exported on an accelerator only.
    on_cuda = cold_server.app.backbones.device.type == "cuda"
    assert after.has("transfer_device_memory_allocated_bytes") == on_cuda
    if on_cuda:
        allocated = after.value("transfer_device_memory_allocated_bytes")
        assert allocated >= after.value("transfer_backbone_resident_bytes", backbone=BACKBONE)
        assert allocated == pytest.approx(torch.cuda.memory_allocated(), rel=0.5)


def test_process_and_build_info_are_exported(cold_server: RunningServer) -> None:
    """The app's own registry carries the standard process_* / python_* series and the
    build's versions, as the default registry would."""
    scrape = Scrape(cold_server)
    assert scrape.value("process_resident_memory_bytes") > 1_000_000
    assert scrape.value("process_cpu_seconds_total") > 0
    assert scrape.value("process_start_time_seconds") > 0
    assert scrape.value("process_open_fds") > 0
    assert scrape.has("python_gc_collections_total")
    assert scrape.value("python_info", **_python_info_labels()) == 1
    build = {
        "version": importlib.metadata.version("transfer-service"),
        "python": platform.python_version(),
        "torch": importlib.metadata.version("torch"),
    }
    assert scrape.value("transfer_build_info", **build) == 1


def _python_info_labels() -> dict[str, str]:
    major, minor, patchlevel = platform.python_version_tuple()
    return {
        "implementation": platform.python_implementation(),
        "major": major,
        "minor": minor,
        "patchlevel": patchlevel,
        "version": platform.python_version(),
    }


def test_fine_tune_traffic_moves_job_and_training_metrics(cold_server: RunningServer) -> None:
    train = fashion_mnist(4, classes=2, seed=23)
    before = Scrape(cold_server)
    with TransferClient(cold_server.address, timeout=120) as client:
        events = list(client.fine_tune(BACKBONE, train, config=TrainingConfig(epochs=3, seed=2)))
        (started,) = [event for event in events if isinstance(event, JobStarted)]
        done = events[-1]
        assert isinstance(done, JobCompleted)
        finished = Scrape(cold_server)
        # A job that trains the whole trunk until cancelled, scraped while it runs.
        endless = client.fine_tune(
            BACKBONE,
            train,
            config=TrainingConfig(
                epochs=1000, batch_size=1, early_stopping_patience=0, trainable_blocks=-1
            ),
        )
        job_id = next(endless).job_id
        running = scrape_until(
            cold_server,
            lambda scrape: (
                scrape.value("transfer_training_step_duration_seconds_count")
                > finished.value("transfer_training_step_duration_seconds_count")
            ),
        )
        client.cancel_job(job_id)
        assert isinstance(list(endless)[-1], JobCancelled)
    after = Scrape(cold_server)

    def moved(scrape: Scrape, name: str, **labels: str) -> float:
        return scrape.value(name, **labels) - before.value(name, **labels)

    assert moved(finished, "transfer_jobs_finished_total", outcome="succeeded") == 1
    assert moved(finished, "transfer_jobs", state="succeeded") == 1
    steps = moved(finished, "transfer_training_step_duration_seconds_count")
    assert steps >= done.metrics.epochs_run  # at least one optimiser step per epoch
    epochs = moved(finished, "transfer_training_epoch_duration_seconds_count")
    assert epochs == done.metrics.epochs_run
    # Each epoch trains on every training example once (validation's are not counted).
    examples = moved(finished, "transfer_training_examples_total")
    assert examples == done.metrics.epochs_run * started.train_examples
    assert finished.value("transfer_training_examples_per_second") > 0  # deprecated gauge
    assert finished.value("transfer_last_validation_accuracy_ratio", backbone=BACKBONE) == (
        pytest.approx(done.metrics.validation_accuracy)
    )

    assert running.value("transfer_jobs", state="running") == 1
    assert running.value("transfer_jobs", state="queued") == 0

    assert after.value("transfer_jobs", state="running") == 0
    assert moved(after, "transfer_jobs", state="cancelled") == 1
    assert moved(after, "transfer_jobs_finished_total", outcome="cancelled") == 1
    assert moved(after, "transfer_rpc_requests_total", method="FineTune", code="OK") == 2
    assert moved(after, "transfer_rpc_duration_seconds_count", method="FineTune") == 2
    assert moved(after, "transfer_rpc_requests_total", method="CancelJob", code="OK") == 1
    assert after.value("transfer_cache_entries", cache="head") >= 1
