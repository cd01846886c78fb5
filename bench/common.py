"""What the benchmarks share: an in-process server, the raw in-process baseline, concurrent
callers, statistics, data and the environment report.

The server is the real one (`tests.conftest.start_server`: real backbones, real gRPC on a
loopback port, its own event loop on a thread). The raw baseline uses the *same* loaded trunk
object and the head's stored weights, called directly under `torch.inference_mode`: no
gRPC, no batcher, no thread hops. The measured Predict callers run in a child process by
default (`bench.callers`), as deployed callers are other processes: their CPU cost (protobuf,
asyncio) is still spent on the same cores, so it is still charged to the server's side of each
ratio, but they do not take the server's GIL. `--callers-in-process` puts them back in this
process, beside the server, for comparison.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import grpc
import torch

# The service, client and test-data modules are imported where used, so that this module
# (and bench.resnet50) imports without them.
if TYPE_CHECKING:
    from transfer_client import AsyncTransferClient
    from transfer_client.types import InputData
    from transfer_service.backbones.cache import LoadedBackbone
    from transfer_service.backbones.preprocess import Preprocessor
    from transfer_service.domain import ModelInput
    from transfer_service.heads import TaskHead
    from transfer_service.lifecycle import Application

    from tests.conftest import RunningServer

REPO = Path(__file__).resolve().parents[1]
CLIENT_TIMEOUT_S = 600.0


# --- command line ------------------------------------------------------------------------


def parser(description: str) -> argparse.ArgumentParser:
    """--quick and --image-size, which every benchmark takes."""
    env_size = os.environ.get("TRANSFER_IMAGE_SIZE")
    arguments = argparse.ArgumentParser(description=description)
    arguments.add_argument(
        "--quick", action="store_true", help="smoke-test sizes: well under a minute"
    )
    arguments.add_argument(
        "--image-size",
        type=int,
        default=int(env_size) if env_size else None,
        help="image side in pixels (default: TRANSFER_IMAGE_SIZE, else each backbone's native)",
    )
    arguments.add_argument(
        "--batch-wait-ms",
        type=float,
        default=None,
        help="server batch_max_wait_ms (default: the server's own setting)",
    )
    return arguments


def add_round_options(arguments: argparse.ArgumentParser) -> None:
    """--repeats and --round-seconds, for benchmarks that measure in interleaved rounds."""
    arguments.add_argument(
        "--repeats", type=int, default=None, help="interleaved rounds per row (default: plan)"
    )
    arguments.add_argument(
        "--round-seconds",
        type=float,
        default=None,
        help="target length of one measured round (default: plan)",
    )


class _Rounds(Protocol):
    @property
    def repeats(self) -> int: ...

    @property
    def round_seconds(self) -> float: ...


RoundPlan = TypeVar("RoundPlan", bound=_Rounds)
Result = TypeVar("Result")


def apply_round_options(plan: RoundPlan, arguments: argparse.Namespace) -> RoundPlan:
    """`plan` (a dataclass) with the command line's --repeats / --round-seconds where given."""
    return dataclasses.replace(  # type: ignore[type-var]  # plans are dataclasses
        plan,
        repeats=arguments.repeats or plan.repeats,
        round_seconds=arguments.round_seconds or plan.round_seconds,
    )


def add_images_only_option(arguments: argparse.ArgumentParser) -> None:
    """--images-only: skip the text backbone, for a machine without MiniLM's weights (the
    GPU machine, where they do not fit beside the rest in one transfer)."""
    arguments.add_argument(
        "--images-only", action="store_true", help="measure efficientnet_lite0 only"
    )


def server_overrides(arguments: argparse.Namespace) -> dict[str, object]:
    """Settings fields the common options set (only those given)."""
    overrides: dict[str, object] = {"image_size": arguments.image_size}
    if arguments.batch_wait_ms is not None:
        overrides["batch_max_wait_ms"] = arguments.batch_wait_ms
    return overrides


# --- server and baseline -----------------------------------------------------------------


@contextlib.contextmanager
def bench_server(
    overrides: dict[str, object], *, store_dir: Path | None = None
) -> Iterator[RunningServer]:
    """A real server in this process. `overrides` are Settings fields; TRANSFER_* variables
    (e.g. TRANSFER_DEVICE=cuda) still apply to every field not overridden here."""
    from tests.conftest import make_settings, start_server

    values: dict[str, object] = {"image_size": None, "metrics_port": -1, "log_level": "WARNING"}
    # make_settings pins the tests' fp32; a benchmark serves what a deployment would.
    values["precision"] = os.environ.get("TRANSFER_PRECISION", "auto")
    # make_settings pins compile off too; TRANSFER_COMPILE=auto measures the background swap.
    values["compile"] = os.environ.get("TRANSFER_COMPILE", "false")
    values.update(overrides)
    with contextlib.ExitStack() as stack:
        if store_dir is None:
            store_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-")))
        running = start_server(make_settings(store_dir, **values))
        try:
            yield running
        finally:
            running.stop()


