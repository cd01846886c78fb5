"""Noisy neighbour (issue 15): one tenant's single-image Predict latency while another
tenant sends each of the attacks that used to stop, stall or kill the server.

For each attack a fresh server process (`python -m transfer_service`, bearer auth on, two tenants,
one store shared by all of them) serves a victim caller in a child process: sequential
single-image Predicts on the victim's own head, first with nothing else running (idle), then
while the attacker's calls run. The ratios are the attack's p50 and p99 over the same
server's idle ones, so drift between servers cancels. A server is killed after its attack
(a wedged one could not stop by itself). Also reported: the victim's failed calls, whether the
server was still SERVING at the end, and its peak RSS.

Target: victim p99 during every attack within 2x of idle.

    .venv/bin/python -m bench.noisy_neighbour [--seconds 12] [--only eps,large_images]
        [--repeats 2]

With --repeats N each attack is measured N times (a fresh server each, rows in turn), and
its row gives the median ratios; the 1-minute load average at each attack's start is in the
last column (the machine may be shared).
"""

from __future__ import annotations

import argparse
import io
import multiprocessing
import os
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import grpc
from PIL import Image
from transfer_client.proto import transfer_service_pb2 as pb
from transfer_client.proto import transfer_service_pb2_grpc as pb_grpc

from bench.common import Environment, median, percentile, table
from tests.datasets import bbc_news, fashion_mnist
from tools.reliability.common import (
    BIG_MESSAGES,
    SERVING,
    ServerProcess,
    health_status,
    server_env,
)

VICTIM_TOKEN = "victim-token-0123456789"
ATTACKER_TOKEN = "attacker-token-0123456789"
VICTIM_CALL_TIMEOUT_S = 10.0
EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n{ } loop\n"


