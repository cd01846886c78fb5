"""TRANSFER_COMPILE=auto on this machine (issue 20): time from SERVING to each backbone's swap,
a victim's single-image Predict latency before / during / after the background build, and
served Predict throughput (8 callers, 1 PNG per call) before and after the swap.

    [TRANSFER_PRECISION=fp32] .venv/bin/python -m bench.background_upgrade [--niceness N]

A real server in this process at the default image size (TRANSFER_PRECISION=auto unless
set), an empty inductor cache (a fresh machine's first start) and a fresh store. The
upgrader is held back until the "before" figures are taken, then started as the server
starts it at SERVING.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path

from transfer_client import TrainingConfig, TransferClient

PHASE_S = 15.0
THROUGHPUT_S = 10.0
CALLERS = 8


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--niceness", type=int, default=None)
    parser.add_argument("--image-size", type=int, default=None)
    parser.add_argument("--swap-timeout", type=float, default=900.0)
    parser.add_argument(
        "--work",
        type=Path,
        help="an earlier run's folder (printed): its store and inductor cache, a restart",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    for name in ("transfer_service.backbones", "transfer_service.backbones.int8_stages"):
        logging.getLogger(name).setLevel(logging.INFO)
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-upgrade-"))
    print("work folder:", work)
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(work / "inductor"))

    from transfer_service.app import build_application

    from tests.conftest import make_settings
    from tests.datasets import fashion_mnist

    settings = make_settings(
        work / "store",
        image_size=args.image_size,
        precision=os.environ.get("TRANSFER_PRECISION", "auto"),
        compile="auto",
        metrics_port=-1,
        log_level="INFO",
        preload_backbones=["efficientnet_lite0", "minilm_l6"],
    )
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()

    def call(coroutine: object) -> object:
        return asyncio.run_coroutine_threadsafe(coroutine, loop).result()  # type: ignore[arg-type]

    async def build() -> object:
        return build_application(settings)

    app = call(build())
    upgrader = app.upgrader  # type: ignore[attr-defined]
    app.upgrader = None  # type: ignore[attr-defined]
    if args.niceness is not None:
        upgrader._niceness = args.niceness
    call(app.start())  # type: ignore[attr-defined]
    address = f"127.0.0.1:{app.port}"  # type: ignore[attr-defined]
    images = [image for image, _ in fashion_mnist(10, classes=4, seed=5)]
    with TransferClient(address, timeout=300) as client:
        head = client.train(
            "efficientnet_lite0",
            fashion_mnist(10, classes=4, seed=1),
            config=TrainingConfig(epochs=3, seed=1),
        ).head_id
    print(f"load {os.getloadavg()[0]:.1f}; backbones:", _paths(app))
    before_rate = throughput(address, head, images)
    latencies: list[tuple[float, float]] = []
    stop = threading.Event()
    victim = threading.Thread(target=single_caller, args=(address, head, images, latencies, stop))
    victim.start()
    time.sleep(PHASE_S)
    started = time.monotonic()
    upgrader.start()
    swapped: dict[str, float] = {}
    while time.monotonic() - started < args.swap_timeout:
        if upgrader.wait_idle(0.5):
            break
        for status in app.backbones.statuses():  # type: ignore[attr-defined]
            loaded = status.loaded
            if loaded and loaded.serving and len(loaded.serving.history()) > 1:
                swapped.setdefault(loaded.name, time.monotonic() - started)
    finished = time.monotonic()
    for status in app.backbones.statuses():  # type: ignore[attr-defined]
        loaded = status.loaded
        if loaded and loaded.serving and len(loaded.serving.history()) > 1:
            swapped.setdefault(loaded.name, finished - started)
    time.sleep(PHASE_S)
    stop.set()
    victim.join()
    after_rate = throughput(address, head, images)
    before = [s for t, s in latencies if t < started]
    during = [s for t, s in latencies if started <= t < finished]
    after = [s for t, s in latencies if t >= finished]
    print(f"niceness {args.niceness}; load {os.getloadavg()[0]:.1f}")
    print(f"upgrade work: {finished - started:.1f} s; swaps after SERVING: {swapped}")
    print("backbones:", _paths(app))
    for name, values in (("before", before), ("during", during), ("after", after)):
        if values:
            p50 = statistics.median(values) * 1000
            print(f"victim single-image p50 {name}: {p50:.1f} ms ({len(values)} calls)")
    print(
        f"served Predict, {CALLERS} callers x 1 PNG: before {before_rate:.1f} img/s, "
        f"after {after_rate:.1f} img/s"
    )
    call(app.stop())  # type: ignore[attr-defined]


def _paths(app: object) -> str:
    rows = []
    for status in app.backbones.statuses():  # type: ignore[attr-defined]
        loaded = status.loaded
        if loaded is not None and loaded.serving is not None:
            path = loaded.serving.current
            rows.append(f"{loaded.name} {path.description} {path.inputs_per_second:.1f}/s")
    return "; ".join(rows)


def single_caller(
    address: str,
    head: str,
    images: list[bytes],
    latencies: list[tuple[float, float]],
    stop: threading.Event,
) -> None:
    with TransferClient(address, timeout=300) as client:
        index = 0
        while not stop.is_set():
            started = time.monotonic()
            client.predict(head, images[index % len(images)])
            latencies.append((started, time.monotonic() - started))
            index += 1
            stop.wait(0.05)


def throughput(address: str, head: str, images: list[bytes]) -> float:
    done = [0] * CALLERS
    deadline = time.monotonic() + THROUGHPUT_S

    def caller(slot: int) -> None:
        with TransferClient(address, timeout=300) as client:
            index = slot
            while time.monotonic() < deadline:
                client.predict(head, images[index % len(images)])
                done[slot] += 1
                index += 1

    threads = [threading.Thread(target=caller, args=(n,)) for n in range(CALLERS)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sum(done) / (time.monotonic() - started)


if __name__ == "__main__":
    main()