def connect(running: RunningServer) -> AsyncTransferClient:
    """An asyncio client on one channel (create it inside the running loop)."""
    from transfer_client import AsyncTransferClient

    return AsyncTransferClient(running.address, timeout=CLIENT_TIMEOUT_S)


@dataclass(frozen=True, slots=True)
class RawModel:
    """The baseline: trunk + head called directly, as a user of plain PyTorch would."""

    backbone: LoadedBackbone
    head: TaskHead
    preprocessor: Preprocessor
    prefix_end: int

    def prepare(self, inputs: Sequence[ModelInput]) -> list[Any]:
        """Decode/tokenise and normalise: what the server does before batching."""
        loaded = [self.preprocessor.load(item, f"inputs[{i}]") for i, item in enumerate(inputs)]
        return self.preprocessor.finish(loaded, None)

    def collate(self, prepared: Sequence[Any]) -> Any:
        trunk = self.backbone.trunk
        return trunk.to_device(trunk.collate(prepared), self.backbone.device)

    @property
    def compute_dtype(self) -> torch.dtype:
        """The server's trunk precision where it has that setting (else fp32); the baseline
        autocasts to the same, as a plain PyTorch user would."""
        dtype: torch.dtype = getattr(self.backbone, "compute_dtype", torch.float32)
        return dtype

    def forward(self, state: Any) -> torch.Tensor:
        """Trunk + head on a ready batch -> class probabilities on the CPU (syncs a GPU)."""
        trunk = self.backbone.trunk
        dtype = self.compute_dtype
        device_type = self.backbone.device.type
        with torch.inference_mode():
            with torch.autocast(device_type, dtype=dtype, enabled=dtype != torch.float32):
                prefix = trunk.run_stages(state, 0, self.prefix_end)
            features = self.head.features(_to_float(prefix))  # heads run in fp32
            return self.head.classify(features).float().softmax(dim=1).cpu()

    def predict(self, inputs: Sequence[ModelInput]) -> torch.Tensor:
        """Everything from raw bytes/text to probabilities (decode + preprocess + model)."""
        return self.forward(self.collate(self.prepare(inputs)))


def _to_float(state: Any) -> Any:
    from transfer_service.backbones.trunks import TextState

    if isinstance(state, TextState):
        values = state.values.float() if state.values.is_floating_point() else state.values
        return TextState(values, state.mask)
    return state.float()


def on_compute_thread(app: Application, work: Callable[..., Result], *args: Any) -> Result:
    """Runs `work(*args)` on the server's Predict compute thread (between server rounds, while it is
    idle) and returns its result. The raw baseline runs there so that it uses the same torch
    thread team as the server's batches: a second thread running torch on every core would
    slow both of them (see torch_threads), which no single-threaded user script sees."""
    return app.compute_pool.submit(work, *args).result()


def single_threaded_torch_here() -> None:
    """This (the benchmark's main) thread prepares data only: torch on one thread here, for
    the same reason as `on_compute_thread`."""
    from transfer_service.torch_threads import use_intra_op_threads

    use_intra_op_threads(1)


def raw_model(app: Application, head_id: str) -> RawModel:
    """Builds the baseline from the server's loaded backbone and the head's stored weights
    (loaded by a private HeadCache: the service's own head-building code, not a copy)."""
    from transfer_service.heads import HeadCache

    loaded = HeadCache(app.backbones, app.store.get_head, app.store.load_head_weights, 1).get(
        head_id
    )
    record = loaded.record
    backbone = app.backbones.get(record.backbone)
    preprocessor = backbone.preprocessor
    if preprocessor.input_size != record.input_size:
        preprocessor = preprocessor.resized(record.input_size)
    return RawModel(
        backbone, loaded.module, preprocessor, backbone.trunk.prefix_end(record.trainable_blocks)
    )


def trunk_precision(app: Application, backbone: str) -> str:
    dtype = getattr(app.backbones.get(backbone), "compute_dtype", torch.float32)
    return str(dtype).removeprefix("torch.")


def model_inputs(values: Sequence[InputData]) -> list[ModelInput]:
    from transfer_service.domain import ModelInput

    out = []
    for value in values:
        if isinstance(value, bytes):
            out.append(ModelInput(image=value))
        elif isinstance(value, str):
            out.append(ModelInput(text=value))
        else:
            raise TypeError(f"bytes or str, not {type(value).__name__}")
    return out


