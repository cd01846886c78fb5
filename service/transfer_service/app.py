"""Composition root: builds every part from Settings, starts, serves, stops gracefully."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from urllib.parse import urlsplit

import torch
from prometheus_client import CollectorRegistry, start_http_server

from transfer_service.backbones.background_upgrade import BackgroundUpgrader
from transfer_service.backbones.cache import BackboneCache
from transfer_service.backbones.catalog import PreprocessingOptions, default_catalog
from transfer_service.backbones.upgrade_candidates import UpgradeCandidates
from transfer_service.domain import HeadRecord
from transfer_service.edge.request_interceptor import RequestInterceptor
from transfer_service.edge.server import HealthReporter, create_server
from transfer_service.edge.servicer import TransferServicer
from transfer_service.edge.tenant_admission import AdmissionLimits, TenantAdmission
from transfer_service.edge.tenant_tokens import load_tenant_tokens
from transfer_service.errors import ConfigurationError, ResourceExhaustedError, UnavailableError
from transfer_service.head_catalog import HeadCatalog
from transfer_service.head_evaluation import HeadEvaluation
from transfer_service.head_names import HeadNameCache
from transfer_service.head_operations import HeadOperations
from transfer_service.heads import HeadCache
from transfer_service.lifecycle import Application
from transfer_service.metrics import Metrics
from transfer_service.operations import TransferOperations
from transfer_service.predict.batcher import PredictTimings
from transfer_service.predict.padding import padded_batch_sizes, pads_predict_batches
from transfer_service.predict.predictor import Predictor
from transfer_service.settings import Settings
from transfer_service.store import pg_head_changes as head_changes
from transfer_service.store.interface import Store
from transfer_service.store.local import LocalStore
from transfer_service.store.postgres import PostgresStore
from transfer_service.structured_logs import configure_logging
from transfer_service.torch_threads import (
    CpuShare,
    default_intra_op_threads,
    jobs_train_on_fresh_threads,
    lower_thread_priority,
    use_intra_op_threads,
)
from transfer_service.training.jobs import JobHooks, JobManager

log = logging.getLogger("transfer_service")


def choose_device(setting: str) -> torch.device:
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(setting)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"TRANSFER_DEVICE={setting} but CUDA is not available")
    return device


def tenant_rate(settings: Settings) -> float:
    """TRANSFER_TENANT_REQUESTS_PER_SECOND, or 50 per CPU when unset: a call's fixed cost is
    CPU, so what one tenant's calls may take scales with the cores (100 on 2)."""
    if settings.tenant_requests_per_second is not None:
        return settings.tenant_requests_per_second
    return 50.0 * default_intra_op_threads()


