"""Every Prometheus metric of the server, on a registry passed in (no global registry).

Labels stay bounded: method, status code, backbone, cache name, job state/outcome. Never a
head id or tenant.
"""

from __future__ import annotations

import importlib.metadata
import platform
from collections.abc import Callable, Iterator, Mapping

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
# Loading a backbone reads and moves hundreds of MB; a head is milliseconds.
_LOAD_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class Metrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        # The standard process_* (CPU, memory, file descriptors; Linux only), python_info and
        # python_gc_* series that the default registry would carry: this one is per app.
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
        GCCollector(registry=registry)
        self.build_info = Info(
            "transfer_build",
            "The server's build: its version, Python's and torch's (always 1).",
            registry=registry,
        )
        self.build_info.info(build_versions())
        self.rpc_requests = Counter(
            "transfer_rpc_requests",
            "gRPC calls handled, by method and status code.",
            ["method", "code"],
            registry=registry,
        )
        self.admission_held = Counter(
            "transfer_admission_held",
            "Calls held over their tenant's rate or in-flight bound, by reason (rate, "
            "in_flight); each then ran or was refused.",
            ["reason"],
            registry=registry,
        )
        self.admission_refused = Counter(
            "transfer_admission_refused",
            "Calls refused RESOURCE_EXHAUSTED over their tenant's rate or in-flight bound, by "
            "reason (rate, in_flight); the tenant is in the warning log line.",
            ["reason"],
            registry=registry,
        )
        self.rpc_duration = Histogram(
            "transfer_rpc_duration_seconds",
            "gRPC call duration (streams: until the stream ends), by method.",
            ["method"],
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.predict_duration = Histogram(
            "transfer_predict_duration_seconds",
            "End-to-end Predict latency inside the server, by backbone.",
            ["backbone"],
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.predict_queue = Histogram(
            "transfer_predict_queue_seconds",
            "Longest wait of a request in a batch before the batch ran, by backbone.",
            ["backbone"],
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.predict_compute = Histogram(
            "transfer_predict_compute_seconds",
            "Trunk plus heads compute time per batch, by backbone.",
            ["backbone"],
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.predict_batch_size = Histogram(
            "transfer_predict_batch_size",
            "Inputs per trunk pass, by backbone.",
            ["backbone"],
            buckets=_BATCH_BUCKETS,
            registry=registry,
        )
        self.predict_inputs = Counter(
            "transfer_predict_inputs",
            "Inputs classified, by backbone.",
            ["backbone"],
            registry=registry,
        )
        self.predict_padding_inputs = Counter(
            "transfer_predict_padding_inputs",
            "Copies of inputs the trunk also ran on, padding batches up to a warmed size "
            "(TRANSFER_PREDICT_BATCH_PADDING), by backbone.",
            ["backbone"],
            registry=registry,
        )
        self.backbone_upgrades = Counter(
            "transfer_backbone_upgrades",
            "Background upgrades of a backbone's serving path (TRANSFER_COMPILE=auto) by "
            "backbone and outcome: installed, none_faster, stored_none, stored_rejected, "
            "failed, cancelled, no_candidates.",
            ["backbone", "outcome"],
            registry=registry,
        )
        self.training_step = Histogram(
            "transfer_training_step_duration_seconds",
            "Duration of one optimiser step.",
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.training_epoch = Histogram(
            "transfer_training_epoch_duration_seconds",
            "Duration of one training epoch (validation included).",
            buckets=(0.01, 0.05, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600),
            registry=registry,
        )
        self.training_examples = Counter(
            "transfer_training_examples",
            "Training examples passed through an epoch of gradient training (each epoch "
            "counts its examples again); rate() gives the training throughput.",
            registry=registry,
        )
        # Deprecated for transfer_training_examples_total: a rate computed in the server is
        # one epoch's, whichever the scrape happens to see; kept one release for old panels.
        self.training_throughput = Gauge(
            "transfer_training_examples_per_second",
            "Deprecated: use rate(transfer_training_examples_total[1m]). Training examples "
            "per second over the newest finished epoch.",
            registry=registry,
        )
        self.jobs = Gauge("transfer_jobs", "Jobs by state.", ["state"], registry=registry)
        self.jobs_finished = Counter(
            "transfer_jobs_finished", "Jobs finished, by outcome.", ["outcome"], registry=registry
        )
        self.validation_accuracy = Gauge(
            "transfer_last_validation_accuracy_ratio",
            "Validation accuracy (0 to 1) of the newest head, by backbone.",
            ["backbone"],
            registry=registry,
        )
        self.cache_hits = Counter(
            "transfer_cache_hits", "Cache hits, by cache.", ["cache"], registry=registry
        )
        self.cache_misses = Counter(
            "transfer_cache_misses", "Cache misses (loads), by cache.", ["cache"], registry=registry
        )
        self.cache_evictions = Counter(
            "transfer_cache_evictions", "Cache evictions, by cache.", ["cache"], registry=registry
        )
        self.cache_load = Histogram(
            "transfer_cache_load_seconds",
            "Time a cache miss waited for the entry to load, by cache (a head's load includes "
            "its backbone's when that was not resident).",
            ["cache"],
            buckets=_LOAD_BUCKETS,
            registry=registry,
        )

    def watch_caches(
        self,
        backbone_resident_bytes: Callable[[], Mapping[str, int]],
        head_entries: Callable[[], int],
        head_resident_bytes: Callable[[], int] = lambda: 0,
    ) -> None:
        """Exports, read at each scrape: `transfer_backbone_resident_bytes{backbone}`,
        `transfer_cache_entries{cache}` for the backbone and head caches and
        `transfer_head_cache_resident_bytes` (against TRANSFER_HEAD_CACHE_BYTES)."""
        self.registry.register(
            _CacheResidency(backbone_resident_bytes, head_entries, head_resident_bytes)
        )

    def watch_device_memory(self, allocated_bytes: Callable[[], int]) -> None:
        """Exports `transfer_device_memory_allocated_bytes`, read at each scrape (CUDA only:
        the caller registers it when the device is an accelerator)."""
        gauge = Gauge(
            "transfer_device_memory_allocated_bytes",
            "Accelerator memory held by tensors (torch.cuda.memory_allocated).",
            registry=self.registry,
        )
        gauge.set_function(allocated_bytes)

    def cache_event(self, event: str, cache: str) -> None:
        counter = {"hit": self.cache_hits, "miss": self.cache_misses, "evict": self.cache_evictions}
        counter[event].labels(cache=cache).inc()

    # Training jobs' observers (training.jobs.JobHooks).

    def record_epoch(self, seconds: float, examples: int) -> None:
        """One finished epoch: its duration (validation included) and training examples."""
        self.training_epoch.observe(seconds)
        self.training_examples.inc(examples)
        self.training_throughput.set(examples / max(seconds, 1e-9))

    def count_job_state(self, new: str, old: str | None) -> None:
        self.jobs.labels(state=new).inc()
        if old is not None:
            self.jobs.labels(state=old).dec()

    def job_finished(self, outcome: str, head: object) -> None:
        """`head`: the new head's record, or None (read by attribute: metrics imports no
        domain type)."""
        self.jobs_finished.labels(outcome=outcome).inc()
        accuracy = getattr(getattr(head, "metrics", None), "validation_accuracy", None)
        if accuracy is not None:
            self.validation_accuracy.labels(backbone=getattr(head, "backbone", "")).set(accuracy)


def build_versions() -> dict[str, str]:
    """transfer_build_info's labels. Read from the installed distributions' metadata, so
    metrics imports no torch."""
    return {
        "version": _distribution_version("transfer-service"),
        "python": platform.python_version(),
        "torch": _distribution_version("torch"),
    }


def _distribution_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:  # run from a tree that is not installed
        return "unknown"


class _CacheResidency(Collector):
    def __init__(
        self,
        backbone_resident_bytes: Callable[[], Mapping[str, int]],
        head_entries: Callable[[], int],
        head_resident_bytes: Callable[[], int],
    ) -> None:
        self._backbone_resident_bytes = backbone_resident_bytes
        self._head_entries = head_entries
        self._head_resident_bytes = head_resident_bytes

    def collect(self) -> Iterator[Metric]:
        resident = self._backbone_resident_bytes()
        resident_bytes = GaugeMetricFamily(
            "transfer_backbone_resident_bytes",
            "Bytes of a resident backbone's weights, by backbone.",
            labels=["backbone"],
        )
        for backbone, size in sorted(resident.items()):
            resident_bytes.add_metric([backbone], size)
        yield resident_bytes
        entries = GaugeMetricFamily(
            "transfer_cache_entries", "Entries resident in a cache, by cache.", labels=["cache"]
        )
        entries.add_metric(["backbone"], len(resident))
        entries.add_metric(["head"], self._head_entries())
        yield entries
        yield GaugeMetricFamily(
            "transfer_head_cache_resident_bytes",
            "Bytes of the heads resident in the head cache (parameters and buffers).",
            value=self._head_resident_bytes(),
        )
