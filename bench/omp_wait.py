"""OpenMP waiting: Predict latency with torch's OpenMP threads spinning at barriers
(libgomp's default: spin up to GOMP_SPINCOUNT, 300,000 turns, then sleep; the variable set
empty, which libgomp ignores and the server does not fill in) against sleeping at once
(OMP_WAIT_POLICY=PASSIVE, the server's default), each alone on the machine and beside one
busy process (a CPU-bound loop standing in for any neighbour: another pod, a build, a
training job).

Each variant runs in a fresh child process (libgomp reads the variable once, when torch
loads): an in-process server with minilm_l6, a head, then interleaved rounds of one 32-text
Predict (a large request: sliced into chunks) and 10 single-text Predicts. Reported: the
medians over the rounds, and passive / spinning ratios side by side.

    .venv/bin/python -m bench.omp_wait [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import median, table

REPO = Path(__file__).resolve().parent.parent
CHILD = """
import json, sys, tempfile, time
from pathlib import Path
from tests.conftest import make_settings, start_server
from tests.datasets import bbc_news
from transfer_client import TransferClient

rounds = int(sys.argv[1])
server = start_server(
    make_settings(Path(tempfile.mkdtemp()) / "store", preload_backbones=["minilm_l6"])
)
try:
    with TransferClient(server.address, timeout=600) as client:
        head = client.train("minilm_l6", bbc_news(6, seed=1)).head_id
        texts = [f"news number {i} about markets, sport and the weather" for i in range(32)]
        client.predict(head, texts[:8])
        large, single = [], []
        for _ in range(rounds):
            started = time.perf_counter()
            client.predict(head, texts)
            large.append(time.perf_counter() - started)
            for i in range(10):
                started = time.perf_counter()
                client.predict(head, texts[i])
                single.append(time.perf_counter() - started)
    print(json.dumps({"large": large, "single": single}))
finally:
    server.stop()
"""


def run_variant(policy: str, busy: bool, rounds: int) -> dict[str, list[float]]:
    env = dict(
        os.environ,
        OMP_WAIT_POLICY=policy,
        PYTHONPATH=os.pathsep.join([str(REPO / "service"), str(REPO / "client"), str(REPO)]),
    )
    burner = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
    try:
        with tempfile.TemporaryDirectory():
            out = subprocess.run(
                [sys.executable, "-c", CHILD, str(rounds)],
                env=env,
                cwd=REPO,
                capture_output=True,
                text=True,
                timeout=1800,
                check=True,
            )
    finally:
        if burner is not None:
            burner.kill()
            burner.wait()
    result: dict[str, list[float]] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    print(f"load before: {os.getloadavg()[0]:.2f}", flush=True)
    rows = []
    for busy in (False, True):
        figures = {}
        for policy in ("", "PASSIVE"):
            started = time.monotonic()
            got = run_variant(policy, busy, args.rounds)
            figures[policy] = (median(got["large"]), median(got["single"]))
            print(
                f"{policy or 'default'} busy={busy}: 32 texts {figures[policy][0] * 1000:.0f} ms, "
                f"1 text p50 {figures[policy][1] * 1000:.1f} ms "
                f"({time.monotonic() - started:.0f} s)",
                flush=True,
            )
        active, passive = figures[""], figures["PASSIVE"]
        rows.append(
            [
                "one busy process beside it" if busy else "alone",
                f"{active[0] * 1000:.0f} / {passive[0] * 1000:.0f}",
                f"{passive[0] / active[0]:.2f}",
                f"{active[1] * 1000:.1f} / {passive[1] * 1000:.1f}",
                f"{passive[1] / active[1]:.2f}",
            ]
        )
    print(f"load after: {os.getloadavg()[0]:.2f}")
    print(
        table(
            [
                "machine",
                "32-text Predict ms, spinning / passive",
                "passive / spinning",
                "1-text Predict p50 ms, spinning / passive",
                "passive / spinning",
            ],
            rows,
        )
    )


if __name__ == "__main__":
    main()