def build_application(settings: Settings) -> Application:
    """Raises ConfigurationError when a setting points at something unusable."""
    # The building thread runs the event loop: one torch thread there (see torch_threads).
    cpu_share = CpuShare(
        settings.torch_threads or default_intra_op_threads(), settings.training_torch_threads
    )
    use_intra_op_threads(1)
    tokens = load_tenant_tokens(settings.auth_tokens_file, settings.auth_tokens.get_secret_value())
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    device = choose_device(settings.device)
    store: Store
    if settings.database_url:
        # Several replicas share it; its schema is migrated here. Unreachable at start: the
        # server refuses to start, saying so (as for any unusable setting).
        try:
            store = PostgresStore(settings.database_url.get_secret_value())
        except UnavailableError as exc:
            raise ConfigurationError(f"TRANSFER_DATABASE_URL: {exc.message}") from exc
    else:
        store = LocalStore(settings.store_dir, recreate_database=settings.recreate_database)
    options = PreprocessingOptions(
        settings.image_size, settings.max_text_tokens, settings.max_image_pixels
    )
    # One compute thread: torch already parallelises inside an op; two batches at once would
    # only fight over the same cores. It alone (and a running training job) gets them all.
    compute_pool = ThreadPoolExecutor(
        1,
        thread_name_prefix="predict",
        initializer=use_intra_op_threads,
        initargs=(cpu_share.predict_threads,),
    )
    # TRANSFER_COMPILE=auto: faster serving paths built after SERVING, swapped in when
    # verified and faster (backbones/background_upgrade.py); "true" compiles at load instead.
    upgrader = None
    if settings.compile == "auto":
        upgrader = BackgroundUpgrader(
            store=store,
            options=options,
            predict_threads=cpu_share.predict_threads,
            candidates=UpgradeCandidates(settings.precision),
            on_predict_thread=lambda work: compute_pool.submit(work).result(),
            on_outcome=lambda backbone, outcome: metrics.backbone_upgrades.labels(
                backbone=backbone, outcome=outcome
            ).inc(),
        )
    backbones = BackboneCache(
        default_catalog(),
        weights_dir=settings.weights_dir,
        device=device,
        options=options,
        budget_bytes=settings.backbone_cache_bytes,
        precision=settings.precision,
        compile=settings.compile == "true",
        measurements=store,
        predict_threads=cpu_share.predict_threads,
        on_event=lambda event, name: metrics.cache_event(event, "backbone"),
        on_load=metrics.cache_load.labels(cache="backbone").observe,
        on_loaded=upgrader.offer if upgrader is not None else None,
    )
    heads = HeadCache(
        backbones,
        store.get_head,
        store.load_head_weights,
        settings.head_cache_entries,
        on_event=metrics.cache_event,
        on_load=metrics.cache_load.labels(cache="head").observe,
        max_bytes=settings.head_cache_bytes,
    )
    # Heads deleted or replaced by another replica leave this one's cache (PostgreSQL: NOTIFY,
    # with a once-a-second check of the resident ids behind it); stopped by store.close().
    # Names, versions and aliases: read through to the store, at most CHECK_SECONDS old (the
    # bound within which a delete on another replica is seen, too); PostgreSQL's NOTIFY
    # drops an entry sooner.
    head_names = HeadNameCache(store.head_name, max_age_seconds=head_changes.CHECK_SECONDS)
    store.watch_heads(heads.discard, heads.resident_ids, head_names.invalidate)
    metrics.watch_caches(backbones.resident_bytes, lambda: len(heads), heads.resident_bytes)
    if device.type == "cuda":
        metrics.watch_device_memory(lambda: torch.cuda.memory_allocated(device))

    def on_job_finished(outcome: str, head: HeadRecord | None) -> None:
        metrics.job_finished(outcome, head)
        if head is not None:  # a new version: `name` and `name@latest` answer with it now
            head_names.invalidate(head.tenant, head.name)

    jobs = JobManager(
        store,
        backbones,
        heads,
        max_running_jobs=settings.max_running_jobs,
        max_jobs_per_tenant=settings.max_jobs_per_tenant,
        feature_cache_bytes=settings.feature_cache_bytes,
        intra_op_threads=cpu_share.training_threads,
        fresh_thread_per_job=jobs_train_on_fresh_threads(device.type),
        progress_min_interval_seconds=settings.progress_min_interval_ms / 1000.0,
        while_training=cpu_share.training,
        lease_seconds=settings.job_lease_seconds,
        max_attempts=settings.job_max_attempts,
        hooks=JobHooks(
            on_state=lambda new, old: metrics.count_job_state(
                new.value, old.value if old else None
            ),
            on_step=metrics.training_step.observe,
            on_epoch=metrics.record_epoch,
            on_finished=on_job_finished,
        ),
    )
    blocking_pool = ThreadPoolExecutor(
        4, thread_name_prefix="blocking", initializer=use_intra_op_threads, initargs=(1,)
    )

    def on_batch(timings: PredictTimings) -> None:
        metrics.predict_batch_size.labels(backbone=timings.backbone).observe(timings.batch_inputs)
        metrics.predict_queue.labels(backbone=timings.backbone).observe(timings.queue_seconds)
        metrics.predict_compute.labels(backbone=timings.backbone).observe(timings.compute_seconds)
        metrics.predict_inputs.labels(backbone=timings.backbone).inc(timings.batch_inputs)
        metrics.predict_padding_inputs.labels(backbone=timings.backbone).inc(timings.padding_inputs)

    # A large (chunked) Predict's decoding: one thread at lowered CPU priority, so the
    # decoding takes what the compute thread leaves instead of slowing other callers' batches.
    bulk_decodes = 1 if device.type == "cpu" else max(1, default_intra_op_threads() // 2)
    bulk_decode_pool = ThreadPoolExecutor(
        bulk_decodes, thread_name_prefix="bulk-decode", initializer=_bulk_decode_thread
    )
    predictor = Predictor(
        backbones,
        bulk_decode_pool=bulk_decode_pool,
        preprocess_pool=blocking_pool,
        compute_pool=compute_pool,
        max_inputs=settings.max_predict_inputs,
        batch_max_size=settings.batch_max_size,
        batch_max_wait_ms=settings.batch_max_wait_ms,
        max_batch_input_bytes=settings.max_batch_input_bytes,
        on_batch=on_batch,
        padded_sizes=(
            padded_batch_sizes(settings.batch_max_size)
            if pads_predict_batches(settings.predict_batch_padding, device)
            else ()
        ),
        # On a CPU the compute thread sizes its team before each batch: for running jobs
        # (when split) and for large requests' decoding threads, one at a time there.
        before_batch=cpu_share.fit_compute_thread if device.type == "cpu" else lambda: None,
        bulk_decodes=bulk_decodes,
        while_decoding=cpu_share.decoding if device.type == "cpu" else nullcontext,
        slice_seconds=settings.predict_slice_ms / 1000.0,
    )

    def on_predicted(backbone: str, seconds: float) -> None:
        metrics.predict_duration.labels(backbone=backbone).observe(seconds)

    catalog = HeadCatalog(
        store=store,
        backbones=backbones,
        heads=heads,
        names=head_names,
        blocking_pool=blocking_pool,
    )
    operations = TransferOperations(
        store=store,
        backbones=backbones,
        resolve_head=catalog.resolve_head,
        jobs=jobs,
        predictor=predictor,
        blocking_pool=blocking_pool,
        max_dataset_examples=settings.max_dataset_examples,
        max_classes=settings.max_classes,
        feature_cache_bytes=settings.feature_cache_bytes,
        max_image_pixels=settings.max_image_pixels,
        max_dataset_bytes_per_tenant=settings.max_dataset_bytes_per_tenant,
        on_predicted=on_predicted,
    )
    # ONNX exports (seconds of CPU each) on a thread of their own, one at a time: never on
    # a blocking-pool thread that every call's store reads need.
    export_pool = ThreadPoolExecutor(
        1, thread_name_prefix="export", initializer=use_intra_op_threads, initargs=(1,)
    )
    head_operations = HeadOperations(
        resolve_head=catalog.resolve_head,
        backbones=backbones,
        predictor=predictor,
        blocking_pool=blocking_pool,
        export_pool=export_pool,
        on_predicted=on_predicted,
    )
    health = HealthReporter()
    admission = TenantAdmission(
        AdmissionLimits(
            tenant_rate(settings),
            settings.tenant_request_burst,
            settings.tenant_max_in_flight,
            settings.tenant_admission_hold_ms / 1000.0,
        ),
        on_held=lambda reason: metrics.admission_held.labels(reason=reason).inc(),
    )
    interceptor = RequestInterceptor(
        tokens,
        on_rejected=lambda method, code: metrics.rpc_requests.labels(
            method=method, code=code
        ).inc(),
        admission=admission,
        on_throttled=lambda reason: metrics.admission_refused.labels(reason=reason).inc(),
    )
    evaluations = HeadEvaluation(
        resolve_head=catalog.resolve_head,
        store=store,
        predictor=predictor,
        blocking_pool=blocking_pool,
        max_examples=settings.max_dataset_examples,
        max_inputs_per_call=settings.max_predict_inputs,
        max_image_pixels=settings.max_image_pixels,
    )
    server, port = create_server(
        settings,
        TransferServicer(
            operations, metrics, evaluations=evaluations, heads=head_operations, catalog=catalog
        ),
        health,
        interceptor,
    )
    metrics_port = None
    if settings.metrics_port >= 0:
        http_server, _ = start_http_server(settings.metrics_port, settings.host, registry)
        metrics_port = http_server.server_port
    return Application(
        settings=settings,
        store=store,
        backbones=backbones,
        heads=heads,
        jobs=jobs,
        predictor=predictor,
        health=health,
        interceptor=interceptor,
        metrics=metrics,
        server=server,
        port=port,
        metrics_port=metrics_port,
        pools=(blocking_pool, compute_pool, export_pool, bulk_decode_pool),
        upgrader=upgrader,
    )


async def serve(settings: Settings) -> None:
    app = build_application(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    metrics_url = f"http://{settings.host}:{app.metrics_port}/metrics"
    if app.metrics_port is None:
        metrics_url = "off"
    security = "TLS" if settings.tls_cert_file else "plaintext"
    if settings.tls_client_ca_file:
        security = "mutual TLS"
    print(
        f"transfer-service listening on {settings.host}:{app.port} ({security}; "
        f"metrics: {metrics_url}; store: {_store_description(settings)}; "
        f"device: {app.backbones.device})",
        flush=True,
    )
    await app.start()
    log.info(
        "SERVING: start-up backbones loaded: %s", ", ".join(settings.preload_backbones) or "none"
    )
    await stop.wait()
    log.info("stopping (grace %.1fs)", settings.grace_seconds)
    await app.stop()


def _store_description(settings: Settings) -> str:
    """Where the store is, for the start-up line; never the database's password."""
    if settings.database_url is None:
        return str(settings.store_dir.resolve())
    url = urlsplit(settings.database_url.get_secret_value())
    return f"PostgreSQL at {url.hostname or 'localhost'}:{url.port or 5432}{url.path}"


def main(argv: list[str] | None = None) -> int:
    """`python -m transfer_service [--log-format auto|json|text]`; every setting is a
    TRANSFER_* variable."""
    parser = argparse.ArgumentParser(
        prog="python -m transfer_service", description="The transfer-learning gRPC server."
    )
    parser.add_argument(
        "--log-format",
        choices=("auto", "json", "text"),
        help="log lines as JSON objects or text for humans (env TRANSFER_LOG_FORMAT; default "
        "auto: text on a terminal, JSON elsewhere)",
    )
    args = parser.parse_args(argv)
    overrides = {"log_format": args.log_format} if args.log_format else {}
    settings = Settings(**overrides)  # type: ignore[arg-type]
    configure_logging(settings.log_level, settings.log_format)
    try:
        asyncio.run(serve(settings))
    except (ConfigurationError, ResourceExhaustedError) as exc:
        # A store refused at start (full or read-only disk, damaged or missing database) is
        # the operator's to fix: one line saying what, no traceback, and status 2 as for any
        # unusable setting. (Raised later, ResourceExhaustedError only fails the call.)
        log.critical("cannot start: %s", exc)
        return 2
    return 0


# Nice value of a large request's decoding thread: CFS then weighs it at about a tenth of a
# normal thread beside the compute thread's team.
BULK_DECODE_NICENESS = 10


def _bulk_decode_thread() -> None:
    use_intra_op_threads(1)
    lower_thread_priority(BULK_DECODE_NICENESS)