async def train_probe(
    client: AsyncTransferClient,
    backbone: str,
    examples: Sequence[tuple[InputData, str]],
    head_name: str,
    *,
    epochs: int = 20,
    seed: int = 0,
) -> str:
    """A linear-probe head trained through FineTune; returns its head id."""
    from transfer_client import TrainingConfig

    done = await client.train(
        backbone,
        list(examples),
        head_name=head_name,
        config=TrainingConfig(epochs=epochs, seed=seed, early_stopping_patience=0),
    )
    return done.head_id


# The Predict benchmarks' two workloads: a probe head per backbone and held-out inputs.
IMAGE_BACKBONE = "efficientnet_lite0"
TEXT_BACKBONE = "minilm_l6"


@dataclass(frozen=True, slots=True)
class ProbeWorkload:
    head_id: str
    inputs: list[InputData]  # held out from the head's training set


def probe_backbones(with_text: bool) -> list[str]:
    """What probe_workloads trains on: the server's preload list."""
    return [IMAGE_BACKBONE, TEXT_BACKBONE] if with_text else [IMAGE_BACKBONE]


async def probe_workloads(client: AsyncTransferClient, with_text: bool) -> list[ProbeWorkload]:
    """Images: a probe on 4 Fashion-MNIST classes, 100 test PNGs. Texts (`with_text`): a probe
    on BBC News snippets, 100 other snippets."""
    print("training one probe head per backbone ...", flush=True)
    image_head = await train_probe(
        client, IMAGE_BACKBONE, fashion_pngs(10, seed=1, classes=4), "bench-image"
    )
    images: list[InputData] = [png for png, _ in fashion_pngs(10, split="test", seed=2)]
    workloads = [ProbeWorkload(image_head, images)]
    if with_text:
        text_head = await train_probe(client, TEXT_BACKBONE, short_texts(8, seed=1), "bench-text")
        texts: list[InputData] = [text for text, _ in short_texts(20, seed=2, skip=8)]
        workloads.append(ProbeWorkload(text_head, texts))
    return workloads


def note_probe_inputs(environment: Environment, app: Application, with_text: bool) -> None:
    image_side = app.backbones.get(IMAGE_BACKBONE).preprocessor.input_size
    environment.note("image input", f"Fashion-MNIST test PNGs (28x28) -> {image_side} px")
    if with_text:
        environment.note("text input", "BBC News snippets, ~400 characters (~80-100 tokens)")


# --- concurrent callers ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Call:
    head_id: str
    inputs: list[InputData]


async def run_callers(
    client: AsyncTransferClient, calls: Sequence[Call], concurrency: int
) -> tuple[float, list[float]]:
    """`concurrency` callers share the list of calls (each takes the next one when its last
    one returns). Returns the wall seconds of the whole list and each call's latency."""
    position = 0
    latencies: list[float] = []

    async def caller() -> None:
        nonlocal position
        while position < len(calls):
            call = calls[position]
            position += 1
            started = time.perf_counter()
            await client.predict(call.head_id, call.inputs)
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(concurrency)))
    return time.perf_counter() - started, latencies


def rounds_inputs(rate: float, seconds: float, granule: int, minimum: int) -> int:
    """How many inputs make a round of about `seconds` at `rate` inputs/s: a multiple of
    `granule` (one wave of all callers) and at least `minimum`."""
    wanted = max(minimum, math.ceil(rate * seconds))
    return granule * max(1, math.ceil(wanted / granule))


# --- statistics and formatting -----------------------------------------------------------


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile, q in [0, 100] (numpy's default method)."""
    ordered = sorted(values)
    if not ordered:
        raise ValueError("no values")
    position = (len(ordered) - 1) * q / 100.0
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def spread(values: Sequence[float]) -> str:
    """'min-max' of a few repeats, for the reader to judge the noise."""
    return f"{min(values):.3g}-{max(values):.3g}"


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(str(cell) for cell in row) + " |")
    return "\n".join(lines)


def verdict(value: float, target: float, *, at_least: bool = True) -> str:
    met = value >= target if at_least else value <= target
    sign = ">=" if at_least else "<="
    return f"{'met' if met else 'NOT met'} ({value:.3f} vs target {sign} {target:g})"


# --- data --------------------------------------------------------------------------------


def fashion_pngs(
    per_class: int, *, split: str = "train", seed: int = 0, classes: int = 10
) -> list[tuple[bytes, str]]:
    """Fashion-MNIST as 28x28 grayscale PNG bytes (the server upscales them)."""
    from tests.datasets import fashion_mnist

    return fashion_mnist(per_class, split=split, seed=seed, classes=classes)


