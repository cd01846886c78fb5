"""Runs the precision measurement for one loaded backbone (TRANSFER_PRECISION=auto) and keeps
its result in the store, keyed by the machine's fingerprint, so restarts reuse it.

The candidates run on a fresh thread with the Predict compute thread's torch thread count:
timings at another count would measure another machine, and a long-lived thread that ran
torch on several cores would keep its OpenMP team and slow every later op
(transfer_service.torch_threads)."""

from __future__ import annotations

import hashlib
import logging
import platform
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from transfer_service.backbones.precision_choice import (
    DEFAULT_TOLERANCE,
    Candidate,
    PrecisionChoice,
    Tolerance,
    choose_precision,
)
from transfer_service.store.interface import MeasurementStore
from transfer_service.torch_threads import run_in_fresh_thread

log = logging.getLogger(__name__)

# The batcher's typical batch sizes: a lone request, and a burst of callers.
TIMING_BATCH_SIZES = (1, 8)
CALIBRATION_BATCH = 8

DTYPE_NAMES = {
    torch.float32: "float32",
    torch.bfloat16: "bfloat16",
    torch.float16: "float16",
}
DTYPES = {name: dtype for dtype, name in DTYPE_NAMES.items()}

# A first-stage batch -> pooled features [B, D], run at one compute dtype.
FeaturesAt = Callable[[torch.dtype], Callable[[Any], torch.Tensor]]


def candidate_dtypes(device: torch.device) -> list[torch.dtype]:
    """fp32 first (the reference), then the reduced precisions worth timing on `device`."""
    if device.type == "cuda":
        reduced = [torch.bfloat16] if torch.cuda.is_bf16_supported() else []
        return [torch.float32, *reduced, torch.float16]
    return [torch.float32, torch.bfloat16]


def machine_fingerprint(device: torch.device, threads: int) -> str:
    """CPU model and flags, torch version, device name and thread count, hashed: a
    measurement holds only where all of them are the same."""
    cpu = _cpu_description()
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    text = f"{cpu}|torch {torch.__version__}|{device_name}|threads {threads}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _cpu_description() -> str:
    """/proc/cpuinfo's first model name and flags (Linux), else what platform knows."""
    try:
        info = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return f"{platform.machine()} {platform.processor()}"
    fields: dict[str, str] = {}
    for line in info.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    return f"{fields.get('model name', '')} {fields.get('flags', fields.get('Features', ''))}"


def measurement_key(
    backbone: str, input_size: int, device: torch.device, fingerprint: str, candidates: list[str]
) -> str:
    """The store key of one backbone's choice; another candidate set is another key."""
    return f"precision/v1/{backbone}/input{input_size}/{device.type}/{fingerprint}/" + ",".join(
        candidates
    )


class PrecisionMeasurer:
    def __init__(
        self,
        store: MeasurementStore | None,
        device: torch.device,
        threads: int,
        tolerance: Tolerance = DEFAULT_TOLERANCE,
    ) -> None:
        self._store = store
        self._device = device
        self._threads = threads
        self._tolerance = tolerance
        self._fingerprint = machine_fingerprint(device, threads)

    def choose(
        self,
        backbone: str,
        input_size: int,
        features_at: FeaturesAt,
        stack: Callable[[Sequence[Any]], Any],
        calibration: Sequence[Any],
    ) -> PrecisionChoice:
        """The stored choice for this backbone on this machine, else a measured one (then
        stored). `calibration`: the shipped set, preprocessed; `stack` batches them."""
        dtypes = candidate_dtypes(self._device)
        names = [DTYPE_NAMES[dtype] for dtype in dtypes]
        key = measurement_key(backbone, input_size, self._device, self._fingerprint, names)
        stored = self._read(key)
        if stored is not None and stored.precision in names:
            log.info(
                "backbone %s precision %s (measured before on this machine: %s)",
                backbone,
                stored.precision,
                stored.summary(),
            )
            return stored
        candidates = [Candidate(DTYPE_NAMES[d], features_at(d)) for d in dtypes]
        calibration_batches = [
            stack(calibration[start : start + CALIBRATION_BATCH])
            for start in range(0, len(calibration), CALIBRATION_BATCH)
        ]
        timing_batches = [stack(calibration[:size]) for size in TIMING_BATCH_SIZES]
        chosen: list[PrecisionChoice] = []
        started = time.perf_counter()
        run_in_fresh_thread(
            lambda: chosen.append(
                choose_precision(candidates, calibration_batches, timing_batches, self._tolerance)
            ),
            f"measure-precision-{backbone}",
            self._threads,
        )
        choice = chosen[0]
        log.info(
            "backbone %s precision %s, measured in %.1fs on %d threads: %s",
            backbone,
            choice.precision,
            time.perf_counter() - started,
            self._threads,
            choice.summary(),
        )
        # Replicas sharing a store that start together each measure; the first to store its
        # choice wins, so that they serve alike (a narrow race remains: last write wins).
        stored = self._read(key)
        if stored is not None and stored.precision in names:
            log.info(
                "backbone %s precision %s, stored by another replica meanwhile",
                backbone,
                stored.precision,
            )
            return stored
        if self._store is not None:
            try:
                self._store.write_measurement(key, choice.to_json())
            except Exception:  # a store fault costs a measurement at the next start, no more
                log.warning("could not store the precision measurement of %s", backbone)
        return choice

    def _read(self, key: str) -> PrecisionChoice | None:
        if self._store is None:
            return None
        try:
            text = self._store.read_measurement(key)
            return None if text is None else PrecisionChoice.from_json(text)
        except Exception:  # unreadable or from older code: measure again
            log.warning("ignoring an unreadable stored precision measurement (%s)", key)
            return None
