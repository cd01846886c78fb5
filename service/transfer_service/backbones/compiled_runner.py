"""A loaded backbone's frozen stages compiled (backbones/compiled.py) as a StageRunner, for the
background upgrade (TRANSFER_COMPILE=auto): built and warmed up off the Predict path, then
installed in the backbone's ServingPathSlot once verified and timed faster."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from transfer_service.backbones.cache import LoadedBackbone
from transfer_service.backbones.compiled import WARM_UP_BATCH_SIZES, CompiledStages, warm_up_inputs


class UpgradeCancelled(Exception):
    """The server is stopping: the upgrade ends between two steps."""


class CompiledRunner:
    """Runs stages [start, stop) through compiled graphs at the backbone's Predict compute dtype
    (autocast, as LoadedBackbone.run_prefix runs its eager stages); returns fp32 state."""

    def __init__(self, loaded: LoadedBackbone) -> None:
        self._trunk = loaded.trunk
        self._device = loaded.device
        self._dtype = loaded.compute_dtype
        self._stages = CompiledStages(loaded.trunk, loaded.device)

    def run(self, state: Any, start: int, stop: int) -> Any:
        if start == stop:
            return state
        # Compiled graphs are guarded on the autocast state: every call (warm-up, checks,
        # Predict) must come in the same one, or it compiles again on the caller's thread.
        with torch.no_grad():
            if self._dtype == torch.float32:
                return self._stages.run(state, start, stop)
            with torch.autocast(self._device.type, dtype=self._dtype):
                out = self._stages.run(state, start, stop)
            return self._trunk.to_float(out)


def prime_inductor_tracing(run_exclusively: Callable[[Callable[[], None]], None]) -> None:
    """Runs, once, the one plain `torch.fx.symbolic_trace` inductor's lowering makes (its
    InterpreterShim's cached placeholder graph) through `run_exclusively` (on the Predict
    compute thread). fx tracing patches `nn.Module.__call__` process-wide while it runs, so a
    Predict batch running eagerly on another thread at that moment fails ("module is not
    installed as a submodule": seen in tests/grpc/test_compiled_swap.py). make_fx's tracer,
    which compiling uses otherwise, patches it too but passes every call through unchanged.
    The import (seconds) runs here, on the calling thread; only the trace (milliseconds) runs
    where Predict does."""
    try:
        from torch._inductor.loop_body import InterpreterShim
    except ImportError:  # another torch: nothing known to prime
        return
    dummy_graph = getattr(InterpreterShim, "_dummy_gm", None)
    if callable(dummy_graph):
        run_exclusively(dummy_graph)


def build_compiled_runner(loaded: LoadedBackbone, cancelled: Callable[[], bool]) -> CompiledRunner:
    """Compiles on the calling thread: torch.compile is lazy, so one batch of each size range
    (WARM_UP_BATCH_SIZES) runs through every stage; after it no batch size or split point
    compiles again (tests/unit/test_compile.py counts graphs). Raises UpgradeCancelled between
    sizes once `cancelled`, and whatever compiling raised (no C++ compiler, say)."""
    runner = CompiledRunner(loaded)
    trunk = loaded.trunk
    for batch_size in WARM_UP_BATCH_SIZES:
        if cancelled():
            raise UpgradeCancelled
        inputs = warm_up_inputs(loaded.spec.modality, batch_size)
        state = loaded.stack([loaded.preprocessor.load(x, "warm-up") for x in inputs])
        with torch.inference_mode():
            trunk.pool(runner.run(state, 0, trunk.num_stages))
    return runner
