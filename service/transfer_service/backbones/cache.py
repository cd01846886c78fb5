"""Device-resident backbone cache: each backbone is loaded once, frozen, in eval mode.

Concurrent first requests for one backbone wait on a single load. When the resident bytes
pass the budget, the least recently used backbones are dropped (a job or batch still
holding one keeps it alive until it finishes; only the cache's reference goes).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from transfer_service.backbones.calibration import calibration_inputs
from transfer_service.backbones.catalog import (
    BackboneSpec,
    PreprocessingOptions,
    WeightsUnavailableError,
)
from transfer_service.backbones.compiled import WARM_UP_BATCH_SIZES, CompiledStages, warm_up_inputs
from transfer_service.backbones.measured_precision import DTYPE_NAMES, DTYPES, PrecisionMeasurer
from transfer_service.backbones.preprocess import Preprocessor
from transfer_service.backbones.serving_path import ServingPath, ServingPathSlot
from transfer_service.backbones.trunks import Trunk
from transfer_service.errors import FailedPreconditionError, NotFoundError
from transfer_service.store.interface import MeasurementStore

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class LoadedBackbone:
    spec: BackboneSpec
    trunk: Trunk
    preprocessor: Preprocessor
    device: torch.device
    resident_bytes: int
    compute_dtype: torch.dtype  # of the frozen trunk's matmuls/convs (autocast) for Predict
    compiled: CompiledStages | None = None  # TRANSFER_COMPILE: run_prefix runs these
    # What training's run_prefix computes in: fp32 under TRANSFER_PRECISION=auto (heads train
    # on exact features, the same on every machine), the forced precision otherwise.
    training_dtype: torch.dtype = torch.float32
    measured_inputs_per_second: float = 0.0  # of compute_dtype at load; 0: not measured
    # Predict's current way through the frozen stages (backbones/serving_path.py): set by the
    # cache at load; a faster verified runner may be installed in it later. None: eager at
    # compute_dtype (copies made for one precision, e.g. `at_precision`).
    serving: ServingPathSlot | None = None

    @property
    def precision(self) -> str:
        """Predict's trunk precision now: "float32", "bfloat16", "float16" or "int8"."""
        if self.serving is not None and self.serving.current.runner is not None:
            return self.serving.current.precision
        return DTYPE_NAMES[self.compute_dtype]

    @property
    def serving_inputs_per_second(self) -> float:
        """What Predict's current path measured (0: not measured)."""
        if self.serving is not None and self.serving.current.runner is not None:
            return self.serving.current.inputs_per_second
        return self.measured_inputs_per_second

    @property
    def name(self) -> str:
        return self.spec.name

    def stack(self, loaded: Sequence[Any]) -> Any:
        """Loaded examples (from `preprocessor.load`) -> one first-stage batch on the device,
        without augmentation."""
        trunk = self.trunk
        return trunk.to_device(trunk.collate(self.preprocessor.finish(loaded, None)), self.device)

    def warm_up(self, batch_sizes: Sequence[int]) -> None:
        """Runs every frozen stage and the pooling once at each batch size, on synthetic
        inputs, on the calling thread: lazily compiled stages compile here, and on an
        accelerator this thread builds each batch shape's cuDNN plans (which torch keeps per
        thread)."""
        for batch_size in batch_sizes:
            inputs = warm_up_inputs(self.spec.modality, batch_size)
            state = self.stack([self.preprocessor.load(x, "warm-up") for x in inputs])
            self.trunk.pool(self.run_prefix(state, 0, self.trunk.num_stages))

    def run_prefix(self, state: Any, start: int, stop: int, *, training: bool = False) -> Any:
        """Frozen stages [start, stop) without autograd, in Predict's compute precision (or
        training's, `training`); the output is fp32 so heads (and their training) always see
        full-precision inputs."""
        if start == stop:
            return state
        runner = None if training or self.serving is None else self.serving.current.runner
        if runner is not None:  # installed after load: it returns fp32 itself
            with torch.no_grad():
                return runner.run(state, start, stop)
        dtype = self.training_dtype if training else self.compute_dtype
        # Compiled graphs are specialised to the serving dtype's autocast state.
        eager = self.compiled is None or dtype != self.compute_dtype
        run = self.trunk.run_stages if eager else self.compiled.run  # type: ignore[union-attr]
        # no_grad, not inference_mode: training feeds these outputs into trainable blocks.
        with torch.no_grad():
            if dtype == torch.float32:
                return run(state, start, stop)
            with torch.autocast(self.device.type, dtype=dtype):
                out = run(state, start, stop)
            return self.trunk.to_float(out)

    def at_precision(self, dtype: torch.dtype) -> Callable[[Any], torch.Tensor]:
        """A first-stage batch -> pooled features [B, D] through the whole trunk at `dtype`
        (eagerly), as Predict would compute them: a precision candidate."""
        eager = replace(self, compute_dtype=dtype, compiled=None, serving=None)

        def features(state: Any) -> torch.Tensor:
            with torch.inference_mode():
                return self.trunk.pool(eager.run_prefix(state, 0, self.trunk.num_stages))

        return features


