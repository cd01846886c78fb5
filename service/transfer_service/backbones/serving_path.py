"""What runs a loaded backbone's frozen stages for Predict, and how a faster way is swapped in
while the server serves (issue 20: compile and int8 built in the background after SERVING).

A backbone starts serving on its eager trunk at the precision measured (or forced) at load.
A faster runner built later (compiled stages, an int8 trunk) is installed in the backbone's
`ServingPathSlot` once it has been checked against fp32 and timed faster. Predict reads the
slot once per trunk pass, so a pass runs wholly on one path; installing is one reference
assignment, atomic under the GIL, and needs no lock on the Predict path. Training never
reads the slot: heads train on the eager trunk's exact features (LoadedBackbone.training_dtype).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Protocol


class StageRunner(Protocol):
    """Runs a trunk's frozen stages [start, stop) for Predict, inference only, for any range
    0 <= start <= stop <= num_stages (heads branch off at any split point). `state` is a
    first-stage batch (or a later stage's output) as the eager trunk takes it; the result is
    the eager stages' state in fp32 (images [B, C, H, W], texts TextState with float hidden
    states), whatever the runner computes in inside."""

    def run(self, state: Any, start: int, stop: int) -> Any: ...


@dataclass(frozen=True, slots=True)
class ServingPath:
    """One way Predict runs a backbone's frozen stages."""

    precision: str  # "float32", "bfloat16", "float16" or "int8": what ListBackbones shows
    inputs_per_second: float  # measured (batch 1 + 8 calibration batches); 0: not measured
    runner: StageRunner | None = None  # None: the eager trunk at the backbone's compute_dtype
    compiled: bool = False  # the runner's stages run through torch.compile graphs
    description: str = ""  # for logs: e.g. "eager bfloat16", "compiled bfloat16", "int8"


class ServingPathSlot:
    """A backbone's current ServingPath, shared by every copy of its LoadedBackbone."""

    def __init__(self, initial: ServingPath) -> None:
        self._current = initial
        self._history_lock = threading.Lock()
        self._installed: list[ServingPath] = [initial]

    @property
    def current(self) -> ServingPath:
        return self._current

    def install(self, path: ServingPath) -> None:
        """Predict's next trunk pass runs on `path`; a pass already running finishes on the
        path it read."""
        with self._history_lock:
            self._installed.append(path)
        self._current = path

    def history(self) -> list[ServingPath]:
        """Every path installed, the first (load-time) one first."""
        with self._history_lock:
            return list(self._installed)