def short_texts(
    per_class: int, *, seed: int = 0, skip: int = 0, chars: int = 400
) -> list[tuple[str, str]]:
    """BBC News documents cut to about `chars` characters at a word boundary (snippet-sized
    requests; whole articles would be truncated at max_text_tokens anyway)."""
    from tests.datasets import bbc_news

    out = []
    for text, label in bbc_news(per_class, seed=seed, skip=skip):
        cut = " ".join(text.split())
        if len(cut) > chars:
            cut = cut[:chars].rsplit(" ", 1)[0]
        out.append((cut, label))
    return out


# --- environment -------------------------------------------------------------------------


def _git_revision() -> str:
    exported = os.environ.get("BENCH_GIT_REVISION")
    if exported:  # a tree exported with `git archive`, which has no .git
        return f"{exported} (exported tree)"
    try:
        revision = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return revision + (" (+ uncommitted changes)" if dirty else "")


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def rss_bytes() -> int:
    """This process's resident set size (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


class CpuMeter:
    """CPU cores kept busy by *other* processes (the rest of a shared machine) since the meter
    started: all CPUs' busy time from /proc/stat minus this process's own CPU time (and its
    `include`d helper processes'), per second of wall time. 0 on an otherwise idle machine; up
    to the CPU count when it is saturated."""

    def __init__(self, helpers: Sequence[int] = ()) -> None:
        self._start = self._sample()
        self._helpers: dict[int, float] = {}  # pid -> its CPU seconds when included
        for pid in helpers:
            self.include(pid)

    def include(self, pid: int) -> None:
        """Counts `pid` (a benchmark's own child process) as ours from now on."""
        self._helpers[pid] = process_cpu_seconds(pid)

    @staticmethod
    def _sample() -> tuple[float, float, float]:
        try:
            fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        except OSError:
            return 0.0, 0.0, time.perf_counter()
        idle = fields[3] + fields[4]  # idle + iowait
        busy = (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")
        own = os.times()
        return busy, own.user + own.system, time.perf_counter()

    def foreign_cores(self) -> float:
        busy, own, wall = self._sample()
        for pid, at_start in self._helpers.items():
            with contextlib.suppress(OSError):
                own += process_cpu_seconds(pid) - at_start
        return max(0.0, (busy - self._start[0]) - (own - self._start[1])) / max(
            wall - self._start[2], 1e-9
        )


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds process `pid` has used (Linux /proc)."""
    # Fields 14 and 15 of /proc/PID/stat are utime and stime in clock ticks; the command name
    # (field 2) may hold spaces, so count from its closing parenthesis.
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Environment:
    """Collects what a reader needs to judge a result; load averages bracket the run."""

    def __init__(self) -> None:
        self.started = datetime.now(UTC)
        self.load_start = os.getloadavg()
        self.meter = CpuMeter()
        self.command = shlex.join(sys.orig_argv)
        self.extra: list[tuple[str, str]] = []

    def note(self, key: str, value: object) -> None:
        self.extra.append((key, str(value)))

    def note_server_threads(self, app: Application) -> None:
        """The intra-op count the server's compute thread (and raw baselines) ran with."""
        self.note(
            "torch intra-op threads, server compute thread",
            on_compute_thread(app, torch.get_num_threads),
        )

    def markdown(self, device: torch.device | str) -> str:
        device = torch.device(device)
        load_end = os.getloadavg()
        accelerator = "none"
        if device.type == "cuda":
            accelerator = torch.cuda.get_device_name(device)
        rows: list[tuple[str, str]] = [
            ("command", f"`{self.command}`"),
            ("date (UTC)", self.started.strftime("%Y-%m-%d %H:%M")),
            ("git", _git_revision()),
            ("machine", f"{len(os.sched_getaffinity(0))} CPUs ({_cpu_model()})"),
            ("accelerator", accelerator),
            ("device", str(device)),
            ("python", platform.python_version()),
            ("torch", torch.__version__),
            (
                "torch threads (benchmark thread)",
                f"intra-op {torch.get_num_threads()}, inter-op {torch.get_num_interop_threads()}",
            ),
            ("grpcio", grpc.__version__),
            (
                "load average (1 min) start / end",
                f"{self.load_start[0]:.2f} / {load_end[0]:.2f}",
            ),
            (
                "CPU used by other processes during the run",
                f"{self.meter.foreign_cores():.2f} cores (mean) of {len(os.sched_getaffinity(0))}",
            ),
            ("wall time", f"{(datetime.now(UTC) - self.started).total_seconds():.0f} s"),
            *self.extra,
        ]
        return table(("environment", ""), rows)