def forced_compute_dtype(precision: str) -> torch.dtype | None:
    """The dtype an explicit TRANSFER_PRECISION forces; None for 'auto' (measured at load by
    backbones/measured_precision.py: no rule on CPU flags held on every machine)."""
    forced = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    return forced.get(precision)


@dataclass(frozen=True, slots=True)
class BackboneStatus:
    spec: BackboneSpec
    parameter_count: int
    input_size: int
    unfreezable_blocks: int
    available: bool
    unavailable_reason: str
    loaded: LoadedBackbone | None


CacheEvent = Callable[[str, str], None]  # (event: hit|miss|evict, backbone name)


class BackboneCache:
    def __init__(
        self,
        catalog: list[BackboneSpec],
        *,
        weights_dir: Path,
        device: torch.device,
        options: PreprocessingOptions,
        budget_bytes: int,
        precision: str = "auto",
        compile: bool = False,
        on_event: CacheEvent | None = None,
        on_load: Callable[[float], None] | None = None,
        measurements: MeasurementStore | None = None,
        predict_threads: int = 1,
        on_loaded: Callable[[LoadedBackbone], None] | None = None,
    ) -> None:
        """`measurements` keeps 'auto' precision choices across restarts (none: measured at
        every load); `predict_threads`: the Predict compute thread's torch threads, which the
        measurement runs on; `on_loaded` sees each backbone once it is resident (the
        background upgrade of TRANSFER_COMPILE=auto queues it)."""
        self._on_load = on_load or (lambda seconds: None)
        self._on_loaded = on_loaded or (lambda loaded: None)
        self._forced_dtype = forced_compute_dtype(precision)
        self._measurer = PrecisionMeasurer(measurements, device, predict_threads)
        self._compile = compile
        self._specs = {spec.name: spec for spec in catalog}
        self._weights_dir = weights_dir
        self._device = device
        self._options = options
        self._budget_bytes = budget_bytes
        self._on_event = on_event or (lambda event, name: None)
        self._loaded: OrderedDict[str, LoadedBackbone] = OrderedDict()
        self._lock = threading.Lock()
        self._load_locks = {name: threading.Lock() for name in self._specs}
        self._parameter_counts: dict[str, int] = {}
        self._stage_counts: dict[str, int] = {}

    @property
    def device(self) -> torch.device:
        return self._device

    def spec(self, name: str) -> BackboneSpec:
        spec = self._specs.get(name)
        if spec is None:
            known = ", ".join(sorted(self._specs))
            raise NotFoundError(f"backbone: unknown backbone {name!r} (known: {known})")
        return spec

    def check_available(self, name: str) -> BackboneSpec:
        """The spec, or FAILED_PRECONDITION saying why its weights cannot be loaded."""
        spec = self.spec(name)
        with self._lock:
            if name in self._loaded:
                return spec
        try:
            spec.locate_weights(self._weights_dir)
        except WeightsUnavailableError as exc:
            raise FailedPreconditionError(f"backbone {name!r} is unavailable: {exc}") from exc
        return spec

    def peek(self, name: str) -> LoadedBackbone | None:
        """The backbone if resident (counted as a hit), else None; never blocks on a load,
        so the event loop may call it."""
        with self._lock:
            loaded = self._loaded.get(name)
            if loaded is not None:
                self._loaded.move_to_end(name)
                self._on_event("hit", name)
            return loaded

    def get(self, name: str) -> LoadedBackbone:
        """The loaded backbone, loading it first if needed (blocking; call off the event loop)."""
        spec = self.spec(name)
        loaded = self.peek(name)
        if loaded is not None:
            return loaded
        with self._load_locks[name]:
            with self._lock:
                loaded = self._loaded.get(name)
                if loaded is not None:
                    self._on_event("hit", name)
                    return loaded
            self._on_event("miss", name)
            load_started = time.perf_counter()
            loaded = self._load(spec)
            self._on_load(time.perf_counter() - load_started)
            with self._lock:
                self._loaded[name] = loaded
                self._evict_over_budget(keep=name)
            self._on_loaded(loaded)
            return loaded

    def _load(self, spec: BackboneSpec) -> LoadedBackbone:
        try:
            weights = spec.locate_weights(self._weights_dir)
        except WeightsUnavailableError as exc:
            raise FailedPreconditionError(f"backbone {spec.name!r} is unavailable: {exc}") from exc
        started = time.perf_counter()
        trunk = spec.build_trunk(weights)
        trunk.requires_grad_(False)
        trunk.eval()
        trunk.to(self._device)
        if spec.modality.value == "image":
            trunk.to(memory_format=torch.channels_last)
        preprocessor = spec.build_preprocessor(weights, self._options)
        resident = sum(t.numel() * t.element_size() for t in trunk.state_dict().values())
        loaded = LoadedBackbone(spec, trunk, preprocessor, self._device, resident, torch.float32)
        if self._forced_dtype is not None:
            forced = self._forced_dtype
            loaded = replace(loaded, compute_dtype=forced, training_dtype=forced)
        else:
            loaded = self._measured(loaded)
        if self._compile:
            loaded = self._compiled(loaded)
        initial = ServingPath(
            loaded.precision,
            loaded.measured_inputs_per_second,
            compiled=loaded.compiled is not None,
            description=f"{'compiled' if loaded.compiled else 'eager'} {loaded.precision}",
        )
        loaded = replace(loaded, serving=ServingPathSlot(initial))
        log.info(
            "loaded backbone %s on %s, %s compute%s (%.1f MB) in %.2fs",
            spec.name,
            self._device,
            loaded.compute_dtype,
            ", compiled" if self._compile else "",
            resident / 1e6,
            time.perf_counter() - started,
        )
        return loaded

    def _measured(self, loaded: LoadedBackbone) -> LoadedBackbone:
        """`loaded` at the fastest precision that keeps its features within tolerance on
        the shipped calibration set (TRANSFER_PRECISION=auto)."""
        preprocessor = loaded.preprocessor
        calibration = [
            preprocessor.load(x, f"calibration[{i}]")
            for i, x in enumerate(calibration_inputs(loaded.spec.modality))
        ]
        choice = self._measurer.choose(
            loaded.name,
            loaded.spec.input_size(self._options),
            loaded.at_precision,
            loaded.stack,
            calibration,
        )
        return replace(
            loaded,
            compute_dtype=DTYPES[choice.precision],
            measured_inputs_per_second=choice.inputs_per_second,
        )

    def _compiled(self, eager: LoadedBackbone) -> LoadedBackbone:
        """The backbone with compiled stages, compiled now: torch.compile is lazy, so a batch
        of each size range runs through every stage before the first request can pay for it.
        A failure fails the load; serving eagerly instead would hide a setting not taking."""
        loaded = replace(eager, compiled=CompiledStages(eager.trunk, self._device))
        try:
            loaded.warm_up(WARM_UP_BATCH_SIZES)
        except Exception as exc:
            reason = (str(exc).strip().splitlines() or [""])[0]  # torch appends debug hints
            raise FailedPreconditionError(
                f"backbone {eager.name!r} failed to compile (TRANSFER_COMPILE=true; set it to "
                f"false to run eagerly): {type(exc).__name__}: {reason}"
            ) from exc
        return loaded

    def _evict_over_budget(self, keep: str) -> None:
        total = sum(b.resident_bytes for b in self._loaded.values())
        for name in list(self._loaded):
            if total <= self._budget_bytes:
                break
            if name == keep:
                continue
            total -= self._loaded.pop(name).resident_bytes
            self._on_event("evict", name)
            log.info("evicted backbone %s (cache budget %d bytes)", name, self._budget_bytes)

    def resident_bytes(self) -> dict[str, int]:
        with self._lock:
            return {name: b.resident_bytes for name, b in self._loaded.items()}

    def statuses(self) -> list[BackboneStatus]:
        statuses = []
        for spec in self._specs.values():
            with self._lock:
                loaded = self._loaded.get(spec.name)
            try:
                spec.locate_weights(self._weights_dir)
                available, reason = True, ""
            except WeightsUnavailableError as exc:
                available, reason = False, str(exc)
            statuses.append(
                BackboneStatus(
                    spec=spec,
                    parameter_count=self._parameter_count(spec),
                    input_size=spec.input_size(self._options),
                    unfreezable_blocks=self._stage_counts[spec.name],
                    available=available,
                    unavailable_reason=reason,
                    loaded=loaded,
                )
            )
        return statuses

    def unfreezable_blocks(self, name: str) -> int:
        """Stages `trainable_blocks` can unfreeze (built on the meta device once, cached)."""
        spec = self.spec(name)
        self._parameter_count(spec)
        return self._stage_counts[spec.name]

    def _parameter_count(self, spec: BackboneSpec) -> int:
        if spec.name not in self._parameter_counts:
            with torch.device("meta"):
                trunk = spec.build_trunk(None)
            self._parameter_counts[spec.name] = sum(p.numel() for p in trunk.parameters())
            self._stage_counts[spec.name] = trunk.num_stages
        return self._parameter_counts[spec.name]
