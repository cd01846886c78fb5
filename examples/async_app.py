"""Serve predictions from an asyncio application with the async client.

One `AsyncTransferClient` (one HTTP/2 connection) is shared by every request of the app;
a semaphore bounds how many Predict calls are in flight, and `asyncio.gather` runs a burst
of requests concurrently, as a web handler receiving them would.

    TRANSFER_TARGET=localhost:50051 python examples/async_app.py HEAD_ID cat.jpg dog.jpg \
        --requests 64 --concurrency 8
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
from collections import Counter
from pathlib import Path

from transfer_client import AsyncTransferClient, Prediction, TransferError


class Classifier:
    """What a request handler calls: one image in, one prediction out."""

    def __init__(self, client: AsyncTransferClient, head: str, concurrency: int) -> None:
        self._client = client
        self._head = head
        self._in_flight = asyncio.Semaphore(concurrency)
        self.latencies: list[float] = []

    async def classify(self, image: Path) -> Prediction:
        async with self._in_flight:
            started = time.perf_counter()
            (prediction,) = await self._client.predict(self._head, [image], top_k=1)
            self.latencies.append(time.perf_counter() - started)
            return prediction


async def serve_burst(head: str, images: list[Path], requests: int, concurrency: int) -> None:
    target = os.environ.get("TRANSFER_TARGET", "localhost:50051")
    async with AsyncTransferClient(target, timeout=30) as client:
        classifier = Classifier(client, head, concurrency)
        burst = [images[i % len(images)] for i in range(requests)]
        started = time.perf_counter()
        # return_exceptions: one refused request (a bad upload) must not sink the others.
        results = await asyncio.gather(
            *(classifier.classify(image) for image in burst), return_exceptions=True
        )
        seconds = time.perf_counter() - started

    answered = [r for r in results if isinstance(r, Prediction)]
    failed = [r for r in results if isinstance(r, TransferError)]
    for error in failed[:3]:
        print(f"refused: {error.code}: {error.message}")
    latencies = sorted(classifier.latencies)
    print(
        f"{len(answered)} of {requests} requests answered in {seconds:.2f} s "
        f"({requests / seconds:.0f}/s, at most {concurrency} in flight); latency "
        f"median {statistics.median(latencies) * 1000:.0f} ms, "
        f"max {latencies[-1] * 1000:.0f} ms"
    )
    per_image = {image.name: result for image, result in zip(burst, results, strict=True)}
    for name, result in sorted(per_image.items()):
        if isinstance(result, Prediction):
            print(f"{name}: {result.label} {result.score:.0%}")
    print("labels:", dict(Counter(p.label for p in answered).most_common()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("head", help="a head id")
    parser.add_argument("images", type=Path, nargs="+")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=8)
    args = parser.parse_args()
    asyncio.run(serve_burst(args.head, args.images, args.requests, args.concurrency))


if __name__ == "__main__":
    main()