def _auth(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


# --- the victim (a spawned child process; module-level, pickled by reference) -----------


def victim_predicts(address: str, head_id: str, image: bytes, seconds: float) -> list[float]:
    """Sequential single-image Predicts for `seconds`; a failed call counts as -1."""
    latencies: list[float] = []
    request = pb.PredictRequest(head_id=head_id, inputs=[pb.Input(image=image)])
    with grpc.insecure_channel(address, options=BIG_MESSAGES) as channel:
        stub = pb_grpc.TransferServiceStub(channel)
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            started = time.perf_counter()
            try:
                stub.Predict(request, timeout=VICTIM_CALL_TIMEOUT_S, metadata=_auth(VICTIM_TOKEN))
                latencies.append(time.perf_counter() - started)
            except grpc.RpcError:
                latencies.append(-1.0)
    return latencies


# --- the attacks (threads of this process, as the attacking tenant) ----------------------


@dataclass(frozen=True, slots=True)
class Heads:
    victim_image: str
    attacker_image: str
    attacker_text: str


def _one_bit_png(side: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("1", (side, side)).save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def _tiny_png(seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.frombytes("L", (8, 8), bytes((seed * 31 + i) % 256 for i in range(64))).save(
        buffer, format="PNG"
    )
    return buffer.getvalue()


Attack = Callable[[pb_grpc.TransferServiceStub, Heads, float], str]


def attack_eps(stub: pb_grpc.TransferServiceStub, heads: Heads, seconds: float) -> str:
    """A 60-byte EPS in a Predict, again and again: refused by its leading bytes, and each
    INVALID_ARGUMENT costs the attacker five admission tokens (edge/tenant_admission.py)."""
    request = pb.PredictRequest(head_id=heads.attacker_image, inputs=[pb.Input(image=EPS)])
    return _predicts(stub, request, seconds)


def attack_large_images(stub: pb_grpc.TransferServiceStub, heads: Heads, seconds: float) -> str:
    """512 1-bit PNGs of 4000 x 4000 pixels in one Predict (a few MB on the wire), on the
    attacker's lite0 head: the victim's backbone and input size, so one batcher serves both
    and the victim's request runs between two segments of the attacker's chunk
    (predict/segmented_pass.py) rather than on another backbone's turn."""
    image = _one_bit_png(4000)
    request = pb.PredictRequest(
        head_id=heads.attacker_image, inputs=[pb.Input(image=image) for _ in range(512)]
    )
    return _predicts(stub, request, seconds)


def attack_long_texts(stub: pb_grpc.TransferServiceStub, heads: Heads, seconds: float) -> str:
    """512 texts of 120 KB in one Predict."""
    words = " ".join(text for text, _ in bbc_news(4))
    text = (words * (120_000 // len(words) + 1))[:120_000]
    request = pb.PredictRequest(
        head_id=heads.attacker_text, inputs=[pb.Input(text=text) for _ in range(512)]
    )
    return _predicts(stub, request, seconds)


def attack_many_tiny_images(stub: pb_grpc.TransferServiceStub, heads: Heads, seconds: float) -> str:
    """A linear-probe FineTune of 8,000 8 x 8 PNGs (a 2 MB request)."""
    examples = [pb.Example(image=_tiny_png(i), label=f"c{i % 2}") for i in range(8000)]
    request = pb.FineTuneRequest(backbone="efficientnet_lite0", head_name="tiny", examples=examples)
    return _fine_tune(stub, request, seconds)


def attack_many_classes(stub: pb_grpc.TransferServiceStub, heads: Heads, seconds: float) -> str:
    """10,000 classes of one 8 x 8 PNG each (a 200 KB request)."""
    examples = [pb.Example(image=_tiny_png(i), label=f"class-{i}") for i in range(10_000)]
    request = pb.FineTuneRequest(
        backbone="efficientnet_lite0", head_name="classes", examples=examples
    )
    return _fine_tune(stub, request, seconds)


def _fine_tune(
    stub: pb_grpc.TransferServiceStub, request: pb.FineTuneRequest, seconds: float
) -> str:
    started = time.monotonic()
    job_id = ""
    try:
        for event in stub.FineTune(request, timeout=seconds, metadata=_auth(ATTACKER_TOKEN)):
            job_id = event.job_id or job_id
            kind = event.WhichOneof("event")
            if kind in ("completed", "failed", "cancelled"):
                return f"job {kind} after {time.monotonic() - started:.1f} s"
    except grpc.RpcError as error:
        if error.code() is not grpc.StatusCode.DEADLINE_EXCEEDED:
            return f"{error.code().name} after {time.monotonic() - started:.2f} s"
    if job_id:
        try:
            stub.CancelJob(
                pb.CancelJobRequest(job_id=job_id), timeout=5, metadata=_auth(ATTACKER_TOKEN)
            )
        except grpc.RpcError as error:
            return f"still running at {seconds:.0f} s; cancel: {error.code().name}"
        return f"still running at {seconds:.0f} s; cancelled"
    return f"still running at {seconds:.0f} s"


def _predicts(stub: pb_grpc.TransferServiceStub, request: pb.PredictRequest, seconds: float) -> str:
    """The attacker's Predict, again and again for `seconds`."""
    return _repeat(
        lambda timeout: stub.Predict(request, timeout=timeout, metadata=_auth(ATTACKER_TOKEN)),
        seconds,
    )


def _repeat(call: Callable[[float], object], seconds: float) -> str:
    """Calls `call(timeout)` until `seconds` pass; counts outcomes by status."""
    end = time.monotonic() + seconds
    outcomes: dict[str, int] = {}
    while (remaining := end - time.monotonic()) > 0.05:
        try:
            call(remaining)
            name = "OK"
        except grpc.RpcError as error:
            name = error.code().name
        outcomes[name] = outcomes.get(name, 0) + 1
    return ", ".join(f"{count} {name}" for name, count in sorted(outcomes.items()))


ATTACKS: dict[str, Attack] = {
    "eps": attack_eps,
    "large_images": attack_large_images,
    "long_texts": attack_long_texts,
    "many_tiny_images": attack_many_tiny_images,
    "many_classes": attack_many_classes,
}


# --- the benchmark -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Outcome:
    attack: str
    idle: list[float]
    during: list[float]
    attacker: str
    serving_after: bool
    peak_rss_mb: float
    load_at_start: float = 0.0


def _env(store: Path) -> dict[str, str]:
    return server_env(
        store,
        preload="efficientnet_lite0,minilm_l6",
        image_size=224,
        extra={
            "TRANSFER_AUTH_TOKENS": f"{VICTIM_TOKEN}=victim,{ATTACKER_TOKEN}=attacker",
            "TRANSFER_LOG_LEVEL": "WARNING",
        },
    )


def _train_heads(address: str) -> Heads:
    def train(token: str, backbone: str, examples: list[pb.Example], name: str) -> str:
        with grpc.insecure_channel(address, options=BIG_MESSAGES) as channel:
            stub = pb_grpc.TransferServiceStub(channel)
            request = pb.FineTuneRequest(backbone=backbone, head_name=name, examples=examples)
            for event in stub.FineTune(request, timeout=600, metadata=_auth(token)):
                if event.WhichOneof("event") == "completed":
                    return str(event.completed.head_id)
                if event.WhichOneof("event") == "failed":
                    raise RuntimeError(f"training {name}: {event.failed.reason}")
        raise RuntimeError(f"training {name}: the stream ended without a result")

    images = [pb.Example(image=x, label=y) for x, y in fashion_mnist(10, seed=1, classes=4)]
    texts = [pb.Example(text=x, label=y) for x, y in bbc_news(6, seed=1)]
    return Heads(
        victim_image=train(VICTIM_TOKEN, "efficientnet_lite0", images, "victim"),
        attacker_image=train(ATTACKER_TOKEN, "efficientnet_lite0", images, "attacker"),
        attacker_text=train(ATTACKER_TOKEN, "minilm_l6", texts, "attacker-text"),
    )


def _peak_rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _measure(
    name: str,
    attack: Attack,
    store: Path,
    heads: Heads,
    victim_image: bytes,
    seconds: float,
    victims: ProcessPoolExecutor,
) -> Outcome:
    load = os.getloadavg()[0]
    with ServerProcess(_env(store), store / f"server-{name}.log") as server:
        server.wait_serving()
        victims.submit(
            victim_predicts, server.address, heads.victim_image, victim_image, 2.0
        ).result()
        idle = victims.submit(
            victim_predicts, server.address, heads.victim_image, victim_image, seconds
        ).result()
        during_call = victims.submit(
            victim_predicts, server.address, heads.victim_image, victim_image, seconds
        )
        attacker_result: list[str] = []

        def run_attack() -> None:
            with grpc.insecure_channel(server.address, options=BIG_MESSAGES) as channel:
                attacker_result.append(attack(pb_grpc.TransferServiceStub(channel), heads, seconds))

        attacker = threading.Thread(target=run_attack, name=f"attack-{name}")
        attacker.start()
        during = during_call.result()
        attacker.join(timeout=seconds + 60)
        serving = server.alive() and health_status(server.address, timeout=5) == SERVING
        rss = _peak_rss_mb(server.pid) if server.alive() else 0.0
    outcome = Outcome(
        name,
        idle,
        during,
        attacker_result[0] if attacker_result else "attacker still blocked",
        serving,
        rss,
        load,
    )
    print(f"  {name}: {_row(outcome)}", flush=True)
    return outcome


def _ok(latencies: list[float]) -> list[float]:
    return [value for value in latencies if value >= 0]


def _row(outcome: Outcome) -> list[str]:
    idle, during = _ok(outcome.idle), _ok(outcome.during)
    failed = len(outcome.during) - len(during)
    if not during:
        return [
            outcome.attack,
            "-",
            "-",
            "no call answered",
            f"{failed}",
            "-",
            "-",
            outcome.attacker,
            f"{outcome.load_at_start:.1f}",
        ]
    idle50, idle99 = percentile(idle, 50), percentile(idle, 99)
    p50, p99 = percentile(during, 50), percentile(during, 99)
    ratio = p99 / idle99
    return [
        outcome.attack,
        f"{idle50 * 1e3:.1f} / {idle99 * 1e3:.1f}",
        f"{p50 * 1e3:.1f} / {p99 * 1e3:.1f}",
        f"{p50 / idle50:.2f} / {ratio:.2f} ({'met' if ratio <= 2.0 else 'missed'})",
        f"{failed} of {len(outcome.during)}",
        "yes" if outcome.serving_after else "NO",
        f"{outcome.peak_rss_mb:.0f}",
        outcome.attacker,
        f"{outcome.load_at_start:.1f}",
    ]


def main() -> None:
    arguments = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    arguments.add_argument("--seconds", type=float, default=12.0, help="per phase")
    arguments.add_argument("--only", default="", help="comma-separated attacks (default: all)")
    arguments.add_argument("--repeats", type=int, default=1, help="measurements per attack")
    options = arguments.parse_args()
    chosen = [name for name in options.only.split(",") if name] or list(ATTACKS)
    environment = Environment()
    victim_image = fashion_mnist(1, split="test", seed=9, classes=1)[0][0]
    with tempfile.TemporaryDirectory(prefix="noisy-") as root:
        store = Path(root) / "store"
        store.mkdir()
        with ServerProcess(_env(store), Path(root) / "server-train.log") as server:
            server.wait_serving()
            print("training the victim's and the attacker's heads ...", flush=True)
            heads = _train_heads(server.address)
        context = multiprocessing.get_context("spawn")
        outcomes = []
        with ProcessPoolExecutor(1, mp_context=context) as victims:
            for name in chosen * options.repeats:
                outcomes.append(
                    _measure(
                        name, ATTACKS[name], store, heads, victim_image, options.seconds, victims
                    )
                )
    headers = [
        "attack",
        "idle p50 / p99 ms",
        "during p50 / p99 ms",
        "p50 / p99 ratio (target p99 <= 2)",
        "victim calls failed",
        "SERVING after",
        "server peak RSS MB",
        "attacker's calls",
        "load (1 min) at start",
    ]
    print()
    print(f"## Noisy neighbour, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC")
    print()
    print(environment.markdown("cpu"))
    print()
    print(
        "(The servers run as child processes of their own, killed after each attack, so "
        '"CPU used by other processes" above counts them too.)'
    )
    print()
    print(table(headers, [_row(outcome) for outcome in outcomes]))
    if options.repeats > 1:
        print()
        for name in chosen:
            mine = [o for o in outcomes if o.attack == name and _ok(o.during)]
            p99s = [percentile(_ok(o.during), 99) / percentile(_ok(o.idle), 99) for o in mine]
            p50s = [percentile(_ok(o.during), 50) / percentile(_ok(o.idle), 50) for o in mine]
            listed = ", ".join(f"{ratio:.2f}" for ratio in p99s)
            print(
                f"- {name}: median p50 / p99 ratio {median(p50s):.2f} / {median(p99s):.2f} "
                f"(p99 ratios {listed})"
            )
    met = [
        o
        for o in outcomes
        if _ok(o.during) and percentile(_ok(o.during), 99) <= 2 * percentile(_ok(o.idle), 99)
    ]
    ratios = [
        percentile(_ok(o.during), 99) / percentile(_ok(o.idle), 99)
        for o in outcomes
        if _ok(o.during)
    ]
    print()
    print(f"{len(met)} of {len(outcomes)} attacks met the target; median p99 ratio", end=" ")
    print(f"{median(ratios):.2f}")


if __name__ == "__main__":
    main()
