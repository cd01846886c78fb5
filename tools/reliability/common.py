"""What the reliability tools and tests share: a `python -m transfer_service` subprocess, raw gRPC
calls (any bytes, any method), status classification, hostile image bytes and RSS reading.

Everything binds to loopback; every wait here is bounded in time.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import random
import signal
import socket
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image
from transfer_client.proto import transfer_service_pb2 as pb
from transfer_client.proto import transfer_service_pb2_grpc as pb_grpc

REPO = Path(__file__).resolve().parents[2]
SERVICE = "transfer.v1.TransferService"
METHODS = {m.name: m for m in pb.DESCRIPTOR.services_by_name["TransferService"].methods}
REQUEST_TYPES: dict[str, type[Any]] = {
    name: getattr(pb, method.input_type.name) for name, method in METHODS.items()
}

# The status table's answers to a bad request. Anything else for a bad request is a bug.
REFUSALS = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    }
)
ACCEPTABLE = REFUSALS | {grpc.StatusCode.OK}
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
BIG_MESSAGES = [
    ("grpc.max_send_message_length", 256 * 1024 * 1024),
    ("grpc.max_receive_message_length", 256 * 1024 * 1024),
]


# --- processes -----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def server_env(
    store_dir: Path,
    *,
    grace_seconds: float = 5.0,
    preload: str = "efficientnet_lite0",
    image_size: int = 64,
    metrics: bool = False,
    extra: dict[str, str] | None = None,
) -> dict[str, str]:
    """TRANSFER_* environment for a loopback `python -m transfer_service` on fresh ports."""
    env = dict(os.environ)
    env.update(
        TRANSFER_HOST="127.0.0.1",
        TRANSFER_PORT=str(free_port()),
        TRANSFER_METRICS_PORT=str(free_port()) if metrics else "-1",
        TRANSFER_STORE_DIR=str(store_dir),
        TRANSFER_IMAGE_SIZE=str(image_size),
        TRANSFER_PRELOAD_BACKBONES=preload,
        TRANSFER_GRACE_SECONDS=str(grace_seconds),
        TRANSFER_WEIGHTS_DIR=str(store_dir.parent / "no-weights"),
    )
    # fp32 unless the caller's environment says otherwise: replicas and restarts are compared
    # answer for answer, and TRANSFER_PRECISION=auto may choose differently on replicas that
    # measure at once (bf16 answers also vary with the batch by ~1e-5).
    env.setdefault("TRANSFER_PRECISION", "fp32")
    # No background compile (TRANSFER_COMPILE=auto) either: it swaps paths mid-run and eats
    # the cores the runs measure.
    env.setdefault("TRANSFER_COMPILE", "false")
    env.update(extra or {})
    return env


class ServerProcess:
    """`python -m transfer_service` as `make run` starts it, its output appended to a log
    file."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.env = env
        self.port = int(env["TRANSFER_PORT"])
        self.address = f"127.0.0.1:{self.port}"
        self.log_path = log_path
        self._log = open(log_path, "ab")  # noqa: SIM115 - closed in close()
        self.started = time.monotonic()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "transfer_service"],
            cwd=REPO,
            env=env,
            stdout=self._log,
            stderr=self._log,
        )

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def wait_serving(self, timeout: float = 180.0) -> float:
        """Seconds from spawn until health reads SERVING; raises if it dies or times out."""
        deadline = time.monotonic() + timeout
        with grpc.insecure_channel(self.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                if not self.alive():
                    raise RuntimeError(
                        f"server exited with {self.process.returncode} before SERVING:\n"
                        + self.log_tail()
                    )
                with contextlib.suppress(grpc.RpcError):
                    response = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=2)
                    if response.status == SERVING:
                        return time.monotonic() - self.started
                time.sleep(0.1)
        raise TimeoutError(f"server not SERVING within {timeout}s:\n{self.log_tail()}")

    def kill(self) -> None:
        """SIGKILL: no handler runs, nothing is flushed or cleaned up."""
        if self.alive():
            self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=30)

    def terminate(self, timeout: float = 60.0) -> int:
        """SIGTERM and wait for the exit code."""
        if self.alive():
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise

    def close(self) -> None:
        if self.alive():
            self.kill()
        self._log.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.close()


def rss_bytes(pid: int) -> int:
    """Resident set size of a process, from /proc/<pid>/status (VmRSS)."""
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def health_status(address: str, timeout: float = 5.0) -> int | None:
    """The server-wide health status, or None when the server does not answer."""
    try:
        with grpc.insecure_channel(address) as channel:
            response = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=timeout
            )
            return int(response.status)
    except grpc.RpcError:
        return None


# --- calls -----------------------------------------------------------------------------------


def _identity(data: bytes) -> bytes:
    return data


def raw_call(channel: grpc.Channel, method: str) -> Any:
    """A multi-callable for `method` that sends bytes exactly as given (no serialisation)."""
    descriptor = METHODS[method]
    path = f"/{SERVICE}/{method}"
    if descriptor.client_streaming:
        return channel.stream_unary(path, _identity, None)
    if descriptor.server_streaming:
        return channel.unary_stream(path, _identity, None)
    return channel.unary_unary(path, _identity, None)


@dataclass
class Outcome:
    """How one call ended: status, details, and the response(s) when it succeeded."""

    code: grpc.StatusCode
    details: str
    responses: list[Any] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.code == grpc.StatusCode.OK


