"""TRANSFER_COMPILE=auto: after SERVING, faster ways through each loaded backbone's frozen stages
are built in the background and swapped in once verified and timed faster (issue 20).

One daemon thread, at lowered CPU priority, takes one backbone at a time (start-up ones, then
any loaded later). For each candidate (backbones/upgrade_candidates.py) it builds the runner,
checks its pooled features against the fp32 eager trunk on the shipped calibration set with
the precision chooser's Tolerance, and times it against the backbone's current serving path
in paired rounds (backbones/upgrade_choice.py). The fastest that passes and is at least
REQUIRED_SPEEDUP faster is installed in the backbone's ServingPathSlot; Predict never waits
for any of it, and a candidate that fails only costs a log line. The verdict is stored per
machine fingerprint: a restart builds only the winner, checks it again and installs it
without timing, or builds nothing when nothing won.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import torch

from transfer_service.backbones.cache import LoadedBackbone
from transfer_service.backbones.catalog import PreprocessingOptions
from transfer_service.backbones.compiled_runner import UpgradeCancelled, prime_inductor_tracing
from transfer_service.backbones.measured_precision import machine_fingerprint
from transfer_service.backbones.precision_choice import DEFAULT_TOLERANCE, Tolerance, agreement
from transfer_service.backbones.serving_path import ServingPath, StageRunner
from transfer_service.backbones.upgrade_candidates import UpgradeCandidate
from transfer_service.backbones.upgrade_choice import (
    PairedTimer,
    UpgradeFigures,
    UpgradeVerdict,
    choose_winner,
    failure_reason,
    pooled_features,
    read_verdict,
    shipped_batches,
    time_paired,
    upgrade_key,
    write_verdict,
)
from transfer_service.store.interface import MeasurementStore
from transfer_service.torch_threads import (
    lower_thread_priority,
    run_in_fresh_thread,
    use_intra_op_threads,
)

log = logging.getLogger(__name__)

# The upgrade thread's nice value (Linux; its compiler child processes inherit it). CFS weighs
# nice 10 at ~1/9 of nice 0, so while Predict keeps the cores busy the build gets about a
# tenth of them and still finishes; when the cores are idle it runs at full speed.
UPGRADE_NICENESS = 10

Candidates = Callable[[LoadedBackbone], list[UpgradeCandidate]]
OnOutcome = Callable[[str, str], None]  # (backbone, outcome)


class BackgroundUpgrader:
    def __init__(
        self,
        *,
        store: MeasurementStore | None,
        options: PreprocessingOptions,
        predict_threads: int,
        candidates: Candidates,
        tolerance: Tolerance = DEFAULT_TOLERANCE,
        timer: PairedTimer = time_paired,
        niceness: int | None = None,
        on_outcome: OnOutcome | None = None,
        on_predict_thread: Callable[[Callable[[], None]], None] = lambda work: work(),
    ) -> None:
        """`predict_threads`: the Predict compute thread's torch threads, which the builds
        (inductor sizes its kernels' loops by them) and the timings run on;
        `niceness`: the thread's nice value (None: UPGRADE_NICENESS); `on_predict_thread`
        runs a short step there, between batches (prime_inductor_tracing says why)."""
        self._store = store
        self._options = options
        self._predict_threads = predict_threads
        self._candidates = candidates
        self._tolerance = tolerance
        self._timer = timer
        self._niceness = niceness
        self._on_outcome = on_outcome or (lambda backbone, outcome: None)
        self._queue: queue.SimpleQueue[LoadedBackbone | None] = queue.SimpleQueue()
        self._stopping = threading.Event()
        self._idle = threading.Condition()
        self._pending = 0
        self._thread: threading.Thread | None = None
        self._on_predict_thread = on_predict_thread
        self._primed = False

    def offer(self, loaded: LoadedBackbone) -> None:
        """Queues a freshly loaded backbone (the cache's load hook); it is upgraded after
        start(), in the order offered."""
        with self._idle:
            self._pending += 1
        self._queue.put(loaded)

    def start(self) -> None:
        """Starts the thread (the server reports SERVING first: start-up never waits)."""
        if self._thread is None and not self._stopping.is_set():
            self._thread = threading.Thread(target=self._run, name="backbone-upgrade", daemon=True)
            self._thread.start()

    def close(self) -> None:
        """Stops the upgrades without waiting: a step running now (a compile, say) may finish
        in the daemon thread, but nothing more is built, timed, stored or installed."""
        self._stopping.set()
        self._queue.put(None)

    def wait_idle(self, timeout: float) -> bool:
        """Whether every backbone offered so far was dealt with within `timeout` seconds."""
        with self._idle:
            return self._idle.wait_for(lambda: self._pending == 0, timeout)

    def _cancelled(self) -> bool:
        return self._stopping.is_set()

    def _run(self) -> None:
        use_intra_op_threads(1)  # this thread only waits; the work runs on fresh threads
        lower_thread_priority(UPGRADE_NICENESS if self._niceness is None else self._niceness)
        while True:
            loaded = self._queue.get()
            if loaded is None or self._cancelled():
                return
            outcome = "failed"
            try:
                outcome = self._upgrade(loaded)
            except UpgradeCancelled:
                outcome = "cancelled"
                log.info("backbone %s: background upgrade cancelled (stopping)", loaded.name)
            except Exception:  # Predict keeps its path; a bug here must not end the thread
                log.exception("backbone %s: background upgrade failed", loaded.name)
            self._on_outcome(loaded.name, outcome)
            with self._idle:
                self._pending -= 1
                self._idle.notify_all()

    def _upgrade(self, loaded: LoadedBackbone) -> str:
        """One backbone, on a fresh thread at the Predict thread count (its OpenMP team ends
        with it); returns the outcome for logs and metrics."""
        import torch._inductor.config as inductor  # heavy: imported in auto mode only

        if not self._primed:
            prime_inductor_tracing(self._on_predict_thread)
            self._primed = True
        outcomes: list[str] = []
        # One compile thread: inductor's default pool (a process per CPU) would compete with
        # Predict for the cores. Dynamic threads: kernels use the calling thread's OpenMP
        # count at run time, so they follow CpuShare's per-batch count instead of the one
        # they were compiled under.
        with inductor.patch({"compile_threads": 1, "cpp.dynamic_threads": True}):
            run_in_fresh_thread(
                lambda: outcomes.append(self._upgrade_here(loaded)),
                f"upgrade-{loaded.name}",
                self._predict_threads,
            )
        return outcomes[0]

    def _upgrade_here(self, loaded: LoadedBackbone) -> str:
        candidates = self._candidates(loaded)
        if not candidates or loaded.serving is None:
            return "no_candidates"
        names = [candidate.name for candidate in candidates]
        fingerprint = machine_fingerprint(loaded.device, self._predict_threads)
        input_size = loaded.spec.input_size(self._options)
        key = upgrade_key(loaded.name, input_size, loaded.device, fingerprint, names)
        stored = read_verdict(self._store, key)
        if stored is not None and stored.winner is None:
            log.info(
                "backbone %s: no faster serving path (measured before on this machine: %s)",
                loaded.name,
                stored.summary(),
            )
            return "stored_none"
        calibration_batches, timing_batches = shipped_batches(loaded)
        with torch.inference_mode():
            fp32 = loaded.at_precision(torch.float32)
            reference = torch.cat([fp32(batch) for batch in calibration_batches])
        if stored is not None and stored.winner in names:
            winner = next(c for c in candidates if c.name == stored.winner)
            return self._reinstall(loaded, winner, stored, calibration_batches, reference)
        return self._measure(
            loaded, candidates, key, calibration_batches, timing_batches, reference
        )

    def _reinstall(
        self,
        loaded: LoadedBackbone,
        winner: UpgradeCandidate,
        stored: UpgradeVerdict,
        calibration_batches: Sequence[Any],
        reference: torch.Tensor,
    ) -> str:
        """The stored winner, built and checked again (it is cheap next to timing), installed
        with its stored rate."""
        figures, runner = self._build_and_check(loaded, winner, calibration_batches, reference)
        remembered = stored.winner_figures()
        if runner is None or not figures.passed or remembered is None:
            log.warning(
                "backbone %s: the stored winner %s no longer passes: %s",
                loaded.name,
                winner.name,
                figures.summary(),
            )
            return "stored_rejected"
        self._install(loaded, winner, runner, remembered.inputs_per_second)
        log.info(
            "backbone %s: serving path %s, its check %s (chosen before on this machine: %s)",
            loaded.name,
            winner.name,
            figures.summary(),
            stored.summary(),
        )
        return "installed"

    def _measure(
        self,
        loaded: LoadedBackbone,
        candidates: list[UpgradeCandidate],
        key: str,
        calibration_batches: Sequence[Any],
        timing_batches: Sequence[Any],
        reference: torch.Tensor,
    ) -> str:
        started = time.perf_counter()
        serving = pooled_features(loaded, None)
        all_figures: list[UpgradeFigures] = []
        runners: dict[str, StageRunner] = {}
        for candidate in candidates:
            figures, runner = self._build_and_check(
                loaded, candidate, calibration_batches, reference
            )
            if runner is not None and figures.passed:
                try:
                    with torch.inference_mode():
                        serving_rate, rate = self._timer(
                            serving,
                            pooled_features(loaded, runner),
                            timing_batches,
                            self._cancelled,
                        )
                except Exception as exc:
                    _log_failure(loaded, candidate, " its timing", exc)
                    figures = UpgradeFigures(candidate.name, False, error=failure_reason(exc))
                else:
                    figures = replace(
                        figures, inputs_per_second=rate, serving_inputs_per_second=serving_rate
                    )
                    runners[candidate.name] = runner
            if self._cancelled():
                raise UpgradeCancelled
            log.info("backbone %s: candidate %s", loaded.name, figures.summary())
            all_figures.append(figures)
        verdict = UpgradeVerdict(choose_winner(all_figures), tuple(all_figures))
        log.info(
            "backbone %s: serving path %s after %.1fs of background work on %d threads: %s",
            loaded.name,
            verdict.winner or "unchanged (no candidate passed and was faster)",
            time.perf_counter() - started,
            self._predict_threads,
            verdict.summary(),
        )
        if not self._cancelled():
            write_verdict(self._store, key, verdict)
        winner = verdict.winner_figures()
        if winner is None:
            return "none_faster"
        chosen = next(c for c in candidates if c.name == winner.candidate)
        self._install(loaded, chosen, runners[chosen.name], winner.inputs_per_second)
        return "installed"

    def _build_and_check(
        self,
        loaded: LoadedBackbone,
        candidate: UpgradeCandidate,
        calibration_batches: Sequence[Any],
        reference: torch.Tensor,
    ) -> tuple[UpgradeFigures, StageRunner | None]:
        """The candidate's runner and its agreement with fp32; (figures with the error, None)
        when it cannot be built or run. Raises UpgradeCancelled once stopping."""
        if self._cancelled():
            raise UpgradeCancelled
        started = time.perf_counter()
        try:
            runner = candidate.build(loaded, calibration_batches, self._cancelled)
            built = time.perf_counter() - started
            if self._cancelled():
                raise UpgradeCancelled
            features = pooled_features(loaded, runner)
            with torch.inference_mode():
                got = torch.cat([features(b) for b in calibration_batches])
        except UpgradeCancelled:
            raise
        except Exception as exc:
            if self._cancelled():  # the candidate's own cancellation, or a fault on the way out
                raise UpgradeCancelled from exc
            _log_failure(loaded, candidate, "", exc)
            return UpgradeFigures(candidate.name, False, error=failure_reason(exc)), None
        if got.shape != reference.shape:
            error = f"features {tuple(got.shape)}, expected {tuple(reference.shape)}"
            return UpgradeFigures(candidate.name, False, build_seconds=built, error=error), None
        mean, worst = agreement(reference, got)
        passed = mean >= self._tolerance.mean_cosine and worst >= self._tolerance.min_cosine
        return UpgradeFigures(candidate.name, passed, mean, worst, build_seconds=built), runner

    def _install(
        self, loaded: LoadedBackbone, candidate: UpgradeCandidate, runner: StageRunner, rate: float
    ) -> None:
        if self._cancelled():
            raise UpgradeCancelled
        assert loaded.serving is not None  # checked in _upgrade_here
        path = ServingPath(candidate.precision, rate, runner, candidate.compiled, candidate.name)
        loaded.serving.install(path)


def _log_failure(
    loaded: LoadedBackbone, candidate: UpgradeCandidate, where: str, exc: BaseException
) -> None:
    """One line with the reason; the traceback (pages, for a compile) at debug level."""
    log.warning(
        "backbone %s: candidate %s failed%s (serving as before): %s",
        loaded.name,
        candidate.name,
        where,
        failure_reason(exc),
    )
    log.debug("candidate %s failure", candidate.name, exc_info=exc)
