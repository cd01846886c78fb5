"""The faster ways to run a loaded backbone's frozen stages that the background upgrade tries
(TRANSFER_COMPILE=auto): its stages compiled at its Predict dtype, and int8 on a CPU for image
backbones when TRANSFER_PRECISION=auto (backbones/int8_stages.py; its torch.export runs in a
child process, backbones/int8_export.py, so building it beside serving threads is safe)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from transfer_service.backbones.cache import LoadedBackbone
from transfer_service.backbones.compiled_runner import build_compiled_runner
from transfer_service.backbones.serving_path import StageRunner
from transfer_service.domain import Modality

log = logging.getLogger(__name__)

# (backbone, calibration batches, cancelled) -> a runner; raises when it cannot be built.
BuildRunner = Callable[[LoadedBackbone, Sequence[Any], Callable[[], bool]], StageRunner]


@dataclass(frozen=True, slots=True)
class UpgradeCandidate:
    name: str  # in logs and the verdict's store key: "compiled-bfloat16", "int8"
    precision: str  # what ListBackbones shows once installed
    compiled: bool  # runs through torch.compile graphs
    build: BuildRunner


def compiled_candidate(loaded: LoadedBackbone) -> UpgradeCandidate:
    """The frozen stages compiled at the backbone's serving compute dtype."""
    precision = loaded.precision
    return UpgradeCandidate(
        f"compiled-{precision}",
        precision,
        True,
        lambda backbone, calibration, cancelled: build_compiled_runner(backbone, cancelled),
    )


class UpgradeCandidates:
    """Which candidates a backbone gets. `precision`: TRANSFER_PRECISION (int8 is a measured
    choice, never tried under a forced precision)."""

    def __init__(self, precision: str) -> None:
        self._precision = precision
        self._int8_missing_logged = False

    def __call__(self, loaded: LoadedBackbone) -> list[UpgradeCandidate]:
        candidates = [compiled_candidate(loaded)]
        int8 = self._int8_candidate(loaded)
        if int8 is not None:
            candidates.append(int8)
        return candidates

    def _int8_candidate(self, loaded: LoadedBackbone) -> UpgradeCandidate | None:
        if self._precision != "auto" or loaded.device.type != "cpu":
            return None
        if loaded.spec.modality is not Modality.IMAGE:
            return None
        try:  # imported here: the int8 module is optional (and heavy), built by its own helper
            from transfer_service.backbones import int8_stages

            unavailable_reason = int8_stages.int8_unavailable_reason
            build_int8_runner = int8_stages.build_int8_runner
        except (ImportError, AttributeError) as exc:
            if not self._int8_missing_logged:
                self._int8_missing_logged = True
                log.info("int8 candidate not available in this build: %s", exc)
            return None
        reason = unavailable_reason(loaded)
        if reason is not None:
            log.info("backbone %s: no int8 candidate: %s", loaded.name, reason)
            return None
        # Its stages are quantised, then compiled (inductor lowers the int8 ops).
        return UpgradeCandidate("int8", "int8", True, build_int8_runner)