def invoke(
    stub: pb_grpc.TransferServiceStub, method: str, request: Any, timeout: float = 60.0
) -> Outcome:
    """Calls any method of the service; streams are read to the end. `request` is a message,
    or for UploadDataset an iterable of messages."""
    started = time.monotonic()
    callable_ = getattr(stub, method)
    descriptor = METHODS[method]
    try:
        if descriptor.client_streaming:
            responses = [callable_(iter(request), timeout=timeout)]
        elif descriptor.server_streaming:
            responses = list(callable_(request, timeout=timeout))
        else:
            responses = [callable_(request, timeout=timeout)]
    except grpc.RpcError as error:
        return Outcome(
            error.code(),  # type: ignore[attr-defined]
            error.details() or "",  # type: ignore[attr-defined]
            seconds=time.monotonic() - started,
        )
    return Outcome(grpc.StatusCode.OK, "", responses, time.monotonic() - started)


def invoke_raw(
    channel: grpc.Channel, method: str, payload: bytes | list[bytes], timeout: float = 30.0
) -> Outcome:
    """Like `invoke`, but the request is raw bytes (a list of chunks for UploadDataset)."""
    started = time.monotonic()
    callable_ = raw_call(channel, method)
    descriptor = METHODS[method]
    try:
        if descriptor.client_streaming:
            chunks = payload if isinstance(payload, list) else [payload]
            responses = [callable_(iter(chunks), timeout=timeout)]
        elif descriptor.server_streaming:
            assert isinstance(payload, bytes)
            responses = list(callable_(payload, timeout=timeout))
        else:
            responses = [callable_(payload, timeout=timeout)]
    except grpc.RpcError as error:
        return Outcome(
            error.code(),  # type: ignore[attr-defined]
            error.details() or "",  # type: ignore[attr-defined]
            seconds=time.monotonic() - started,
        )
    return Outcome(grpc.StatusCode.OK, "", responses, time.monotonic() - started)


def terminal_event(events: Iterable[pb.FineTuneEvent]) -> pb.FineTuneEvent | None:
    last = None
    for event in events:
        last = event
    if last is None or last.WhichOneof("event") not in ("completed", "failed", "cancelled"):
        return None
    return last


def problems_with_stream(events: list[pb.FineTuneEvent]) -> list[str]:
    """What is wrong with a finished FineTune/WatchJob stream: gaps, no terminal event, a
    job that failed as INTERNAL (a bug) or with a traceback."""
    problems = []
    sequences = [event.sequence for event in events]
    if sequences and sequences != list(range(sequences[0], sequences[0] + len(sequences))):
        problems.append(f"event sequences are not contiguous: {sequences[:20]}")
    kinds = [event.WhichOneof("event") for event in events]
    ends = [i for i, kind in enumerate(kinds) if kind in ("completed", "failed", "cancelled")]
    if ends and ends[0] != len(events) - 1:
        problems.append(f"events after the terminal one: {kinds[ends[0] :][:5]}")
    last = terminal_event(events)
    if events and last is None:
        problems.append("stream ended without a terminal event")
    if last is not None and last.WhichOneof("event") == "failed":
        if last.failed.code in ("INTERNAL", "UNKNOWN", ""):
            problems.append(f"job failed as {last.failed.code!r}: {last.failed.reason}")
        if "Traceback" in last.failed.reason:
            problems.append("job failure reason carries a traceback")
    return problems


# --- inputs ----------------------------------------------------------------------------------


def png(width: int, height: int, mode: str = "L", seed: int = 0) -> bytes:
    """A real PNG of random pixels."""
    rng = random.Random(seed)
    image = Image.new(mode, (width, height))
    if width * height <= 4096:
        bands = len(image.getbands())
        pixels: list[Any] = [
            tuple(rng.randrange(256) for _ in range(bands)) if bands > 1 else rng.randrange(256)
            for _ in range(width * height)
        ]
        image.putdata(pixels)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def encoded(image: Image.Image, fmt: str, **options: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def bomb_png(width: int, height: int) -> bytes:
    """A small PNG (kilobytes) whose header declares width x height pixels."""
    return encoded(Image.new("1", (width, height)), "PNG", optimize=True)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_with_header(width: int, height: int, *, idat: bytes = b"") -> bytes:
    """A hand-built 8-bit greyscale PNG declaring any size (even 0 or 2^31-1)."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    body = idat or zlib.compress(b"\x00" * 8)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", body)
        + _png_chunk(b"IEND", b"")
    )


def gif_with_header(width: int, height: int) -> bytes:
    """A GIF header and one image descriptor declaring width x height, no real pixel data."""
    screen = struct.pack("<HHBBB", width, height, 0x80, 0, 0) + b"\x00\x00\x00\xff\xff\xff"
    descriptor = b"\x2c" + struct.pack("<HHHHB", 0, 0, width, height, 0)
    return b"GIF89a" + screen + descriptor + b"\x02\x02\x44\x01\x00\x3b"


def random_bytes(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


# --- misc -------------------------------------------------------------------------------------


def wait_until(condition: Callable[[], bool], timeout: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(interval)
    return condition()


@contextlib.contextmanager
def channel_to(address: str) -> Iterator[grpc.Channel]:
    channel = grpc.insecure_channel(address, options=BIG_MESSAGES)
    try:
        yield channel
    finally:
        channel.close()


def percentile(values: list[float], fraction: float) -> float:
    """Nearest-rank percentile (0 for no values)."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = min(len(ordered), max(1, math.ceil(fraction * len(ordered))))
    return ordered[rank - 1]
