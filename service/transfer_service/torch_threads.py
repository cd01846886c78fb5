"""Which threads run torch on several cores, and how that is arranged.

torch's CPU wheels parallelise ops with GNU OpenMP (libgomp), which gives every thread that
runs a parallel op its own team of worker threads and keeps that team until the thread
exits. Once the process holds more OpenMP threads than CPUs, libgomp makes every team spin
only briefly before sleeping, so each of the hundreds of small ops in a forward pass then
pays a futex wake-up. Measured on this project's 2-CPU machine: the EfficientNet-Lite0
batch-1 forward went from 13 ms to 34 ms, for the rest of the process's life, after one other
thread had run a single image normalisation on two threads.

So the policy is: only the Predict compute thread and the thread of a running training job
run torch on `intra_op_threads` cores; every other thread (the event loop, preprocessing,
loading) runs it on one. On a CPU a training job gets a fresh thread that exits when the job
ends, which frees its team: the slowdown lasts only while a job runs, not for good. With an
accelerator jobs run on long-lived threads instead (jobs_train_on_fresh_threads says why).

While a job runs on a CPU, its team and the compute thread's would share the cores, and both
run throttled. `CpuShare` splits them instead: by default a job yields to Predict (it trains
on every core while no Predict batch ran for PREDICT_RECENT_SECONDS, on half of them while
Predicts come), or TRANSFER_TRAINING_TORCH_THREADS fixes the job's share for as long as it runs.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator

log = logging.getLogger(__name__)

# A job trains on every core only once no Predict batch started for this long: Predict's
# callers come back within milliseconds, so a gap this long means they stopped.
PREDICT_RECENT_SECONDS = 0.5

# The pacing of the running job's thread (CpuShare.training sets it; run_in_fresh_thread
# carries it to the job's thread): training code calls pace_training() between batches.
_training_pace: contextvars.ContextVar[Callable[[], None] | None] = contextvars.ContextVar(
    "training_pace", default=None
)


def pace_training() -> None:
    """Called by a training job between its batches (feature extraction): sets the calling
    thread's torch count to the job's share now (CpuShare.pace_job_thread); a no-op outside a
    job run by CpuShare.training."""
    pace = _training_pace.get()
    if pace is not None:
        pace()


def default_intra_op_threads() -> int:
    """One per CPU this process may run on (a container's cpuset, not the host's count)."""
    return max(1, len(os.sched_getaffinity(0)))


def use_intra_op_threads(count: int) -> None:
    """Sets the calling thread's torch intra-op thread count, for good.

    OpenMP's count is per thread, but torch initialises each thread's count once, lazily, at
    its first parallel op, to whatever count was set last on *any* thread, overwriting one
    set before. `get_num_threads` runs that initialisation now, so the count set after it
    stays (without it, a pool initialised to one thread took the compute thread's two)."""
    import torch  # imported here so that the policy is importable without torch loaded

    torch.get_num_threads()
    torch.set_num_threads(count)


@contextlib.contextmanager
def intra_op_threads_within(count: int) -> Iterator[None]:
    """The calling thread's count is `count` inside the block, its own again after it."""
    import torch

    previous = torch.get_num_threads()  # also runs torch's lazy per-thread initialisation
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def jobs_train_on_fresh_threads(device_type: str) -> bool:
    """Whether each training job gets a fresh thread (see run_in_fresh_thread).

    On a CPU, yes: the job's OpenMP team must end with it. With an accelerator, no: jobs run on
    long-lived threads (with the same torch CPU thread count, which the CPU-side L-BFGS probe
    uses), because PyTorch keeps cuDNN's execution plans per thread: on a fresh thread every
    convolution built its plan again, 6.2 s of a 7.4 s 500-image FineTune on an H200
    (bench/probe_training.py under py-spy). Their OpenMP teams then stay, beside the compute
    thread's; there the compute thread runs its trunk on the device, not on CPU cores."""
    return device_type == "cpu"


def run_in_fresh_thread(target: Callable[[], None], name: str, intra_op_threads: int) -> None:
    """Runs `target` on a new thread with `intra_op_threads` torch threads and waits for it;
    the thread (and with it its OpenMP team) is gone when this returns."""
    failure: list[BaseException] = []

    def run() -> None:
        use_intra_op_threads(intra_op_threads)
        try:
            target()
        except BaseException as exc:  # re-raised on the calling thread
            failure.append(exc)

    # The caller's context variables (the job's pacing, see pace_training) go with it.
    context = contextvars.copy_context()
    thread = threading.Thread(target=context.run, args=(run,), name=name, daemon=True)
    thread.start()
    thread.join()
    if failure:
        raise failure[0]


class CpuShare:
    """How a CPU's torch threads are split between Predict and running training jobs.

    By default (`training_threads` 0) a job yields to Predict: between its batches
    (pace_training) it runs on every core when no Predict batch started for
    PREDICT_RECENT_SECONDS, and on `yield_threads` (half, at least one) when one did; while a
    job runs, the compute thread runs each batch on what the yielded jobs leave (at least
    one). Measured on 2 CPUs (bench/noisy_neighbour.py, many_tiny_images): victim Predict p99
    3.34x idle with the teams sharing the cores, see bench/RESULTS.md for after. A fixed
    `training_threads` below `predict_threads` gives each job that many for as long as it
    runs instead (measured with 1: single-image Predict p99 during a probe FineTune 119 ->
    51 ms, the FineTune 1.3-1.6x slower when no Predicts come). At or above
    `predict_threads`: no split, both teams share every core."""

    def __init__(
        self,
        predict_threads: int,
        training_threads: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.predict_threads = predict_threads
        self.yields = training_threads == 0 and predict_threads > 1
        self.training_threads = training_threads or predict_threads
        self.yield_threads = max(1, predict_threads // 2)
        self._clock = clock
        self._lock = threading.Lock()
        self._running_jobs = 0
        self._decoding = 0
        self._last_predict = -float("inf")

    @property
    def splits(self) -> bool:
        """Whether a running job leaves the compute thread fewer threads (fixed split)."""
        return self.training_threads < self.predict_threads

    @contextlib.contextmanager
    def training(self) -> Iterator[None]:
        """Marks one job as running inside the block; the job's thread (run_in_fresh_thread,
        which carries this context) paces itself with pace_training()."""
        with self._lock:
            self._running_jobs += 1
        reset = _training_pace.set(self.pace_job_thread if self.yields else None)
        try:
            yield
        finally:
            _training_pace.reset(reset)
            with self._lock:
                self._running_jobs -= 1

    @contextlib.contextmanager
    def decoding(self) -> Iterator[None]:
        """Marks one thread as decoding a large Predict's input (a CPU-bound Pillow call that
        releases the GIL) inside the block: the compute thread leaves it a core. Without
        that, an OpenMP team of every core beside a busy decoder stalls at each barrier:
        single-image Predict p99 went to 2.4 s beside a 512-image request of 16-megapixel
        PNGs (bench/noisy_neighbour.py)."""
        with self._lock:
            self._decoding += 1
        try:
            yield
        finally:
            with self._lock:
                self._decoding -= 1

    def note_predict_batch(self) -> None:
        """A Predict batch starts now (yielding jobs read it)."""
        self._last_predict = self._clock()

    def predict_recent(self) -> bool:
        return self._clock() - self._last_predict < PREDICT_RECENT_SECONDS

    def job_threads_now(self) -> int:
        """A yielding job's torch threads at this moment."""
        return self.yield_threads if self.predict_recent() else self.predict_threads

    def pace_job_thread(self) -> None:
        """Runs on a job's thread between its batches: its count for the Predicts now. At 1
        its team's workers stay, asleep, and come back at the next larger count."""
        import torch

        wanted = self.job_threads_now()
        if torch.get_num_threads() != wanted:
            torch.set_num_threads(wanted)

    def predict_threads_now(self) -> int:
        busy = self._decoding
        if self.splits:
            busy += self._running_jobs * self.training_threads
        elif self.yields:
            busy += self._running_jobs * self.yield_threads
        return max(1, self.predict_threads - busy)

    def fit_compute_thread(self) -> None:
        """Runs on the compute thread before each batch: its count for the jobs running now
        (and the moment, which yielding jobs read). At 1 its team's workers stay, asleep; at
        2 or more libgomp ends the extra ones."""
        import torch

        self.note_predict_batch()
        wanted = self.predict_threads_now()
        if torch.get_num_threads() != wanted:
            torch.set_num_threads(wanted)


def lower_thread_priority(niceness: int) -> None:
    """Lowers the calling thread's CPU priority to at least `niceness` (Linux: nice is per
    thread, and the threads and processes it starts inherit it). For work that must not take
    CPU from Predict's compute thread: a background compile, a large request's decoding. Not
    undone: raising priority back needs a privilege a container seldom has, so such work gets
    threads of its own."""
    if niceness <= 0 or not sys.platform.startswith("linux"):
        return
    thread_id = threading.get_native_id()
    try:
        current = os.getpriority(os.PRIO_PROCESS, thread_id)
        os.setpriority(os.PRIO_PROCESS, thread_id, max(current, niceness))
    except OSError as exc:
        log.warning("could not lower a thread's CPU priority: %s", exc)
