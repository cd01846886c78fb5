"""Callers that keep predicting while a server swaps a backbone's serving path in the
background (tests/grpc/test_compiled_swap.py, tests/grpc/test_int8_swap.py): every answer is
kept with when its call began and ended, every failure whatever it is, and when ListBackbones
last showed the old path and first showed the new one."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from transfer_client import TransferClient

from tests.conftest import RunningServer

PAUSE_S = 0.05  # between one caller's calls: back to back, the callers fill both CI cores
AFTER_SWAP_S = 3.0


@dataclass
class SwapRun:
    answers: list[tuple[float, float, int, Any]] = field(
        default_factory=list
    )  # (begun, done, input index, answer)
    failures: list[BaseException] = field(default_factory=list)
    swapped_at: float | None = None  # when ListBackbones first showed the new path
    unswapped_at: float = 0.0  # when the last ListBackbones that did not show it began
    backbone: Any = None  # the backbone's ListBackbones entry after the callers stopped


def predict_during_swap(
    server: RunningServer,
    backbone_name: str,
    inputs: Sequence[Any],
    predict: Callable[[TransferClient, Any], Any],
    swapped: Callable[[Any], bool],
    *,
    callers: int,
    swap_timeout_s: float,
) -> SwapRun:
    """`callers` threads predict `inputs` in turn until `swapped(backbone entry)` and
    AFTER_SWAP_S more (or `swap_timeout_s`, or the first failure)."""
    run = SwapRun()
    stop = threading.Event()

    def caller(offset: int) -> None:
        with TransferClient(server.address, timeout=120) as client:
            index = offset
            while not stop.is_set():
                input_index = index % len(inputs)
                index += 1
                begun = time.monotonic()
                try:
                    answer = predict(client, inputs[input_index])
                    run.answers.append((begun, time.monotonic(), input_index, answer))
                except BaseException as exc:  # every failure counts, whatever it is
                    run.failures.append(exc)
                stop.wait(PAUSE_S)

    threads = [threading.Thread(target=caller, args=(n,), daemon=True) for n in range(callers)]
    try:
        for thread in threads:
            thread.start()
        with TransferClient(server.address, timeout=120) as client:
            deadline = time.monotonic() + swap_timeout_s
            while run.swapped_at is None and time.monotonic() < deadline and not run.failures:
                asked = time.monotonic()
                (backbone,) = [b for b in client.list_backbones() if b.name == backbone_name]
                if swapped(backbone):
                    run.swapped_at = time.monotonic()
                else:
                    run.unswapped_at = asked
                    time.sleep(0.5)
            time.sleep(AFTER_SWAP_S)
            stop.set()
            for thread in threads:
                thread.join(timeout=120)
            (run.backbone,) = [b for b in client.list_backbones() if b.name == backbone_name]
    finally:
        stop.set()
    return run
